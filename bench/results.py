"""What a benchmark run leaves behind: bench/results/<time>-<variant>.json (every figure,
with the machine), .md (the table the README reports) and .png (throughput and p99 latency
per variant, drawn with matplotlib when it is installed)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
STAMP = time.strftime("%Y%m%d-%H%M%S")  # one set of result files per invocation


def machine() -> dict:
    cpu = "unknown"
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                cpu = text.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "kernel": platform.release(), "python": platform.python_version(),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write(results: list[dict], tag: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    m = machine()
    (RESULTS / f"{STAMP}-{tag}.json").write_text(json.dumps({"machine": m, "results": results}, indent=2))
    rows = [f"{m['cpus']} vCPU {m['cpu']}, Linux {m['kernel']}, Python {m['python']}, {m['when']}", "",
            "| run | accepted/s | delivered/s | delivered vs Postfix | p50 ms | p95 ms | p99 ms | CPU ms/msg "
            "| exactly once |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "accepted_per_s" in r:
            ratio = r.get("postfix_ratio", {}).get("delivered", "")
            rows.append(f"| {r['name']} | {r['accepted_per_s']} | {r['delivered_per_s']} | {ratio and f'{ratio}x'} | "
                        f"{r['latency_p50_ms']} | {r.get('latency_p95_ms')} | {r['latency_p99_ms']} | "
                        f"{r['cpu_ms_per_message_site']} | {r['exactly_once']} |")
    for r in results:
        if "drain_per_s" in r:
            rows += ["", f"{r['name']}: " + ", ".join(f"{k} {v}" for k, v in r.items() if k != "name")]
    (RESULTS / f"{STAMP}-{tag}.md").write_text("\n".join(rows) + "\n")
    try:
        plot(results, RESULTS / f"{STAMP}-{tag}.png")
    except ImportError:
        print("(matplotlib is not installed: no plot; pip install matplotlib)")
    print(f"results in {RESULTS}/{STAMP}-{tag}.*")


def plot(results: list[dict], out: Path) -> None:
    """Throughput and p99 latency per variant, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
