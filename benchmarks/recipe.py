"""The pretraining recipe as users launch it, against its own bare step and against a plain transformers Trainer.

    python benchmarks/recipe.py --train-files .data/corpus                 # GPU: 150 steps each, the last 100 timed
    python benchmarks/recipe.py --smoke                                    # CPU: tiny model, data/sample, seconds

In one process, on the same packed data (the recipe's tokenize-and-pack of --train-files, 128-token samples):

  recipe         `scripts/pretrain.py --config base --per-device-batch-size 256 --max-steps N` run as users run it
                 (the recipe's own Trainer, collator, optimizer, logging and dataloader settings; evaluation and
                 checkpoints are moved past the last step so that the timed window holds training steps only).
  bare           the same model, right after, stepping on batches from the recipe's own dataloader (its collator's
                 output, moved to the GPU once): forward, backward and fused AdamW under bf16 autocast, back-to-back
                 with one synchronisation at the end.
  plain Trainer  transformers' `Trainer` on `BertForMaskedLM` (BERT-base, SDPA, vocabulary --bert-vocab): bf16,
                 `torch_compile=True`, `optim="adamw_torch_fused"`, `DataCollatorForLanguageModeling` at 30%,
                 `dataloader_drop_last=True` (no recompilation on a short last batch), the recipe's batch size and
                 dataloader workers, everything else at Trainer's defaults.

Steady state: a callback records a CUDA event (and the host clock) at the end of every optimizer step without
synchronising; tokens/s = tokens of the last --timed steps / time between the events that end step N - timed and
step N. Compilation, the dataloader's start and warm-up fall before the window. Tokens are real tokens (the packed
samples carry no padding: checked on a batch).

Writes $OUT/recipe_bench.json (rewritten after each part) and $OUT/recipe_bench.png; prints the table last.
"""

import argparse
import contextlib
import gc
import json
import os
import runpy
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from report import recipe_table  # noqa: E402
from runinfo import run_meta  # noqa: E402


def log(*args):
    print(*args, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-files", nargs="+", default=[],
                   help="text files or folders for both runs (default: the embedded data/sample)")
    p.add_argument("--steps", type=int, help="optimizer steps of each Trainer run (default 150; 8 with --smoke)")
    p.add_argument("--timed", type=int, help="last steps timed (default 100; 4 with --smoke)")
    p.add_argument("--batch-size", type=int, help="sequences per step (default 256; 8 with --smoke)")
    p.add_argument("--seq-len", type=int, help="tokens per packed sample (default 128; 32 with --smoke)")
    p.add_argument("--config", help="the recipe's --config (default base; tiny with --smoke)")
    p.add_argument("--bert-vocab", type=int, default=30528, help="the plain run's BertConfig vocab_size")
    p.add_argument("--bare-steps", type=int, help="steps per timed bare loop, 3 loops, median (default 20; 2 with "
                   "--smoke)")
    p.add_argument("--parts", default="recipe,bare,plain", help="comma list of recipe, bare, plain")
    p.add_argument("--recipe-args", default="", help="extra arguments for scripts/pretrain.py, one string")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, no compilation")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"), help="output folder (default $OUT)")
    p.add_argument("--work-dir", help="scratch folder for run outputs and the tokenization cache (default: a temp dir)")
    args = p.parse_args(argv)
    smoke = args.smoke
    args.steps = args.steps or (8 if smoke else 150)
    args.timed = args.timed or (4 if smoke else 100)
    args.batch_size = args.batch_size or (8 if smoke else 256)
    args.seq_len = args.seq_len or (32 if smoke else 128)
    args.config = args.config or ("tiny" if smoke else "base")
    args.bare_steps = args.bare_steps or (2 if smoke else 20)
    if smoke:  # a small held-out set: the recipe evaluates once at the end
        args.recipe_args = f"--eval-samples 8 {args.recipe_args}"

    args.parts = [part for part in args.parts.split(",") if part]
    if args.timed >= args.steps:
        p.error(f"--timed ({args.timed}) must be below --steps ({args.steps}): the first steps compile and warm up")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Timing Trainer steps from the inside
# ---------------------------------------------------------------------------------------------------------------


def step_clock_class():
    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """A CUDA event and a host timestamp at the end of every optimizer step; nothing synchronises."""

        def __init__(self):
            self.events, self.host = [], []
            self.cuda = torch.cuda.is_available()

        def on_train_begin(self, args, state, control, **kwargs):
            self.events, self.host = [], []

        def on_step_end(self, args, state, control, **kwargs):
            self.host.append(time.perf_counter())
            if self.cuda:
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                self.events.append(event)

        def window_seconds(self, timed):
            """Seconds of the last `timed` steps (device clock on CUDA, host clock otherwise)."""
            if len(self.host) <= timed:
                raise RuntimeError(f"only {len(self.host)} steps ran; {timed} + 1 are needed")
            if self.cuda:
                torch.cuda.synchronize()
                return self.events[-timed - 1].elapsed_time(self.events[-1]) / 1e3
            return self.host[-1] - self.host[-timed - 1]

    return StepClock


