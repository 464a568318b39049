"""MLM pretraining of MosaicBERT with the Hugging Face Trainer, MosaicBERT's recipe as defaults.

Defaults (MosaicBERT-base, mosaicml/examples `bert/yamls/main/mosaic-bert-base-uncased.yaml`):
  * 30% masking with BERT's 80/10/10 replacement; evaluation at 15% masking on a fixed, pre-masked held-out set.
  * sequence length 128, packed samples `[CLS] ... [SEP]` (documents separated by [SEP] inside a sample).
  * AdamW(lr 5e-4, betas (0.9, 0.98), eps 1e-6) with MosaicML-style *decoupled* weight decay 1e-5 (see
    `torch_weight_decay`), linear warm-up over 6% of the steps, then linear decay to 0.02 x lr.
  * bf16 autocast where the GPU supports it, fp32 otherwise.

Entry points: `run_pretraining(opts)` trains and writes the output folder; `build_pretraining_trainer(opts)` returns
the configured `MLMTrainer` without training (benchmarks time its steps); `prepare_pretraining` / `finish_pretraining`
are the two halves of `run_pretraining`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from transformers import TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from .cli import OptionError
from .common import (
    bf16_available,
    check_one_gpu_per_process,
    default_peak_tflops,
    enable_activation_checkpointing,
    finalize_hub_folder,
    hardware_description,
    import_model_code,
    is_main_process,
    load_config,
    load_tokenizer,
    nonembedding_params,
    register_code_for_save,
    setup_logging,
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
from .trainer import (
    Clock,
    MLMTrainer,
    Schedule,
    TimeBudgetCallback,
    TokenThroughput,
    mlm_accuracy_metrics,
    mlm_accuracy_preprocess,
    schedule_factor,
)

logger = logging.getLogger(__name__)

__all__ = [
    "PretrainingOptions", "OPTION_GROUPS", "run_pretraining", "build_pretraining_trainer", "prepare_pretraining",
    "finish_pretraining", "build_training_arguments", "training_arguments_kwargs", "torch_weight_decay",
    "flops_per_token", "schedule_factor", "TimeBudgetCallback",
]


# ----------------------------------------------------------------------------------------------------------------
# Options (each field's help is the command line's --help)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ModelOptions:
    _argument_group_name = "model"

    config: str = field(default="base", metadata={
        "help": "a preset of configs/ (base, small, tiny, wiki-small), a config json, or a model folder"})
    hidden_size: int | None = field(default=None, metadata={"help": "overrides the config"})
    num_hidden_layers: int | None = field(default=None, metadata={"help": "overrides the config"})
    num_attention_heads: int | None = field(default=None, metadata={"help": "overrides the config"})
    intermediate_size: int | None = field(default=None, metadata={"help": "overrides the config"})
    init_from: str | None = field(default=None, metadata={
        "help": "continue pretraining a saved MosaicBERT masked-LM folder instead of a random init"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "tokenizer folder; default: the bert-base-uncased files at the repository root"})


@dataclass
class DataOptions:
    _argument_group_name = "data"

    train_files: list[str] = field(default_factory=list, metadata={
        "help": "text files (plain, .xz, .gz, .bz2; one paragraph per line, a blank line between documents) or "
                "folders of them; default: the embedded sample data/sample/"})
    eval_files: list[str] = field(default_factory=list, metadata={
        "help": "held-out text files; default: the tail of the training data"})
    eval_samples: int = field(default=256, metadata={
        "help": "held-out packed samples (at most 5%% of the training data when taken from its tail), rounded down "
                "to whole evaluation batches; 0: no evaluation"})
    dataset: str | None = field(default=None, metadata={
        "help": "a Hub dataset read through `datasets` instead of files, e.g. allenai/c4 (needs the network)"})
    dataset_config: str | None = field(default=None, metadata={"help": "the dataset's configuration, e.g. en"})
    dataset_split: str = field(default="train", metadata={"help": "split to train on"})
    dataset_eval_split: str | None = field(default="validation", metadata={"help": "split to evaluate on"})
    dataset_text_field: str = field(default="text", metadata={"help": "column holding the text"})
    dataset_data_files: list[str] = field(default_factory=list, metadata={
        "help": "data_files for --dataset (e.g. --dataset json --dataset-data-files a.jsonl)"})
    streaming: bool = field(default=False, metadata={"help": "stream --dataset instead of downloading it"})
    cache_dir: str | None = field(default=None, metadata={
        "help": "tokenization cache; default: $MOSAIC_BERT_CACHE, else ~/.cache/mosaic_bert_recipes"})
    max_seq_length: int = field(default=128, metadata={"help": "tokens per packed sample"})
    mlm_probability: float = field(default=0.3, metadata={"help": "fraction of tokens masked in training"})
    eval_mlm_probability: float = field(default=0.15, metadata={"help": "fraction masked in the held-out set"})


@dataclass
class OptimisationOptions:
    _argument_group_name = "optimisation"

    learning_rate: float = field(default=5e-4, metadata={"help": "peak learning rate", "aliases": ["--lr"]})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.98, metadata={"help": "AdamW beta2"})
    adam_epsilon: float = field(default=1e-6, metadata={"help": "AdamW epsilon"})
    weight_decay: float = field(default=1e-5, metadata={"help": "weight decay, in --weight-decay-mode units"})
    weight_decay_mode: Literal["decoupled", "torch"] = field(default="decoupled", metadata={
        "help": "decoupled: MosaicML's semantics (torch AdamW gets weight_decay / learning_rate); torch: as is"})
    warmup_ratio: float = field(default=0.06, metadata={"help": "linear warm-up over this fraction of the run"})
    min_lr_ratio: float = field(default=0.02, metadata={"help": "the learning rate decays linearly to this x lr"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; -1: --num-train-epochs decides"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs, when --max-steps is -1"})
    schedule_steps: int | None = field(default=None, metadata={
        "help": "length of the learning-rate schedule in steps, when it differs from the run's (a run stopped "
                "early at --max-steps of a longer planned schedule); default: the run's length"})
    max_time_minutes: float | None = field(default=None, metadata={
        "help": "training-time budget: the schedule runs on the larger of the step and time fractions, and the "
                "run stops (and saves) when the budget is spent"})
    per_device_batch_size: int | None = field(default=None, metadata={
        "help": "sequences per device per step; default: 128 on a GPU, 32 on CPU"})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps"})
    seed: int = field(default=17, metadata={"help": "random seed (model init, masking, data order)"})
    precision: Literal["auto", "bf16", "fp16", "fp32"] = field(default="auto", metadata={
        "help": "auto: bf16 autocast on GPUs that support it, else fp32"})
    torch_compile: bool = field(default=False, metadata={"help": "compile the model with torch.compile"})
    activation_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each layer's activations in the backward (less memory, slower)",
        "aliases": ["--gradient-checkpointing"]})
    fsdp: str = field(default="", metadata={"help": 'FSDP mode, e.g. "full_shard auto_wrap" (TrainingArguments.fsdp)'})
    fsdp_config: str | None = field(default=None, metadata={
        "help": "FSDP config, a json file or inline json; default: wrap each MosaicBertLayer"})


@dataclass
class OutputOptions:
    _argument_group_name = "output and logging"

    output_dir: str = field(default="runs/mosaic-bert-pretrain", metadata={"help": "where the model is written"})
    logging_steps: int = field(default=10, metadata={"help": "a training log line every N steps"})
    eval_steps: int | None = field(default=None, metadata={
        "help": "evaluate every N steps as well as at the end; default: every tenth of a run of at least 2,000 "
                "steps, else only at the end"})
    save_steps: int = field(default=1000, metadata={"help": "a checkpoint every N steps"})
    save_total_limit: int | None = field(default=2, metadata={"help": "checkpoints kept"})
    resume: str | None = field(default=None, metadata={
        "help": "resume from a checkpoint folder, or (no value) from the latest checkpoint in --output-dir",
        "nargs": "?", "const": "auto", "metavar": "CHECKPOINT"})
    dataloader_num_workers: int | None = field(default=None, metadata={
        "help": "data loader processes (they mask the batches); default: 4 with a GPU, 0 on CPU"})
    peak_tflops: float | None = field(default=None, metadata={
        "help": "per-device peak TFLOP/s for MFU; default: the datasheet's dense bf16 peak of H100/H200 SXM "
                "(989.4), H100 PCIe (756) and A100 (312), none elsewhere"})
    report_to: str = field(default="none", metadata={"help": "none, tensorboard, wandb, ..."})
    disable_tqdm: bool = field(default=False, metadata={
        "help": "no progress bars", "aliases": ["--no-progress-bar"]})


@dataclass
class PretrainingOptions(OutputOptions, OptimisationOptions, DataOptions, ModelOptions):
    """Every option of the pretraining recipe (the fields of the four groups)."""

    def __post_init__(self):
        if self.dataset and not self.max_steps > 0:
            raise OptionError("--dataset streams data of unknown length: pass --max-steps")
        if self.max_time_minutes is not None and not self.max_time_minutes > 0:
            raise OptionError(f"--max-time-minutes must be positive, got {self.max_time_minutes}")


OPTION_GROUPS = (ModelOptions, DataOptions, OptimisationOptions, OutputOptions)


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
# Training arguments
# ----------------------------------------------------------------------------------------------------------------


def _precision(opts) -> str:
    if opts.precision == "auto":
        return "bf16" if bf16_available() else "fp32"
    return opts.precision


def per_device_batch_size(opts: PretrainingOptions, on_gpu: bool) -> int:
    return opts.per_device_batch_size or (128 if on_gpu else 32)


def total_steps(opts: PretrainingOptions, n_train: int | None, batch_size: int) -> int | None:
    """Optimizer steps of the run as the Trainer counts them (the loader drops the last partial batch)."""
    if opts.max_steps and opts.max_steps > 0:
        return opts.max_steps
    if not n_train:
        return None
    per_epoch = max(1, (n_train // world_size()) // batch_size // opts.grad_accum)
    return math.ceil(per_epoch * opts.num_train_epochs)


def default_eval_steps(steps: int | None) -> int | None:
    """Periodic evaluation only for long runs (every tenth of a run of at least 2,000 steps); every run also
    evaluates once at its end."""
    return steps // 10 if steps and steps >= 2000 else None


def _fsdp_config(opts: PretrainingOptions):
    config = opts.fsdp_config
    if config and os.path.isfile(config):
        config = json.loads(Path(config).read_text())
    elif isinstance(config, str) and config.strip().startswith("{"):
        config = json.loads(config)
    if opts.fsdp and not config:
        config = {"transformer_layer_cls_to_wrap": ["MosaicBertLayer"]}  # each encoder layer (_no_split_modules)
    return config


def training_arguments_kwargs(opts: PretrainingOptions, n_train: int | None = None, eval_batch_size: int | None = None,
                              iterable: bool = False, on_gpu: bool | None = None, has_eval: bool = True) -> dict:
    """The recipe's TrainingArguments as keywords. Nothing in them makes the host wait for the GPU at each step:
    fused AdamW on GPUs; no Trainer token counting (`TokenThroughput` counts from the batch shape); no NaN/inf
    filter on the logged loss (it reads the loss every step; a NaN loss is logged as NaN instead); full batches only
    (static shapes); masking in pinned-memory loader workers on GPUs."""
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    bs = per_device_batch_size(opts, on_gpu)
    eval_steps = (opts.eval_steps or default_eval_steps(total_steps(opts, n_train, bs))) if has_eval else None
    workers = opts.dataloader_num_workers if opts.dataloader_num_workers is not None else (4 if on_gpu else 0)
    accelerator_config = {"non_blocking": True} if on_gpu else {}
    if iterable:  # each rank reads its own shard of the stream (see StreamingTextDataset)
        accelerator_config["dispatch_batches"] = False
    prec = _precision(opts)
    return dict(
        output_dir=opts.output_dir, per_device_train_batch_size=bs, per_device_eval_batch_size=eval_batch_size or bs,
        gradient_accumulation_steps=opts.grad_accum, learning_rate=opts.learning_rate, adam_beta1=opts.adam_beta1,
        adam_beta2=opts.adam_beta2, adam_epsilon=opts.adam_epsilon,
        weight_decay=torch_weight_decay(opts.learning_rate, opts.weight_decay, opts.weight_decay_mode),
        optim="adamw_torch_fused" if on_gpu else "adamw_torch", max_grad_norm=opts.max_grad_norm,
        max_steps=opts.max_steps if opts.max_steps else -1, num_train_epochs=opts.num_train_epochs,
        bf16=prec == "bf16", fp16=prec == "fp16", use_cpu=not on_gpu,
        logging_steps=opts.logging_steps, logging_first_step=True, logging_nan_inf_filter=False,
        include_num_input_tokens_seen="no",
        eval_strategy="steps" if eval_steps else "no", eval_steps=eval_steps,
        save_strategy="steps", save_steps=opts.save_steps, save_total_limit=opts.save_total_limit, seed=opts.seed,
        dataloader_num_workers=workers, dataloader_pin_memory=on_gpu, dataloader_persistent_workers=workers > 0,
        dataloader_drop_last=True, accelerator_config=accelerator_config or None,
        torch_compile=opts.torch_compile, report_to=opts.report_to, disable_tqdm=opts.disable_tqdm or None,
        remove_unused_columns=False, fsdp=opts.fsdp or "", fsdp_config=_fsdp_config(opts),
        ddp_find_unused_parameters=False,
    )


def build_training_arguments(opts: PretrainingOptions, n_train: int | None = None, eval_batch_size: int | None = None,
                             iterable: bool = False, has_eval: bool = True) -> TrainingArguments:
    return TrainingArguments(**training_arguments_kwargs(opts, n_train, eval_batch_size, iterable,
                                                         has_eval=has_eval))


# ----------------------------------------------------------------------------------------------------------------
# Model and data
# ----------------------------------------------------------------------------------------------------------------


def build_model(opts: PretrainingOptions, tokenizer):
    """-> (MosaicBertForMaskedLM, config name). Saving it writes the code files and auto_map (loadable with
    trust_remote_code, checkpoints included)."""
    _, modeling = import_model_code()
    set_seed(opts.seed)  # the Trainer seeds only after the model exists
    if opts.init_from:
        model = modeling.MosaicBertForMaskedLM.from_pretrained(opts.init_from)
        name = str(opts.init_from)
    else:
        config, path = load_config(opts.config, dict(
            hidden_size=opts.hidden_size, num_hidden_layers=opts.num_hidden_layers,
            num_attention_heads=opts.num_attention_heads, intermediate_size=opts.intermediate_size))
        if config.vocab_size < len(tokenizer):
            config.vocab_size = int(math.ceil(len(tokenizer) / 8) * 8)
        model, name = modeling.MosaicBertForMaskedLM(config), path.stem
    register_code_for_save(model, "AutoModelForMaskedLM")
    if opts.activation_checkpointing:
        enable_activation_checkpointing(model)
    return model, name


@dataclass
class PretrainingData:
    train: torch.utils.data.Dataset
    eval: PackedDataset | None
    n_train: int | None  # None: a stream
    eval_batch_size: int
    data_files: list[str]
    stats: dict


def eval_layout(available: int, wanted: int, batch_size: int, processes: int) -> tuple[int, int]:
    """(held-out samples, per-device eval batch): whole batches on every process, as the loader drops partial ones.
    The batch is the largest divisor of the per-process share up to `batch_size`, so that no sample is dropped,
    unless that divisor is under half the batch size; then the share is cut to whole batches of `batch_size`."""
    share = min(available, max(wanted, 0)) // max(processes, 1)
    if share == 0:
        return 0, 1
    cap = min(batch_size, share)
    divisor = next(d for d in range(cap, 0, -1) if share % d == 0)
    per_device = divisor if 2 * divisor >= cap else cap
    return (share - share % per_device) * processes, per_device


def _materialize_stream(ds: StreamingTextDataset, n: int) -> np.ndarray:
    rows = []
    for ex in ds:
        if len(rows) >= n:
            break
        rows.append(ex["input_ids"].numpy().astype(np.int32))
    return np.stack(rows) if rows else np.zeros((0, ds.seq_len), np.int32)


def _stream_data(opts: PretrainingOptions, tokenizer) -> tuple:
    kw = dict(tokenizer=tokenizer, seq_len=opts.max_seq_length, streaming=opts.streaming,
              data_files=opts.dataset_data_files)
    train = StreamingTextDataset(opts.dataset, opts.dataset_config, opts.dataset_split, opts.dataset_text_field,
                                 seed=opts.seed, shuffle_buffer=10000 if opts.streaming else 0, **kw)
    eval_split = opts.dataset_eval_split or opts.dataset_split
    eval_src = StreamingTextDataset(opts.dataset, opts.dataset_config, eval_split, opts.dataset_text_field, **kw)
    name = f"{opts.dataset}:{opts.dataset_config or ''}:{opts.dataset_split}"
    eval_ids = _materialize_stream(eval_src, opts.eval_samples)
    return train, None, eval_ids, [name], {"dataset": name, "eval_split": eval_split}


def _file_data(opts: PretrainingOptions, tokenizer, args: TrainingArguments) -> tuple:
    def packed(files, what):
        with args.main_process_first(local=True, desc=f"tokenizing {what}"):
            return load_or_build_packed(files, tokenizer, opts.max_seq_length, opts.cache_dir,
                                        progress=not opts.disable_tqdm and is_main_process())

    files = expand_text_files(opts.train_files)
    ids, stats = packed(files, "training data")
    data_stats = {"train": stats}
    if opts.eval_files:
        eval_ids, data_stats["eval"] = packed(expand_text_files(opts.eval_files), "eval data")
        train_ids = ids
    else:
        n_eval = min(opts.eval_samples, max(1, int(0.05 * len(ids)))) if opts.eval_samples > 0 else 0
        if len(ids) - n_eval < 1:
            raise ValueError(f"only {len(ids)} packed samples of {opts.max_seq_length} tokens: too little data")
        train_ids, eval_ids = ids[: len(ids) - n_eval], ids[len(ids) - n_eval:]
    return PackedDataset(train_ids), len(train_ids), eval_ids, [str(f) for f in files], data_stats


def load_pretraining_data(opts: PretrainingOptions, tokenizer, args: TrainingArguments) -> PretrainingData:
    """Packed (or streamed) training samples and the pre-masked held-out set, in whole evaluation batches."""
    if opts.dataset:
        train, n_train, eval_ids, data_files, stats = _stream_data(opts, tokenizer)
    else:
        train, n_train, eval_ids, data_files, stats = _file_data(opts, tokenizer, args)
    n_eval, eval_bs = eval_layout(len(eval_ids), opts.eval_samples, args.per_device_train_batch_size,
                                  args.world_size)
    eval_ds = None
    if n_eval:
        eval_ids = np.asarray(eval_ids[:n_eval])
        masked, labels = premask(eval_ids, MLMCollator(tokenizer, opts.eval_mlm_probability), seed=opts.seed + 1)
        eval_ds = PackedDataset(eval_ids, masked, labels)
    return PretrainingData(train, eval_ds, n_train, eval_bs, data_files, stats)


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PretrainingRun:
    """A configured pretraining run: `trainer` is ready to `train()`; the rest is what the output folder reports."""

    opts: PretrainingOptions
    trainer: MLMTrainer
    tokenizer: object
    config_name: str
    data: PretrainingData
    resume: str | None
    started: float = field(default_factory=time.time)


def _resume_checkpoint(opts: PretrainingOptions) -> str | None:
    out = Path(opts.output_dir)
    if opts.resume not in ("auto", "latest", "true", "True"):
        return opts.resume
    found = get_last_checkpoint(str(out)) if out.is_dir() else None
    if found is None:
        logger.warning("--resume: no checkpoint in %s, starting from scratch", out)
    return found


def _optim_name(args: TrainingArguments) -> str:
    return getattr(args.optim, "value", str(args.optim))


def _print_setup(opts: PretrainingOptions, config_name: str, model, data: PretrainingData, args) -> None:
    n_params = sum(p.numel() for p in model.parameters())
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    n_eval = len(data.eval) if data.eval is not None else 0
    print(f"[pretrain] model {config_name}: {n_params:,} parameters; data: {data.n_train or 'stream'} train / "
          f"{n_eval} eval samples of {opts.max_seq_length} tokens")
    print(f"[pretrain] global batch = {args.per_device_train_batch_size} per device x "
          f"{args.gradient_accumulation_steps} grad accum x {args.world_size} processes = {global_batch} "
          f"sequences ({global_batch * opts.max_seq_length:,} tokens)")
    print(f"[pretrain] precision {_precision(opts)}, lr {opts.learning_rate}, torch AdamW weight_decay "
          f"{args.weight_decay:g} ({opts.weight_decay_mode} {opts.weight_decay:g}), optimizer {_optim_name(args)}, "
          f"hardware: {hardware_description()}")


def prepare_pretraining(opts: PretrainingOptions, clock: Clock = time.monotonic) -> PretrainingRun:
    """Model, data and the configured Trainer of a run, before training. `clock` times the budget of
    `max_time_minutes` (monotonic seconds; tests pass a fake one)."""
    setup_logging()
    tokenizer = load_tokenizer(opts.tokenizer)
    model, config_name = build_model(opts, tokenizer)
    data = load_pretraining_data(opts, tokenizer, build_training_arguments(opts))  # provisional args: rank order
    args = build_training_arguments(opts, data.n_train, data.eval_batch_size, iterable=bool(opts.dataset),
                                    has_eval=data.eval is not None)
    check_one_gpu_per_process(args)
    if is_main_process():
        _print_setup(opts, config_name, model, data, args)
    resume = _resume_checkpoint(opts)
    tokens_per_step = (args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
                       * opts.max_seq_length)
    peak = opts.peak_tflops if opts.peak_tflops is not None else default_peak_tflops()
    trainer = MLMTrainer(
        model=model, args=args, data_collator=MLMCollator(tokenizer, opts.mlm_probability),
        train_dataset=data.train, eval_dataset=data.eval, processing_class=tokenizer,
        compute_metrics=mlm_accuracy_metrics, preprocess_logits_for_metrics=mlm_accuracy_preprocess,
        schedule=Schedule(opts.warmup_ratio, opts.min_lr_ratio, opts.schedule_steps),
        time_budget=TimeBudgetCallback.resumed(opts.max_time_minutes, resume, clock) if opts.max_time_minutes
        else None,
        throughput=TokenThroughput(tokens_per_step, flops_per_token(model, opts.max_seq_length), peak),
    )
    return PretrainingRun(opts, trainer, tokenizer, config_name, data, resume)


def build_pretraining_trainer(opts: PretrainingOptions, clock: Clock = time.monotonic) -> MLMTrainer:
    """The recipe's configured `MLMTrainer` (model, data, arguments, callbacks), without training it."""
    return prepare_pretraining(opts, clock).trainer


