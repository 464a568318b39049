"""GLUE fine-tuning of MosaicBERT with the Hugging Face Trainer, MosaicBERT's per-task recipe as defaults.

Per-task defaults follow mosaicml/examples `bert/src/glue/finetuning_jobs.py` (max length 256, AdamW betas
(0.9, 0.98), eps 1e-6, decoupled weight decay, linear warm-up over 6% of the steps then linear decay to 0).  RTE,
MRPC and STS-B start from an MNLI-fine-tuned checkpoint in that recipe (`--init-from-mnli`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from transformers import (
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

from . import REPO_ROOT
from .cli import OptionError
from .common import (
    bf16_available,
    check_one_gpu_per_process,
    finalize_hub_folder,
    hardware_description,
    import_model_code,
    is_main_process,
    load_config,
    load_tokenizer,
    register_code_for_save,
    setup_logging,
    world_size,
    write_json,
)
from .data import GLUE_TASKS, GlueDataset, canonical_task, load_glue_split
from .pretraining import torch_weight_decay

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskRecipe:
    learning_rate: float
    epochs: float
    batch_size: int  # global batch size
    weight_decay: float  # decoupled (MosaicML) units: multiplied by the schedule factor, not by the lr


# mosaicml/examples bert/src/glue/finetuning_jobs.py (weight decay = lr / 10, except RTE: 1e-5).  WNLI is not part of
# MosaicBERT's GLUE runs; it gets RTE-like small-data settings with the usual lr/10 decay.
TASK_RECIPES: dict[str, TaskRecipe] = {
    "mnli": TaskRecipe(5e-5, 3, 48, 5e-6),
    "qnli": TaskRecipe(1e-5, 10, 16, 1e-6),
    "qqp": TaskRecipe(3e-5, 5, 16, 3e-6),
    "sst2": TaskRecipe(3e-5, 3, 16, 3e-6),
    "cola": TaskRecipe(5e-5, 10, 32, 5e-6),
    "rte": TaskRecipe(1e-5, 3, 16, 1e-5),
    "mrpc": TaskRecipe(8e-5, 10, 32, 8e-6),
    "stsb": TaskRecipe(3e-5, 10, 32, 3e-6),
    "wnli": TaskRecipe(1e-5, 3, 16, 1e-6),
}
MNLI_INIT_TASKS = ("rte", "mrpc", "stsb")
TASK_ORDER = ("mnli", "qnli", "qqp", "sst2", "cola", "rte", "mrpc", "stsb", "wnli")


def default_glue_dir() -> str | None:
    env = os.environ.get("GLUE_DIR")
    if env:
        return env
    cand = REPO_ROOT.parent / "shared" / "data" / "glue"
    return str(cand) if cand.is_dir() else None


@dataclass
class GlueOptions:
    model: str | None = field(default=None, metadata={
        "help": "checkpoint folder to fine-tune (a pretrained masked-LM or a classification model)"})
    random_init: str | None = field(default=None, metadata={
        "help": "fine-tune a randomly initialised model of this preset instead (tiny, small, base): smoke tests",
        "metavar": "PRESET"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "tokenizer folder; default: the model folder's tokenizer, else the repository root's"})
    tasks: list[str] = field(default_factory=lambda: list(TASK_ORDER), metadata={
        "help": "GLUE tasks (tasks without local training data are skipped)"})
    glue_dir: str | None = field(default=None, metadata={
        "help": "folder in the official GLUE layout; 'hub': nyu-mll/glue through `datasets` (network); default: "
                "$GLUE_DIR, else ../shared/data/glue when it exists"})
    seeds: list[int] = field(default_factory=lambda: [19], metadata={"help": "one fine-tuning run per seed"})
    init_from_mnli: str | None = field(default=None, metadata={
        "help": "start RTE, MRPC and STS-B from this MNLI checkpoint; 'auto': this run's MNLI model (first seed)",
        "metavar": "CKPT|auto"})
    output_dir: str = field(default="runs/mosaic-bert-glue", metadata={"help": "results (and models) go here"})
    max_seq_length: int = field(default=256, metadata={"help": "longer inputs are truncated"})
    learning_rate: float | None = field(default=None, metadata={
        "help": "overrides the per-task learning rate (all tasks)", "aliases": ["--lr"]})
    num_train_epochs: float | None = field(default=None, metadata={"help": "overrides the per-task epochs"})
    batch_size: int | None = field(default=None, metadata={
        "help": "overrides the per-task global batch size (divided among the processes)"})
    weight_decay: float | None = field(default=None, metadata={
        "help": "overrides the per-task weight decay (in --weight-decay-mode units)"})
    weight_decay_mode: Literal["decoupled", "torch"] = field(default="decoupled", metadata={
        "help": "decoupled: MosaicML's semantics (torch AdamW gets weight_decay / learning_rate); torch: as is"})
    warmup_ratio: float = field(default=0.06, metadata={"help": "linear warm-up over this fraction of the steps"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.98, metadata={"help": "AdamW beta2"})
    adam_epsilon: float = field(default=1e-6, metadata={"help": "AdamW epsilon"})
    max_steps: int = field(default=-1, metadata={"help": "stop each run after N steps (quick runs); -1: epochs"})
    max_train_samples: int | None = field(default=None, metadata={"help": "a random subset of the training set"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "a random subset of each dev set"})
    eval_batch_size: int = field(default=64, metadata={"help": "per-device evaluation batch"})
    precision: Literal["auto", "bf16", "fp16", "fp32"] = field(default="auto", metadata={
        "help": "auto: bf16 autocast on GPUs that support it, else fp32"})
    logging_steps: int = field(default=50, metadata={"help": "a training log line every N steps"})
    save_models: bool = field(default=False, metadata={
        "help": "keep every fine-tuned model (with its tokenizer) under <output-dir>/<task>/seed<N>/model"})
    skip_missing: bool = field(default=True, metadata={
        "help": "skip tasks whose training data is not available, instead of failing (default: on)"})
    dataloader_num_workers: int = field(default=0, metadata={"help": "data loader processes"})
    torch_compile: bool = field(default=False, metadata={"help": "compile the model with torch.compile"})
    disable_tqdm: bool = field(default=False, metadata={"help": "no progress bars", "aliases": ["--no-progress-bar"]})
    report_to: str = field(default="none", metadata={"help": "none, tensorboard, wandb, ..."})

    def __post_init__(self):
        if self.model and self.random_init:
            raise OptionError("pass either --model or --random-init, not both")


@dataclass
class MergeOptions:
    _argument_group_name = "merging the results of separate runs (trains nothing)"

    merge: list[str] = field(default_factory=list, metadata={
        "help": "results.json files of separate runs (e.g. one process per task and seed) to merge into one "
                "results.json + results.md in --output-dir; refuses runs that disagree on model, hyperparameters "
                "or init, and a task's seed given twice", "metavar": "RESULTS_JSON"})
    note: list[str] = field(default_factory=list, metadata={
        "help": "with --merge: lines shown under the results table (repeatable)", "action": "extend"})


def glue_main(opts: GlueOptions, merging: MergeOptions) -> dict:
    """What scripts/glue.py runs: merge results files (`merging.merge`), or fine-tune."""
    if merging.merge:
        if opts.model or opts.random_init:
            raise OptionError("--merge trains nothing: leave out --model / --random-init")
        results = merge_results(merging.merge, notes=merging.note)
        print(write_results(results, opts.output_dir).read_text())
        return results
    if merging.note:
        raise OptionError("--note goes with --merge")
    return run_glue(opts)


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


def _rank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    xs = x[order]
    i = 0
    while i < len(x):  # average ranks for ties
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def pearson_spearman(pred: np.ndarray, gold: np.ndarray) -> tuple[float, float]:
    try:
        from scipy.stats import pearsonr, spearmanr

        return float(pearsonr(pred, gold)[0]), float(spearmanr(pred, gold)[0])
    except ImportError:
        p = float(np.corrcoef(pred, gold)[0, 1])
        s = float(np.corrcoef(_rank(pred), _rank(gold))[0, 1])
        return p, s


def task_metrics(task_name: str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    task = GLUE_TASKS[task_name]
    if task.is_regression:
        pred = np.asarray(predictions, dtype=np.float64).reshape(-1)
        p, s = pearson_spearman(pred, np.asarray(labels, dtype=np.float64))
        return {"pearson": p, "spearmanr": s}
    pred = np.asarray(predictions).argmax(-1)
    out = {}
    if "accuracy" in task.metrics:
        out["accuracy"] = float(accuracy_score(labels, pred))
    if "f1" in task.metrics:
        out["f1"] = float(f1_score(labels, pred))
    if "matthews_correlation" in task.metrics:
        out["matthews_correlation"] = float(matthews_corrcoef(labels, pred))
    return out


def glue_score(task_name: str, metrics: dict[str, float]) -> float:
    """The GLUE leaderboard's per-task number: the mean of the task's metrics (MRPC/QQP: acc & F1, STS-B: Pearson &
    Spearman), MNLI: matched accuracy."""
    keys = GLUE_TASKS[task_name].metrics
    return float(np.mean([metrics[k] for k in keys]))


# ----------------------------------------------------------------------------------------------------------------
# Running one task
# ----------------------------------------------------------------------------------------------------------------


def _precision(opts) -> str:
    if opts.precision == "auto":
        return "bf16" if bf16_available() else "fp32"
    return opts.precision


def _recipe(opts: GlueOptions, task: str) -> TaskRecipe:
    r = TASK_RECIPES[task]
    return TaskRecipe(
        learning_rate=opts.learning_rate if opts.learning_rate is not None else r.learning_rate,
        epochs=opts.num_train_epochs if opts.num_train_epochs is not None else r.epochs,
        batch_size=opts.batch_size if opts.batch_size is not None else r.batch_size,
        weight_decay=opts.weight_decay if opts.weight_decay is not None else r.weight_decay,
    )


def _load_model(opts: GlueOptions, task: str, init: str | None):
    t = GLUE_TASKS[task]
    kw = dict(num_labels=t.num_labels,
              problem_type="regression" if t.is_regression else "single_label_classification")
    if not t.is_regression:
        kw["id2label"] = dict(enumerate(t.labels))
        kw["label2id"] = {lab: i for i, lab in enumerate(t.labels)}
    if init:
        return AutoModelForSequenceClassification.from_pretrained(
            init, trust_remote_code=True, ignore_mismatched_sizes=True, **kw)
    if opts.random_init:
        _, modeling = import_model_code()
        config, _ = load_config(opts.random_init)
        for k, v in kw.items():
            setattr(config, k, v)
        model = modeling.MosaicBertForSequenceClassification(config)
        register_code_for_save(model, "AutoModelForSequenceClassification")
        return model
    raise OptionError("pass --model CHECKPOINT (or --random-init PRESET for a smoke test)")


def _subsample(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    if n is None or n >= len(rows):
        return rows
    idx = np.random.default_rng(seed).permutation(len(rows))[:n]
    return [rows[i] for i in sorted(idx)]


def load_task_data(opts: GlueOptions, task: str, tokenizer) -> tuple[GlueDataset, dict[str, GlueDataset]]:
    """Tokenized train set and dev set(s) ("dev", or MNLI's "dev_matched"/"dev_mismatched") of a task."""
    t = GLUE_TASKS[task]
    glue_dir = opts.glue_dir or default_glue_dir()
    train_rows = _subsample(load_glue_split(t, "train", glue_dir), opts.max_train_samples, 0)
    dev_sets = {}
    for f in t.dev_files:
        stem = f[: -len(".tsv")]
        try:
            dev_sets[stem] = _subsample(load_glue_split(t, stem, glue_dir), opts.max_eval_samples, 0)
        except FileNotFoundError:
            if stem == "dev_mismatched":
                continue
            raise
    train_ds = GlueDataset(train_rows, tokenizer, opts.max_seq_length, t.is_regression)
    dev_ds = {k: GlueDataset(v, tokenizer, opts.max_seq_length, t.is_regression) for k, v in dev_sets.items()}
    return train_ds, dev_ds


def task_training_arguments_kwargs(opts: GlueOptions, task: str, seed: int, n_train: int, out_dir: Path,
                                   on_gpu: bool | None = None) -> dict:
    """The TrainingArguments of one (task, seed) run as keywords: the task's recipe (or the overrides), fused AdamW
    on GPUs, and no per-step read of the loss for the NaN/inf filter."""
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    r = _recipe(opts, task)
    per_device = max(1, r.batch_size // world_size())
    if opts.max_steps and opts.max_steps > 0:
        total_steps = opts.max_steps
    else:
        total_steps = math.ceil(r.epochs * math.ceil(math.ceil(n_train / world_size()) / per_device))
    prec = _precision(opts)
    return dict(
        output_dir=str(out_dir), per_device_train_batch_size=per_device,
        per_device_eval_batch_size=opts.eval_batch_size, learning_rate=r.learning_rate,
        weight_decay=torch_weight_decay(r.learning_rate, r.weight_decay, opts.weight_decay_mode),
        adam_beta1=opts.adam_beta1, adam_beta2=opts.adam_beta2, adam_epsilon=opts.adam_epsilon,
        optim="adamw_torch_fused" if on_gpu else "adamw_torch", lr_scheduler_type="linear",
        warmup_steps=int(round(opts.warmup_ratio * total_steps)), num_train_epochs=r.epochs,
        max_steps=opts.max_steps if opts.max_steps else -1, bf16=prec == "bf16", fp16=prec == "fp16",
        use_cpu=not on_gpu, seed=seed, data_seed=seed, logging_steps=opts.logging_steps,
        logging_nan_inf_filter=False, eval_strategy="no", save_strategy="no", report_to=opts.report_to,
        disable_tqdm=opts.disable_tqdm or None, dataloader_num_workers=opts.dataloader_num_workers,
        dataloader_pin_memory=on_gpu, torch_compile=opts.torch_compile, remove_unused_columns=False,
    )


def _evaluate_dev_sets(trainer, task: str, dev_ds: dict) -> dict:
    """The task's metrics on its dev set(s): MNLI's mismatched set adds `<metric>_mm` keys."""
    metric_names = GLUE_TASKS[task].metrics
    result = {}
    for stem, ds in dev_ds.items():
        m = trainer.evaluate(ds, metric_key_prefix="eval")
        metrics = {k[len("eval_"):]: v for k, v in m.items() if k[len("eval_"):] in metric_names}
        if stem in ("dev", "dev_matched"):
            result.update(metrics)
            result["eval_loss"] = m.get("eval_loss")
        else:  # MNLI mismatched
            result.update({f"{k}_mm": v for k, v in metrics.items()})
    result["score"] = glue_score(task, result)
    return result


def _save_model(trainer, tokenizer, folder: Path) -> None:
    """The fine-tuned model with its tokenizer and code files: `pipeline(model=folder, trust_remote_code=True)`."""
    trainer.save_model(str(folder))
    tokenizer.save_pretrained(str(folder))
    finalize_hub_folder(folder, tokenizer)


def run_task_seed(opts: GlueOptions, task: str, seed: int, tokenizer, init: str | None, out_dir: Path,
                  keep_model: bool, data: tuple | None = None) -> dict:
    """Fine-tune and evaluate one (task, seed); the result's metrics, losses, steps and sizes."""
    train_ds, dev_ds = data if data is not None else load_task_data(opts, task, tokenizer)
    args = TrainingArguments(**task_training_arguments_kwargs(opts, task, seed, len(train_ds), out_dir))
    check_one_gpu_per_process(args)
    set_seed(seed)
    model = _load_model(opts, task, init)

    def compute(eval_pred):
        preds = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        return task_metrics(task, preds, eval_pred.label_ids)

    trainer = Trainer(model=model, args=args, train_dataset=train_ds,
                      data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8),
                      processing_class=tokenizer, compute_metrics=compute)
    t0 = time.time()
    train_out = trainer.train()
    result = {"train_loss": train_out.training_loss, "steps": trainer.state.global_step,
              "train_runtime_s": round(time.time() - t0, 1)}
    result.update(_evaluate_dev_sets(trainer, task, dev_ds))
    if keep_model and trainer.is_world_process_zero():
        _save_model(trainer, tokenizer, out_dir / "model")
        result["model_dir"] = str(out_dir / "model")
    result["n_train"], result["n_eval"] = len(train_ds), {k: len(v) for k, v in dev_ds.items()}
    del trainer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------------


def summarize(per_seed: dict[str, dict]) -> tuple[dict, dict]:
    keys = sorted({k for r in per_seed.values() for k, v in r.items() if isinstance(v, (int, float))
                   and k not in ("steps", "n_train")})
    mean = {k: float(np.mean([r[k] for r in per_seed.values() if k in r])) for k in keys}
    std = {k: float(np.std([r[k] for r in per_seed.values() if k in r])) for k in keys}
    return mean, std


METRIC_LABELS = {"accuracy": "acc", "f1": "F1", "matthews_correlation": "MCC", "pearson": "Pearson",
                 "spearmanr": "Spearman"}


def results_markdown(results: dict, meta: dict) -> str:
    tasks = [t for t in TASK_ORDER if t in results["tasks"]]
    lines = [f"GLUE dev results of `{meta['model']}` (x100; mean ± std over seeds {meta['seeds']}; "
             f"{meta['hardware']}).", ""]
    header = ["task", "metric(s)", "score", "seeds"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for t in tasks:
        r = results["tasks"][t]
        if "skipped" in r:
            lines.append(f"| {GLUE_TASKS[t].folder} | – | skipped: {r['skipped']} | – |")
            continue
        parts = []
        for k in GLUE_TASKS[t].metrics:
            parts.append(f"{METRIC_LABELS[k]} {100 * r['mean'][k]:.2f} ± {100 * r['std'][k]:.2f}")
            if f"{k}_mm" in r["mean"]:
                parts.append(f"{METRIC_LABELS[k]}-mm {100 * r['mean'][k + '_mm']:.2f}")
        lines.append(f"| {GLUE_TASKS[t].folder} | {', '.join(parts)} | {100 * r['mean']['score']:.2f} | "
                     f"{len(r['seeds'])} |")
    if results.get("average") is not None:
        lines.append(f"| **average** | over {results['average_over']} task(s) | **{100 * results['average']:.2f}** | |")
    lines += ["", "Score = the task's GLUE number (mean of its metrics; MNLI: matched accuracy).",
              "Hyperparameters (lr / epochs / batch / decoupled wd): " + "; ".join(
                  f"{GLUE_TASKS[t].folder} {results['tasks'][t]['hyperparameters']['learning_rate']:g} / "
                  f"{results['tasks'][t]['hyperparameters']['epochs']:g} / "
                  f"{results['tasks'][t]['hyperparameters']['batch_size']} / "
                  f"{results['tasks'][t]['hyperparameters']['weight_decay']:g}"
                  for t in tasks if "hyperparameters" in results["tasks"][t]) + ".", ""]
    if meta.get("limited"):
        lines += [f"Quick run: {meta['limited']} — not comparable to full GLUE numbers.", ""]
    for note in meta.get("notes") or []:
        lines += [f"Note: {note}", ""]
    return "\n".join(lines)


def glue_average(results: dict) -> tuple[float | None, int]:
    """The mean GLUE score over the tasks that ran (skipped tasks do not count) and how many tasks that is."""
    done = [t for t in TASK_ORDER if "mean" in results["tasks"].get(t, {})]
    avg = float(np.mean([results["tasks"][t]["mean"]["score"] for t in done])) if done else None
    return avg, len(done)


def write_results(results: dict, out_dir: str | os.PathLike) -> Path:
    """results.json and results.md (the table of `results_markdown`) into out_dir; returns the markdown's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    md = out / "results.md"
    md.write_text(results_markdown(results, results["meta"]))
    return md


def _run_task(opts: GlueOptions, task: str, tokenizer, init: str | None, out: Path) -> dict:
    """Every seed of one task: the per-seed results, their mean and std, the hyperparameters and the init."""
    rec = _recipe(opts, task)
    data = load_task_data(opts, task, tokenizer)  # tokenized once for all seeds
    per_seed = {}
    for i, seed in enumerate(opts.seeds):
        if is_main_process():
            print(f"[glue] {task} seed {seed}: lr {rec.learning_rate:g}, {rec.epochs:g} epochs, batch "
                  f"{rec.batch_size}, wd {rec.weight_decay:g} ({opts.weight_decay_mode}), init {init or 'random'}")
        keep = opts.save_models or (task == "mnli" and opts.init_from_mnli == "auto" and i == 0)
        r = run_task_seed(opts, task, seed, tokenizer, init, out / task / f"seed{seed}", keep, data)
        per_seed[str(seed)] = r
        if is_main_process():
            shown = {k: round(v, 4) for k, v in r.items() if k in GLUE_TASKS[task].metrics or k == "score"}
            print(f"[glue] {task} seed {seed}: {shown}")
    mean, std = summarize(per_seed)
    return {"seeds": per_seed, "mean": mean, "std": std,
            "hyperparameters": {**asdict(rec), "max_seq_length": opts.max_seq_length,
                                "warmup_ratio": opts.warmup_ratio, "weight_decay_mode": opts.weight_decay_mode},
            "init": init or f"random {opts.random_init}"}


def _quick_run_limits(opts: GlueOptions) -> str | None:
    limits = [f"max_train_samples={opts.max_train_samples}" if opts.max_train_samples else "",
              f"max_eval_samples={opts.max_eval_samples}" if opts.max_eval_samples else "",
              f"max_steps={opts.max_steps}" if opts.max_steps and opts.max_steps > 0 else "",
              f"random init {opts.random_init}" if opts.random_init and not opts.model else ""]
    return ", ".join(x for x in limits if x) or None


def run_glue(opts: GlueOptions) -> dict:
    """Fine-tune every task and seed of `opts`; writes results.json and results.md to opts.output_dir."""
    setup_logging()
    if not opts.model and not opts.random_init:
        raise OptionError("pass --model CHECKPOINT (or --random-init PRESET for a smoke test)")
    tasks = [canonical_task(t) for t in opts.tasks]
    tasks = [t for t in TASK_ORDER if t in tasks]  # MNLI first, so "auto" can chain into RTE/MRPC/STS-B
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_src = opts.tokenizer
    if tok_src is None and opts.model and (Path(opts.model) / "tokenizer_config.json").exists():
        tok_src = opts.model
    tokenizer = load_tokenizer(tok_src)
    glue_dir = opts.glue_dir or default_glue_dir()
    t_start = time.time()
    results: dict = {"tasks": {}}
    mnli_ckpt = None if opts.init_from_mnli in (None, "auto") else opts.init_from_mnli
    for task in tasks:
        folder = GLUE_TASKS[task].folder
        if glue_dir and glue_dir != "hub" and not (Path(glue_dir) / folder / "train.tsv").exists():
            if not opts.skip_missing:
                raise FileNotFoundError(f"no {folder}/train.tsv under {glue_dir}")
            logger.warning("Skipping %s: no %s/train.tsv under %s", task, folder, glue_dir)
            results["tasks"][task] = {"skipped": "train data not available"}
            continue
        init = mnli_ckpt if task in MNLI_INIT_TASKS and mnli_ckpt else opts.model
        results["tasks"][task] = _run_task(opts, task, tokenizer, init, out)
        if task == "mnli" and opts.init_from_mnli == "auto":
            mnli_ckpt = results["tasks"][task]["seeds"][str(opts.seeds[0])].get("model_dir")
    results["average"], results["average_over"] = glue_average(results)
    results["meta"] = {"model": opts.model or f"random-init {opts.random_init}", "seeds": opts.seeds,
                       "hardware": hardware_description(), "glue_dir": glue_dir,
                       "wall_time_s": round(time.time() - t_start, 1), "limited": _quick_run_limits(opts),
                       "options": asdict(opts), "torch": torch.__version__}
    if is_main_process():
        print(write_results(results, out).read_text())
    return results


# ----------------------------------------------------------------------------------------------------------------
# Merging runs
# ----------------------------------------------------------------------------------------------------------------


def _same_path(x):
    return os.path.normpath(x) if isinstance(x, str) and x and not x.startswith("random ") else x


def _unique(values) -> list:
    out = []
    for v in values:
        if v not in (None, "") and v not in out:
            out.append(v)
    return out


def _load_results(sources: Iterable[str | os.PathLike | dict]) -> list[tuple[str, dict]]:
    """(name, results dict) of each source, checked to be results of `run_glue` of one model."""
    loaded = []
    for i, src in enumerate(sources):
        if isinstance(src, dict):
            name, data = f"<results {i}>", src
        else:
            name, data = str(src), json.loads(Path(src).read_text())
        if not (isinstance(data, dict) and isinstance(data.get("tasks"), dict) and isinstance(data.get("meta"), dict)):
            raise ValueError(f"{name} is not a GLUE results.json (needs 'tasks' and 'meta')")
        loaded.append((name, data))
    if not loaded:
        raise ValueError("nothing to merge: pass at least one results.json")
    first_name, first = loaded[0]
    model = first["meta"].get("model")
    for name, data in loaded[1:]:
        other = data["meta"].get("model")
        if _same_path(other) != _same_path(model):
            raise ValueError(f"runs of different models cannot be merged: {first_name} has model {model!r}, "
                             f"{name} has {other!r}")
    return loaded


def _pool_seeds(loaded: list[tuple[str, dict]]) -> tuple[dict[str, dict], dict[str, str]]:
    """Per task, the seeds of all runs (refusing disagreeing settings and a seed given twice); and the tasks skipped."""
    merged_tasks: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for name, data in loaded:
        limited = data["meta"].get("limited") or None
        for task, r in data["tasks"].items():
            if task not in GLUE_TASKS:
                raise ValueError(f"{name}: unknown GLUE task {task!r}")
            if "skipped" in r:
                skipped.setdefault(task, r["skipped"])
                continue
            setting = {"hyperparameters": r.get("hyperparameters"), "init": _same_path(r.get("init")),
                       "quick-run limits": limited}
            entry = merged_tasks.setdefault(task, {"setting": setting, "from": name, "seeds": {}, "seed_from": {},
                                                   "hyperparameters": r.get("hyperparameters"), "init": r.get("init")})
            for key, value in setting.items():
                if value != entry["setting"][key]:
                    raise ValueError(f"{task}: the runs disagree on {key}: {entry['from']} has "
                                     f"{entry['setting'][key]!r}, {name} has {value!r}")
            for seed, per_seed in r.get("seeds", {}).items():
                if seed in entry["seeds"]:
                    raise ValueError(f"{task} seed {seed} appears twice: in {entry['seed_from'][seed]} and in {name}")
                entry["seeds"][seed] = per_seed
                entry["seed_from"][seed] = name
    return merged_tasks, skipped


def _merged_meta(loaded: list[tuple[str, dict]], seeds: set[int], notes: Sequence[str]) -> dict:
    metas = [data["meta"] for _, data in loaded]
    walls = [m["wall_time_s"] for m in metas if isinstance(m.get("wall_time_s"), (int, float))]
    return {
        "model": metas[0].get("model"),
        "seeds": sorted(seeds),
        "hardware": "; ".join(_unique(m.get("hardware") for m in metas)) or None,
        "glue_dir": "; ".join(_unique(str(m["glue_dir"]) for m in metas if m.get("glue_dir"))) or None,
        "wall_time_s": max(walls) if walls else None,  # the runs ran side by side: the longest one
        "wall_time_s_sum": round(sum(walls), 1) if walls else None,
        "limited": "; ".join(_unique(m.get("limited") for m in metas)) or None,
        "notes": list(notes),
        "torch": "; ".join(_unique(m.get("torch") for m in metas)) or None,
        "merged_from": [{"source": name, "tasks": sorted(t for t, r in data["tasks"].items() if "seeds" in r),
                         "seeds": data["meta"].get("seeds"), "wall_time_s": data["meta"].get("wall_time_s")}
                        for name, data in loaded],
    }


def merge_results(sources: Iterable[str | os.PathLike | dict], notes: Sequence[str] = ()) -> dict:
    """Merge the results of separate `run_glue` runs (e.g. one process per task and seed) into one results dict of
    the same format: per task the seeds of all runs, their mean and std (`summarize`), the hyperparameters and init;
    the GLUE average; merged meta.  `sources` are results.json paths (or already loaded dicts); `notes` are lines
    shown under the markdown table (`meta["notes"]`).

    Refuses (ValueError) runs of different models, runs of one task that disagree on hyperparameters, init or quick-run
    limits (max steps / samples), and a (task, seed) present in two runs.  A task skipped in one run but trained in
    another counts as trained; a task only ever skipped stays marked skipped.
    """
    loaded = _load_results(sources)
    merged_tasks, skipped = _pool_seeds(loaded)
    results: dict = {"tasks": {}}
    all_seeds: set[int] = set()
    for task in TASK_ORDER:
        if task in merged_tasks and merged_tasks[task]["seeds"]:
            e = merged_tasks[task]
            per_seed = {s: e["seeds"][s] for s in sorted(e["seeds"], key=int)}
            all_seeds.update(int(s) for s in per_seed)
            mean, std = summarize(per_seed)
            results["tasks"][task] = {"seeds": per_seed, "mean": mean, "std": std,
                                      "hyperparameters": e["hyperparameters"], "init": e["init"]}
        elif task in skipped:
            results["tasks"][task] = {"skipped": skipped[task]}
    results["average"], results["average_over"] = glue_average(results)
    results["meta"] = _merged_meta(loaded, all_seeds, notes)
    return results
