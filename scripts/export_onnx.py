#!/usr/bin/env python
r"""Export a MosaicBERT folder to ONNX with dynamic batch and sequence axes, check it, optionally time it.

examples:
    python scripts/export_onnx.py --model checkpoints/mosaic-bert-wiki-small --output /tmp/mosaic-bert.onnx
    python scripts/export_onnx.py --model runs/glue/sst2 --task sequence-classification --output sst2.onnx
    python scripts/export_onnx.py --model checkpoints/mosaic-bert-wiki-small --output /tmp/mlm.onnx \
        --task masked-lm --measure-latency --latency-shapes 1x128 8x128

The export goes through `torch.onnx.export(dynamo=True)` (torch.export underneath), on the model's padded attention
path (SDPA with the ALiBi bias and a key-padding mask), which the model takes by itself while it is being exported.
The inputs are those a tokenizer gives: input_ids, attention_mask and token_type_ids, each (batch, seqlen), int64.
After exporting, onnxruntime runs a tokenizer batch of another shape than the export example, right- and
left-padded, and every output is compared with PyTorch eager; the script fails when they differ by more than
--atol. With --measure-latency it prints the median CPU latency of onnxruntime and of PyTorch eager for each
batch_size x seqlen of --latency-shapes.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recipes.cli import build_parser, parse  # noqa: E402

TASKS = {
    "base": AutoModel,
    "masked-lm": AutoModelForMaskedLM,
    "sequence-classification": AutoModelForSequenceClassification,
    "token-classification": AutoModelForTokenClassification,
    "question-answering": AutoModelForQuestionAnswering,
}
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class ExportOptions:
    model: str = field(metadata={"help": "a MosaicBERT folder (save_pretrained output with its tokenizer)"})
    output: str = field(metadata={"help": "the .onnx file to write (the weights go beside it, in <output>.data)"})
    task: Literal["base", "masked-lm", "sequence-classification", "token-classification", "question-answering"] = (
        field(default="base", metadata={"help": "which head to export (the Auto class that loads the folder)"})
    )
    opset: int | None = field(default=None, metadata={"help": "ONNX opset (default: the exporter's)"})
    atol: float = field(default=1e-4, metadata={"help": "largest |onnxruntime - eager| the check accepts"})
    check_batch_size: int = field(default=5, metadata={"help": "batch size of the check (not the export's 2)"})
    check_seqlen: int = field(default=23, metadata={"help": "padded length of the check (not the export's 16)"})
    measure_latency: bool = field(default=False, metadata={"help": "time onnxruntime and PyTorch eager on CPU"})
    latency_shapes: list[str] = field(default_factory=lambda: ["8x128"], metadata={
        "help": "the batch_size x seqlen batches to time, for example 1x128 32x128"})
    latency_repeats: int = field(default=20, metadata={"help": "timed runs per runtime (the median is reported)"})
    latency_full_rows: bool = field(default=False, metadata={
        "help": "time rows that are all real tokens; by default rows hold 2 to seqlen tokens, as a tokenizer pads a "
                "batch of texts (PyTorch runs the real tokens only, the ONNX graph every position)"})
    threads: int | None = field(
        default=None, metadata={"help": "CPU threads for both runtimes (default: torch.get_num_threads())"}
    )


def parse_shape(shape: str) -> tuple[int, int]:
    """"8x128" -> (8, 128)."""
    try:
        batch_size, seqlen = (int(part) for part in shape.lower().split("x"))
    except ValueError:
        raise ValueError(f"a latency shape is batch_size x seqlen, like 8x128; got {shape!r}") from None
    if batch_size < 1 or seqlen < 2:
        raise ValueError(f"a latency shape needs batch_size >= 1 and seqlen >= 2 ([CLS] and [SEP]); got {shape!r}")
    return batch_size, seqlen


def load_model(folder: str, task: str) -> torch.nn.Module:
    """The folder's model for `task`, float32, in eval mode."""
    model = TASKS[task].from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    return model.eval()


def tokenizer_batch(tokenizer, batch_size: int, seqlen: int, padding_side: str = "right", seed: int = 0,
                    full_rows: bool = False) -> dict:
    """What a tokenizer gives for `batch_size` texts of random vocabulary words, padded (and truncated) to exactly
    `seqlen` tokens on `padding_side`: int64 (batch_size, seqlen) input_ids, attention_mask and token_type_ids.
    The real lengths vary from row to row (2 to seqlen tokens, [CLS] and [SEP] included; the first row is full), or,
    with `full_rows`, every row has seqlen real tokens."""
    rng = random.Random(seed)
    words = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii())
    texts = [" ".join(rng.choices(words, k=seqlen if b == 0 or full_rows else rng.randint(0, seqlen - 2)))
             for b in range(batch_size)]
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=seqlen, padding_side=padding_side,
                      return_tensors="pt", return_token_type_ids=True)
    return {name: batch[name] for name in INPUT_NAMES}


def output_names(model: torch.nn.Module, inputs: dict) -> list[str]:
    """Names of the tensors the model returns for `inputs`, in the order ONNX lists them."""
    with torch.inference_mode():
        return list(model(**inputs).keys())


