"""End-to-end model benchmark: MosaicBERT-base against transformers' BERT-base and ModernBERT-base.

    python benchmarks/model.py                                  # GPU: pretrain, train, infer, long
    python benchmarks/model.py --device cpu                     # CPU: the cpu workload
    python benchmarks/model.py --device cpu --smoke --workloads pretrain,train,infer,long,cpu \
        --models ours,ours-compiled,ours-torch,bert,bert-compiled,modernbert   # every code path, tiny sizes

Every model gets random weights from a config (nothing is downloaded) and the very same random inputs.

Workloads (full sizes; --smoke shrinks batches, lengths and models):
    pretrain  MaskedLM, 256 x 128 tokens, no padding (no attention_mask passed), 30% of tokens labelled (others
              -100); forward + backward + AdamW step. Ours runs the MLM head only on the labelled tokens.
    train     SequenceClassification (2 labels), batch 64, lengths uniform in [64, 512] padded to 512 with
              attention_mask; forward + backward + AdamW step.
    infer     base encoder, batch 128, lengths uniform in [64, 512] padded to 512 with attention_mask,
              torch.inference_mode.
    long      base encoder, 8 x 8192 tokens, inference. BERT: n/a (512 position embeddings).
    cpu       base encoder on the CPU (--device cpu), batch 32, lengths uniform in [16, 256] padded to the batch
              maximum, float32, inference, torch.set_num_threads(all cores).
On CUDA every workload runs under bf16 autocast with float32 weights (AdamW fused=True).

Models: ours (MosaicBERT-base from the repo's config.json, attention_backend "auto": the Triton kernel on CUDA),
ours-compiled (the same, each encoder layer compiled: layer.compile(dynamic=True)), ours-torch
(attention_backend="torch"), ours-triton (attention_backend="triton", forces the kernel; on CPU only under
TRITON_INTERPRET, which --smoke sets), bert (transformers BERT-base, BertConfig() defaults, SDPA), bert-compiled
(torch.compile(model)), modernbert (transformers ModernBERT-base, ModernBertConfig() defaults, SDPA),
modernbert-compiled.

Timing: a pool of 3 input batches (fixed seeds) is cycled; >= 3 warm-up iterations (2 x pool + 1 for compiled
models; compile time is reported separately), then --iters timed iterations, each timed alone with CUDA events
(perf_counter on CPU) and synchronised. Each figure is the median over the timed iterations of its per-iteration
value.

Figures per row:
    samples/s    batch / step time.
    real tok/s   real (unpadded) tokens / step time: padding is never counted.
    MFU          model FLOPs / step time / matmul ceiling. The ceiling is measured in the same run: a bf16
                 8192 x 8192 x 8192 matmul on random data on CUDA (FLOPs = 2 M N K), a float32 2048^3 one on CPU.
    peak mem     torch.cuda.max_memory_allocated() after reset_peak_memory_stats() (model, optimizer state and
                 activations); not measured on CPU.

Model FLOPs count real tokens only, and the same formula is used for every model:
    forward = 2 * P_lin * T  +  2 * P_head * N_lab  +  4 * hidden * n_layers * sum_b(L_b^2)
where T = real tokens in the batch, L_b = length of sequence b, P_lin = number of weights of the nn.Linear layers
of the encoder layers (embeddings, pooler and classifier excluded), P_head = weights of the MLM head's transform and
decoder (pretrain only), N_lab = labelled tokens (pretrain only). 4 * hidden * L per layer per token is QK^T plus
PV at full attention. Training = 3 x forward. ModernBERT's sliding-window layers do less attention work than the
formula credits, so its MFU is flattering where attention dominates (long).

Robustness: any failure of one row (OOM, compile error, ...) becomes a row "error: ..." and the run goes on; after
--budget seconds (default 450 on CUDA) the remaining rows are skipped. Eager rows run first, compiled rows last.
$OUT/model_bench.json (OUT defaults to ./bench_out) is rewritten after every row; the PNG bar chart and the
markdown table (printed last) come at the end.
"""

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

ALL_WORKLOADS = ["pretrain", "train", "infer", "long", "cpu"]
ALL_MODELS = ["ours", "ours-compiled", "ours-torch", "ours-triton", "bert", "bert-compiled", "modernbert",
              "modernbert-compiled"]
DEFAULT_MODELS = {"cuda": "ours,ours-compiled,ours-torch,bert,bert-compiled,modernbert", "cpu": "ours,bert,modernbert"}
DEFAULT_WORKLOADS = {"cuda": "pretrain,train,infer,long", "cpu": "cpu"}

