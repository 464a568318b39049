"""Charts of the benchmarks' result files.

    python benchmarks/plot.py benchmarks/results/model_bench.json [out.png]
    python benchmarks/plot.py benchmarks/results/recipe_bench.json [out.png]

model.py and recipe.py call these themselves; the CLI redraws a chart from a saved JSON.
"""

import json
import sys
from pathlib import Path


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_model(results, png_path):
    """Real tokens/s per contender (median over rounds, bars from min to max), one panel per workload, the ratio
    ours / fastest peer in each title. Returns None on success, else why nothing was drawn."""
    plt = _pyplot()
    if plt is None:
        return "matplotlib is not installed"
    panels = [r for r in results["results"] if any(row.get("tokens_per_s") for row in r.get("rows", []))]
    if not panels:
        return "no row has a result to plot"
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.5, 3.0 * len(panels) + 1.0), 4.6), squeeze=False)
    for ax, result in zip(axes[0], panels):
        rows = [row for row in result["rows"] if row.get("tokens_per_s")]
        values = [row["tokens_per_s"] / 1e3 for row in rows]
        low = [v - min(row["tokens_per_s_rounds"]) / 1e3 for v, row in zip(values, rows)]
        high = [max(row["tokens_per_s_rounds"]) / 1e3 - v for v, row in zip(values, rows)]
        colours = ["tab:orange" if row["contender"].startswith("ours") else "tab:blue" for row in rows]
        bars = ax.bar(range(len(rows)), values, yerr=[low, high], capsize=3, color=colours)
        for bar, value in zip(bars, values):
            ax.annotate(f"{value:,.0f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom",
                        fontsize=7)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([row["contender"] + ("" if row.get("mask", True) else "\n(no mask)") for row in rows],
                           rotation=35, ha="right", fontsize=7)
        title = results["workloads"].get(result["workload"], {}).get("desc", result["workload"])
        c = result.get("comparison")
        if c:
            title += f"\nours / {c['peer']}: {c['ratio_median']:.2f}x ({c['ratio_min']:.2f}-{c['ratio_max']:.2f})"
        ax.set_title(title, fontsize=7)
        ax.margins(y=0.15)
    axes[0][0].set_ylabel("real (unpadded) tokens/s, thousands")
    meta = results["meta"]
    fig.suptitle(f"MosaicBERT vs peers on {meta.get('device_name')} (torch {meta.get('torch')}, transformers "
                 f"{meta.get('transformers')}, {meta.get('date', '')[:10]}, commit {str(meta.get('commit'))[:10]})",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return None


def plot_recipe(results, png_path):
    """Left: steady-state tokens/s of the recipe, the bare step and the plain Trainer. Right: each Trainer run's
    tokens/s per step over the run (the timed window shaded)."""
    plt = _pyplot()
    if plt is None:
        return "matplotlib is not installed"
    runs = [(key, run) for key, run in results["runs"].items() if run.get("tokens_per_s")]
    if not runs:
        return "no run has a result to plot"
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    values = [run["tokens_per_s"] / 1e3 for _, run in runs]
    bars = left.bar(range(len(runs)), values, color=["tab:orange", "tab:green", "tab:blue"][: len(runs)])
    for bar, value in zip(bars, values):
        left.annotate(f"{value:,.0f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom",
                      fontsize=8)
    left.set_xticks(range(len(runs)))
    left.set_xticklabels([run["label"] for _, run in runs], fontsize=7, rotation=15, ha="right")
    left.set_ylabel("steady-state tokens/s, thousands")
    left.margins(y=0.15)
    for _, run in runs:
        trace = run.get("step_tokens_per_s")
        if trace:
            right.plot(range(1, len(trace) + 1), [t / 1e3 for t in trace], label=run["label"], lw=0.8)
    first = results["setup"].get("first_timed_step")
    if first:
        right.axvspan(first, results["setup"]["steps"], alpha=0.1, color="grey", label="timed window")
    right.set_xlabel("step")
    right.set_ylabel("tokens/s per step (host clock), thousands")
    right.legend(fontsize=7)
    meta = results["meta"]
    fig.suptitle(f"Pretraining recipe vs bare step vs plain Trainer on {meta.get('device_name')} "
                 f"({results['setup']['desc']}; commit {str(meta.get('commit'))[:10]})", fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return None


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    src = Path(sys.argv[1])
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else src.with_suffix(".png")
    data = json.loads(src.read_text())
    problem = (plot_recipe if "runs" in data else plot_model)(data, dst)
    print(problem or f"wrote {dst}")
