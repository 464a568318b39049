"""Fill-mask predictions of a MosaicBERT folder, offline, on CPU (what scripts/fill_mask.py prints)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from . import REPO_ROOT

DEFAULT_MODEL = REPO_ROOT / "checkpoints" / "mosaic-bert-wiki-small"
EXAMPLES = (
    "Paris is the [MASK] of France.",
    "The cat sat on the [MASK].",
    "Water is made of hydrogen and [MASK].",
    "He plays the [MASK] in a rock band.",
    "The Second World War ended in [MASK].",
)


@dataclass
class FillMaskOptions:
    model: str | None = field(default=None, metadata={
        "help": "a local MosaicBERT folder; default: the checkpoint shipped in checkpoints/"})
    top_k: int = field(default=3, metadata={"help": "predictions shown per sentence"})


def print_fill_mask(opts: FillMaskOptions, sentences: list[str] | None = None) -> None:
    """Load opts.model with the fill-mask pipeline and print its top predictions for each sentence."""
    from transformers import pipeline

    model = opts.model or str(DEFAULT_MODEL)
    start = time.perf_counter()
    fill = pipeline("fill-mask", model=model, trust_remote_code=True, device="cpu")
    print(f"loaded {model} in {time.perf_counter() - start:.1f} s")
    for sentence in sentences or EXAMPLES:
        predictions = fill(sentence, top_k=opts.top_k)
        shown = ", ".join(f"{p['token_str']} ({p['score']:.2f})" for p in predictions)
        print(f"{sentence}\n    -> {shown}")