# head: mlm (MaskedLM, training), cls (SequenceClassification, training), base (encoder, inference).
# lengths: (min, max) uniform per sequence; pad_to: padded length (None = batch max); mask: pass attention_mask.
WORKLOADS = {
    "pretrain": dict(head="mlm", batch=256, lengths=(128, 128), pad_to=128, mask=False, label_frac=0.3),
    "train": dict(head="cls", batch=64, lengths=(64, 512), pad_to=512, mask=True),
    "infer": dict(head="base", batch=128, lengths=(64, 512), pad_to=512, mask=True),
    "long": dict(head="base", batch=8, lengths=(8192, 8192), pad_to=8192, mask=False),
    "cpu": dict(head="base", batch=32, lengths=(16, 256), pad_to=None, mask=True, cpu_only=True),
}
SMOKE_WORKLOADS = {
    "pretrain": dict(batch=4, lengths=(32, 32), pad_to=32),
    "train": dict(batch=4, lengths=(8, 64), pad_to=64),
    "infer": dict(batch=4, lengths=(8, 64), pad_to=64),
    "long": dict(batch=2, lengths=(256, 256), pad_to=256),  # beyond the smoke BERT's 128 positions: n/a path
    "cpu": dict(batch=4, lengths=(4, 32), pad_to=None),
}
SMOKE_SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
POOL = 3  # distinct input batches cycled through warm-up and timing
TOKEN_IDS = (1000, 30522)  # random token ids valid in every vocabulary (BERT's is the smallest), no special ids


def log(*args):
    print(*args, flush=True)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if _cuda_available() else "cpu")
    p.add_argument("--workloads", help=f"comma list of {ALL_WORKLOADS}")
    p.add_argument("--models", help=f"comma list of {ALL_MODELS}")
    p.add_argument("--iters", type=int, help="timed iterations (default 10; 3 with --smoke)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up iterations of eager models (compiled: 2*pool+1)")
    p.add_argument("--budget", type=float, help="seconds after which remaining rows are skipped "
                   "(default 450 on CUDA, none on CPU)")
    p.add_argument("--amp", choices=["auto", "bf16", "none"], default="auto",
                   help="autocast dtype: auto = bf16 on CUDA, none (float32) on CPU")
    p.add_argument("--smoke", action="store_true", help="tiny models, tiny inputs, few iterations")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"), help="output folder (default $OUT)")
    args = p.parse_args()
    args.workloads = [w for w in (args.workloads or DEFAULT_WORKLOADS[args.device]).split(",") if w]
    args.models = [m for m in (args.models or DEFAULT_MODELS[args.device]).split(",") if m]
    for name, given, known in (("workload", args.workloads, ALL_WORKLOADS), ("model", args.models, ALL_MODELS)):
        unknown = set(given) - set(known)
        if unknown:
            p.error(f"unknown {name}(s) {sorted(unknown)}; choose from {known}")
    if args.iters is None:
        args.iters = 3 if args.smoke else 10
    if args.budget is None:
        args.budget = 450.0 if args.device == "cuda" else float("inf")
    if args.amp == "auto":
        args.amp = "bf16" if args.device == "cuda" else "none"
    return args


def _cuda_available():
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------


def workload_spec(name, smoke):
    spec = dict(WORKLOADS[name])
    if smoke:
        spec.update(SMOKE_WORKLOADS[name])
    lo, hi = spec["lengths"]
    pad = spec["pad_to"] or "batch max"
    spec["desc"] = f"{spec['batch']} x {lo}" + (f"-{hi}" if hi != lo else "") + (
        f", padded to {pad}" if spec["mask"] else "")
    return spec


def make_batches(spec, device, seed=0):
    """POOL batches of random inputs: input_ids (B, S) int64 with 0 on padding, attention_mask (B, S) int64 (or None
    without padding), labels (MLM: ids on label_frac of the real tokens, else -100; cls: (B,) in {0, 1}), lengths."""
    import torch

    batches = []
    for i in range(POOL):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        B, (lo, hi) = spec["batch"], spec["lengths"]
        lengths = torch.randint(lo, hi + 1, (B,), generator=g)
        S = spec["pad_to"] or int(lengths.max())
        real = torch.arange(S)[None, :] < lengths[:, None]
        ids = torch.randint(*TOKEN_IDS, (B, S), generator=g).masked_fill(~real, 0)
        batch = {"input_ids": ids, "attention_mask": real.long() if spec["mask"] else None}
        if spec["head"] == "mlm":
            real_pos = real.flatten().nonzero().flatten()
            n_lab = round(spec["label_frac"] * real_pos.numel())
            chosen = real_pos[torch.randperm(real_pos.numel(), generator=g)[:n_lab]]
            labels = torch.full((B * S,), -100, dtype=torch.long)
            labels[chosen] = ids.flatten()[chosen]
            batch["labels"] = labels.view(B, S)
        elif spec["head"] == "cls":
            batch["labels"] = torch.randint(0, 2, (B,), generator=g)
        batch = {k: (v.to(device) if v is not None else None) for k, v in batch.items()}
        batch["lengths"] = lengths.tolist()
        batch["n_labelled"] = int((batch["labels"] != -100).sum()) if spec["head"] == "mlm" else 0
        batches.append(batch)
    return batches


