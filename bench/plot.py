"""A picture of a benchmark run: throughput and p99 latency per variant (matplotlib)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot(results: list[dict], out: Path) -> None:
    runs = [r for r in results if "delivered_per_s" in r]
    if not runs:
        return
    names = [r["name"] for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(runs) + 4), 4.5))
    left.bar(names, [r["delivered_per_s"] or 0 for r in runs], color="#3b6ea5")
    left.set_title("delivered messages per second")
    right.bar(names, [r["latency_p99_ms"] or 0 for r in runs], color="#c0504d")
    right.set_title("p99 latency, 250 to arrival (ms)")
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=30)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