@contextlib.contextmanager
def capture_trainers():
    """Every transformers Trainer built inside gets a StepClock and is recorded as (trainer, clock): the recipe's
    Trainer is built deep inside scripts/pretrain.py, and this reaches it without changing the recipe."""
    from transformers import Trainer

    clock_class = step_clock_class()
    original = Trainer.__init__
    captured = []

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        clock = clock_class()
        self.add_callback(clock)
        captured.append((self, clock))

    Trainer.__init__ = init
    try:
        yield captured
    finally:
        Trainer.__init__ = original


def steady_state(clock, timed, tokens_per_step, batch_size, label, note=""):
    seconds = clock.window_seconds(timed)
    host_steps = [b - a for a, b in zip(clock.host, clock.host[1:])]
    return {
        "label": label,
        "tokens_per_s": tokens_per_step * timed / seconds,
        "samples_per_s": batch_size * timed / seconds,
        "step_ms": 1e3 * seconds / timed,
        "steps_timed": timed,
        "steps_run": len(clock.host),
        "host_step_ms_median": 1e3 * statistics.median(host_steps[-timed:]) if host_steps else None,
        "step_tokens_per_s": [tokens_per_step / s for s in host_steps],
        "note": note,
    }


# ---------------------------------------------------------------------------------------------------------------
# The three runs
# ---------------------------------------------------------------------------------------------------------------


def recipe_argv(args, work):
    argv = ["--config", args.config, "--per-device-batch-size", str(args.batch_size), "--max-seq-length",
            str(args.seq_len), "--max-steps", str(args.steps), "--eval-steps", str(args.steps + 1), "--save-steps",
            str(10 * args.steps), "--output-dir", str(work / "recipe"), "--cache-dir", str(work / "cache")]
    if args.train_files:
        argv += ["--train-files", *args.train_files]
    return argv + args.recipe_args.split()


def run_recipe(args, work):
    """scripts/pretrain.py in this process. Returns (result, trainer)."""
    argv = recipe_argv(args, work)
    log(f"[recipe] scripts/pretrain.py {' '.join(argv)}")
    saved = sys.argv
    sys.argv = [str(REPO / "scripts" / "pretrain.py"), *argv]
    t0 = time.perf_counter()
    try:
        with capture_trainers() as captured:
            runpy.run_path(str(REPO / "scripts" / "pretrain.py"), run_name="__main__")
    finally:
        sys.argv = saved
    wall = time.perf_counter() - t0
    trainer, clock = captured[0]
    batch = next(iter(trainer.get_train_dataloader()))
    real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    shape = tuple(batch["input_ids"].shape)
    result = steady_state(clock, args.timed, real, shape[0], "recipe (scripts/pretrain.py)",
                          note=f"batch {shape[0]} x {shape[1]}, {real / batch['input_ids'].numel():.0%} real tokens")
    result.update(wall_s=round(wall, 1), argv=argv, batch_keys=sorted(batch),
                  optim=str(trainer.args.optim))
    return result, trainer


def run_bare(args, trainer):
    """The recipe's model stepping alone on three of the recipe's own batches."""
    import torch

    model = trainer.model
    model.train()
    loader = iter(trainer.get_train_dataloader())
    batches = [trainer._prepare_inputs(next(loader)) for _ in range(3)]
    cuda = torch.cuda.is_available()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)

    def step(inputs):
        with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for inputs in batches:
        step(inputs)
    sync()
    seconds = []
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(args.bare_steps):
            step(batches[i % 3])
        sync()
        seconds.append((time.perf_counter() - t0) / args.bare_steps)
    step_s = statistics.median(seconds)
    real = statistics.mean(int(b["attention_mask"].sum()) for b in batches)
    size = batches[0]["input_ids"].shape[0]
    return {"label": "bare step (same model, same batches)", "tokens_per_s": real / step_s,
            "samples_per_s": size / step_s, "step_ms": 1e3 * step_s, "steps_timed": 3 * args.bare_steps,
            "step_ms_loops": [1e3 * s for s in seconds], "batch_keys": sorted(batches[0]),
            "note": f"{args.bare_steps} back-to-back steps x 3 loops, median"
                    + ("; fused AdamW, bf16 autocast" if cuda else "; float32")}


class PackedRows:
    """The packed (n, seq_len) token array as examples {"input_ids": [...]}, what DataCollatorForLanguageModeling
    takes."""

    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return int(self.ids.shape[0])

    def __getitem__(self, i):
        return {"input_ids": [int(t) for t in self.ids[i]]}


