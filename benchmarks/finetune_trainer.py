"""Fine-tuning through transformers' Trainer on variable lengths: eager against `torch_compile=True`.

    python benchmarks/finetune_trainer.py                # GPU: 5 contenders, 120 steps each, the last 80 timed
    python benchmarks/finetune_trainer.py --smoke        # CPU: tiny eager models, seconds (checks the script)

Each contender is a sequence classifier (2 labels) trained by a plain `Trainer`: bf16, `adamw_torch_fused`, batch
--batch-size, `DataCollatorWithPadding` with its default padding (to the longest sequence of the batch, so nearly
every batch has a new length: the case that made a compiled model recompile), `dataloader_drop_last=True`. The
examples are [CLS] random-ids [SEP] of --min-len to --max-len tokens, the same examples in the same order for every
contender (Trainer's seeded sampler).

    ours            MosaicBertForSequenceClassification (the repo's config.json), eager
    ours-compiled   the same with TrainingArguments(torch_compile=True)
    bert-compiled   transformers' BertForSequenceClassification (BERT-base, SDPA), torch_compile=True
    ours-nosync     ours eager with logging_nan_inf_filter=False, as recipes/glue.py sets it (an extra row): Trainer's
                    default filter reads each step's loss on the host (a synchronisation per step), so the host
                    cannot queue the next step while the device runs this one
    ours-compiled-nosync  ours-compiled with logging_nan_inf_filter=False: the compiled twin of ours-nosync

Steady state: the StepClock of benchmarks/recipe.py (a CUDA event at the end of every optimizer step, nothing
synchronises); real tokens/s over the last --timed steps, counted from the attention masks the collator built. The
warm-up (compilation included) and the number of graphs Dynamo built are reported per contender.

Writes $OUT/finetune_trainer.json; prints the table last.
"""

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from recipe import capture_trainers, log, steady_state  # noqa: E402
from report import finetune_trainer_table  # noqa: E402
from runinfo import run_meta  # noqa: E402

CONTENDERS = ("ours", "ours-nosync", "ours-compiled", "ours-compiled-nosync", "bert-compiled")  # cheap ones first


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma list of {CONTENDERS}")
    p.add_argument("--steps", type=int, help="optimizer steps per contender (default 120; 6 with --smoke)")
    p.add_argument("--timed", type=int, help="last steps timed (default 80; 3 with --smoke)")
    p.add_argument("--batch-size", type=int, help="sequences per step (default 32; 4 with --smoke)")
    p.add_argument("--min-len", type=int, help="shortest example in tokens (default 64; 8 with --smoke)")
    p.add_argument("--max-len", type=int, help="longest example in tokens (default 512; 48 with --smoke)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny models, no compilation")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"), help="output folder (default $OUT)")
    args = p.parse_args(argv)
    smoke = args.smoke
    args.steps = args.steps or (6 if smoke else 120)
    args.timed = args.timed or (3 if smoke else 80)
    args.batch_size = args.batch_size or (4 if smoke else 32)
    args.min_len = args.min_len or (8 if smoke else 64)
    args.max_len = args.max_len or (48 if smoke else 512)
    args.contenders = [c for c in args.contenders.split(",") if c]
    unknown = set(args.contenders) - set(CONTENDERS)
    if unknown:
        p.error(f"unknown contender(s) {sorted(unknown)}; choose from {CONTENDERS}")
    if args.timed >= args.steps:
        p.error(f"--timed ({args.timed}) must be below --steps ({args.steps}): the first steps compile and warm up")
    return args


class RandomExamples:
    """n tokenized examples, [CLS] ids [SEP] with lengths uniform in [min_len, max_len], and a 0/1 label."""

    def __init__(self, n, min_len, max_len, tokenizer, seed=0):
        import torch

        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
        self.rows = []
        for length in lengths:
            ids = [tokenizer.cls_token_id, *torch.randint(1000, 30000, (length - 2,), generator=g).tolist(),
                   tokenizer.sep_token_id]
            self.rows.append({"input_ids": ids, "token_type_ids": [0] * length, "attention_mask": [1] * length,
                              "labels": int(torch.randint(0, 2, (1,), generator=g))})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class CountingCollator:
    """DataCollatorWithPadding that records each batch's real tokens (the dataloader runs it in this process)."""

    def __init__(self, tokenizer):
        from transformers import DataCollatorWithPadding

        self.collate = DataCollatorWithPadding(tokenizer)
        self.real_tokens, self.shapes = [], []

    def __call__(self, features):
        batch = self.collate(features)
        self.real_tokens.append(int(batch["attention_mask"].sum()))
        self.shapes.append(tuple(batch["input_ids"].shape))
        return batch


def build_model(name, smoke):
    from transformers import BertConfig, BertForSequenceClassification

    from recipes.common import import_model_code, load_config

    sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128) if smoke else {}
    if name.startswith("bert"):
        return BertForSequenceClassification(BertConfig(num_labels=2, attn_implementation="sdpa", **sizes))
    _, modeling = import_model_code()
    config, _ = load_config(None, dict(num_labels=2, **sizes))
    return modeling.MosaicBertForSequenceClassification(config)


