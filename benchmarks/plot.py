"""Bar chart of a model benchmark: real (unpadded) tokens/s per workload, one bar per model.

    python benchmarks/plot.py bench_out/model_bench.json [out.png]

`benchmarks/model.py` calls `plot()` itself after every run; this CLI redraws the chart from a saved JSON (e.g. when
the machine that ran the benchmark has no matplotlib).
"""

import json
import sys
from pathlib import Path

WORKLOAD_ORDER = ["pretrain", "train", "infer", "long", "cpu"]


def plot(results: dict, png_path) -> str | None:
    """Draws results["rows"] to png_path. Returns None on success, else why nothing was drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (redraw later: python benchmarks/plot.py model_bench.json)"

    rows = [r for r in results["rows"] if r.get("tokens_per_s")]
    workloads = [w for w in WORKLOAD_ORDER if any(r["workload"] == w for r in rows)]
    workloads += sorted({r["workload"] for r in rows} - set(workloads))
    if not workloads:
        return "no row has a result to plot"
    models = list(dict.fromkeys(r["model"] for r in rows))
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(models)}

    fig, axes = plt.subplots(1, len(workloads), figsize=(max(6.5, 3.2 * len(workloads) + 1.5), 4.6), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        wrows = [r for r in rows if r["workload"] == workload]
        names = [r["model"] for r in wrows]
        values = [r["tokens_per_s"] / 1e3 for r in wrows]
        bars = ax.bar(range(len(wrows)), values, color=[colours[n] for n in names])
        for bar, value in zip(bars, values):
            ax.annotate(f"{value:,.0f}" if value >= 10 else f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, value),
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(wrows)))
        ax.set_xticklabels(names, rotation=40, ha="right", fontsize=8)
        ax.set_title(f"{workload}\n{results.get('workloads', {}).get(workload, {}).get('desc', '')}", fontsize=8)
        ax.margins(y=0.15)
    axes[0][0].set_ylabel("real (unpadded) tokens/s, thousands")
    meta = results.get("meta", {})
    fig.suptitle(f"MosaicBERT model benchmark on {meta.get('device_name', '?')}\n"
                 f"(torch {meta.get('torch', '?')}, {meta.get('date', '')[:10]})", fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return None


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    src = Path(sys.argv[1])
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else src.with_suffix(".png")
    problem = plot(json.loads(src.read_text()), dst)
    print(problem or f"wrote {dst}")
