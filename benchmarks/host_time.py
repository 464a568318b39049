"""Where the host's time goes in a training step: the Python side of MosaicBERT, not the GPU kernels.

    python benchmarks/host_time.py [--workload pretrain|finetune] [--steps 10] [--smoke]

A step is host-bound when the host takes longer to launch its kernels than the device takes to run them; then the
device idles between kernels however fast they are. This script runs the step the way benchmarks/model.py does
(collator-shaped inputs with attention_mask, bf16 autocast, fused AdamW) and reports, per step:
- the wall time of back-to-back steps with one synchronisation at the end;
- the host time of forward, backward and optimizer, each measured without synchronising (what the host spends
  launching), and the time the forward spends waiting for the device (its one synchronisation);
- the functions with the most own host time under cProfile (which inflates every Python call alike, so read it for
  shares, not absolute times).
"""

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from runinfo import run_meta  # noqa: E402

import modeling_mosaic_bert  # noqa: E402
from configuration_mosaic_bert import MosaicBertConfig  # noqa: E402
from modeling_mosaic_bert import MosaicBertForMaskedLM, MosaicBertForSequenceClassification  # noqa: E402


def make_batch(workload: str, device: str, generator: torch.Generator, smoke: bool) -> dict:
    """What DataCollatorForLanguageModeling (pretrain) or DataCollatorWithPadding (finetune) hands the model."""
    if workload == "pretrain":
        batch, seqlen = (4, 16) if smoke else (256, 128)
        ids = torch.randint(1000, 30000, (batch, seqlen), generator=generator)
        labels = torch.where(torch.rand(batch, seqlen, generator=generator) < 0.3, ids, -100)
        mask = torch.ones_like(ids)
        extra = {"labels": labels}
    else:
        batch, low, high = (4, 8, 16) if smoke else (64, 64, 512)
        lengths = torch.randint(low, high + 1, (batch,), generator=generator)
        seqlen = int(lengths.max())
        ids = torch.randint(1000, 30000, (batch, seqlen), generator=generator)
        mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).long()
        ids = ids * mask
        extra = {"labels": torch.randint(0, 2, (batch,), generator=generator)}
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids), **extra}
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}


def build(workload: str, smoke: bool):
    """Model, fused AdamW, three collator-shaped batches and the autocast context of the workload."""
    device = "cpu" if smoke else "cuda"
    if smoke:
        config = MosaicBertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    else:
        config = MosaicBertConfig.from_json_file(str(REPO_ROOT / "config.json"))
    model_cls = MosaicBertForMaskedLM if workload == "pretrain" else MosaicBertForSequenceClassification
    model = model_cls(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    generator = torch.Generator().manual_seed(0)
    batches = [make_batch(workload, device, generator, smoke) for _ in range(3)]
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    return model, optimizer, batches, autocast


def count_entry_waits() -> list[float]:
    """Wraps the model's entry check (`read_batch`, its one host read) to record how long each call took."""
    waits = []
    read_batch = modeling_mosaic_bert.read_batch

    def timed_read_batch(*args, **kwargs):
        start = time.perf_counter()
        try:
            return read_batch(*args, **kwargs)
        finally:
            waits.append(time.perf_counter() - start)

    modeling_mosaic_bert.read_batch = timed_read_batch
    return waits


def median_ms(values: list[float]) -> float | None:
    return sorted(values)[len(values) // 2] * 1e3 if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=("pretrain", "finetune"), default="pretrain")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU (checks the script only)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    model, optimizer, batches, autocast = build(args.workload, args.smoke)
    sync = torch.cuda.synchronize if torch.cuda.is_available() and not args.smoke else (lambda: None)
    waits = count_entry_waits()
    phases = {"forward": [], "backward": [], "optimizer": []}

    def step(i: int, record: bool = False) -> None:
        t0 = time.perf_counter()
        with autocast:
            loss = model(**batches[i % len(batches)]).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if record:
            for name, seconds in zip(phases, (t1 - t0, t2 - t1, time.perf_counter() - t2)):
                phases[name].append(seconds)

    for i in range(3):
        step(i)
    sync()
    start = time.perf_counter()
    for i in range(args.steps):
        step(i)
    sync()
    wall_ms = (time.perf_counter() - start) / args.steps * 1e3
    waits.clear()
    for i in range(args.steps):
        step(i, record=True)
    sync()
    entry_waits = list(waits)
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(5):
        step(i)
    sync()
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(35)
    meta = run_meta("cpu" if args.smoke else "cuda")
    meta["argv"] = sys.argv[1:]
    result = {"meta": meta, "workload": args.workload, "wall_ms_per_step": wall_ms,
              "host_ms_per_step": {name: median_ms(v) for name, v in phases.items()},
              "entry_check_ms": median_ms(entry_waits), "entry_checks_per_step": len(entry_waits) / args.steps,
              "device": torch.cuda.get_device_name() if not args.smoke else "cpu",
              "cprofile_top": stream.getvalue().strip().splitlines()}
    print(stream.getvalue())
    print(json.dumps({k: v for k, v in result.items() if k != "cprofile_top"}, indent=1))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"host_time_{args.workload}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
