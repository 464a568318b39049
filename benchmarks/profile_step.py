"""Where MosaicBERT spends its time: torch.profiler over a few steps, kernels (or CPU ops) grouped by category.

    python benchmarks/profile_step.py [--config config.json] [--batch 256] [--seqlen 128] [--steps 3] [--smoke]
    python benchmarks/profile_step.py --cpu-inference [--steps 3]

Default: one pretraining step on the GPU with the inputs the recipe's collator gives (input_ids, an all-ones
attention_mask, token_type_ids, labels on 30% of tokens; the MLM head runs on those only): random weights, bf16
autocast, fused AdamW. --cpu-inference: the CPU workload of benchmarks/model.py instead (the base encoder in
fp32, 32 sequences of 16-256 tokens padded to the batch maximum). Prints the top kernels by time and a table of time
per category (matmul, attention, elementwise and normalisation, optimizer, other) as a share of the wall time.
"""

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from categories import categorize  # noqa: E402

from configuration_mosaic_bert import MosaicBertConfig  # noqa: E402
from modeling_mosaic_bert import MosaicBertForMaskedLM  # noqa: E402


def pretraining_step(config, device: str, batch: int, seqlen: int):
    model = MosaicBertForMaskedLM(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, fused=device == "cuda")
    ids = torch.randint(1000, 30522, (batch, seqlen), device=device)
    # What the recipe's collator gives a packed batch: a mask of ones, token types of zeros, 30% of tokens labelled.
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
              "labels": torch.where(torch.rand(ids.shape, device=device) < 0.3, ids, -100)}

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def cpu_inference_step(config):
    """The base encoder in fp32 on 32 sequences of 16-256 tokens, padded to the batch maximum."""
    from modeling_mosaic_bert import MosaicBertModel

    model = MosaicBertModel(config).eval()
    lengths = torch.randint(16, 257, (32,))
    seqlen = int(lengths.max())
    ids = torch.randint(5, config.vocab_size, (32, seqlen))
    mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).long()

    def step():
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask)

    return step, 32, seqlen


def print_device_waits(prof, steps: int, top: int = 15) -> None:
    """Idle device time before each kernel, summed by the kernel that ended the wait: which launches the host was late
    with (after a host synchronisation, or behind slow Python)."""
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    gaps = collections.Counter()
    for before, after in zip(kernels, kernels[1:]):
        idle = after.time_range.start - max(before.time_range.end, before.time_range.start)
        if idle > 5:  # microseconds: launch-to-launch spacing of a busy stream is below this
            gaps[after.name[:70]] += idle / 1e3 / steps
    print(f"\n| the device waited before (top {top}) | ms/step |\n|---|---:|")
    for name, ms in gaps.most_common(top):
        print(f"| {name} | {ms:.2f} |")


def print_ops_by_device_time(step, sync, activities, steps: int, top: int = 30) -> None:
    """PyTorch ops grouped by input shapes, by the device time of the kernels they launched (their own, not their
    children's): names which op and which tensors stand behind a kernel. A separate pass, since recording shapes
    slows the host and would distort the idle time above."""
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        sync()
    ops = [e for e in prof.key_averages(group_by_input_shape=True) if e.self_device_time_total > 0]
    ops.sort(key=lambda e: e.self_device_time_total, reverse=True)
    print(f"\n| op (top {top} by own device time) | input shapes | calls/step | ms/step |\n|---|---|---:|---:|")
    for e in ops[:top]:
        shapes = str(e.input_shapes)[:110]
        print(f"| {e.key[:50]} | {shapes} | {e.count / steps:.0f} | {e.self_device_time_total / 1e3 / steps:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO_ROOT / "config.json"))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU (checks the script only)")
    parser.add_argument("--cpu-inference", action="store_true", help="profile the CPU inference workload instead")
    parser.add_argument("--by-op", action="store_true",
                        help="also profile once more with input shapes and list the PyTorch ops (with their shapes) "
                             "that spend the most device time")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()

    device = "cpu" if args.smoke or args.cpu_inference else "cuda"
    config = MosaicBertConfig.from_json_file(args.config)
    if args.smoke:
        config = MosaicBertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
        args.batch, args.seqlen = 4, 32
    torch.manual_seed(0)
    if args.cpu_inference:
        step, args.batch, args.seqlen = cpu_inference_step(config)
    else:
        step = pretraining_step(config, device, args.batch, args.seqlen)

    for _ in range(3):
        step()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        wall_ms = (time.perf_counter() - start) * 1e3 / args.steps

    per_kernel = collections.Counter()
    for event in prof.events():
        if device == "cuda" and event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name] += event.device_time / 1e3 / args.steps
        elif device == "cpu" and event.device_type == torch.autograd.DeviceType.CPU and event.name.startswith("aten::"):
            per_kernel[event.name] += event.self_cpu_time_total / 1e3 / args.steps
    per_category = collections.Counter()
    for name, ms in per_kernel.items():
        per_category[categorize(name)] += ms
    busy = sum(per_kernel.values())

    print(f"# {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print(f"# step {args.batch} x {args.seqlen}: wall {wall_ms:.1f} ms/step, device busy {busy:.1f} ms/step "
          f"({args.batch / wall_ms * 1e3:,.0f} samples/s)")
    print("\n| kernel (top 20) | ms/step | share of wall |\n|---|---:|---:|")
    for name, ms in per_kernel.most_common(20):
        print(f"| {name[:90]} | {ms:.2f} | {ms / wall_ms:.1%} |")
    print("\n| category | ms/step | share of wall |\n|---|---:|---:|")
    for category, ms in per_category.most_common():
        print(f"| {category} | {ms:.2f} | {ms / wall_ms:.1%} |")
    print(f"| idle (wall - busy) | {max(wall_ms - busy, 0):.2f} | {max(wall_ms - busy, 0) / wall_ms:.1%} |")
    if device == "cuda":
        print_device_waits(prof, args.steps)
    if args.by_op:
        print_ops_by_device_time(step, sync, activities, args.steps)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    from runinfo import run_meta

    Path(args.out, "profile_step.json").write_text(json.dumps(
        {"meta": run_meta(device), "batch": args.batch, "seqlen": args.seqlen, "steps": args.steps,
         "wall_ms": wall_ms, "busy_ms": busy, "categories": per_category, "kernels": per_kernel.most_common(60)},
        indent=1))


if __name__ == "__main__":
    main()