def model_inputs(batch):
    return {k: v for k, v in batch.items() if k not in ("lengths", "n_labelled") and v is not None}


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def build_model(name, head, smoke, device="cpu"):
    """Returns (model on device, encoder layers ModuleList, MLM head modules or [], max positions or None)."""
    import torch

    family = name.split("-")[0]
    if family == "ours":
        from configuration_mosaic_bert import MosaicBertConfig
        from modeling_mosaic_bert import MosaicBertForMaskedLM, MosaicBertForSequenceClassification, MosaicBertModel

        config = MosaicBertConfig.from_json_file(str(REPO / "config.json"))
        if name in ("ours-torch", "ours-triton"):
            config.attention_backend = name.split("-")[1]
        cls = {"mlm": MosaicBertForMaskedLM, "cls": MosaicBertForSequenceClassification, "base": MosaicBertModel}[head]
    elif family == "bert":
        from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel

        config = BertConfig(attn_implementation="sdpa")
        if smoke:
            config.max_position_embeddings = 128
        cls = {"mlm": BertForMaskedLM, "cls": BertForSequenceClassification, "base": BertModel}[head]
    elif family == "modernbert":
        from transformers import (ModernBertConfig, ModernBertForMaskedLM, ModernBertForSequenceClassification,
                                  ModernBertModel)

        config = ModernBertConfig(attn_implementation="sdpa", reference_compile=False)
        if smoke:
            config.local_attention = 16
        cls = {"mlm": ModernBertForMaskedLM, "cls": ModernBertForSequenceClassification, "base": ModernBertModel}[head]
    else:
        raise ValueError(name)
    if smoke:
        for key, value in SMOKE_SIZES.items():
            setattr(config, key, value)
        if family == "modernbert":
            config.intermediate_size = 96
            config.num_hidden_layers = 3
            if getattr(config, "layer_types", None) is not None:
                config.layer_types = config.layer_types[:3]
    config.num_labels = 2
    with torch.device(device):  # initialise the weights where they will run
        model = cls(config)
    base = model.base_model
    layers = base.layers if family == "modernbert" else base.encoder.layer
    if head != "mlm":
        mlm_head = []
    elif family == "modernbert":
        mlm_head = [model.head.dense, model.decoder]
    else:
        mlm_head = [model.cls.predictions.transform.dense, model.cls.predictions.decoder]
    max_positions = getattr(config, "max_position_embeddings", None) if family != "ours" else None
    return model, layers, mlm_head, max_positions


def compile_model(name, model, layers):
    """ours: regional compilation of the encoder layers; transformers models: the whole model."""
    if name.startswith("ours"):
        for layer in layers:
            layer.compile(dynamic=True)
        return model
    return __import__("torch").compile(model)


def attention_path(model, layers, device, amp_dtype):
    """For our model: which attention implementation a call of the first layer would take, and why."""
    import torch
    import modeling_mosaic_bert as mmb

    attn = layers[0].attention.self
    dtype = amp_dtype or torch.float32
    q = torch.zeros(16, attn.num_heads, attn.head_dim, dtype=dtype, device=device)
    cu = torch.tensor([0, 16], dtype=torch.int32, device=device)
    reason = attn.kernel_unsupported_reason(q, q, q, cu, mmb.alibi_slopes(attn.num_heads, device), False)
    return "attn=triton" if reason is None else f"attn=torch ({reason})"


# ---------------------------------------------------------------------------------------------------------------
# FLOPs, timing
# ---------------------------------------------------------------------------------------------------------------


def linear_weights(modules):
    from torch import nn

    return sum(m.weight.numel() for mod in modules for m in mod.modules() if isinstance(m, nn.Linear))


