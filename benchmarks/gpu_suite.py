"""The GPU test-and-benchmark suite: GPU tests, model benchmark, recipe benchmark, step profile, in one command.

    python benchmarks/gpu_suite.py                                   # every part, within --total seconds
    python benchmarks/gpu_suite.py --parts tests,model               # some parts
    python benchmarks/gpu_suite.py --parts recipe,profile --train-files .data/corpus

Parts, in this order, each a subprocess with its own time limit (--<part>-s), all within --total seconds:
    tests    python -m pytest -q -m "gpu or interpreter" tests    (every test that needs the GPU or runs kernels; a
             module that cannot be imported there, for want of a package, is reported and the rest still run)
    model    benchmarks/model.py     -> model_bench.json, model_bench.png
    recipe   benchmarks/recipe.py    -> recipe_bench.json, recipe_bench.png
    finetune benchmarks/finetune_trainer.py -> finetune_trainer.json (Trainer fine-tuning, eager and compiled)
    profile  benchmarks/profile_step.py --by-op  -> profile_step.json
A part that runs out of time is stopped; model.py and recipe.py rewrite their JSON as they go, so what finished is
kept. Writes to --out (default $OUT): the result files above, summary.md (status of each part and every table,
also printed last) and logs.tgz (each part's full log, the GPU and software versions). That is at most 7 files.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from report import render  # noqa: E402

PARTS = ("tests", "model", "recipe", "finetune", "profile")
BUDGETS = {"tests": 300, "model": 330, "recipe": 240, "finetune": 420, "profile": 60}
RESULTS = {"model": ("model_bench.json", "model_bench.png"), "recipe": ("recipe_bench.json", "recipe_bench.png"),
           "finetune": ("finetune_trainer.json",), "profile": ("profile_step.json",)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    p.add_argument("--total", type=float, default=560, help="seconds for all parts together (default 560)")
    for part in PARTS:
        p.add_argument(f"--{part}-s", type=float, default=BUDGETS[part], help=f"seconds for {part} at most")
    p.add_argument("--train-files", nargs="+",
                   help="the recipe benchmark's text (default .data/corpus when it exists, else data/sample; "
                   "data/sample with --smoke)")
    p.add_argument("--model-args", default="", help="extra arguments for model.py, one string")
    p.add_argument("--recipe-args", default="", help="extra arguments for recipe.py, one string")
    p.add_argument("--finetune-args", default="", help="extra arguments for finetune_trainer.py, one string")
    p.add_argument("--tests-args", default="tests", help="pytest's test paths and options (default: tests)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU check of the suite: the benchmarks' --smoke modes, the GPU tests only collected")
    p.add_argument("--commit", help="the commit measured (recorded in every result; default $BENCH_COMMIT or git)")
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_suite_out"), help="output folder (default $OUT)")
    args = p.parse_args(argv)
    args.parts = [part for part in args.parts.split(",") if part]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        p.error(f"unknown part(s) {sorted(unknown)}; choose from {PARTS}")
    if args.train_files is None:
        corpus = REPO / ".data" / "corpus"
        args.train_files = [str(corpus)] if corpus.is_dir() and not args.smoke else []
    return args


def command(part, args, out, limit):
    python, smoke = sys.executable, ["--smoke"] if args.smoke else []
    if part == "tests":
        return [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors", "-m",
                "gpu or interpreter", *(["--collect-only"] if args.smoke else []), *args.tests_args.split()]
    if part == "model":  # its own budget stops starting new work a minute before the limit
        return [python, str(HERE / "model.py"), "--out", str(out), "--budget", str(max(limit - 60, 30)), *smoke,
                *args.model_args.split()]
    if part == "recipe":
        files = ["--train-files", *args.train_files] if args.train_files else []
        return [python, str(HERE / "recipe.py"), "--out", str(out), *files, *smoke, *args.recipe_args.split()]
    if part == "finetune":
        return [python, str(HERE / "finetune_trainer.py"), "--out", str(out), *smoke, *args.finetune_args.split()]
    return [python, str(HERE / "profile_step.py"), "--by-op", "--out", str(out), *smoke]


def run_part(cmd, log_path, limit, env):
    """Runs cmd with its output in log_path; stops its whole process group after `limit` seconds.
    Returns (exit code or 'timeout', seconds)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            code = "timeout"
    return code, time.perf_counter() - t0