def finish_pretraining(run: PretrainingRun) -> dict:
    """Train `run`, evaluate at the end, and write the Hub-ready folder to opts.output_dir. Returns the facts written
    to train_results.json (plus "data_stats")."""
    trainer = run.trainer
    if run.resume and is_main_process():
        print(f"[pretrain] resuming from {run.resume}")
    started = time.time()
    result = trainer.train(resume_from_checkpoint=run.resume or None)
    train_runtime = time.time() - started
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    if run.data.eval is None:
        final_eval = {}
    elif evals and evals[-1].get("step") == trainer.state.global_step:
        final_eval = evals[-1]  # already evaluated at the final step
    else:
        final_eval = trainer.evaluate()
    out = Path(run.opts.output_dir)
    trainer.save_model(str(out))
    if not trainer.is_world_process_zero():
        return {}
    run.tokenizer.save_pretrained(str(out))
    finalize_hub_folder(out, run.tokenizer)
    facts = run_facts(run, result.training_loss, final_eval, train_runtime)
    hist = trainer.state.log_history
    write_json(out / "train_results.json", facts)
    write_json(out / "log_history.json", hist)
    write_model_card(out, facts)
    plot_loss(out, hist)
    print(f"[pretrain] done: {facts['global_step']} steps, {facts['tokens_seen']:,} tokens, final train loss "
          f"{_fmt(facts['final_train_loss'])}, eval loss {_fmt(facts['eval_loss'])}, MLM acc "
          f"{_fmt(facts['eval_mlm_accuracy'])}; saved to {out}")
    return facts