def model_flops(batch, p_lin, p_head, hidden, n_layers, training):
    """Real-token model FLOPs of one step (see the module docstring)."""
    tokens = sum(batch["lengths"])
    attention = 4 * hidden * n_layers * sum(length * length for length in batch["lengths"])
    forward = 2 * p_lin * tokens + 2 * p_head * batch["n_labelled"] + attention
    return 3 * forward if training else forward


def synchronize(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(step, batches, warmup, iters, device):
    """Runs step(batch) warmup times, then iters times, each timed alone. Returns [(batch, seconds)]."""
    import torch

    for i in range(warmup):
        step(batches[i % len(batches)])
    synchronize(device)
    timings = []
    for i in range(iters):
        batch = batches[i % len(batches)]
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(batch)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            step(batch)
            seconds = time.perf_counter() - t0
        timings.append((batch, seconds))
    return timings


def matmul_ceiling(device, smoke):
    """Measured dense matmul throughput in FLOP/s: bf16 8192^3 on CUDA, float32 2048^3 on CPU."""
    import torch

    if device == "cuda":
        n, dtype, iters = (2048 if smoke else 8192), torch.bfloat16, 10
    else:
        n, dtype, iters = (512 if smoke else 2048), torch.float32, 5
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    timings = time_steps(lambda _: a @ b, [None], 3, iters, device)
    seconds = statistics.median(t for _, t in timings)
    return 2 * n**3 / seconds, f"{str(dtype).split('.')[-1]} {n}x{n}x{n} matmul"


# ---------------------------------------------------------------------------------------------------------------
# One row
# ---------------------------------------------------------------------------------------------------------------


def run_row(model_name, workload, spec, batches, args, peak_flops):
    import torch

    device = args.device
    row = {"model": model_name, "workload": workload}
    compiled = model_name.endswith("-compiled")
    model, layers, mlm_head, max_positions = build_model(model_name, spec["head"], args.smoke, device)
    seqlen = max(b["input_ids"].shape[1] for b in batches)
    if max_positions is not None and seqlen > max_positions:
        row["note"] = f"n/a: {max_positions} position embeddings"
        return row
    training = spec["head"] != "base"
    model.to(device).train(training)
    amp_dtype = torch.bfloat16 if args.amp == "bf16" else None
    notes = []
    if model_name.startswith("ours"):
        notes.append(attention_path(model, layers, device, amp_dtype))
    if compiled:
        model = compile_model(model_name, model, layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda") if training else None
    autocast = (lambda: torch.autocast(device, dtype=amp_dtype)) if amp_dtype else (lambda: torch.autocast(
        device, enabled=False))

    def train_step(batch):
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = model(**model_inputs(batch)).loss
        loss.backward()
        optimizer.step()

    def infer_step(batch):
        with torch.inference_mode(), autocast():
            model(**model_inputs(batch))

    p_lin = linear_weights([layers])
    p_head = linear_weights(mlm_head)
    hidden, n_layers = model.config.hidden_size, len(layers)
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    warmup = 2 * POOL + 1 if compiled else max(args.warmup, 1)
    t0 = time.perf_counter()
    timings = time_steps(train_step if training else infer_step, batches, warmup, args.iters, device)
    wall = time.perf_counter() - t0
    step_times = [t for _, t in timings]
    row.update(
        samples_per_s=statistics.median(spec["batch"] / t for _, t in timings),
        tokens_per_s=statistics.median(sum(b["lengths"]) / t for b, t in timings),
        mfu=statistics.median(model_flops(b, p_lin, p_head, hidden, n_layers, training) / t
                              for b, t in timings) / peak_flops,
        step_ms=1e3 * statistics.median(step_times),
        step_ms_min=1e3 * min(step_times),
        step_ms_max=1e3 * max(step_times),
        peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
        linear_weights_m=p_lin / 1e6,
    )
    if compiled:
        warm_s = wall - sum(step_times)
        row["warmup_s"] = warm_s
        notes.append(f"compile+warm-up {warm_s:.0f} s")
    notes.append(f"{row['step_ms']:.1f} ms/step")
    row["note"] = "; ".join(notes)
    return row


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------


def fmt(value, kind):
    if value is None:
        return "-"
    if kind == "rate":
        return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    return f"{value:.1f} GiB"


def table(rows):
    lines = ["| model | workload | samples/s | real tok/s | MFU | peak mem | note |", "|---|---|---:|---:|---:|---:|---|"]
    order = {w: i for i, w in enumerate(ALL_WORKLOADS)}
    for r in sorted(rows, key=lambda r: (order.get(r["workload"], 99), ALL_MODELS.index(r["model"]))):
        lines.append(f"| {r['model']} | {r['workload']} | {fmt(r.get('samples_per_s'), 'rate')} | "
                     f"{fmt(r.get('tokens_per_s'), 'rate')} | {fmt(r.get('mfu'), 'pct')} | "
                     f"{fmt(r.get('peak_mem_gib'), 'mem')} | {r.get('note', '')} |")
    return "\n".join(lines)


def versions():
    import torch
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "transformers": transformers.__version__, "triton": triton_version,
            "python": platform.python_version()}


def device_name(device):
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores)"


