"""The pretraining recipe's Trainer pieces: the learning-rate schedule, the time budget, token counting and MLM metrics.

None of them synchronises the host with the GPU at a training step: tokens are counted from the static shape of the
packed batches, the time budget reads a host clock, and throughput is computed only when a log line is written.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainerCallback

from .common import is_main_process, world_size, write_json

logger = logging.getLogger(__name__)

Clock = Callable[[], float]


def schedule_factor(progress: float, warmup_ratio: float, min_lr_ratio: float) -> float:
    """The recipe's learning-rate multiplier at `progress` in [0, 1] of the run: linear warm-up from 0 to 1 over the
    first `warmup_ratio`, then linear decay to `min_lr_ratio` at the end (MosaicBERT's schedule)."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup_ratio:
        return progress / warmup_ratio
    return 1.0 - (1.0 - min_lr_ratio) * (progress - warmup_ratio) / max(1.0 - warmup_ratio, 1e-12)


@dataclass(frozen=True)
class Schedule:
    """Warm-up and floor of `schedule_factor`; `steps` is the schedule's length when it differs from the run's."""

    warmup_ratio: float = 0.06
    min_lr_ratio: float = 0.02
    steps: int | None = None


class TokenThroughput(TrainerCallback):
    """Counts the tokens seen from the static batch shape (packed samples: every token is real, and the loader drops
    the last partial batch), with no device read, and adds tokens/s, TFLOP/s per device and MFU to every training
    log line. The count lives in `state.num_input_tokens_seen`, so checkpoints carry it into a resumed run."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_tflops: float | None,
                 clock: Clock = time.perf_counter):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops
        self.clock = clock
        self.mark: tuple[float, int] | None = None  # (time, tokens) of the previous log line

    def on_train_begin(self, args, state, control, **kwargs):
        self.mark = (self.clock(), state.num_input_tokens_seen)  # start-up and compilation are not counted

    def on_step_end(self, args, state, control, **kwargs):
        state.num_input_tokens_seen += self.tokens_per_step

    def add_rates(self, logs: dict, tokens: int) -> None:
        now = self.clock()
        if self.mark is not None and now > self.mark[0] and tokens >= self.mark[1]:
            tps = (tokens - self.mark[1]) / (now - self.mark[0])
            logs["tokens_per_second"] = round(tps, 1)
            logs["tflops_per_device"] = round(tps * self.flops_per_token / 1e12 / world_size(), 3)
            if self.peak_tflops:
                logs["mfu"] = round(tps * self.flops_per_token / (self.peak_tflops * 1e12 * world_size()), 4)
        self.mark = (now, tokens)


class TimeBudgetCallback(TrainerCallback):
    """A training-time budget: stops training (and saves a checkpoint) once `minutes` of training have passed, counted
    over every session of a resumed run (each checkpoint records the time spent in `time_budget.json`), and exposes
    the spent fraction to the learning-rate schedule.

    `clock` is any monotonic clock in seconds (injectable for tests). The fraction is read after each optimizer step,
    before the scheduler steps. Across processes, rank 0's fraction is broadcast at logging steps only (where the
    Trainer synchronises anyway) and held in between, so all ranks use the same learning rate and stop at the same
    step, at most `logging_steps` steps after the budget is spent."""

    FILE = "time_budget.json"

    def __init__(self, minutes: float, spent_seconds: float = 0.0, clock: Clock = time.monotonic):
        if not minutes > 0:
            raise ValueError(f"the time budget must be positive, got {minutes} minutes")
        self.seconds = minutes * 60.0
        self.spent_seconds = spent_seconds  # training time of earlier sessions
        self.clock = clock
        self.fraction = spent_seconds / self.seconds  # of the budget, as of the last optimizer step
        self.t0: float | None = None
        self.stopped_at_step: int | None = None

    @classmethod
    def resumed(cls, minutes: float, checkpoint: str | None, clock: Clock = time.monotonic) -> TimeBudgetCallback:
        """The budget of a run resumed from `checkpoint` (or a fresh one): continues from the time spent there."""
        record = Path(checkpoint) / cls.FILE if checkpoint else None
        spent = json.loads(record.read_text())["spent_seconds"] if record and record.exists() else 0.0
        return cls(minutes, spent_seconds=spent, clock=clock)

    def spent_now(self) -> float:
        return self.spent_seconds + (self.clock() - self.t0 if self.t0 is not None else 0.0)

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = self.clock()
        self.fraction = self.spent_seconds / self.seconds

    def on_optimizer_step(self, args, state, control, **kwargs):
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        step = state.global_step + 1  # the step that is ending
        if distributed and step % max(int(state.logging_steps or 1), 1):
            return
        fraction = self.spent_now() / self.seconds
        if distributed:
            shared = torch.tensor([fraction], dtype=torch.float64, device=args.device)
            torch.distributed.broadcast(shared, src=0)
            fraction = float(shared.item())
        self.fraction = fraction

    def on_step_end(self, args, state, control, **kwargs):
        if self.fraction >= 1.0 and not control.should_training_stop:
            self.stopped_at_step = state.global_step
            control.should_training_stop = True
            control.should_save = True
            logger.warning("Time budget of %.3g min reached at step %d; stopping.", self.seconds / 60,
                           state.global_step)
        return control

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if is_main_process() and folder.is_dir():
            write_json(folder / self.FILE, {"spent_seconds": self.spent_now(), "budget_seconds": self.seconds})


class MLMTrainer(Trainer):
    """Trainer with the recipe's learning-rate schedule (`schedule_factor`, on the step count or the time budget)
    and throughput in every training log line (so it lands in log_history)."""

    def __init__(self, *args, schedule: Schedule = Schedule(), time_budget: TimeBudgetCallback | None = None,
                 throughput: TokenThroughput | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.schedule = schedule
        self.time_budget = time_budget
        self.throughput = throughput
        for callback in (throughput, time_budget):
            if callback is not None:
                self.add_callback(callback)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The run's progress is the step fraction of the schedule's length, or, with a time budget, the larger of
        that and the budget's fraction, so a run stopped by its budget has warmed up and decayed to the floor."""
        if self.lr_scheduler is None:
            budget, schedule = self.time_budget, self.schedule
            total = max(schedule.steps or num_training_steps, 1)

            def factor(step: int) -> float:
                progress = step / total
                if budget is not None:
                    progress = max(progress, budget.fraction)
                return schedule_factor(progress, schedule.warmup_ratio, schedule.min_lr_ratio)

            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer if optimizer is None else optimizer,
                                                                  factor)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self.throughput is not None:
            logs["num_input_tokens_seen"] = self.state.num_input_tokens_seen
            self.throughput.add_rates(logs, self.state.num_input_tokens_seen)
        return super().log(logs, *args, **kwargs)


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
