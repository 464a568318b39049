"""Whole-model speed as users run it: MosaicBERT against transformers' BERT (compiled, SDPA) and ModernBERT.

    python benchmarks/model.py                                   # GPU: every workload, the default contenders
    python benchmarks/model.py --workloads pretrain --rounds 7   # one workload, more pairs
    python benchmarks/model.py --extra ours-nomask,bert-compiled-v30528-nomask,bert   # add labelled extra rows
    python benchmarks/model.py --smoke                           # CPU: tiny eager models and inputs (checks the script)

Inputs. Every model gets what a tokenizer and a data collator produce: the repo's bert-base-uncased tokenizer pads
random token ids framed by [CLS] ... [SEP] (`DataCollatorForLanguageModeling(mlm_probability=0.3)` for MLM training,
`DataCollatorWithPadding` otherwise), so every batch carries input_ids, token_type_ids and attention_mask (all ones
on packed batches), and MLM labels on 30% of the non-special tokens (-100 elsewhere). A model receives the keys its
forward names (ModernBERT takes no token_type_ids, as its own tokenizer gives none). Rows named `-nomask` drop the
attention_mask, to show what a model does without one; they are extras, never the comparison.

Workloads (--smoke shrinks them):
    pretrain    MLM training step on 256 x 128 packed tokens: forward, backward, fused AdamW; bf16 autocast over
                float32 weights.
    finetune    sequence classification (2 labels) training step, 64 sequences of 64-512 tokens padded to the batch
                maximum (rounded up to a multiple of 64, so a compiled peer sees one shape).
    infer-base  the base encoder, 128 sequences of 64-512 tokens, torch.inference_mode.
    infer-mlm   the MLM head's logits on every token, same batches.
    long        the base encoder on 8 x 8192 tokens (BERT: n/a, 512 positions).

Contenders: `ours` (MosaicBERT-base from the repo's config.json, eager; its `cuda_graphs` replays the layers of packed
MLM training as CUDA graphs, `ours-nographs` runs them eagerly too), `bert-compiled-v30522` /
`bert-compiled-v30528` (transformers Bert* with SDPA, the whole model under torch.compile, the vocabulary as named;
`bert-compiled` is 30,522), `modernbert-compiled` (ModernBERT-base defaults, SDPA, compiled). Extras: drop
`-compiled` for eager, add `-nomask`, `ours-compiled` (each encoder layer compiled).

Timing. All contenders of a workload live on the card at once. Each warms up (compiles), then the rounds run
interleaved: in every round each contender runs `steps` back-to-back steps over a pool of 3 batches with one
synchronisation at the end (as a Trainer's loop runs them), the order rotating from round to round. The card varies
about 10% from run to run, so the comparison is the per-round ratio of real tokens/s, ours over the fastest peer;
its median and spread (min, max) over the rounds are reported.

Per contender also: GPU busy = the union of kernel and copy intervals in a torch.profiler trace of a few steps,
per step, over the unprofiled median step time; host syncs per step = synchronising calls counted by
torch.cuda.set_sync_debug_mode("warn") (item(), nonzero(), device-to-host copies, ...) in a separate loop; and the
CUDA runtime's synchronize calls in the trace (minus the one that ends the trace). MFU = model FLOPs of the real
tokens (2 x encoder linear weights per token, the MLM head on the tokens it must score, 4 x hidden x L^2 per layer
for attention; training 3x forward) over the bf16 matmul ceiling measured in the same run (8192^3, random data).

Writes $OUT/model_bench.json (rewritten after every workload) and $OUT/model_bench.png; prints the table last.
"""

import argparse
import collections
import gc
import inspect
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from report import render  # noqa: E402
from runinfo import run_meta  # noqa: E402

