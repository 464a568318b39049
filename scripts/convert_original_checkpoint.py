"""Convert an original MosaicBERT checkpoint folder (config.json with model_type "bert" + pytorch_model.bin, keys
possibly prefixed `model.` as Composer saves them) into a folder of this package (model.safetensors, config, code,
tokenizer files), then check that the new folder gives the same outputs.

    python scripts/convert_original_checkpoint.py SRC DST [--overwrite]
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recipes.conversion import ConversionError, convert_checkpoint  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="folder of the original checkpoint")
    parser.add_argument("dst", help="folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace the contents of an existing DST")
    parser.add_argument("--atol", type=float, default=1e-5, help="largest output difference accepted")
    parser.add_argument("--no-verify", action="store_true", help="skip reloading DST and comparing outputs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = convert_checkpoint(args.src, args.dst, overwrite=args.overwrite, atol=args.atol, verify=not args.no_verify)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{report.model_class} written to {args.dst} (max output difference {report.max_abs_diff:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
