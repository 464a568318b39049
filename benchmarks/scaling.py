"""Compare pretraining runs that used the same global batch on different numbers of processes (GPUs).

    python benchmarks/scaling.py RUN_1GPU RUN_2GPU [...] [--png scaling.png]

Each RUN is an output folder of scripts/pretrain.py (its train_results.json and log_history.json). Prints, per run,
processes, global batch, tokens/s and the scaling efficiency against the first run (tokens/s per process over the first
run's), and how far each loss curve lies from the first run's at the same steps (mean and largest relative
difference of the logged training losses after warm-up). Writes a PNG of the curves when matplotlib is there.
"""

import argparse
import json
from pathlib import Path


def load_run(folder: str) -> dict:
    folder = Path(folder)
    facts = json.loads((folder / "train_results.json").read_text())
    history = json.loads((folder / "log_history.json").read_text())
    losses = {row["step"]: row["loss"] for row in history if "loss" in row and "step" in row}
    return {
        "name": folder.name,
        "processes": facts["world_size"],
        "global_batch": facts["global_batch"],
        "steps": facts["global_step"],
        "tokens_per_s": facts["tokens_seen"] / facts["train_runtime_s"],
        "hardware": facts["hardware"],
        "losses": losses,
    }


def curve_distance(base: dict, other: dict, skip_fraction: float = 0.1) -> tuple[float, float]:
    """Mean and largest |loss_other - loss_base| / loss_base over the steps both logged, after the first 10%."""
    steps = sorted(set(base["losses"]) & set(other["losses"]))
    steps = steps[int(len(steps) * skip_fraction) :]
    if not steps:
        return float("nan"), float("nan")
    gaps = [abs(other["losses"][s] - base["losses"][s]) / base["losses"][s] for s in steps]
    return sum(gaps) / len(gaps), max(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="pretraining output folders; the first is the baseline")
    parser.add_argument("--png", help="write the loss curves here")
    args = parser.parse_args()

    runs = [load_run(folder) for folder in args.runs]
    base = runs[0]
    if any(run["global_batch"] != base["global_batch"] for run in runs):
        raise ValueError("the runs must share one global batch: " + ", ".join(str(r["global_batch"]) for r in runs))
    print(f"| run | processes | global batch | steps | tokens/s | scaling efficiency | loss gap to {base['name']} "
          "(mean / max) | hardware |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for run in runs:
        efficiency = run["tokens_per_s"] / run["processes"] / (base["tokens_per_s"] / base["processes"])
        mean_gap, max_gap = curve_distance(base, run)
        print(f"| {run['name']} | {run['processes']} | {run['global_batch']} | {run['steps']} | "
              f"{run['tokens_per_s']:,.0f} | {efficiency:.1%} | {mean_gap:.2%} / {max_gap:.2%} | {run['hardware']} |")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for run in runs:
            steps = sorted(run["losses"])
            ax.plot(steps, [run["losses"][s] for s in steps], label=f"{run['name']} ({run['processes']} proc.)")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (30% masking)")
        ax.set_title(f"same global batch ({base['global_batch']}), different process counts")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