def run_pretraining(opts: PretrainingOptions, clock: Clock = time.monotonic) -> dict:
    """Train, evaluate and write a Hub-ready folder to opts.output_dir (see `finish_pretraining`)."""
    return finish_pretraining(prepare_pretraining(opts, clock))


def run_facts(run: PretrainingRun, mean_train_loss: float, final_eval: dict, train_runtime: float) -> dict:
    """What train_results.json and the model card report about a finished run."""
    trainer, opts, model = run.trainer, run.opts, run.trainer.model
    args, config, state = trainer.args, trainer.model.config, trainer.state
    train_losses = [h["loss"] for h in state.log_history if "loss" in h]
    budget = trainer.time_budget
    facts = {
        "config_name": run.config_name,
        **{k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                           "intermediate_size", "vocab_size")},
        "parameters": sum(p.numel() for p in model.parameters()),
        "nonembedding_parameters": nonembedding_params(model),
        "data_files": run.data.data_files,
        "data_files_short": [Path(f).name for f in run.data.data_files],
        "train_samples": run.data.n_train if run.data.n_train is not None else "stream",
        "eval_samples": len(run.data.eval) if run.data.eval is not None else 0,
        "max_seq_length": opts.max_seq_length,
        "tokens_seen": int(state.num_input_tokens_seen),
        "global_step": int(state.global_step),
        "global_batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "per_device_batch_size": args.per_device_train_batch_size,
        "grad_accum": args.gradient_accumulation_steps,
        "world_size": args.world_size,
        "precision": _precision(opts),
        "optimizer": _optim_name(args),
        "hardware": hardware_description(),
        "train_runtime_s": round(train_runtime, 1),
        "wall_time_s": round(time.time() - run.started, 1),
        "final_train_loss": train_losses[-1] if train_losses else None,
        "mean_train_loss": mean_train_loss,
        "eval_loss": final_eval.get("eval_loss"),
        "eval_mlm_accuracy": final_eval.get("eval_mlm_accuracy"),
        "stopped_by_time_budget": bool(budget and budget.stopped_at_step is not None),
        "resumed_from": str(run.resume) if run.resume else None,
        "torch_weight_decay": args.weight_decay,
        "flops_per_token": trainer.throughput.flops_per_token,
        "peak_tflops": trainer.throughput.peak_tflops,
        "torch": torch.__version__,
        "options": asdict(opts),
        "data_stats": run.data.stats,
    }
    for k in ("learning_rate", "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay", "weight_decay_mode",
              "warmup_ratio", "min_lr_ratio", "mlm_probability", "eval_mlm_probability"):
        facts[k] = getattr(opts, k)
    return facts


