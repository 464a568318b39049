"""MLM pretraining of MosaicBERT with the Hugging Face Trainer, MosaicBERT's recipe as defaults.

Defaults (MosaicBERT-base, mosaicml/examples `bert/yamls/main/mosaic-bert-base-uncased.yaml`):
  * 30% masking with BERT's 80/10/10 replacement; evaluation at 15% masking on a fixed, pre-masked held-out set.
  * sequence length 128, packed samples `[CLS] ... [SEP]` (documents separated by [SEP] inside a sample).
  * AdamW(lr 5e-4, betas (0.9, 0.98), eps 1e-6) with MosaicML-style *decoupled* weight decay 1e-5 (see
    `torch_weight_decay`), linear warm-up over 6% of the steps, then linear decay to 0.02 x lr.
  * bf16 autocast where the GPU supports it, fp32 otherwise.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from .common import (
    bf16_available,
    check_one_gpu_per_process,
    default_peak_tflops,
    finalize_hub_folder,
    hardware_description,
    import_model_code,
    setup_logging,
    is_main_process,
    load_config,
    load_tokenizer,
    nonembedding_params,
    world_size,
    write_json,
)
from .data import (
    MLMCollator,
    PackedDataset,
    StreamingTextDataset,
    expand_text_files,
    load_or_build_packed,
    premask,
)

logger = logging.getLogger(__name__)


@dataclass
class PretrainingOptions:
    # model
    config: str | None = None  # preset name (base, small, tiny) or a json path / model folder; default base
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    intermediate_size: int | None = None
    init_from: str | None = None  # start from a saved MosaicBERT MLM folder instead of random init
    tokenizer: str | None = None  # default: the tokenizer files at the repo root
    # data
    train_files: list[str] = field(default_factory=list)  # files or folders; default data/sample/
    eval_files: list[str] = field(default_factory=list)
    eval_samples: int = 1000  # held out from the end of the training stream when no eval files are given
    dataset: str | None = None  # Hub dataset through `datasets` (e.g. allenai/c4)
    dataset_config: str | None = None
    dataset_split: str = "train"
    dataset_eval_split: str | None = "validation"
    dataset_text_field: str = "text"
    dataset_data_files: list[str] = field(default_factory=list)  # e.g. --dataset json --dataset-data-files a.jsonl
    streaming: bool = False
    cache_dir: str | None = None
    max_seq_length: int = 128
    mlm_probability: float = 0.3
    eval_mlm_probability: float = 0.15
    # optimisation
    learning_rate: float = 5e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_epsilon: float = 1e-6
    weight_decay: float = 1e-5
    weight_decay_mode: str = "decoupled"  # "decoupled" (MosaicML/Composer semantics) or "torch" (passed as is)
    warmup_ratio: float = 0.06
    min_lr_ratio: float = 0.02
    max_grad_norm: float = 1.0
    max_steps: int = -1
    num_train_epochs: float = 1.0
    max_time_minutes: float | None = None
    per_device_batch_size: int | None = None  # default 128 on GPU, 32 on CPU
    grad_accum: int = 1
    seed: int = 17
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    torch_compile: bool = False
    gradient_checkpointing: bool = False
    fsdp: str = ""
    fsdp_config: str | None = None
    # bookkeeping
    output_dir: str = "runs/mosaic-bert-pretrain"
    logging_steps: int = 10
    eval_steps: int | None = None  # default: ~10 evaluations per run (or 1000 steps when the length is unknown)
    save_steps: int = 1000
    save_total_limit: int | None = 2
    resume: str | None = None  # "auto" (latest checkpoint in output_dir) or a checkpoint path
    dataloader_num_workers: int | None = None
    peak_tflops: float | None = None
    report_to: str = "none"
    disable_tqdm: bool | None = None


def torch_weight_decay(opts_lr: float, weight_decay: float, mode: str) -> float:
    """MosaicML's DecoupledAdamW updates `p -= (lr_t / lr_0) * wd * p`, i.e. wd is *not* multiplied by the learning
    rate, only by the schedule's factor.  torch.optim.AdamW does `p -= lr_t * wd' * p`.  With wd' = wd / lr_0 the two
    are identical at every step, so "decoupled" mode passes wd / lr to torch's AdamW (1e-5 / 5e-4 = 0.02)."""
    if mode == "decoupled":
        return weight_decay / opts_lr if opts_lr > 0 else 0.0
    if mode == "torch":
        return weight_decay
    raise ValueError(f"weight_decay_mode must be 'decoupled' or 'torch', got {mode!r}")


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6 x non-embedding parameters (forward + backward matmuls) + 12 x layers x hidden x
    seq_len (attention scores and the weighted sum, forward + backward).  The MLM decoder is tied to the embedding
    and only runs on the masked tokens, so it is left out (as are the embeddings)."""
    cfg = model.config
    return 6.0 * nonembedding_params(model) + 12.0 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


# ----------------------------------------------------------------------------------------------------------------
# Trainer pieces
# ----------------------------------------------------------------------------------------------------------------


class MLMTrainer(Trainer):
    """Trainer that adds tokens/s and MFU to every training log line (so they land in log_history)."""

    def __init__(self, *args, flops_per_token: float = 0.0, peak_tflops: float | None = None,
                 time_budget: "TimeBudgetCallback | None" = None, schedule: tuple[float, float] = (0.06, 0.02),
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._fpt = flops_per_token
        self._peak = peak_tflops
        self._last = None  # (time, tokens)
        self.time_budget = time_budget
        self.schedule = schedule  # (warmup_ratio, min_lr_ratio)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The recipe's schedule (`schedule_factor`) over the run's progress: the step fraction, or, with a time budget,
        the larger of the step fraction and the budget fraction, so that a run stopped by its budget has warmed up,
        decayed and ended at the end of its schedule."""
        if self.lr_scheduler is None:
            budget, (warmup_ratio, min_lr_ratio) = self.time_budget, self.schedule

            def factor(step: int) -> float:
                progress = step / max(num_training_steps, 1)
                if budget is not None:
                    progress = max(progress, budget.fraction)
                return schedule_factor(progress, warmup_ratio, min_lr_ratio)

            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer if optimizer is None else optimizer,
                                                                  factor)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self.args.include_num_input_tokens_seen != "no":
            now, tokens = time.time(), self.state.num_input_tokens_seen
            if self._last is not None and now > self._last[0] and tokens >= self._last[1]:
                tps = (tokens - self._last[1]) / (now - self._last[0])
                logs["tokens_per_second"] = round(tps, 1)
                logs["tflops_per_device"] = round(tps * self._fpt / 1e12 / world_size(), 3)
                if self._peak:
                    logs["mfu"] = round(tps * self._fpt / (self._peak * 1e12 * world_size()), 4)
            self._last = (now, tokens)
        return super().log(logs, *args, **kwargs)


class ThroughputStartCallback(TrainerCallback):
    """Start the tokens/s clock at the first step (excludes start-up/compilation from the first reading)."""

    def __init__(self, trainer_ref):
        self.trainer_ref = trainer_ref

    def on_train_begin(self, args, state, control, **kw):
        self.trainer_ref._last = (time.time(), state.num_input_tokens_seen)


class TimeBudgetCallback(TrainerCallback):
    """A training-time budget: stops training (and saves a checkpoint) once `minutes` of training have passed, counted
    over every session of a resumed run (each checkpoint records the time spent in `time_budget.json`), and exposes
    the spent fraction to the learning-rate schedule. Rank 0's clock decides and is broadcast every step, so all ranks
    see the same fraction and stop at the same step."""

    FILE = "time_budget.json"

    def __init__(self, minutes: float, spent_seconds: float = 0.0):
        self.seconds = minutes * 60.0
        self.spent_seconds = spent_seconds  # training time of earlier sessions
        self.fraction = spent_seconds / self.seconds  # of the budget, as of the last finished step
        self.t0 = None
        self.stopped_at_step = None

    @classmethod
    def resumed(cls, minutes: float, checkpoint: str | None) -> "TimeBudgetCallback":
        """The budget of a run resumed from `checkpoint` (or a fresh one): continues from the time spent there."""
        record = Path(checkpoint) / cls.FILE if checkpoint else None
        spent = json.loads(record.read_text())["spent_seconds"] if record and record.exists() else 0.0
        return cls(minutes, spent_seconds=spent)

    def on_save(self, args, state, control, **kw):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if is_main_process() and folder.is_dir():
            write_json(folder / self.FILE, {"spent_seconds": self._spent_now(), "budget_seconds": self.seconds})

    def _spent_now(self) -> float:
        return self.spent_seconds + (time.time() - self.t0 if self.t0 is not None else 0.0)

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = time.time()
        self.fraction = self.spent_seconds / self.seconds

    def on_step_end(self, args, state, control, **kw):
        fraction = self._spent_now() / self.seconds
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            shared = torch.tensor([fraction], dtype=torch.float64, device=args.device)
            torch.distributed.broadcast(shared, src=0)
            fraction = float(shared.item())
        self.fraction = fraction
        if fraction >= 1.0 and not control.should_training_stop:
            self.stopped_at_step = state.global_step
            control.should_training_stop = True
            control.should_save = True
            logger.warning("Time budget of %.3g min reached at step %d; stopping.", self.seconds / 60,
                           state.global_step)
        return control


def schedule_factor(progress: float, warmup_ratio: float, min_lr_ratio: float) -> float:
    """The recipe's learning-rate multiplier at `progress` in [0, 1] of the run: linear warm-up from 0 to 1 over the
    first `warmup_ratio`, then linear decay to `min_lr_ratio` at the end (MosaicBERT's schedule)."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup_ratio:
        return progress / warmup_ratio
    return 1.0 - (1.0 - min_lr_ratio) * (progress - warmup_ratio) / max(1.0 - warmup_ratio, 1e-12)


def mlm_accuracy_preprocess(logits, labels):
    """Per-sample (correct, total) over labelled positions; works for (N, V) logits of labelled tokens only
    (MosaicBERT with labels) and for full (B, S, V) logits."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    mask = labels != -100
    preds = logits.argmax(-1)
    if preds.dim() == 2:
        preds = preds[mask]
    hit = torch.zeros_like(mask)
    hit[mask] = preds == labels[mask]
    return torch.stack([hit.sum(1), mask.sum(1)], dim=1)


def mlm_accuracy_metrics(eval_pred):
    counts = np.asarray(eval_pred.predictions).reshape(-1, 2)
    total = counts[:, 1].sum()
    return {"mlm_accuracy": float(counts[:, 0].sum() / total) if total else float("nan")}


# ----------------------------------------------------------------------------------------------------------------
# Model card, plots
# ----------------------------------------------------------------------------------------------------------------


def _fmt(x, nd=4):
    return "n/a" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def write_model_card(out: Path, facts: dict) -> None:
    wiki = any("wiki" in str(f).lower() for f in facts.get("data_files", []))
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: fill-mask",
        "language: en",
        "tags: [mosaic-bert, bert, alibi, fill-mask]",
        *(["datasets: [wikipedia]"] if wiki else []),
        "---",
        "",
        f"# {out.name}",
        "",
        "A MosaicBERT (ALiBi, unpadded attention, GeGLU) masked-language model pretrained from scratch with "
        "`scripts/pretrain.py` of this repository. Load it with "
        "`AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True)`.",
        "",
        "## Training run (generated)",
        "",
        "| | |",
        "|---|---|",
        f"| model | {facts['config_name']}: hidden {facts['hidden_size']}, {facts['num_hidden_layers']} layers, "
        f"{facts['num_attention_heads']} heads, intermediate {facts['intermediate_size']}, "
        f"{facts['parameters']:,} parameters |",
        f"| data | {', '.join(facts['data_files_short'])} ({facts['train_samples']} packed samples of "
        f"{facts['max_seq_length']} tokens, {facts['eval_samples']} held out) |",
        f"| tokens seen | {facts['tokens_seen']:,} |",
        f"| steps | {facts['global_step']} (global batch {facts['global_batch']} = {facts['per_device_batch_size']} per "
        f"device x {facts['grad_accum']} accumulation x {facts['world_size']} processes) |",
        f"| optimiser | AdamW lr {facts['learning_rate']}, betas ({facts['adam_beta1']}, {facts['adam_beta2']}), "
        f"eps {facts['adam_epsilon']}, weight decay {facts['weight_decay']} ({facts['weight_decay_mode']}; torch "
        f"AdamW weight_decay={_fmt(facts['torch_weight_decay'], 6)}), warm-up {facts['warmup_ratio']:.0%}, linear "
        f"decay to {facts['min_lr_ratio']} x lr"
        + (f" over a {facts['options']['max_time_minutes']:g}-minute training budget (or the steps, if fewer)"
           if facts.get("options", {}).get("max_time_minutes") else "") + " |",
        f"| masking | {facts['mlm_probability']:.0%} (train), {facts['eval_mlm_probability']:.0%} (eval) |",
        f"| precision | {facts['precision']} |",
        f"| hardware | {facts['hardware']} |",
        f"| wall time | {facts['train_runtime_s']:.0f} s of training ({facts['wall_time_s']:.0f} s end to end) |",
        f"| final train loss | {_fmt(facts.get('final_train_loss'))} |",
        f"| eval loss / MLM accuracy (15% masking) | {_fmt(facts.get('eval_loss'))} / "
        f"{_fmt(facts.get('eval_mlm_accuracy'))} |",
        "",
        "`log_history.json` holds the loss curve (and tokens/s, MFU), `train_results.json` the run's facts.",
        "",
    ]
    if wiki:
        lines += [
            "## Data licence",
            "",
            "Trained on English Wikipedia text (CC BY-SA; https://creativecommons.org/licenses/by-sa/4.0/), by "
            "Wikipedia contributors.",
            "",
        ]
    if facts.get("global_step", 0) < 10000:
        lines += ["This is a short run: the model is not a usable MosaicBERT replacement.", ""]
    (out / "README.md").write_text("\n".join(lines))


def plot_loss(out: Path, history: list[dict]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # pragma: no cover - matplotlib is optional
        return None
    tr = [(h["step"], h["loss"]) for h in history if "loss" in h]
    ev = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if not tr and not ev:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    if tr:
        ax.plot(*zip(*tr), label="train loss (30% masking)")
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss (15% masking)")
    ax.set_xlabel("step")
    ax.set_ylabel("MLM loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "loss_curve.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Main entry
# ----------------------------------------------------------------------------------------------------------------


def _precision(opts) -> str:
    if opts.precision == "auto":
        return "bf16" if bf16_available() else "fp32"
    return opts.precision


def build_training_arguments(opts: PretrainingOptions, n_train: int | None, iterable: bool = False
                             ) -> TrainingArguments:
    on_gpu = torch.cuda.is_available()
    bs = opts.per_device_batch_size or (128 if on_gpu else 32)
    prec = _precision(opts)
    # total optimizer steps (as the Trainer computes them), for the default evaluation interval
    if opts.max_steps and opts.max_steps > 0:
        total_steps = opts.max_steps
    elif n_train:
        per_epoch = max(1, math.ceil(math.ceil(n_train / world_size()) / bs) // opts.grad_accum)
        total_steps = math.ceil(per_epoch * opts.num_train_epochs)
    else:
        total_steps = None
    eval_steps = opts.eval_steps or (max(1, total_steps // 10) if total_steps else 1000)
    wd = torch_weight_decay(opts.learning_rate, opts.weight_decay, opts.weight_decay_mode)
    fsdp_config = opts.fsdp_config
    if fsdp_config and os.path.isfile(fsdp_config):
        fsdp_config = json.loads(Path(fsdp_config).read_text())
    elif isinstance(fsdp_config, str) and fsdp_config.strip().startswith("{"):
        fsdp_config = json.loads(fsdp_config)
    if opts.fsdp and not fsdp_config:
        # wrap each encoder layer (the model's _no_split_modules)
        fsdp_config = {"transformer_layer_cls_to_wrap": ["MosaicBertLayer"]}
    workers = opts.dataloader_num_workers
    if workers is None:
        workers = 4 if on_gpu else 0
    kwargs = dict(
        output_dir=opts.output_dir,
        per_device_train_batch_size=bs,
        per_device_eval_batch_size=bs,
        gradient_accumulation_steps=opts.grad_accum,
        learning_rate=opts.learning_rate,
        adam_beta1=opts.adam_beta1,
        adam_beta2=opts.adam_beta2,
        adam_epsilon=opts.adam_epsilon,
        weight_decay=wd,
        optim="adamw_torch",
        max_grad_norm=opts.max_grad_norm,
        max_steps=opts.max_steps if opts.max_steps else -1,
        num_train_epochs=opts.num_train_epochs,
        bf16=prec == "bf16",
        fp16=prec == "fp16",
        use_cpu=not on_gpu,
        logging_steps=opts.logging_steps,
        logging_first_step=True,
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=opts.save_steps,
        save_total_limit=opts.save_total_limit,
        seed=opts.seed,
        dataloader_num_workers=workers,
        dataloader_drop_last=False,  # True would also drop the tail of the evaluation set
        include_num_input_tokens_seen="non_padding",
        torch_compile=opts.torch_compile,
        report_to=opts.report_to,
        disable_tqdm=opts.disable_tqdm,
        remove_unused_columns=False,
        fsdp=opts.fsdp or "",
        fsdp_config=fsdp_config,
        ddp_find_unused_parameters=False,
    )
    if iterable:  # each rank reads its own shard of the stream (see StreamingTextDataset)
        kwargs["accelerator_config"] = {"dispatch_batches": False}
    return TrainingArguments(**kwargs)


def _load_packed(files, tokenizer, opts, args, what):
    with args.main_process_first(local=True, desc=f"tokenizing {what}"):
        arr, stats = load_or_build_packed(files, tokenizer, opts.max_seq_length, opts.cache_dir)
    return arr, stats


def _materialize_stream(ds: StreamingTextDataset, n: int) -> np.ndarray:
    rows = []
    for ex in ds:
        rows.append(ex["input_ids"].numpy().astype(np.int32))
        if len(rows) >= n:
            break
    return np.stack(rows) if rows else np.zeros((0, ds.seq_len), np.int32)


def run_pretraining(opts: PretrainingOptions) -> dict:
    """Train, evaluate and write a Hub-ready folder to opts.output_dir.  Returns the facts written to
    train_results.json (plus "data_stats")."""
    t_start = time.time()
    setup_logging()
    _, modeling = import_model_code()
    tokenizer = load_tokenizer(opts.tokenizer)
    out = Path(opts.output_dir)

    # ---- model ----
    set_seed(opts.seed)  # the Trainer seeds only after the model exists
    if opts.init_from:
        model = modeling.MosaicBertForMaskedLM.from_pretrained(opts.init_from)
        config, config_name = model.config, str(opts.init_from)
    else:
        config, cfg_path = load_config(opts.config, dict(
            hidden_size=opts.hidden_size, num_hidden_layers=opts.num_hidden_layers,
            num_attention_heads=opts.num_attention_heads, intermediate_size=opts.intermediate_size))
        config_name = cfg_path.stem
        if config.vocab_size < len(tokenizer):
            config.vocab_size = int(math.ceil(len(tokenizer) / 8) * 8)
        model = modeling.MosaicBertForMaskedLM(config)
    n_params = sum(p.numel() for p in model.parameters())

    # ---- data ----
    args = build_training_arguments(opts, n_train=None)  # provisional: needed for main_process_first
    data_stats: dict = {}
    train_collator = MLMCollator(tokenizer, opts.mlm_probability, pad_to_multiple_of=8)
    eval_collator_for_mask = MLMCollator(tokenizer, opts.eval_mlm_probability, pad_to_multiple_of=8)
    if opts.dataset:
        if not opts.max_steps or opts.max_steps <= 0:
            raise ValueError("--dataset streams data of unknown length: pass --max-steps")
        train_ds = StreamingTextDataset(opts.dataset, opts.dataset_config, opts.dataset_split, opts.dataset_text_field,
                                        tokenizer, opts.max_seq_length, streaming=opts.streaming, seed=opts.seed,
                                        shuffle_buffer=10000 if opts.streaming else 0,
                                        data_files=opts.dataset_data_files)
        eval_split = opts.dataset_eval_split or opts.dataset_split
        eval_src = StreamingTextDataset(opts.dataset, opts.dataset_config, eval_split, opts.dataset_text_field,
                                        tokenizer, opts.max_seq_length, streaming=opts.streaming,
                                        data_files=opts.dataset_data_files)
        eval_ids = _materialize_stream(eval_src, opts.eval_samples)
        data_files = [f"{opts.dataset}:{opts.dataset_config or ''}:{opts.dataset_split}"]
        n_train = None
        data_stats = {"dataset": data_files[0], "eval_split": eval_split}
    else:
        files = expand_text_files(opts.train_files)
        data_files = [str(f) for f in files]
        ids, stats = _load_packed(files, tokenizer, opts, args, "training data")
        data_stats["train"] = stats
        if opts.eval_files:
            eval_ids, estats = _load_packed(expand_text_files(opts.eval_files), tokenizer, opts, args, "eval data")
            eval_ids = eval_ids[: opts.eval_samples]
            data_stats["eval"] = estats
            train_ids = ids
        else:
            n_eval = min(opts.eval_samples, max(1, int(0.05 * len(ids)))) if opts.eval_samples > 0 else 0
            if len(ids) - n_eval < 1:
                raise ValueError(f"only {len(ids)} packed samples of {opts.max_seq_length} tokens: too little data")
            train_ids, eval_ids = ids[: len(ids) - n_eval], ids[len(ids) - n_eval:]
        train_ds = PackedDataset(train_ids)
        n_train = len(train_ds)
    eval_ds = None
    if len(eval_ids):
        masked, labels = premask(np.asarray(eval_ids), eval_collator_for_mask, seed=opts.seed + 1)
        eval_ds = PackedDataset(np.asarray(eval_ids), masked, labels)

    args = build_training_arguments(opts, n_train=n_train, iterable=bool(opts.dataset))
    check_one_gpu_per_process(args)
    if eval_ds is None:
        args.eval_strategy = "no"
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    if is_main_process():
        print(f"[pretrain] model {config_name}: {n_params:,} parameters; data: {n_train if n_train else 'stream'} "
              f"train / {len(eval_ids)} eval samples of {opts.max_seq_length} tokens")
        print(f"[pretrain] global batch = {args.per_device_train_batch_size} per device x "
              f"{args.gradient_accumulation_steps} grad accum x {args.world_size} processes = {global_batch} "
              f"sequences ({global_batch * opts.max_seq_length:,} tokens)")
        print(f"[pretrain] precision {_precision(opts)}, lr {opts.learning_rate}, torch AdamW weight_decay "
              f"{args.weight_decay:g} ({opts.weight_decay_mode} {opts.weight_decay:g}), hardware: "
              f"{hardware_description()}")

    if opts.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    peak = opts.peak_tflops if opts.peak_tflops is not None else default_peak_tflops()
    fpt = flops_per_token(model, opts.max_seq_length)
    resume = opts.resume
    if resume in ("auto", "latest", "true", "True"):
        resume = get_last_checkpoint(str(out)) if out.is_dir() else None
        if resume is None:
            logger.warning("--resume auto: no checkpoint in %s, starting from scratch", out)
    budget = TimeBudgetCallback.resumed(opts.max_time_minutes, resume) if opts.max_time_minutes else None
    trainer = MLMTrainer(
        model=model,
        args=args,
        data_collator=train_collator,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        compute_metrics=mlm_accuracy_metrics,
        preprocess_logits_for_metrics=mlm_accuracy_preprocess,
        flops_per_token=fpt,
        peak_tflops=peak,
        time_budget=budget,
        schedule=(opts.warmup_ratio, opts.min_lr_ratio),
    )
    trainer.add_callback(ThroughputStartCallback(trainer))
    if budget is not None:
        trainer.add_callback(budget)

    if resume and is_main_process():
        print(f"[pretrain] resuming from {resume}")

    t_train = time.time()
    train_result = trainer.train(resume_from_checkpoint=resume or None)
    train_runtime = time.time() - t_train
    eval_metrics = {}
    if eval_ds is not None:
        last = [h for h in trainer.state.log_history if "eval_loss" in h]
        if last and last[-1].get("step") == trainer.state.global_step:
            eval_metrics = last[-1]  # already evaluated at the final step
        else:
            eval_metrics = trainer.evaluate()

    # ---- save a Hub-ready folder ----
    trainer.save_model(str(out))
    facts = {}
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(out))
        finalize_hub_folder(out, tokenizer)
        hist = trainer.state.log_history
        train_losses = [h["loss"] for h in hist if "loss" in h]
        facts = {
            "config_name": config_name,
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "intermediate_size": config.intermediate_size,
            "vocab_size": config.vocab_size,
            "parameters": n_params,
            "nonembedding_parameters": nonembedding_params(model),
            "data_files": data_files,
            "data_files_short": [Path(f).name for f in data_files],
            "train_samples": n_train if n_train is not None else "stream",
            "eval_samples": int(len(eval_ids)),
            "max_seq_length": opts.max_seq_length,
            "tokens_seen": int(trainer.state.num_input_tokens_seen),
            "global_step": int(trainer.state.global_step),
            "global_batch": global_batch,
            "per_device_batch_size": args.per_device_train_batch_size,
            "grad_accum": args.gradient_accumulation_steps,
            "world_size": args.world_size,
            "precision": _precision(opts),
            "hardware": hardware_description(),
            "train_runtime_s": round(train_runtime, 1),
            "wall_time_s": round(time.time() - t_start, 1),
            "final_train_loss": train_losses[-1] if train_losses else None,
            "mean_train_loss": train_result.training_loss,
            "eval_loss": eval_metrics.get("eval_loss"),
            "eval_mlm_accuracy": eval_metrics.get("eval_mlm_accuracy"),
            "stopped_by_time_budget": bool(budget and budget.stopped_at_step is not None),
            "resumed_from": str(resume) if resume else None,
            "torch_weight_decay": args.weight_decay,
            "flops_per_token": fpt,
            "peak_tflops": peak,
            "torch": torch.__version__,
            "options": asdict(opts),
            "data_stats": data_stats,
        }
        for k in ("learning_rate", "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay", "weight_decay_mode",
                  "warmup_ratio", "min_lr_ratio", "mlm_probability", "eval_mlm_probability"):
            facts[k] = getattr(opts, k)
        write_json(out / "train_results.json", facts)
        write_json(out / "log_history.json", hist)
        write_model_card(out, facts)
        plot_loss(out, hist)
        print(f"[pretrain] done: {facts['global_step']} steps, {facts['tokens_seen']:,} tokens, final train loss "
              f"{_fmt(facts['final_train_loss'])}, eval loss {_fmt(facts['eval_loss'])}, MLM acc "
              f"{_fmt(facts['eval_mlm_accuracy'])}; saved to {out}")
    return facts