def run_plain(args, work, recipe_workers):
    """transformers Trainer + BertForMaskedLM on the same packed data."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from recipes.common import load_tokenizer
    from recipes.data import expand_text_files, load_or_build_packed

    tokenizer = load_tokenizer()
    ids, _ = load_or_build_packed(expand_text_files(args.train_files), tokenizer, args.seq_len, work / "cache")
    cuda = torch.cuda.is_available()
    config = BertConfig(vocab_size=args.bert_vocab, attn_implementation="sdpa")
    if args.smoke:
        config.update(dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128))
    model = BertForMaskedLM(config)
    training_args = TrainingArguments(
        output_dir=str(work / "plain"), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=5e-4, bf16=cuda, torch_compile=cuda, optim="adamw_torch_fused" if cuda else "adamw_torch",
        dataloader_drop_last=True, dataloader_num_workers=recipe_workers, save_strategy="no", report_to="none",
        disable_tqdm=True, use_cpu=not cuda)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.3)
    log(f"[plain] Trainer + BertForMaskedLM (vocab {args.bert_vocab}), {len(ids)} packed samples, "
        f"compile {cuda}, workers {recipe_workers}")
    t0 = time.perf_counter()
    with capture_trainers() as captured:
        trainer = Trainer(model=model, args=training_args, train_dataset=PackedRows(ids), data_collator=collator)
        trainer.train()
    wall = time.perf_counter() - t0
    clock = captured[0][1]
    batch = next(iter(trainer.get_train_dataloader()))
    real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    note = ("BertForMaskedLM, SDPA, torch_compile, bf16, adamw_torch_fused, DataCollatorForLanguageModeling 30%, "
            f"vocab {args.bert_vocab}") if cuda else "CPU smoke: eager, float32"
    result = steady_state(clock, args.timed, real, batch["input_ids"].shape[0], "plain transformers Trainer", note)
    result.update(wall_s=round(wall, 1), batch_keys=sorted(batch), optim=str(trainer.args.optim))
    return result


def main(argv=None):
    args = parse_args(argv)
    import torch

    start = time.perf_counter()
    cuda = torch.cuda.is_available()
    if not args.smoke and not cuda:
        sys.exit("no CUDA device: run with --smoke for the CPU check")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "recipe_bench.json", out / "recipe_bench.png"
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="recipe_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    meta = run_meta("cuda" if cuda else "cpu")
    meta["argv"] = sys.argv[1:] if argv is None else argv
    setup = {"steps": args.steps, "timed": args.timed, "first_timed_step": args.steps - args.timed + 1,
             "batch_size": args.batch_size, "seq_len": args.seq_len, "config": args.config,
             "train_files": args.train_files or ["data/sample"], "bert_vocab": args.bert_vocab,
             "desc": f"{args.config} config, {args.batch_size} x {args.seq_len} packed, {args.steps} steps per run, "
                     f"the last {args.timed} timed"}
    results = {"meta": meta, "setup": setup, "runs": {}, "ratios": {}}
    log(f"# recipe benchmark {meta['date']}: {meta['device_name']}, torch {meta['torch']}, transformers "
        f"{meta['transformers']}, commit {meta['commit']}; {setup['desc']}")

    def save():
        runs = results["runs"]
        tps = {key: run.get("tokens_per_s") for key, run in runs.items()}
        if tps.get("recipe") and tps.get("bare"):
            results["ratios"]["recipe / bare step"] = tps["recipe"] / tps["bare"]
        if tps.get("recipe") and tps.get("plain_trainer"):
            results["ratios"]["recipe / plain Trainer"] = tps["recipe"] / tps["plain_trainer"]
        json_path.write_text(json.dumps(results, indent=1))

    workers = None
    trainer = None
    if "recipe" in args.parts:
        results["runs"]["recipe"], trainer = run_recipe(args, work)
        workers = trainer.args.dataloader_num_workers
        save()
        log(f"[recipe] {results['runs']['recipe']['tokens_per_s']:,.0f} tokens/s")
        if "bare" in args.parts:
            results["runs"]["bare"] = run_bare(args, trainer)
            save()
            log(f"[bare] {results['runs']['bare']['tokens_per_s']:,.0f} tokens/s")
        del trainer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    if "plain" in args.parts:
        if workers is None:
            workers = 4 if cuda else 0
        results["runs"]["plain_trainer"] = run_plain(args, work, workers)
        save()
        log(f"[plain] {results['runs']['plain_trainer']['tokens_per_s']:,.0f} tokens/s")
    meta["total_s"] = round(time.perf_counter() - start, 1)
    save()
    try:
        from plot import plot_recipe

        problem = plot_recipe(results, png_path)
    except Exception as exc:  # noqa: BLE001 -- the chart is optional
        problem = f"{type(exc).__name__}: {exc}"
    log(f"# wrote {json_path}" + (f"; no chart: {problem}" if problem else f" and {png_path}"))
    log(recipe_table(results))


if __name__ == "__main__":
    main()
