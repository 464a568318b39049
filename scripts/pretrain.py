#!/usr/bin/env python
"""MLM pretraining of MosaicBERT (MosaicBERT recipe defaults). See recipes/README.md.

  python scripts/pretrain.py --config tiny --max-steps 40 --output-dir /tmp/run          # CPU smoke run
  python scripts/pretrain.py --config base --train-files ../shared/data/corpus --max-steps 20000 --output-dir runs/b
  torchrun --nproc_per_node 8 scripts/pretrain.py --config base --train-files DIR --per-device-batch-size 256 ...
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recipes.pretraining import PretrainingOptions, run_pretraining  # noqa: E402


def parse_args(argv=None) -> PretrainingOptions:
    d = PretrainingOptions()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--config", default=d.config,
                   help="preset (base, small, tiny), a config json, or a folder with config.json (default: base)")
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--num-hidden-layers", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--intermediate-size", type=int)
    g.add_argument("--init-from", help="continue pretraining from a saved MosaicBERT MLM folder")
    g.add_argument("--tokenizer", help="tokenizer folder (default: the repo root's bert-base-uncased files)")
    g = p.add_argument_group("data")
    g.add_argument("--train-files", nargs="+", default=[],
                   help="text files (plain/.xz/.gz; one paragraph per line, blank line between documents) or "
                        "folders; default: the embedded sample data/sample/")
    g.add_argument("--eval-files", nargs="+", default=[], help="held-out text files (default: tail of the train data)")
    g.add_argument("--eval-samples", type=int, default=d.eval_samples,
                   help="max eval samples (held out from the end of the train data: at most 5%% of it)")
    g.add_argument("--dataset", help="Hub dataset via `datasets` instead of files, e.g. allenai/c4 (needs network)")
    g.add_argument("--dataset-config", help="e.g. en")
    g.add_argument("--dataset-split", default=d.dataset_split)
    g.add_argument("--dataset-eval-split", default=d.dataset_eval_split)
    g.add_argument("--dataset-text-field", default=d.dataset_text_field)
    g.add_argument("--dataset-data-files", nargs="+", default=[], help="data_files for --dataset (e.g. json, text)")
    g.add_argument("--streaming", action="store_true")
    g.add_argument("--cache-dir", help="tokenization cache (default $MOSAIC_BERT_CACHE or ~/.cache/mosaic_bert_recipes)")
    g.add_argument("--max-seq-length", type=int, default=d.max_seq_length)
    g.add_argument("--mlm-probability", type=float, default=d.mlm_probability)
    g.add_argument("--eval-mlm-probability", type=float, default=d.eval_mlm_probability)
    g = p.add_argument_group("optimisation")
    g.add_argument("--learning-rate", "--lr", type=float, default=d.learning_rate)
    g.add_argument("--adam-beta1", type=float, default=d.adam_beta1)
    g.add_argument("--adam-beta2", type=float, default=d.adam_beta2)
    g.add_argument("--adam-epsilon", type=float, default=d.adam_epsilon)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--weight-decay-mode", choices=["decoupled", "torch"], default=d.weight_decay_mode,
                   help="decoupled: MosaicML semantics, torch AdamW gets weight_decay/lr; torch: passed as is")
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final lr = ratio x lr (linear decay)")
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    g.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps (-1: use --num-train-epochs)")
    g.add_argument("--num-train-epochs", type=float, default=d.num_train_epochs)
    g.add_argument("--max-time-minutes", type=float,
                   help="training-time budget: the lr schedule also runs on it; stop (and save) when it is spent")
    g.add_argument("--per-device-batch-size", type=int, help="default 128 on GPU, 32 on CPU")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum)
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default=d.precision,
                   help="auto: bf16 on GPUs that support it, else fp32")
    g.add_argument("--torch-compile", action="store_true")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--fsdp", default="", help='e.g. "full_shard auto_wrap" (TrainingArguments.fsdp)')
    g.add_argument("--fsdp-config", help="json file or inline json (default wraps MosaicBertLayer)")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default=d.output_dir)
    g.add_argument("--logging-steps", type=int, default=d.logging_steps)
    g.add_argument("--eval-steps", type=int, help="default: ~10 evaluations per run")
    g.add_argument("--save-steps", type=int, default=d.save_steps)
    g.add_argument("--save-total-limit", type=int, default=d.save_total_limit)
    g.add_argument("--resume", nargs="?", const="auto",
                   help="resume from a checkpoint path, or (no value) the latest checkpoint in --output-dir")
    g.add_argument("--dataloader-num-workers", type=int)
    g.add_argument("--peak-tflops", type=float,
                   help="per-device peak for MFU (default: 784 on H100/H200, 312 on A100, none elsewhere)")
    g.add_argument("--report-to", default=d.report_to, help="none, tensorboard, wandb, ...")
    g.add_argument("--no-progress-bar", dest="disable_tqdm", action="store_const", const=True, default=None)
    a = p.parse_args(argv)
    return PretrainingOptions(**vars(a))


def main(argv=None):
    run_pretraining(parse_args(argv))


if __name__ == "__main__":
    main()