# ----------------------------------------------------------------------------------------------------------------
# Model card, plots
# ----------------------------------------------------------------------------------------------------------------


def _fmt(x, nd=4):
    return "n/a" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def _schedule_note(options: dict) -> str:
    notes = []
    if options.get("schedule_steps"):
        notes.append(f" planned over {options['schedule_steps']:,} steps")
    if options.get("max_time_minutes"):
        notes.append(f" over a {options['max_time_minutes']:g}-minute training budget (or the steps, if fewer)")
    return ",".join(notes)


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
        f"| steps | {facts['global_step']} (global batch {facts['global_batch']} = "
        f"{facts['per_device_batch_size']} per device x {facts['grad_accum']} accumulation x {facts['world_size']} "
        "processes) |",
        f"| optimiser | AdamW lr {facts['learning_rate']}, betas ({facts['adam_beta1']}, {facts['adam_beta2']}), "
        f"eps {facts['adam_epsilon']}, weight decay {facts['weight_decay']} ({facts['weight_decay_mode']}; torch "
        f"AdamW weight_decay={_fmt(facts['torch_weight_decay'], 6)}), warm-up {facts['warmup_ratio']:.0%}, linear "
        f"decay to {facts['min_lr_ratio']} x lr"
        + _schedule_note(facts.get("options", {})) + " |",
        f"| masking | {facts['mlm_probability']:.0%} (train), {facts['eval_mlm_probability']:.0%} (eval) |",
        f"| precision | {facts['precision']} |",
        f"| hardware | {facts['hardware']} |",
        f"| wall time | {facts['train_runtime_s']:.0f} s of training ({facts['wall_time_s']:.0f} s end to end) |",
        f"| final train loss | {_fmt(facts.get('final_train_loss'))} |",
        f"| eval loss / MLM accuracy ({facts['eval_mlm_probability']:.0%} masking) | {_fmt(facts.get('eval_loss'))} / "
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


