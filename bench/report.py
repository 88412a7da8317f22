#!/usr/bin/env python3
"""Turns the RESULT lines of a bench/results/*.txt file into the Markdown tables of BENCHMARKS.md,
then prints each performance target as measured against target, beside the floor (bench/floor's
lines in the same file) or the peer it is measured against. A target whose runs are not in the
file is listed as not measured.

    python3 bench/report.py bench/results/2026-11-28.txt
"""
import json
import re
import sys


FANOUT = re.compile(r"^fanout write\(2\).*?: (\d+) sockets x (\d+) rounds/s.*= ([\d.]+) us per write")
LAST = re.compile(r"to the last frame p50 \d+ us, p99 (\d+) us")
READ = re.compile(r"^receiver: .*= ([\d.]+) us per frame read")
FIRST = re.compile(r"time to the first frame p50 \d+ us, p99 (\d+) us")
PINGPONG = re.compile(r"^pingpong: .*p99 (\d+) us")


class Floor:
    """bench/floor's figures as the file gives them: per (sockets, rate) the µs per write and
    the last frame's p99 in ms, the receiver's µs per frame read (floors measured before the
    receiver printed it have none), and the cross-core ping-pong p99 in ms."""

    def __init__(self):
        self.fanout, self.reads, self.firsts, self.pingpong, self.pending = {}, {}, {}, None, None

    def read(self, line):
        if m := FANOUT.match(line):
            self.pending = (int(m[1]), int(m[2]))
            self.fanout[self.pending] = (float(m[3]), None)
        elif self.pending and (m := LAST.search(line)):
            self.fanout[self.pending] = (self.fanout[self.pending][0], int(m[1]) / 1000)
            if r := READ.match(line):
                self.reads[self.pending] = float(r[1])
            if f := FIRST.search(line):
                self.firsts[self.pending] = int(f[1]) / 1000
            self.pending = None
        elif m := PINGPONG.match(line):
            self.pingpong = int(m[1]) / 1000

    def snapshot(self):
        copy = Floor()
        copy.fanout, copy.reads, copy.firsts = dict(self.fanout), dict(self.reads), dict(self.firsts)
        copy.pingpong = self.pingpong
        return copy


def load(path):
    """The RESULT lines, each with its command and the floor measured last before it."""
    runs, command, floor = [], None, Floor()
    for line in open(path):
        floor.read(line)
        if line.startswith("# ") and "sidecast-bench" in line:
            command = line.strip()
        elif line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["command"] = command or ""
            result["pinned"] = "pinned=1" in (command or "")
            result["floor"] = floor.snapshot()
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


def streamed(r):
    return " (batch API)" if r["peer"] == "centrifugo" else " (PublishStream)"


def cost_verdict(r):
    flags = [f for f, bad in (("generator-bound", r["generator_bound"]), (f"{r['errors']} errors", r["errors"]),
                              ("sender late", r["late"] * 100 > r["published"])) if bad]
    return ", ".join(flags) or "ok"


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
    if "--publish-stream" in r["command"]:
        name += streamed(r)
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
    cost = [r for r in runs if r.get("label") == "publish-cost"]
    if cost:
        print("\n### publish cost, no subscriber (pinned)\n")
        print(table([[r["peer"] + (streamed(r) if "--publish-stream" in r["command"] else ""), f"{r['rate']:g}",
                      f"{r['published'] / r['seconds']:,.0f}", f"{r['server_cpu_us_per_publication']:.1f}",
                      f"{r['generator_cpu'] * 100:.0f}%", cost_verdict(r)]
                     for r in cost],
                    ["server", "pub/s offered", "pub/s", "server CPU-µs / publication", "generator CPU", "verdict"]))
    s5 = [r for r in runs if r.get("scenario") == "s5"]
    if s5:
        print("\n### s5 memory\n")
        print(table([[r["peer"], r.get("phase_label", "s5"), r["slow"], f"{r['rss_peak_growth_bytes'] / 1048576:.1f}", ms(r["others_p99_ms"])] for r in s5],
                    ["server", "phase", "stalled subscribers", "RSS peak growth MiB", "others' p99 ms"]))

    instrument(runs)
    targets(runs)


