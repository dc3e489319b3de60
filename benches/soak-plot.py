"""Draws a soak CSV (benches/soak.sh) as a PNG: one panel per sampled column over time.

    python benches/soak-plot.py soak.csv soak.png "title"

Each panel's y axis starts at 0, so a flat line reads as flat and a leak as a slope.
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

LABELS = {
    "rss_kib": ("RSS", "MiB", 1 / 1024),
    "fds": ("open descriptors", "", 1),
    "threads": ("threads", "", 1),
    "lag_records": ("lag, all groups", "records", 1),
}


def main(source, target, title):
    with open(source, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        sys.exit(f"{source} holds no samples")
    minutes = [int(r["seconds"]) / 60 for r in rows]
    columns = [c for c in rows[0] if c != "seconds"]
    fig, axes = plt.subplots(len(columns), 1, figsize=(10, 2.2 * len(columns)), sharex=True)
    for ax, column in zip(axes, columns):
        name, unit, scale = LABELS.get(column, (column, "", 1))
        values = [float(r[column]) * scale for r in rows]
        ax.plot(minutes, values, linewidth=1)
        ax.set_ylim(bottom=0, top=max(values) * 1.15 or 1)
        ax.set_ylabel(f"{name}\n({unit})" if unit else name)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("minutes")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(target, dpi=80)


if __name__ == "__main__":
    main(*sys.argv[1:4])
