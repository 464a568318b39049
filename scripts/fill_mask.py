"""The README's main job: load a MosaicBERT folder offline and print its fill-mask predictions.

    python scripts/fill_mask.py                        # the checkpoint shipped in checkpoints/
    python scripts/fill_mask.py --model PATH "The [MASK] sat on the mat."
"""

import argparse
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / "checkpoints" / "mosaic-bert-wiki-small"
EXAMPLES = [
    "Paris is the [MASK] of France.",
    "The cat sat on the [MASK].",
    "Water is made of hydrogen and [MASK].",
    "He plays the [MASK] in a rock band.",
    "The Second World War ended in [MASK].",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sentences", nargs="*", help="sentences with one [MASK] each (default: a few examples)")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="a local MosaicBERT folder")
    parser.add_argument("--top-k", type=int, default=3)
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import pipeline

    start = time.perf_counter()
    fill = pipeline("fill-mask", model=args.model, trust_remote_code=True, device="cpu")
    print(f"loaded {args.model} in {time.perf_counter() - start:.1f} s")
    for sentence in args.sentences or EXAMPLES:
        predictions = fill(sentence, top_k=args.top_k)
        shown = ", ".join(f"{p['token_str']} ({p['score']:.2f})" for p in predictions)
        print(f"{sentence}\n    -> {shown}")


if __name__ == "__main__":
    sys.exit(main())