WORKLOADS = {
    "pretrain": dict(head="mlm", train=True, batch=256, lengths=(128, 128), pad_multiple=None, mlm=0.3, steps=10),
    "finetune": dict(head="cls", train=True, batch=64, lengths=(64, 512), pad_multiple=64, steps=12),
    "infer-base": dict(head="base", train=False, batch=128, lengths=(64, 512), pad_multiple=64, steps=10),
    "infer-mlm": dict(head="mlm", train=False, batch=128, lengths=(64, 512), pad_multiple=64, steps=10),
    "long": dict(head="base", train=False, batch=8, lengths=(8192, 8192), pad_multiple=None, steps=5),
}
DESCRIPTIONS = {"pretrain": "MLM training step", "finetune": "sequence classification training step",
                "infer-base": "base encoder inference", "infer-mlm": "MLM logits on every token",
                "long": "base encoder inference"}
SMOKE = {
    "pretrain": dict(batch=4, lengths=(32, 32), steps=2),
    "finetune": dict(batch=4, lengths=(8, 64), pad_multiple=8, steps=2),
    "infer-base": dict(batch=4, lengths=(8, 64), pad_multiple=8, steps=2),
    "infer-mlm": dict(batch=4, lengths=(8, 64), pad_multiple=8, steps=2),
    "long": dict(batch=2, lengths=(256, 256), steps=2),  # beyond the smoke BERT's 128 positions: the n/a path
}
SMOKE_SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
DEFAULT_CONTENDERS = {
    "pretrain": ["ours", "ours-nographs", "bert-compiled-v30522", "bert-compiled-v30528"],
    "finetune": ["ours", "bert-compiled"],
    "infer-base": ["ours", "bert-compiled"],
    "infer-mlm": ["ours", "bert-compiled-v30522", "bert-compiled-v30528"],
    "long": ["ours", "modernbert-compiled"],
}
TARGETS = {"pretrain": 1.25, "finetune": 1.6, "infer-base": 1.8, "infer-mlm": 1.8}  # ours / fastest peer, to reach
POOL = 3  # distinct batches cycled through warm-up and timing
TOKEN_IDS = (1000, 30522)  # random ids valid in every vocabulary here, no special tokens


def log(*args):
    print(*args, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {list(WORKLOADS)}")
    p.add_argument("--contenders", help="comma list replacing the defaults of every workload (ours is always kept)")
    p.add_argument("--extra", default="", help="comma list of contenders added to every workload")
    p.add_argument("--rounds", type=int, help="interleaved timing rounds (default 5; 2 with --smoke)")
    p.add_argument("--profile-steps", type=int, default=3, help="steps under torch.profiler / sync counting")
    p.add_argument("--budget", type=float, default=float("inf"),
                   help="seconds; a workload that would start later, or a contender not yet warmed, is skipped")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny models and inputs, 2 rounds")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"), help="output folder (default $OUT)")
    args = p.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    unknown = set(args.workloads) - set(WORKLOADS)
    if unknown:
        p.error(f"unknown workload(s) {sorted(unknown)}; choose from {list(WORKLOADS)}")
    args.rounds = args.rounds or (2 if args.smoke else 5)
    return args


# ---------------------------------------------------------------------------------------------------------------
# Inputs: a tokenizer and a collator, as users get them
# ---------------------------------------------------------------------------------------------------------------


def workload_spec(name, smoke):
    spec = dict(WORKLOADS[name])
    if smoke:
        spec.update(SMOKE[name])
    (lo, hi), what = spec["lengths"], DESCRIPTIONS[name]
    shape = f"{spec['batch']} x {lo}" + (f"-{hi}" if hi != lo else "")
    spec["desc"] = f"{what}, {shape}" + (" packed" if name == "pretrain" else "")
    spec["target"] = TARGETS.get(name)
    return spec


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(REPO), trust_remote_code=True)


