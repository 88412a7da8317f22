#!/usr/bin/env python3
"""Plots a soak's samples (bench/soak): server RSS, kernel slab, open files and tasks over time.

    plot.py samples.csv soak.png
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(source, target):
    rows = list(csv.DictReader(open(source)))
    minutes = [float(r["seconds"]) / 60 for r in rows]
    panels = [
        ("server RSS (MiB)", [int(r["rss_bytes"]) / 2**20 for r in rows]),
        ("kernel slab, machine-wide (MiB)", [int(r["slab_bytes"]) / 2**20 for r in rows]),
        ("server open files", [int(r["open_files"]) for r in rows]),
        ("server tasks (sidecast_tasks)", [int(r["tasks"]) for r in rows]),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 10), sharex=True)
    for ax, (title, values) in zip(axes, panels):
        ax.plot(minutes, values, marker=".", linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(target, dpi=90)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