def run_contender(name, args, tokenizer, work):
    import torch
    from transformers import Trainer, TrainingArguments

    cuda = torch.cuda.is_available()
    compiled = "-compiled" in name and not args.smoke
    nosync = name.endswith("nosync")
    torch.manual_seed(0)
    model = build_model(name, args.smoke)
    collator = CountingCollator(tokenizer)
    data = RandomExamples(args.batch_size * args.steps, args.min_len, args.max_len, tokenizer)
    training_args = TrainingArguments(
        output_dir=str(work / name), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=2e-5, bf16=cuda, torch_compile=compiled, optim="adamw_torch_fused" if cuda else "adamw_torch",
        dataloader_drop_last=True, save_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=not cuda, seed=0, logging_nan_inf_filter=not nosync)
    graphs_before = _graph_count()
    t0 = time.perf_counter()
    with capture_trainers() as captured:
        trainer = Trainer(model=model, args=training_args, train_dataset=data, data_collator=collator)
        trainer.train()
    wall = time.perf_counter() - t0
    clock = captured[0][1]
    timed_tokens = sum(collator.real_tokens[args.steps - args.timed: args.steps]) / args.timed
    result = steady_state(clock, args.timed, timed_tokens, args.batch_size, name,
                          note=("torch_compile=True" if compiled else "eager")
                          + (", logging_nan_inf_filter=False" if nosync else ""))
    step_lengths = [shape[1] for shape in collator.shapes[: args.steps]]
    result.update(wall_s=round(wall, 1), compiled=compiled, graphs=_graph_count() - graphs_before,
                  distinct_lengths=len(set(step_lengths)), real_tokens_per_step=timed_tokens,
                  **slow_steps(clock, step_lengths, args.timed))
    del trainer, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def slow_steps(clock, step_lengths, timed):
    """The timed steps that took over 1.5x the median, by the device clock: (step, padded length, ms, whether the
    length was new), and the median ms of the steps of a new length against that of repeated ones, to tell a cost
    paid once per length (compilation) from one that is not."""
    if not clock.cuda or len(clock.events) < len(step_lengths):
        return {}
    ms = [a.elapsed_time(b) for a, b in zip(clock.events, clock.events[1:])]  # ms[i - 1]: step i
    first = len(step_lengths) - timed
    seen = set(step_lengths[:first])
    new, repeated, slow = [], [], []
    median = statistics.median(ms[first - 1:])
    for i in range(first, len(step_lengths)):
        length, step_ms = step_lengths[i], ms[i - 1]
        is_new = length not in seen
        seen.add(length)
        (new if is_new else repeated).append(step_ms)
        if step_ms > 1.5 * median:
            slow.append((i, length, round(step_ms, 1), is_new))
    return {"slow_steps": slow,
            "new_length_step_ms": statistics.median(new) if new else None, "new_length_steps": len(new),
            "repeated_length_step_ms": statistics.median(repeated) if repeated else None}


def _graph_count():
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def main(argv=None):
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not args.smoke and not cuda:
        sys.exit("no CUDA device: run with --smoke for the CPU check")
    from recipes.common import load_tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "finetune_trainer.json"
    work = Path(tempfile.mkdtemp(prefix="finetune_trainer_"))
    meta = run_meta("cuda" if cuda else "cpu")
    meta["argv"] = sys.argv[1:] if argv is None else argv
    setup = {"steps": args.steps, "timed": args.timed, "batch_size": args.batch_size,
             "desc": f"sequence classification, {args.batch_size} examples of {args.min_len}-{args.max_len} tokens "
                     f"padded to the longest, {args.steps} Trainer steps per contender, the last {args.timed} timed"}
    results = {"meta": meta, "setup": setup, "contenders": {}, "ratios": {}}
    log(f"# Trainer fine-tuning benchmark {meta['date']}: {meta['device_name']}, torch {meta['torch']}, "
        f"transformers {meta['transformers']}, commit {meta['commit']}; {setup['desc']}")
    tokenizer = load_tokenizer()
    for name in args.contenders:
        log(f"[{name}] training")
        results["contenders"][name] = {"label": name, "note": "started, not finished (stopped by a time limit?)"}
        json_path.write_text(json.dumps(results, indent=1))
        results["contenders"][name] = run_contender(name, args, tokenizer, work)
        row = results["contenders"][name]
        log(f"[{name}] {row['tokens_per_s']:,.0f} real tokens/s, {row['graphs']} graphs, wall {row['wall_s']} s")
        rates = {key: value["tokens_per_s"] for key, value in results["contenders"].items() if "tokens_per_s" in value}
        if "ours" in rates:
            results["ratios"] = {f"{key} / ours": rate / rates["ours"] for key, rate in rates.items() if key != "ours"}
        json_path.write_text(json.dumps(results, indent=1))
    log(f"# wrote {json_path}")
    log(finetune_trainer_table(results))


if __name__ == "__main__":
    main()