def sustained(r):
    return not (r["generator_bound"] or r["missing"] or r["gaps"] or r["duplicates"] or r["reordered"]
                or r["p99_ms"] > 250 or (r["published"] and r["late"] * 100 > r["published"]))


def per_publication_us(r):
    """Server CPU-µs per publication of an S4 window (CPU per delivery times deliveries per publication)."""
    return r["server_cpu_s_per_million"] * r["received"] / max(r["published"], 1)


def instrument(runs):
    """The generator's own CPU per delivery beside the floor's receiver reading the same shape:
    how far the instrument is from the cheapest possible reader of those frames."""
    rows = []
    for r in runs:
        if not (r.get("pinned") and r.get("label") == "s2 pad=20" and r["deliveries_per_sec"]):
            continue
        read = r["floor"].reads.get((r["subscribers"], int(r["rate"])))
        if read is None:
            continue
        own = r["generator_cpu"] / r["deliveries_per_sec"] * 1e6
        rows.append([r["peer"], r["subscribers"], f"{r['rate']:g}", f"{own:.2f}", f"{read:.2f}", f"{own / read:.2f}x"])
    if rows:
        print("\n### the generator against the floor's receiver (pinned)\n")
        print(table(rows, ["server", "subs", "pub/s", "generator CPU-µs / delivery",
                           "floor's receiver µs / frame", "ratio"]))


