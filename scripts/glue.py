#!/usr/bin/env python
"""GLUE fine-tuning of MosaicBERT; MosaicBERT's per-task recipe is the default (recipes/README.md has the table).

examples:
  # CPU smoke run: a random-init tiny model on slices of RTE and STS-B
  python scripts/glue.py --random-init tiny --tasks rte stsb --max-train-samples 64 --max-eval-samples 64 \\
      --max-steps 5 --output-dir /tmp/glue

  # a pretrained model, three seeds; RTE, MRPC and STS-B start from this run's MNLI model
  python scripts/glue.py --model runs/base --seeds 1 2 3 --init-from-mnli auto --output-dir runs/base-glue

  # runs made as separate processes -> one results.json + results.md
  python scripts/glue.py --merge runs/glue-*/results.json --output-dir runs/glue
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recipes.cli import OptionError, build_parser, parse  # noqa: E402
from recipes.glue import TASK_RECIPES, GlueOptions, MergeOptions, glue_main  # noqa: E402


def description() -> str:
    rows = [f"  {task:<5} lr {r.learning_rate:g}, {r.epochs:g} epochs, batch {r.batch_size}, weight decay "
            f"{r.weight_decay:g}" for task, r in TASK_RECIPES.items()]
    return __doc__ + "\nper-task defaults (decoupled weight decay):\n" + "\n".join(rows)


def main(argv=None):
    parser = build_parser([GlueOptions, MergeOptions], description())
    try:
        glue_main(*parse(parser, argv))
    except OptionError as e:
        parser.error(str(e))  # usage and the message, exit status 2


if __name__ == "__main__":
    main()