def main():
    args = parse_args()
    if args.smoke and args.device == "cpu" and "ours-triton" in args.models:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before modeling_mosaic_bert imports the kernel
    import torch

    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count())
    for knob in ("cache_size_limit", "recompile_limit"):  # each workload compiles its own graphs
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "model_bench.json", out_dir / "model_bench.png"

    meta = dict(versions(), device=args.device, device_name=device_name(args.device),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                threads=torch.get_num_threads(), amp=args.amp, smoke=args.smoke, iters=args.iters,
                argv=sys.argv[1:], load_avg_1_5_15=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)
    log(f"# model benchmark  {meta['date']}")
    log(f"# device {meta['device_name']}; torch {meta['torch']}, transformers {meta['transformers']}, "
        f"triton {meta['triton']}, python {meta['python']}; threads {meta['threads']}; autocast {args.amp}; "
        f"load average {meta['load_avg_1_5_15']}")
    import modeling_mosaic_bert as mmb

    log(f"# our Triton kernel imported: {mmb.flash_attn_varlen_qkvpacked_func is not None}")

    peak_flops, ceiling_desc = matmul_ceiling(args.device, args.smoke)
    meta.update(peak_tflops=peak_flops / 1e12, ceiling=ceiling_desc)
    log(f"# matmul ceiling: {ceiling_desc}: {peak_flops / 1e12:.3g} TFLOP/s")

    specs = {w: workload_spec(w, args.smoke) for w in args.workloads}
    results = {"meta": meta, "workloads": specs, "rows": []}
    start = time.perf_counter()
    pool_cache = {}
    # Eager rows of every workload first, compiled rows last: a timeout then costs the compiled rows only.
    plan = [(w, m) for compiled in (False, True) for w in args.workloads for m in args.models
            if m.endswith("-compiled") == compiled]
    for i, (workload, model_name) in enumerate(plan):
        spec = specs[workload]
        elapsed = time.perf_counter() - start
        log(f"[{i + 1}/{len(plan)}] {model_name} / {workload} ({spec['desc']})  t={elapsed:.0f}s")
        if spec.get("cpu_only") and args.device != "cpu":
            row = {"model": model_name, "workload": workload, "note": "skipped: cpu workload needs --device cpu"}
        elif elapsed > args.budget:
            row = {"model": model_name, "workload": workload, "note": f"skipped: time budget {args.budget:.0f} s"}
        else:
            try:
                if workload not in pool_cache:
                    pool_cache = {workload: make_batches(spec, args.device, seed=ALL_WORKLOADS.index(workload))}
                row = run_row(model_name, workload, spec, pool_cache[workload], args, peak_flops)
            except Exception as exc:  # noqa: BLE001 -- one broken row must not end the run
                traceback.print_exc(limit=4)
                message = " ".join(f"{type(exc).__name__}: {exc}".split())
                row = {"model": model_name, "workload": workload, "note": f"error: {message[:200]}"}
            finally:
                gc.collect()
                if args.device == "cuda":
                    torch.cuda.empty_cache()
        row["elapsed_s"] = time.perf_counter() - start
        results["rows"].append(row)
        log("    " + table([row]).splitlines()[-1])
        json_path.write_text(json.dumps(results, indent=1))

    meta["total_s"] = time.perf_counter() - start
    json_path.write_text(json.dumps(results, indent=1))
    try:
        from plot import plot

        problem = plot(results, png_path)
    except Exception as exc:  # noqa: BLE001 -- the chart is optional
        problem = f"{type(exc).__name__}: {exc}"
    log(f"# wrote {json_path}" + (f"; no chart: {problem}" if problem else f" and {png_path}"))
    log(f"# total {meta['total_s']:.0f} s\n")
    log(f"## Model benchmark: {meta['device_name']}, torch {meta['torch']}, transformers {meta['transformers']}, "
        f"triton {meta['triton']}, {meta['date']}; autocast {args.amp}; matmul ceiling {ceiling_desc} "
        f"{peak_flops / 1e12:.3g} TFLOP/s\n")
    log(table(results["rows"]))


if __name__ == "__main__":
    main()
