#!/usr/bin/env python
"""The README's main job: load a MosaicBERT folder offline and print its fill-mask predictions.

examples:
  python scripts/fill_mask.py                                   # the checkpoint shipped in checkpoints/
  python scripts/fill_mask.py --model PATH "The [MASK] sat on the mat."
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recipes.cli import build_parser, parse  # noqa: E402
from recipes.fill_mask import FillMaskOptions, print_fill_mask  # noqa: E402


def main(argv=None) -> None:
    parser = build_parser([FillMaskOptions], __doc__, usage="%(prog)s [options] [SENTENCE ...]")
    parser.add_argument("sentences", nargs="*", metavar="SENTENCE",
                        help="sentences with one [MASK] each (default: a few examples)")
    opts, rest = parse(parser, argv)
    print_fill_mask(opts, rest.sentences)


if __name__ == "__main__":
    main()