def tail(path, n=1):
    lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    return lines[-n:] if lines else [""]


def environment(env):
    lines = []
    for cmd in (["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv"],
                [sys.executable, "-c", "import torch, triton, transformers; print('torch', torch.__version__, "
                 "'triton', triton.__version__, 'transformers', transformers.__version__)"]):
        try:
            lines.append(subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env).stdout.strip())
        except (OSError, subprocess.SubprocessError) as exc:
            lines.append(f"{cmd[0]}: {exc}")
    lines.append(f"cpu cores {os.cpu_count()}; commit {env.get('BENCH_COMMIT', 'unknown')}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="gpu_suite_logs_"))
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="true")
    if args.commit:
        env["BENCH_COMMIT"] = args.commit
    (logs / "environment.txt").write_text(environment(env) + "\n")
    print((logs / "environment.txt").read_text(), flush=True)
    start = time.perf_counter()
    status = []
    for part in args.parts:
        remaining = args.total - (time.perf_counter() - start)
        limit = min(getattr(args, f"{part}_s"), remaining - 10)
        if limit < 20:
            status.append((part, "skipped: no time left", 0.0, ""))
            continue
        cmd = command(part, args, out, limit)
        print(f"[{time.perf_counter() - start:5.0f} s] {part}: limit {limit:.0f} s: {' '.join(cmd)}", flush=True)
        code, seconds = run_part(cmd, logs / f"{part}.log", limit, env)
        last = tail(logs / f"{part}.log")[0][:160]
        status.append((part, "ok" if code == 0 else f"exit {code}" if code != "timeout" else
                       f"stopped at {limit:.0f} s", seconds, last))
        print(f"[{time.perf_counter() - start:5.0f} s] {part}: {status[-1][1]} after {seconds:.0f} s: {last}",
              flush=True)
        if part == "profile":
            shutil.copy(logs / "profile.log", logs / "profile_step.txt")

    summary = ["# GPU suite", "", (logs / "environment.txt").read_text().strip(), "",
               "| part | status | seconds | last line |", "|---|---|---:|---|"]
    summary += [f"| {part} | {state} | {seconds:.0f} | `{last}` |" for part, state, seconds, last in status]
    for part in args.parts:
        for name in RESULTS.get(part, ()):
            path = out / name
            if name.endswith(".json") and path.exists():
                try:
                    summary += ["", render(json.loads(path.read_text()))]
                except (KeyError, TypeError, ValueError) as exc:
                    summary += ["", f"{name}: no table ({type(exc).__name__}: {exc})"]
    if "profile" in args.parts and (logs / "profile.log").exists():
        text = (logs / "profile.log").read_text(errors="replace")
        summary += ["", "Step profile (benchmarks/profile_step.py --by-op):", "", text[-6000:]]
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    with tarfile.open(out / "logs.tgz", "w:gz") as tar:
        tar.add(logs, arcname="logs")
    shutil.rmtree(logs, ignore_errors=True)
    print("\n".join(summary[: 6 + len(status)]), flush=True)
    for part in args.parts:
        for name in RESULTS.get(part, ()):
            if name.endswith(".json") and (out / name).exists() and part != "profile":
                try:
                    print("\n" + render(json.loads((out / name).read_text())), flush=True)
                except (KeyError, TypeError, ValueError):
                    pass
    print(f"\n[{time.perf_counter() - start:.0f} s] wrote " + ", ".join(sorted(p.name for p in out.iterdir())))


if __name__ == "__main__":
    main()