def targets(runs):
    """Each target of the performance work as measured / target, against the floor measured
    last before the run, or the peer."""
    pinned = [r for r in runs if r.get("pinned")]
    rows = []

    def row(name, measured, target, ok, against):
        rows.append([name, measured, target, "met" if ok else "NOT met", against])

    # Single-frame cost: S2 windows whose frames went out one per write, against the bare write.
    for r in pinned:
        if r.get("peer") != "sidecast" or r.get("label") != "s2 pad=20":
            continue
        floor = r["floor"].fanout.get((r["subscribers"], int(r["rate"])))
        if floor and r.get("frames_per_write") and r["frames_per_write"] < 1.05 and sustained(r):
            ratio = r["server_cpu_s_per_million"] / floor[0]
            row(f"S2 single-frame CPU per delivery, {r['subscribers']} x {r['rate']:g}/s",
                f"{r['server_cpu_s_per_million']:.2f} µs = {ratio:.2f}x floor", "<= 1.25x", ratio <= 1.25,
                f"bare write {floor[0]:.2f} µs")
    # Time to the last subscriber, and to the first, at 10 publications/s.
    for r in pinned:
        if r.get("peer") != "sidecast" or r.get("label") != "s3" or r["rate"] != 10:
            continue
        floor, pingpong = r["floor"].fanout.get((r["subscribers"], 10)), r["floor"].pingpong
        if floor and floor[1] and r.get("last_p99_ms"):
            ratio = r["last_p99_ms"] / floor[1]
            row(f"S3 last of {r['subscribers']} p99 at 10/s", f"{ms(r['last_p99_ms'])} ms = {ratio:.2f}x floor",
                "<= 1.5x", ratio <= 1.5, f"floor's last frame p99 {ms(floor[1])} ms")
        if pingpong and r.get("first_p99_ms"):
            ratio = r["first_p99_ms"] / pingpong
            row(f"S3 first of {r['subscribers']} p99 at 10/s", f"{ms(r['first_p99_ms'])} ms = {ratio:.1f}x",
                "<= 2x", ratio <= 2, f"cross-core ping-pong p99 {pingpong:.2f} ms")
        # Not a target: the floor's own fan-out, one bare write per socket, to its first reader.
        first = r["floor"].firsts.get((r["subscribers"], 10))
        if first and r.get("first_p99_ms"):
            rows.append([f"S3 first of {r['subscribers']} p99 at 10/s, against the floor's own first frame",
                         f"{ms(r['first_p99_ms'])} ms = {r['first_p99_ms'] / first:.2f}x", "(none)", "-",
                         f"floor's first frame p99 {ms(first)} ms"])
    # Small rooms: the stream against the unary call, and against Centrifugo's batch API.
    s4 = {}
    for r in pinned:
        if r.get("label", "").startswith("s4") and sustained(r):
            stream = "--publish-stream" in r["command"]
            s4.setdefault((r["peer"], stream, r["rate"]), per_publication_us(r))
    for (peer, stream, rate), us in sorted(s4.items()):
        if peer != "sidecast" or not stream:
            continue
        if unary := s4.get(("sidecast", False, rate)):
            row(f"S4 publications per CPU-second, stream vs unary, {rate:g}/s", f"{unary / us:.2f}x",
                ">= 5x", unary / us >= 5, f"{us:.0f} against {unary:.0f} µs per publication")
        if batch := s4.get(("centrifugo", True, rate)):
            row(f"S4 publications per CPU-second vs Centrifugo's batch API, {rate:g}/s", f"{batch / us:.2f}x",
                ">= 2x", batch / us >= 2, f"{us:.0f} against {batch:.0f} µs per publication")
    # Against Centrifugo at equal work: the same S2 window on both.
    s2 = {}
    for r in pinned:
        if r.get("label", "").startswith("s2") and sustained(r):
            s2[(r["peer"], r["label"], r["subscribers"], r["rate"])] = r
    for (peer, label, subs, rate), r in sorted(s2.items()):
        c = s2.get(("centrifugo", label, subs, rate))
        if peer != "sidecast" or not c:
            continue
        ratio = r["server_cpu_s_per_million"] / c["server_cpu_s_per_million"]
        row(f"{label} {subs} x {rate:g}/s: CPU per delivery vs Centrifugo", f"{ratio:.2f}x", "<= 0.67x",
            ratio <= 2 / 3, f"{r['server_cpu_s_per_million']:.2f} against {c['server_cpu_s_per_million']:.2f} µs")
        row(f"{label} {subs} x {rate:g}/s: p99 vs Centrifugo", f"{ms(r['p99_ms'])} ms", "<= Centrifugo's",
            r["p99_ms"] <= c["p99_ms"], f"{ms(c['p99_ms'])} ms")
    best = {}
    for r in pinned:
        if r.get("label", "").startswith("s2") and sustained(r):
            best[r["peer"]] = max(best.get(r["peer"], 0), r["deliveries_per_sec"])
    if "sidecast" in best and "centrifugo" in best:
        ratio = best["sidecast"] / best["centrifugo"]
        row("highest sustained S2 deliveries/s vs Centrifugo", f"{best['sidecast']:,.0f} = {ratio:.2f}x", ">= 3x",
            ratio >= 3, f"{best['centrifugo']:,.0f}/s (sidecast's may be the generator's limit)")
    s1 = {r["peer"]: r for r in runs if r.get("scenario") == "s1"}
    if "sidecast" in s1 and "centrifugo" in s1:
        a, b = s1["sidecast"]["rss_per_conn"]["held"], s1["centrifugo"]["rss_per_conn"]["held"]
        row("S1 memory per idle connection vs Centrifugo", f"{a:,.0f} B = {a / b:.3f}x", "<= 0.33x", a / b <= 1 / 3,
            f"{b:,.0f} B")
    print("\n### targets\n")
    if rows:
        print(table(rows, ["target", "measured", "target", "verdict", "against"]))
    else:
        print("No run in this file measures a target (bench/floor and the peers must run in the same file).")


if __name__ == "__main__":
    main(sys.argv[1])
