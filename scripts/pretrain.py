#!/usr/bin/env python
"""MLM pretraining of MosaicBERT; MosaicBERT's recipe is the default (recipes/README.md has the details).

examples:
  # CPU smoke run: the tiny preset on the embedded Wikipedia sample
  python scripts/pretrain.py --config tiny --max-steps 20 --output-dir /tmp/run

  # one GPU: MosaicBERT-base on the Wikipedia shards (bf16 is automatic)
  python scripts/pretrain.py --config base --train-files ../shared/data/corpus --per-device-batch-size 256 \\
      --max-steps 20000 --output-dir runs/base

  # several GPUs (DDP; add --fsdp "full_shard auto_wrap" for FSDP)
  torchrun --nproc_per_node 8 scripts/pretrain.py --config base --train-files ../shared/data/corpus \\
      --per-device-batch-size 256 --max-steps 20000 --output-dir runs/base-8gpu
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recipes.cli import OptionError, build_parser, merged, parse  # noqa: E402
from recipes.pretraining import OPTION_GROUPS, PretrainingOptions, run_pretraining  # noqa: E402


def parse_args(argv=None, parser=None) -> PretrainingOptions:
    return merged(PretrainingOptions, parse(parser or build_parser(OPTION_GROUPS, __doc__), argv))


def main(argv=None):
    parser = build_parser(OPTION_GROUPS, __doc__)
    try:
        run_pretraining(parse_args(argv, parser))
    except OptionError as e:
        parser.error(str(e))  # usage and the message, exit status 2


if __name__ == "__main__":
    main()