def make_batches(spec, tokenizer, seed):
    """POOL collated batches (dicts of CPU tensors). Each example is [CLS] random ids [SEP] with token_type_ids of
    zeros (and a class label for finetune); the collator pads, builds attention_mask and draws the MLM labels."""
    import torch
    from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding

    if spec["head"] == "mlm" and spec["train"]:
        collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=spec["mlm"],
                                                   pad_to_multiple_of=spec["pad_multiple"], seed=seed)
    else:
        collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=spec["pad_multiple"])
    batches = []
    for i in range(POOL):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        lo, hi = spec["lengths"]
        lengths = torch.randint(lo, hi + 1, (spec["batch"],), generator=g).tolist()
        examples = []
        for length in lengths:
            body = torch.randint(*TOKEN_IDS, (length - 2,), generator=g).tolist()
            example = {"input_ids": [tokenizer.cls_token_id, *body, tokenizer.sep_token_id],
                       "token_type_ids": [0] * length}
            if spec["head"] == "cls":
                example["labels"] = int(torch.randint(0, 2, (1,), generator=g))
            examples.append(example)
        batch = dict(collator(examples))
        real = batch["attention_mask"].bool()
        batch = {"inputs": batch, "lengths": lengths, "real_tokens": int(real.sum())}
        if spec["head"] == "mlm":
            labels = batch["inputs"].get("labels")
            batch["scored_tokens"] = int((labels != -100).sum()) if labels is not None else batch["real_tokens"]
        else:
            batch["scored_tokens"] = 0
        batches.append(batch)
    return batches


def forward_keys(model):
    """Names of the inputs a model's forward takes explicitly (what Trainer's remove_unused_columns keeps)."""
    params = inspect.signature(model.forward).parameters.values()
    return {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def model_inputs(batch, keys, mask, device):
    inputs = {k: v for k, v in batch["inputs"].items() if k in keys and (mask or k != "attention_mask")}
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}


# ---------------------------------------------------------------------------------------------------------------
# Contenders
# ---------------------------------------------------------------------------------------------------------------


def parse_contender(name):
    """'bert-compiled-v30528-nomask' -> dict(family='bert', compiled=True, vocab=30528, mask=False)."""
    parts = name.split("-")
    family, flags = parts[0], parts[1:]
    if family not in ("ours", "bert", "modernbert"):
        raise ValueError(f"unknown contender {name!r}: it starts with ours, bert or modernbert")
    spec = dict(name=name, family=family, compiled=False, vocab=None, mask=True, graphs=True)
    for flag in flags:
        if flag == "compiled":
            spec["compiled"] = True
        elif flag == "nographs" and family == "ours":
            spec["graphs"] = False
        elif flag == "nomask":
            spec["mask"] = False
        elif flag.startswith("v") and flag[1:].isdigit():
            spec["vocab"] = int(flag[1:])
        else:
            raise ValueError(
                f"unknown flag {flag!r} in contender {name!r} (compiled, nomask, v<vocab>; ours: nographs)")
    return spec


def build_model(contender, head, smoke, device):
    """Returns (model on device, encoder layers, MLM head modules, max positions or None)."""
    import torch

    family = contender["family"]
    if family == "ours":
        from configuration_mosaic_bert import MosaicBertConfig
        from modeling_mosaic_bert import MosaicBertForMaskedLM, MosaicBertForSequenceClassification, MosaicBertModel

        config = MosaicBertConfig.from_json_file(str(REPO / "config.json"))
        config.cuda_graphs = config.cuda_graphs and contender["graphs"]
        classes = {"mlm": MosaicBertForMaskedLM, "cls": MosaicBertForSequenceClassification, "base": MosaicBertModel}
    elif family == "bert":
        from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel

        config = BertConfig(attn_implementation="sdpa", vocab_size=contender["vocab"] or 30522)
        if smoke:
            config.max_position_embeddings = 128
        classes = {"mlm": BertForMaskedLM, "cls": BertForSequenceClassification, "base": BertModel}
    else:
        from transformers import (
            ModernBertConfig,
            ModernBertForMaskedLM,
            ModernBertForSequenceClassification,
            ModernBertModel,
        )

        config = ModernBertConfig(attn_implementation="sdpa", reference_compile=False)
        if smoke:
            config.local_attention = 16
        classes = {"mlm": ModernBertForMaskedLM, "cls": ModernBertForSequenceClassification, "base": ModernBertModel}
    if contender["vocab"] and family != "bert":
        config.vocab_size = contender["vocab"]
    if smoke:
        for key, value in SMOKE_SIZES.items():
            setattr(config, key, value)
        if family == "modernbert":
            config.intermediate_size, config.num_hidden_layers = 96, 3
            if getattr(config, "layer_types", None) is not None:
                config.layer_types = config.layer_types[:3]
    config.num_labels = 2
    with torch.device(device):
        model = classes[head](config)
    base = model.base_model
    layers = base.layers if family == "modernbert" else base.encoder.layer
    if head != "mlm":
        mlm_head = []
    elif family == "modernbert":
        mlm_head = [model.head.dense, model.decoder]
    else:
        mlm_head = [model.cls.predictions.transform.dense, model.cls.predictions.decoder]
    max_positions = None if family == "ours" else getattr(config, "max_position_embeddings", None)
    return model, layers, mlm_head, max_positions


