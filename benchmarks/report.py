"""Markdown tables from the benchmarks' result files (what benchmarks/README.md pastes in after a run).

    python benchmarks/report.py benchmarks/results/model_bench.json [benchmarks/results/recipe_bench.json ...]

Each file is recognised by its content: model.py's (results per workload), recipe.py's (recipe, bare step and plain
Trainer) and profile_step.py's (categories). Also used by those scripts to print their table last.
"""

import json
import sys
from pathlib import Path


def _num(value, digits=0):
    if value is None:
        return "-"
    if abs(value) >= 1e6:
        return f"{value / 1e6:.2f}M"
    if abs(value) >= 1e4:
        return f"{value / 1e3:,.0f}k"
    return f"{value:,.{digits}f}"


def _pct(value):
    return "-" if value is None else f"{100 * value:.0f}%"


def header(meta):
    return (f"{meta.get('device_name', '?')} (driver {meta.get('driver') or '?'}), torch {meta.get('torch')}, "
            f"triton {meta.get('triton')}, transformers {meta.get('transformers')}, commit "
            f"{meta.get('commit') or 'unknown'} (code {meta.get('code_digest')}), {meta.get('date')}")


def model_table(results):
    meta = results["meta"]
    lines = [f"Model benchmark: {header(meta)}; matmul ceiling {meta.get('peak_tflops', 0):.0f} TFLOP/s "
             f"({meta.get('ceiling')}, measured); {meta.get('rounds')} interleaved rounds.", "",
             "| workload | model | samples/s | real tokens/s | MFU | ms/step (min-max) | GPU busy | host syncs/step "
             "| ours / fastest peer, median (min-max) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for result in results["results"]:
        workload = result["workload"]
        desc = results["workloads"].get(workload, {}).get("desc", workload)
        if result.get("skipped"):
            lines.append(f"| {desc} | skipped: {result['skipped']} | | | | | | | |")
            continue
        comparison = result.get("comparison")
        for row in result["rows"]:
            name = row["contender"] + ("" if row.get("mask", True) else " (no attention_mask)")
            if row.get("tokens_per_s") is None:
                lines.append(f"| {desc} | {name} | {row.get('note', '-')} | | | | | | |")
                continue
            ratio = ""
            if comparison and row["contender"] == "ours":
                ratio = (f"**{comparison['ratio_median']:.2f}x** ({comparison['ratio_min']:.2f}-"
                         f"{comparison['ratio_max']:.2f}) vs {comparison['peer']}")
            syncs = row.get("syncs_per_step")
            lines.append(
                f"| {desc} | {name} | {_num(row['samples_per_s'])} | {_num(row['tokens_per_s'])} | "
                f"{_pct(row.get('mfu'))} | {row['step_ms']:.1f} ({row['step_ms_min']:.1f}-{row['step_ms_max']:.1f}) | "
                f"{_pct(row.get('gpu_busy'))} | {'-' if syncs is None else f'{syncs:.1f}'} | {ratio} |")
    return "\n".join(lines)


def gap_table(results):
    """Where each step's milliseconds go, for every workload with a target: ours against the fastest peer, kernel time
    by category, the sum (GPU work), device idle time (step time during which the GPU ran nothing: the host was late)
    and the step time the target ratio needs. One column per contender and workload."""
    columns = []  # (workload key, target, ours row, peer row, peer name)
    for result in results["results"]:
        comparison = result.get("comparison")
        target = results["workloads"].get(result["workload"], {}).get("target")
        rows = {row["contender"]: row for row in result.get("rows", [])}
        if not comparison or not target:
            continue
        ours, peer = rows.get("ours"), rows.get(comparison["peer"])
        if not ours or not peer or ours.get("kernel_ms") is None or peer.get("kernel_ms") is None:
            continue
        columns.append((result["workload"], target, ours, peer, comparison["peer"]))
    if not columns:
        return ""
    categories = sorted({name for _, _, ours, peer, _ in columns for name in (*ours["kernel_ms"], *peer["kernel_ms"])},
                        key=lambda n: -sum(r["kernel_ms"].get(n, 0.0) for c in columns for r in c[2:4]))
    head = "| ms/step | " + " | ".join(f"{w} ours | {peer_name}" for w, _, _, _, peer_name in columns) + " |"
    lines = [head, "|---|" + "---:|" * (2 * len(columns))]

    def line(label, values, bold=False):
        cells = [f"**{v:.1f}**" if bold else f"{v:.1f}" for v in values]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    for name in categories:
        line(name, [r["kernel_ms"].get(name, 0.0) for c in columns for r in c[2:4]])
    line("**GPU work** (kernel sum)", [sum(r["kernel_ms"].values()) for c in columns for r in c[2:4]], bold=True)
    line("device idle (waiting on the host)", [max(r["step_ms"] - r["busy_ms_per_step"], 0.0)
                                               for c in columns for r in c[2:4]])
    line("**step**", [r["step_ms"] for c in columns for r in c[2:4]], bold=True)
    needs = [cell for _, target, _, peer, _ in columns for cell in (f"{target}x: {peer['step_ms'] / target:.1f}", "")]
    lines.append("| step the target needs | " + " | ".join(needs) + " |")
    return "\n".join(lines)


def host_time_table(result):
    meta = result.get("meta", {})
    host = result["host_ms_per_step"]
    return (f"Host time, {result['workload']}: {header(meta)}; step {result['wall_ms_per_step']:.1f} ms, launching "
            f"forward {host['forward']:.1f} + backward {host['backward']:.1f} + optimizer {host['optimizer']:.1f} = "
            f"{sum(host.values()):.1f} ms.")


def recipe_table(results):
    meta = results["meta"]
    lines = [f"Recipe benchmark: {header(meta)}; {results['setup']['desc']}.", "",
             "| run | steady tokens/s | samples/s | ms/step | steps timed | note |", "|---|---:|---:|---:|---:|---|"]
    for key in ("recipe", "bare", "plain_trainer"):
        run = results["runs"].get(key)
        if not run:
            continue
        if run.get("tokens_per_s") is None:
            lines.append(f"| {run.get('label', key)} | {run.get('note', '-')} | | | | |")
            continue
        lines.append(f"| {run['label']} | {_num(run['tokens_per_s'])} | {_num(run['samples_per_s'])} | "
                     f"{run['step_ms']:.1f} | {run.get('steps_timed', '-')} | {run.get('note', '')} |")
    ratios = results.get("ratios", {})
    if ratios:
        lines.append("")
        lines.append(", ".join(f"{name}: **{value:.2f}x**" for name, value in ratios.items() if value is not None))
    return "\n".join(lines)


def profile_table(results):
    lines = [f"Step profile: {header(results.get('meta', {}))}; wall {results['wall_ms']:.1f} ms/step, device busy "
             f"{results['busy_ms']:.1f} ms/step.", "", "| category | ms/step |", "|---|---:|"]
    for name, ms in sorted(results["categories"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {ms:.2f} |")
    return "\n".join(lines)


def finetune_trainer_table(results):
    lines = [f"Trainer fine-tuning: {header(results['meta'])}; {results['setup']['desc']}.", "",
             "| contender | steady real tokens/s | samples/s | ms/step | graphs compiled | distinct lengths | "
             "timed steps of a new length: median ms (count) | of a repeated length: median ms | "
             "warm-up + run (s) | vs eager ours |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in results["contenders"].items():
        if "tokens_per_s" not in row:
            lines.append(f"| {name} | {row.get('note', '-')} | | | | | | | | |")
            continue
        ratio = results.get("ratios", {}).get(f"{name} / ours")
        new, repeated = row.get("new_length_step_ms"), row.get("repeated_length_step_ms")
        new = "-" if new is None else f"{new:.1f} ({row['new_length_steps']})"
        repeated = "-" if repeated is None else f"{repeated:.1f}"
        ratio = "-" if ratio is None else f"{ratio:.2f}x"
        lines.append(f"| {name} ({row['note']}) | {_num(row['tokens_per_s'])} | {_num(row['samples_per_s'])} | "
                     f"{row['step_ms']:.1f} | {row['graphs']} | {row['distinct_lengths']} | {new} | {repeated} | "
                     f"{row['wall_s']:.0f} | {ratio} |")
    return "\n".join(lines)


def render(results):
    if "host_ms_per_step" in results:
        return host_time_table(results)
    if "contenders" in results:
        return finetune_trainer_table(results)
    if "runs" in results:
        return recipe_table(results)
    if "categories" in results:
        return profile_table(results)
    gaps = gap_table(results)
    if not gaps:
        return model_table(results)
    return model_table(results) + "\n\nWhere the step time goes (torch.profiler, same run):\n\n" + gaps


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for path in sys.argv[1:]:
        print(render(json.loads(Path(path).read_text())))
        print()
