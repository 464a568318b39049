#!/usr/bin/env python
"""GLUE fine-tuning of MosaicBERT (MosaicBERT's per-task recipe as defaults). See recipes/README.md.

  python scripts/glue.py --model runs/pretrain --tasks rte stsb --seeds 1 2 3 --output-dir runs/glue
  python scripts/glue.py --model CKPT --tasks mnli rte mrpc stsb --init-from-mnli auto
  python scripts/glue.py --random-init tiny --tasks rte --max-train-samples 64 --max-steps 5   # smoke test
  python scripts/glue.py --merge runs/glue-*/results.json --output-dir runs/glue   # runs of separate processes -> one
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recipes.glue import (  # noqa: E402
    TASK_ORDER,
    TASK_RECIPES,
    GlueOptions,
    default_glue_dir,
    merge_results,
    run_glue,
    write_results,
)

MERGE_ONLY = ("merge", "note")


def build_parser() -> argparse.ArgumentParser:
    d = GlueOptions()
    table = "; ".join(f"{t}: lr {r.learning_rate:g}, {r.epochs:g} ep, batch {r.batch_size}, wd {r.weight_decay:g}"
                      for t, r in TASK_RECIPES.items())
    p = argparse.ArgumentParser(description=__doc__ + "\nPer-task defaults: " + table,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", help="checkpoint folder (pretrained MLM or classification model)")
    g.add_argument("--random-init", metavar="PRESET", help="random-init model of a preset (tiny/small/base): tests")
    p.add_argument("--tokenizer", help="default: the model folder's tokenizer, else the repo root's")
    p.add_argument("--tasks", nargs="+", default=list(TASK_ORDER), help="GLUE tasks (default: all; tasks without "
                   "local data are skipped)")
    p.add_argument("--glue-dir", default=None,
                   help=f"folder in the official GLUE layout (default $GLUE_DIR or {default_glue_dir()}); 'hub': "
                        "nyu-mll/glue through `datasets` (network)")
    p.add_argument("--seeds", nargs="+", type=int, default=d.seeds)
    p.add_argument("--init-from-mnli", metavar="CKPT|auto",
                   help="start RTE/MRPC/STS-B from this MNLI checkpoint; 'auto': the MNLI model of this run")
    p.add_argument("--output-dir", default=d.output_dir)
    p.add_argument("--max-seq-length", type=int, default=d.max_seq_length)
    p.add_argument("--learning-rate", "--lr", type=float, help="override the per-task lr (all tasks)")
    p.add_argument("--num-train-epochs", type=float, help="override the per-task epochs")
    p.add_argument("--batch-size", type=int, help="override the per-task global batch size")
    p.add_argument("--weight-decay", type=float, help="override the per-task (decoupled) weight decay")
    p.add_argument("--weight-decay-mode", choices=["decoupled", "torch"], default=d.weight_decay_mode)
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    p.add_argument("--max-steps", type=int, default=d.max_steps)
    p.add_argument("--max-train-samples", type=int)
    p.add_argument("--max-eval-samples", type=int)
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default=d.precision)
    p.add_argument("--logging-steps", type=int, default=d.logging_steps)
    p.add_argument("--save-models", action="store_true", help="keep every fine-tuned model under output-dir")
    p.add_argument("--no-skip-missing", dest="skip_missing", action="store_false",
                   help="fail instead of skipping tasks whose training data is not available")
    p.add_argument("--dataloader-num-workers", type=int, default=d.dataloader_num_workers)
    p.add_argument("--torch-compile", action="store_true")
    p.add_argument("--report-to", default=d.report_to)
    p.add_argument("--no-progress-bar", dest="disable_tqdm", action="store_const", const=True, default=None)
    m = p.add_argument_group("merging runs (no training)")
    m.add_argument("--merge", nargs="+", metavar="RESULTS_JSON",
                   help="merge the results.json files of separate runs (e.g. one process per task and seed) into one "
                        "results.json + results.md in --output-dir; refuses runs that disagree on model, "
                        "hyperparameters or init, and a task's seed given twice")
    m.add_argument("--note", action="append", default=[],
                   help="with --merge: a line shown under the results table (repeatable)")
    return p


def parse_args(argv=None) -> GlueOptions:
    args = vars(build_parser().parse_args(argv))
    for k in MERGE_ONLY:
        args.pop(k)
    return GlueOptions(**args)


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.merge:
        if args.model or args.random_init:
            p.error("--merge trains nothing: leave out --model / --random-init")
        results = merge_results(args.merge, notes=args.note)
        print(write_results(results, args.output_dir).read_text())
        return
    if args.note:
        p.error("--note goes with --merge")
    opts = {k: v for k, v in vars(args).items() if k not in MERGE_ONLY}
    run_glue(GlueOptions(**opts))


if __name__ == "__main__":
    main()