def linear_weights(modules):
    from torch import nn

    return sum(m.weight.numel() for mod in modules for m in mod.modules() if isinstance(m, nn.Linear))


def model_flops(batch, p_lin, p_head, hidden, n_layers, training):
    """Real-token model FLOPs of one step (module docstring)."""
    attention = 4 * hidden * n_layers * sum(length * length for length in batch["lengths"])
    forward = 2 * p_lin * batch["real_tokens"] + 2 * p_head * batch["scored_tokens"] + attention
    return 3 * forward if training else forward


class Runner:
    """One contender of one workload: its model, its step function, its measurements."""

    def __init__(self, contender, spec, batches, device, smoke):
        import torch

        self.contender, self.spec, self.device = contender, spec, device
        self.row = {"contender": contender["name"], "mask": contender["mask"], "compiled": contender["compiled"]}
        model, layers, mlm_head, max_positions = build_model(contender, spec["head"], smoke, device)
        seqlen = max(b["inputs"]["input_ids"].shape[1] for b in batches)
        self.na = None
        if max_positions is not None and seqlen > max_positions:
            self.na = f"n/a: {max_positions} position embeddings"
            return
        model.train(spec["train"])
        keys = forward_keys(model)
        self.inputs = [model_inputs(b, keys, contender["mask"], device) for b in batches]
        self.batches = batches
        self.row["inputs"] = sorted(self.inputs[0])
        self.flops = [model_flops(b, linear_weights([layers]), linear_weights(mlm_head), model.config.hidden_size,
                                  len(layers), spec["train"]) for b in batches]
        if contender["compiled"]:
            if contender["family"] == "ours":
                for layer in layers:
                    layer.compile(dynamic=True)
            else:
                model = torch.compile(model)
        self.model = model
        cuda = device == "cuda"
        if spec["train"]:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)

            def step(inputs):
                with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
                    loss = model(**inputs).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        else:
            def step(inputs):
                with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
                    model(**inputs)
        self.step = step
        self.times = []  # per round: (seconds, steps, first batch index)

    def sync(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def loop(self, steps, start=0):
        for i in range(start, start + steps):
            self.step(self.inputs[i % POOL])

    def warm_up(self):
        import torch

        if self.device == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        self.loop(2 * POOL + 1 if self.contender["compiled"] else POOL + 1)
        self.sync()
        self.row["warmup_s"] = round(time.perf_counter() - t0, 1)
        if self.device == "cuda":
            self.row["step_peak_gib"] = (torch.cuda.max_memory_allocated() - resident) / 2**30

    def timed_round(self, r):
        steps = self.spec["steps"]
        self.sync()
        t0 = time.perf_counter()
        self.loop(steps, start=r)
        self.sync()
        self.times.append((time.perf_counter() - t0, steps, r))

    def rate(self, i):
        """(samples/s, real tokens/s, FLOP/s) of round i."""
        seconds, steps, start = self.times[i]
        used = [(start + k) % POOL for k in range(steps)]
        return (self.spec["batch"] * steps / seconds, sum(self.batches[j]["real_tokens"] for j in used) / seconds,
                sum(self.flops[j] for j in used) / seconds)

    def count_syncs(self, steps):
        """Synchronising calls per step, as torch.cuda.set_sync_debug_mode('warn') reports them."""
        import torch

        if self.device != "cuda":
            return None
        self.sync()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                self.loop(steps)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        self.sync()
        return sum("synchroniz" in str(w.message) for w in caught) / steps

    def profile(self, steps):
        """From a torch.profiler trace: GPU busy ms per step, runtime synchronize calls per step, and kernel ms per
        step by category (benchmarks/categories.py)."""
        import torch
        from categories import categorize
        from torch.profiler import ProfilerActivity, profile

        if self.device != "cuda":
            return None, None, None
        self.sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            self.loop(steps)
            torch.cuda.synchronize()
        intervals, sync_calls = [], -1  # the synchronize that ends the trace is ours
        by_category = collections.Counter()
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                intervals.append((e.time_range.start, e.time_range.end))
                by_category[categorize(e.name)] += (e.time_range.end - e.time_range.start) / 1e3 / steps
            elif e.name in ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy"):
                sync_calls += 1
        return union_length(intervals) / 1e3 / steps, max(sync_calls, 0) / steps, dict(by_category)

    def summarise(self, peak_flops):
        rates = [self.rate(i) for i in range(len(self.times))]
        step_ms = [1e3 * s / n for s, n, _ in self.times]
        self.row.update(
            samples_per_s=statistics.median(r[0] for r in rates),
            tokens_per_s=statistics.median(r[1] for r in rates),
            tokens_per_s_rounds=[r[1] for r in rates],
            mfu=statistics.median(r[2] for r in rates) / peak_flops,
            step_ms=statistics.median(step_ms),
            step_ms_min=min(step_ms),
            step_ms_max=max(step_ms),
        )
        if self.row.get("busy_ms_per_step") is not None:
            self.row["gpu_busy"] = min(1.0, self.row["busy_ms_per_step"] / self.row["step_ms"])


def union_length(intervals):
    """Total length covered by (start, end) intervals."""
    total, end = 0.0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


# ---------------------------------------------------------------------------------------------------------------
# One workload: contenders side by side, interleaved rounds, ratios
# ---------------------------------------------------------------------------------------------------------------


def compare(rows):
    """Ours (with mask) against the fastest peer with a mask: per-round ratio of real tokens/s."""
    ours = next((r for r in rows if r["contender"] == "ours" and r.get("tokens_per_s")), None)
    peers = [r for r in rows if not r["contender"].startswith("ours") and r["mask"] and r.get("tokens_per_s")]
    if ours is None or not peers:
        return None
    peer = max(peers, key=lambda r: r["tokens_per_s"])
    ratios = [a / b for a, b in zip(ours["tokens_per_s_rounds"], peer["tokens_per_s_rounds"])]
    return {"peer": peer["contender"], "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios), "ratios": ratios}


def run_workload(name, spec, contenders, tokenizer, args, device, peak_flops, deadline):
    import torch

    batches = make_batches(spec, tokenizer, seed=list(WORKLOADS).index(name))
    runners, rows = [], []
    for contender in contenders:
        row = {"contender": contender["name"], "mask": contender["mask"], "compiled": contender["compiled"]}
        if time.perf_counter() > deadline:
            row["note"] = "skipped: time budget"
            rows.append(row)
            continue
        try:
            runner = Runner(contender, spec, batches, device, args.smoke)
            if runner.na:
                row["note"] = runner.na
                rows.append(row)
                continue
            runner.warm_up()
            runner.row["syncs_per_step"] = runner.count_syncs(args.profile_steps)
            busy, sync_calls, by_category = runner.profile(args.profile_steps)
            runner.row.update(busy_ms_per_step=busy, sync_calls_per_step=sync_calls, kernel_ms=by_category)
            runners.append(runner)
            rows.append(runner.row)
            log(f"    {contender['name']}: warm-up {runner.row['warmup_s']} s, inputs {runner.row['inputs']}")
        except Exception as exc:  # noqa: BLE001 -- one broken contender must not end the run
            traceback.print_exc(limit=4)
            row["note"] = "error: " + " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            rows.append(row)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    for r in range(args.rounds):
        for k in range(len(runners)):
            runners[(r + k) % len(runners)].timed_round(r)
    for runner in runners:
        runner.summarise(peak_flops)
        runner.row["note"] = f"{runner.row['step_ms']:.1f} ms/step"
    del runners
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"workload": name, "rows": rows, "comparison": compare(rows)}


def matmul_ceiling(device, smoke):
    """Measured dense matmul rate in FLOP/s: bf16 8192^3 on CUDA (random data), float32 on the CPU."""
    import torch

    n, dtype = ((2048 if smoke else 8192), torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(13):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times), f"{str(dtype).split('.')[-1]} {n}^3 matmul"


def main(argv=None):
    args = parse_args(argv)
    import torch

    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.smoke:
        sys.exit("no CUDA device: run with --smoke for the CPU check")
    torch.manual_seed(0)
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "model_bench.json", out / "model_bench.png"
    start = time.perf_counter()
    deadline = start + args.budget

    meta = run_meta(device)
    peak_flops, ceiling = matmul_ceiling(device, args.smoke)
    meta.update(peak_tflops=peak_flops / 1e12, ceiling=ceiling, rounds=args.rounds, smoke=args.smoke,
                argv=sys.argv[1:] if argv is None else argv)
    log(f"# model benchmark {meta['date']}: {meta['device_name']}, torch {meta['torch']}, triton {meta['triton']}, "
        f"transformers {meta['transformers']}, commit {meta['commit']}; {ceiling} {peak_flops / 1e12:.0f} TFLOP/s")
    tokenizer = load_tokenizer()
    results = {"meta": meta, "workloads": {}, "results": []}
    for name in args.workloads:
        spec = workload_spec(name, args.smoke)
        results["workloads"][name] = spec
        names = args.contenders.split(",") if args.contenders else DEFAULT_CONTENDERS[name]
        names = list(dict.fromkeys(["ours", *names, *[n for n in args.extra.split(",") if n]]))
        contenders = [parse_contender(n) for n in names]
        if args.smoke:  # compiling on a CPU takes minutes: the smoke run checks the eager path of every contender
            for contender in contenders:
                contender["compiled"] = False
        log(f"[{name}] {spec['desc']}: {', '.join(names)}  t={time.perf_counter() - start:.0f}s")
        if time.perf_counter() > deadline:
            results["results"].append({"workload": name, "rows": [], "skipped": "time budget"})
            continue
        result = run_workload(name, spec, contenders, tokenizer, args, device, peak_flops, deadline)
        results["results"].append(result)
        c = result["comparison"]
        if c:
            log(f"    ours / {c['peer']}: {c['ratio_median']:.2f}x (min {c['ratio_min']:.2f}, max "
                f"{c['ratio_max']:.2f}, {len(c['ratios'])} rounds)")
        json_path.write_text(json.dumps(results, indent=1))
    meta["total_s"] = round(time.perf_counter() - start, 1)
    json_path.write_text(json.dumps(results, indent=1))
    try:
        from plot import plot_model

        problem = plot_model(results, png_path)
    except Exception as exc:  # noqa: BLE001 -- the chart is optional
        problem = f"{type(exc).__name__}: {exc}"
    log(f"# wrote {json_path}" + (f"; no chart: {problem}" if problem else f" and {png_path}"))
    log(f"# total {meta['total_s']:.0f} s\n")
    log(render(results))


if __name__ == "__main__":
    main()
