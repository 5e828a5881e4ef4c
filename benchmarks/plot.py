"""Charts from the JSON rows of bench_op.py and bench_capture.py (needs matplotlib; skips without it).

    python benchmarks/plot.py                      # reads benchmarks/results/, writes PNGs beside them
    python benchmarks/plot.py --results DIR --out DIR

For each results file: bench_op-<device>.json → bench_op-<device>.png (fraction of the copy ceiling
per shape and dtype, fused op vs torch ops, the 0.90 target drawn); bench_capture-<device>.json →
bench_capture-<device>.png (time relative to a plain forward per model and dtype, 1.01 drawn).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import RESULTS_DIR


def _bars(ax, groups: list[str], series: dict[str, list[float]], target: float, ylabel: str) -> None:
    width = 0.8 / max(len(series), 1)
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, values, width, label=name)
    ax.axhline(target, color="k", linestyle="--", linewidth=1, label=f"target {target}")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _shape(r: dict) -> str:
    return "x".join(map(str, r["shape"])) if "shape" in r else r.get("model", "?")


def plot_op(rows: list[dict], ax) -> None:
    groups, series = [], {"fused_op": [], "torch_ops": []}
    for r in rows:
        key = f"{_shape(r)} {r['dtype']}"
        if key not in groups and "median_s" in r:
            groups.append(key)
    for method in series:
        by = {f"{_shape(r)} {r['dtype']}": r.get("frac_of_copy", 0.0)
              for r in rows if r.get("method") == method}
        series[method] = [by.get(g, 0.0) for g in groups]
    _bars(ax, groups, series, 0.90, "fraction of the copy ceiling")
    ax.set_title(f"capture_block on {rows[0].get('hardware', '?')}")


def plot_capture(rows: list[dict], ax) -> None:
    rows = [r for r in rows if "ratio" in r]  # a capture that failed its check has no time
    groups = list(dict.fromkeys(f"{r['model']} {r['dtype']}" for r in rows))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "forward"]
    series = {}
    for m in methods:
        by = {f"{r['model']} {r['dtype']}": r["ratio"] for r in rows if r["method"] == m}
        series[m] = [by.get(g, 0.0) for g in groups]
    _bars(ax, groups, series, 1.01, "time / plain forward")
    ax.set_title(f"capture during a forward on {rows[0].get('hardware', '?')}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(RESULTS_DIR), help="directory of bench_*.json files")
    p.add_argument("--out", default=None, help="where to write the PNGs (default: --results)")
    args = p.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot.py: skipped: matplotlib is not installed (pip install matplotlib)")
        return 0
    results, out = Path(args.results), Path(args.out or args.results)
    out.mkdir(parents=True, exist_ok=True)
    drawers = {"bench_op": plot_op, "bench_capture": plot_capture}
    for path in sorted(results.glob("bench_*.json")):
        kind = next((k for k in drawers if path.name.startswith(k + "-")), None)
        rows = json.loads(path.read_text())
        if kind is None or not rows:
            continue
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) / 2), 4), layout="constrained")
        drawers[kind](rows, ax)
        png = out / (path.stem + ".png")
        fig.savefig(png, dpi=120)
        plt.close(fig)
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