def export_onnx(model: torch.nn.Module, path: str | os.PathLike, example: dict, opset: int | None = None) -> Path:
    """Exports `model` with `torch.onnx.export(dynamo=True)`, batch and sequence axes dynamic, inputs named as in
    `example` (a tokenizer batch of at least 2 x 2), outputs named after the model's output fields.
    Returns the .onnx path (the weights sit beside it)."""
    batch, seqlen = torch.export.Dim("batch"), torch.export.Dim("seqlen")
    dynamic_shapes = {name: {0: batch, 1: seqlen} for name in example}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model, (), str(path), kwargs=dict(example), dynamo=True, dynamic_shapes=dynamic_shapes,
        input_names=list(example), output_names=output_names(model, example), opset_version=opset,
    )
    return path


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session over the exported file (all graph optimisations, `threads` intra-op threads)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, inputs: dict) -> dict[str, np.ndarray]:
    """onnxruntime outputs by name for a batch of torch tensors."""
    names = [o.name for o in session.get_outputs()]
    feed = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    return dict(zip(names, session.run(names, feed)))


def max_abs_diffs(model: torch.nn.Module, session, inputs: dict) -> dict[str, float]:
    """max |onnxruntime - eager| of every output, by name; every position is compared (padded ones too)."""
    with torch.inference_mode():
        eager = model(**inputs)
    onnx = run_onnx(session, inputs)
    if set(onnx) != set(eager.keys()):
        raise ValueError(f"the ONNX outputs {sorted(onnx)} are not the model's {sorted(eager.keys())}")
    diffs = {}
    for name, value in onnx.items():
        if value.shape != tuple(eager[name].shape):
            raise ValueError(f"{name}: onnxruntime gives shape {value.shape}, eager {tuple(eager[name].shape)}")
        diffs[name] = float(np.abs(value - eager[name].numpy()).max())
    return diffs


def median_latencies(runs: dict[str, Callable[[], object]], repeats: int, warmup: int = 2,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each of `runs`, over `repeats` timed calls each after `warmup` untimed ones.
    The calls are interleaved (one of each per round), so that a busy spell of the machine falls on all of them."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def measure_latency(model: torch.nn.Module, session, inputs: dict, repeats: int,
                    clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median CPU seconds per batch of onnxruntime and of PyTorch eager (inference mode) on `inputs`."""
    feed = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}

    def eager():
        with torch.inference_mode():
            model(**inputs)

    return median_latencies({"onnxruntime": lambda: session.run(None, feed), "pytorch_eager": eager}, repeats,
                            clock=clock)


def check_export(model: torch.nn.Module, session, tokenizer, options: ExportOptions) -> dict[str, float]:
    """Largest |onnxruntime - eager| per output over a right- and a left-padded batch of the check shape.
    Raises ValueError above options.atol."""
    worst: dict[str, float] = {}
    for side in ("right", "left"):
        inputs = tokenizer_batch(tokenizer, options.check_batch_size, options.check_seqlen, side, seed=1)
        for name, diff in max_abs_diffs(model, session, inputs).items():
            worst[name] = max(worst.get(name, 0.0), diff)
    bad = {name: diff for name, diff in worst.items() if not diff <= options.atol}
    if bad:
        raise ValueError(f"onnxruntime differs from eager by more than {options.atol:g}: {bad}")
    return worst


def run(options: ExportOptions) -> dict:
    """Export, check and (optionally) time; returns what it printed, as numbers."""
    if options.threads:
        torch.set_num_threads(options.threads)
    tokenizer = AutoTokenizer.from_pretrained(options.model, trust_remote_code=True)
    model = load_model(options.model, options.task)
    path = export_onnx(model, options.output, tokenizer_batch(tokenizer, 2, 16), options.opset)
    session = onnx_session(path, options.threads)
    print(f"exported {options.model} ({options.task}) to {path}")
    diffs = check_export(model, session, tokenizer, options)
    shape = f"{options.check_batch_size} x {options.check_seqlen}"
    for name, diff in diffs.items():
        print(f"max |onnxruntime - eager| of {name} on {shape}, right and left padding: {diff:.2e}")
    result = {"output": str(path), "max_abs_diff": diffs}
    if options.measure_latency:
        threads = options.threads or torch.get_num_threads()
        print(f"median CPU latency, {threads} threads, {options.latency_repeats} runs:")
        result["latency"] = []
        for shape in options.latency_shapes:
            batch_size, seqlen = parse_shape(shape)
            inputs = tokenizer_batch(tokenizer, batch_size, seqlen, seed=2, full_rows=options.latency_full_rows)
            latency = measure_latency(model, session, inputs, options.latency_repeats)
            real = int(inputs["attention_mask"].sum())
            print(f"  {batch_size} x {seqlen} ({real} real tokens): onnxruntime {latency['onnxruntime'] * 1e3:.1f} ms,"
                  f" PyTorch eager {latency['pytorch_eager'] * 1e3:.1f} ms")
            result["latency"].append({"batch_size": batch_size, "seqlen": seqlen, "real_tokens": real, **latency})
    return result


def main(argv: list[str] | None = None) -> dict:
    (options,) = parse(build_parser([ExportOptions], __doc__), argv)
    return run(options)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        main()
    except ValueError as error:
        sys.exit(f"error: {error}")
