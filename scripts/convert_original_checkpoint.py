#!/usr/bin/env python
"""Convert an original MosaicBERT checkpoint folder (config.json with model_type "bert" + pytorch_model.bin, keys
possibly prefixed `model.` as Composer saves them) into a folder of this package (model.safetensors, config, code,
tokenizer files), then check that the new folder gives the same outputs.

example:
  python scripts/convert_original_checkpoint.py SRC DST --overwrite
"""

import dataclasses
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recipes.cli import build_parser, parse  # noqa: E402
from recipes.conversion import ConversionError, ConversionOptions, convert_checkpoint  # noqa: E402


def main(argv=None) -> int:
    parser = build_parser([ConversionOptions], __doc__, usage="%(prog)s [options] SRC DST")
    parser.add_argument("src", metavar="SRC", help="folder of the original checkpoint")
    parser.add_argument("dst", metavar="DST", help="folder to write")
    opts, folders = parse(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = convert_checkpoint(folders.src, folders.dst, **dataclasses.asdict(opts))
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{report.model_class} written to {folders.dst} (max output difference {report.max_abs_diff:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
