#!/usr/bin/env python3
"""Turns the RESULT lines of a bench/results/*.txt file into the Markdown tables of BENCHMARKS.md.

    python3 bench/report.py bench/results/2026-11-28.txt
"""
import json
import re
import sys


def load(path):
    runs, command = [], None
    for line in open(path):
        if line.startswith("# ") and "sidecast-bench" in line:
            command = line.strip()
        elif line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["command"] = command or ""
            result["pinned"] = "pinned=1" in (command or "")
            runs.append(result)
    return runs


def ms(v):
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def windows(runs, label_prefix, pinned=True):
    return [r for r in runs if r.get("label", "").startswith(label_prefix) and r["pinned"] == pinned]


def table(rows, header):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def window_row(r):
    flags = []
    if r["generator_bound"]:
        flags.append("generator-bound")
    churn = r["label"].startswith("s4")
    if churn and r["missing"] and not (r["gaps"] or r["duplicates"] or r["reordered"]):
        # Under churn, deliveries expected by connections that the generator itself closed.
        flags.append(f"{r['missing']} owed to churned-away connections, no gaps")
    elif r["missing"] or r["gaps"] or r["duplicates"] or r["reordered"]:
        flags.append(f"missing {r['missing']}, gaps {r['gaps']}, dup {r['duplicates']}, reorder {r['reordered']}")
    if r["p99_ms"] > 250:
        flags.append("p99 > 250 ms")
    if r["published"] and r["late"] * 100 > r["published"]:
        flags.append("sender late")
    name = r["peer"]
    if r["label"].startswith("s5"):
        if "with slow" in r["label"]:
            name += " + stalled"
        else:
            name += {"again": " (none stalled, after)", "middle": " (none stalled, middle)"}.get(
                r["label"].rsplit(", ", 1)[-1], " (none stalled)")
    return [
        name,
        r["subscribers"],
        f"{r['rate']:g}",
        f"{r['deliveries_per_sec']:,.0f}",
        ms(r["p50_ms"]),
        ms(r["p99_ms"]),
        ms(r["p999_ms"]),
        ms(r["last_p99_ms"]) if r["last_p99_ms"] else "-",
        f"{r['server_cpu_s_per_million']:.2f}",
        f"{r['generator_cpu'] * 100:.0f}%",
        ", ".join(flags) or "ok",
    ]


HEADER = ["server", "subs", "pub/s", "deliveries/s", "p50 ms", "p99 ms", "p99.9 ms", "last p99 ms",
          "CPU-s / M", "generator CPU", "verdict"]


def main(path):
    runs = load(path)
    for pinned in (True, False):
        for prefix in ("s2 pad=20", "s2 pad=980", "s3", "s4", "s5"):
            rows = [window_row(r) for r in windows(runs, prefix, pinned)]
            if rows:
                print(f"\n### {prefix} ({'pinned' if pinned else 'unpinned'})\n")
                print(table(rows, HEADER))
    s1 = [r for r in runs if r.get("scenario") == "s1"]
    if s1:
        print("\n### s1\n")
        rows = []
        for r in s1:
            rss, slab = r["rss_per_conn"], r["slab_per_conn_both_ends"]
            rows.append([r["peer"], r["connections"], f"{rss['upgraded']:.0f}", f"{rss['authenticated']:.0f}",
                         f"{rss['subscribed']:.0f}", f"{rss['held']:.0f}", f"{slab['held']:.0f}",
                         f"{r['idle_server_cpu_pct']:.2f}%"])
        print(table(rows, ["server", "connections", "RSS B/conn upgraded", "authenticated", "subscribed",
                           "after 60 s", "kernel slab B/conn (both ends)", "idle CPU"]))
    s6 = [r for r in runs if r.get("scenario") == "s6"]
    if s6:
        print("\n### s6 events (pinned)\n")
        print(table([[r["peer"], r["window"], f"{r['rate']:g}", f"{r['cycles_per_sec']:,.0f}",
                      f"{r['events_per_sec']:,.0f}", f"{r['server_cpu_s_per_1k_cycles']:.3f}",
                      f"{r['generator_cpu'] * 100:.0f}%",
                      "ok" if r["complete"] and not r["gaps"] else "events lost",
                      r["verdict"]] for r in s6],
                    ["server", "window", "cycles/s offered", "cycles/s", "events/s", "CPU-s / 1k cycles",
                     "generator CPU", "events", "verdict"]))
    s5 = [r for r in runs if r.get("scenario") == "s5"]
    if s5:
        print("\n### s5 memory\n")
        print(table([[r["peer"], r.get("phase_label", "s5"), r["slow"], f"{r['rss_peak_growth_bytes'] / 1048576:.1f}", ms(r["others_p99_ms"])] for r in s5],
                    ["server", "phase", "stalled subscribers", "RSS peak growth MiB", "others' p99 ms"]))


if __name__ == "__main__":
    main(sys.argv[1])
