"""Tests of the pretraining and GLUE recipes (CPU, a couple of minutes on 2 cores).

The pretraining run goes through the real command line (subprocess); resume, time budget and GLUE call the recipe
functions directly.  GLUE data: synthetic TSVs in the official layout, so no shared data is needed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from transformers import TrainerCallback  # noqa: E402

from recipes.data import (  # noqa: E402
    GLUE_TASKS,
    MLMCollator,
    Packer,
    expand_text_files,
    iter_documents,
    load_glue_split,
    premask,
    read_glue_tsv,
)
from recipes.glue import (  # noqa: E402
    GlueOptions,
    merge_results,
    pearson_spearman,
    run_glue,
    summarize,
    task_metrics,
)
from recipes.pretraining import (  # noqa: E402
    PretrainingOptions,
    TimeBudgetCallback,
    build_training_arguments,
    default_eval_steps,
    eval_layout,
    finish_pretraining,
    prepare_pretraining,
    run_pretraining,
    schedule_factor,
    torch_weight_decay,
    training_arguments_kwargs,
)

SHARED_GLUE = REPO.parent / "shared" / "data" / "glue"


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(REPO), trust_remote_code=True)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tokcache")


# ------------------------------------------------------------------------------------------------ unit tests


def test_sample_data_and_packing(tokenizer):
    files = expand_text_files(None)
    assert [f.name for f in files] == ["enwiki-vital-summaries-sample.txt.xz"]  # README.md is not training data
    docs = list(iter_documents(files))
    assert len(docs) > 900 and all(docs)

    class Progress:  # what tokenizing's progress bar is given: the bytes read from each (compressed) file
        n = 0

        def update(self, n):
            self.n += n

    progress = Progress()
    assert list(iter_documents(files, progress=progress)) == docs
    assert progress.n == files[0].stat().st_size
    p = Packer(16, tokenizer.cls_token_id, tokenizer.sep_token_id)
    p.add_document(list(range(1000, 1020)))
    p.add_document(list(range(2000, 2005)))
    arr = p.array()
    assert arr.shape == (1, 16)
    assert arr[0, 0] == tokenizer.cls_token_id and arr[0, -1] == tokenizer.sep_token_id
    assert list(arr[0, 1:15]) == list(range(1000, 1014))
    # buffer: 6 left + [SEP] + 5 = 12 tokens, still short of a sample; the next document completes it
    sep = tokenizer.sep_token_id
    p.add_document(list(range(3000, 3010)))
    arr = p.array()
    assert arr.shape == (2, 16)
    assert list(arr[1, 1:15]) == [*range(1014, 1020), sep, *range(2000, 2005), sep, 3000]


def test_mlm_collator(tokenizer):
    torch.manual_seed(0)
    coll = MLMCollator(tokenizer, mlm_probability=0.3)
    ids = torch.randint(1000, 30000, (64, 128))
    ids[:, 0], ids[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
    batch = coll([{"input_ids": row} for row in ids] + [{"input_ids": ids[0, :50]}])
    assert batch["input_ids"].shape == (65, 128)
    lab = batch["labels"]
    assert (lab[:, 0] == -100).all() and (lab[:64, -1] == -100).all()  # specials never masked
    assert (lab[64, 50:] == -100).all() and (batch["attention_mask"][64, 50:] == 0).all()  # padding unlabelled
    frac = (lab[:64] != -100).float().mean().item()
    assert 0.26 < frac < 0.34
    sel = lab != -100
    masked = (batch["input_ids"][sel] == tokenizer.mask_token_id).float().mean().item()
    assert 0.75 < masked < 0.85
    assert (lab[sel] == (torch.cat([ids, torch.nn.functional.pad(ids[:1, :50], (0, 78))]))[sel]).all()
    # pre-masked eval set: deterministic, passes through the collator unchanged
    m1, l1 = premask(ids.numpy(), MLMCollator(tokenizer, 0.15), seed=3)
    m2, l2 = premask(ids.numpy(), MLMCollator(tokenizer, 0.15), seed=3)
    assert (m1 == m2).all() and (l1 == l2).all() and 0.12 < (l1 != -100).mean() < 0.18
    out = coll([{"input_ids": torch.from_numpy(m1[0]), "labels": torch.from_numpy(l1[0])}])
    packed = coll([{"input_ids": row} for row in ids[:8]])  # equal lengths: stacked, nothing padded
    assert packed["input_ids"].shape == (8, 128) and bool(packed["attention_mask"].all())
    assert (out["labels"][0].numpy() == l1[0]).all() and (out["input_ids"][0].numpy() == m1[0]).all()


def test_presets():
    from recipes.common import load_config

    base = json.loads((REPO / "config.json").read_text())
    assert json.loads((REPO / "configs" / "mosaic-bert-base.json").read_text()) == base  # base preset = root config
    tiny, _ = load_config("tiny")
    assert (tiny.hidden_size, tiny.num_hidden_layers, tiny.num_attention_heads, tiny.intermediate_size) == (
        128, 2, 2, 512)
    small, _ = load_config("small", {"num_hidden_layers": 6})
    assert small.hidden_size == 512 and small.num_hidden_layers == 6 and small.vocab_size == 30528
    # the shipped checkpoint's shape is the preset of its name
    shipped = json.loads((REPO / "checkpoints" / "mosaic-bert-wiki-small" / "config.json").read_text())
    wiki_small = json.loads((REPO / "configs" / "mosaic-bert-wiki-small.json").read_text())
    assert {k: shipped.get(k) for k in wiki_small} == wiki_small


def test_weight_decay_conversion():
    # MosaicML DecoupledAdamW (wd 1e-5 at lr 5e-4) == torch AdamW weight_decay 0.02
    assert torch_weight_decay(5e-4, 1e-5, "decoupled") == pytest.approx(0.02)
    assert torch_weight_decay(5e-4, 0.01, "torch") == 0.01
    # and the two optimisers really agree
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(10))
    opt = torch.optim.AdamW([p], lr=5e-4, weight_decay=0.0)
    p.grad = torch.zeros(10)
    before = p.detach().clone()
    opt = torch.optim.AdamW([p], lr=5e-4, weight_decay=torch_weight_decay(5e-4, 1e-5, "decoupled"))
    opt.step()
    assert torch.allclose(p.detach(), before * (1 - 1e-5))


def test_metrics():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50)
    p, s = pearson_spearman(x, y)
    assert p == pytest.approx(np.corrcoef(x, y)[0, 1])
    m = task_metrics("mrpc", np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), np.array([1, 0, 0]))
    assert m["accuracy"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    assert set(task_metrics("cola", np.eye(2)[[0, 1, 1]], np.array([0, 1, 0]))) == {"matthews_correlation"}


@pytest.mark.skipif(not SHARED_GLUE.is_dir(), reason="shared GLUE data not available")
def test_read_real_glue_tsvs():
    expected = {("cola", "train"): 8551, ("cola", "dev"): 1043, ("sst2", "dev"): 872, ("mrpc", "train"): 3668,
                ("mrpc", "dev"): 408, ("rte", "dev"): 277, ("stsb", "dev"): 1500, ("wnli", "dev"): 71,
                ("qnli", "dev"): 5463, ("stsb", "train"): 5749}
    for (task, split), n in expected.items():
        rows = load_glue_split(GLUE_TASKS[task], split, SHARED_GLUE)
        assert len(rows) == n, (task, split)
    cola = load_glue_split(GLUE_TASKS["cola"], "dev", SHARED_GLUE)
    assert {r["label"] for r in cola} == {0, 1} and cola[0]["b"] is None
    sts = load_glue_split(GLUE_TASKS["stsb"], "dev", SHARED_GLUE)
    assert sts[0]["label"] == 5.0 and sts[0]["a"].startswith("A man with a hard hat")


# ------------------------------------------------------------------------------------------------ pretraining


@pytest.fixture(scope="session")
def pretrain_run(tmp_path_factory, cache_dir):
    """A real CLI run: tiny model, 30 steps, checkpoint every 15 steps."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    env = dict(os.environ, MOSAIC_BERT_CACHE=str(cache_dir), TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(REPO / "scripts" / "pretrain.py"), "--config", "tiny", "--max-steps", "30",
           "--learning-rate", "2e-3", "--per-device-batch-size", "8", "--max-seq-length", "64", "--logging-steps", "5",
           "--eval-steps", "15", "--save-steps", "15", "--eval-samples", "32", "--output-dir", str(out),
           "--no-progress-bar"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc


def test_pretraining_cli_run(pretrain_run):
    from recipes.common import model_code_files

    out, proc = pretrain_run
    assert "global batch = 8 per device x 1 grad accum x 1 processes = 8" in proc.stdout
    for f in ("config.json", "model.safetensors", *model_code_files(), "tokenizer.json", "tokenizer_config.json",
              "README.md", "train_results.json", "log_history.json", "checkpoint-15", "checkpoint-30"):
        assert (out / f).exists(), f
    facts = json.loads((out / "train_results.json").read_text())
    assert facts["global_step"] == 30 and facts["tokens_seen"] == 30 * 8 * 64  # counted from the batch shape
    assert facts["torch_weight_decay"] == pytest.approx(1e-5 / 2e-3)
    hist = json.loads((out / "log_history.json").read_text())
    losses = [h["loss"] for h in hist if "loss" in h]
    assert losses[-1] < losses[0] - 1.0, losses  # the loss falls
    evals = [h["eval_loss"] for h in hist if "eval_loss" in h]
    assert len(evals) >= 2 and evals[-1] < evals[0]
    assert [h["num_input_tokens_seen"] for h in hist if "loss" in h][-1] == 30 * 8 * 64
    assert any("tokens_per_second" in h for h in hist)
    assert 0.0 <= facts["eval_mlm_accuracy"] <= 1.0 and facts["eval_samples"] == 32
    card = (out / "README.md").read_text()
    assert "tokens seen | 15,360" in card and "CC BY-SA" in card
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForMaskedLM"] == "modeling_mosaic_bert.MosaicBertForMaskedLM"
    assert cfg["hidden_size"] == 128 and cfg["vocab_size"] == 30528


@pytest.mark.parametrize("folder", [".", "checkpoint-15"])
def test_pretraining_outputs_load_with_pipeline_from_the_folder_alone(pretrain_run, folder):
    """pipeline(model=folder) finds model, code and tokenizer in the output folder and in every checkpoint."""
    from transformers import pipeline

    out, _ = pretrain_run
    fill = pipeline("fill-mask", model=str(out / folder), trust_remote_code=True)
    assert type(fill.model).__name__ == "MosaicBertForMaskedLM"
    preds = fill("The capital of France is [MASK].")
    assert len(preds) == 5 and all("token_str" in p for p in preds)


def test_pretraining_output_holds_every_weight_of_the_model(pretrain_run):
    """The saved weights are the model's whole state dict (a pooler, when the model has one, included); only the
    decoder, tied to the word embeddings, is stored once."""
    from safetensors import safe_open
    from transformers import AutoModelForMaskedLM

    out, _ = pretrain_run
    model = AutoModelForMaskedLM.from_pretrained(str(out), trust_remote_code=True)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    tied = {"cls.predictions.decoder.weight"}
    assert saved | tied == set(model.state_dict()) and not saved & tied
    assert any(k.startswith("bert.pooler.") for k in saved) == (model.bert.pooler is not None)


def test_resume_and_tokenization_cache(pretrain_run, cache_dir, tmp_path):
    out, proc = pretrain_run
    assert "cache miss" in proc.stderr  # the first run tokenized
    caches = sorted(Path(cache_dir).glob("packed-*.npy"))
    assert len(caches) == 1
    mtime = caches[0].stat().st_mtime_ns
    new_out = tmp_path / "resumed"
    facts = run_pretraining(PretrainingOptions(
        config="tiny", max_steps=30, learning_rate=2e-3, per_device_batch_size=8, max_seq_length=64, logging_steps=5,
        eval_steps=15, save_steps=15, eval_samples=32, output_dir=str(new_out), resume=str(out / "checkpoint-15"),
        cache_dir=str(cache_dir), disable_tqdm=True))
    assert facts["data_stats"]["train"]["cache_hit"] is True  # no re-tokenization
    assert caches[0].stat().st_mtime_ns == mtime
    assert facts["global_step"] == 30 and facts["resumed_from"].endswith("checkpoint-15")
    hist = json.loads((new_out / "log_history.json").read_text())
    resumed_steps = [h["step"] for h in hist if "loss" in h]
    assert resumed_steps[-1] == 30 and 20 in resumed_steps
    assert facts["tokens_seen"] == 30 * 8 * 64  # restored counter continued


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
    assert schedule_factor(0.0, 0.06, 0.02) == 0.0
    assert schedule_factor(0.03, 0.06, 0.02) == pytest.approx(0.5)
    assert schedule_factor(0.06, 0.06, 0.02) == pytest.approx(1.0)
    assert schedule_factor(0.53, 0.06, 0.02) == pytest.approx(1.0 - 0.98 * 0.5)
    assert schedule_factor(1.0, 0.06, 0.02) == pytest.approx(0.02)
    assert schedule_factor(1.7, 0.06, 0.0) == 0.0  # past the end: the floor


@pytest.mark.parametrize("schedule_steps", [None, 50])
def test_step_schedule_follows_the_recipe_at_every_logged_step(tmp_path, cache_dir, schedule_steps):
    """The schedule runs over the run's 20 steps, or over --schedule-steps (a run stopped early in a longer plan)."""
    run_pretraining(PretrainingOptions(
        config="tiny", max_steps=20, schedule_steps=schedule_steps, learning_rate=1e-3, warmup_ratio=0.1,
        min_lr_ratio=0.02, per_device_batch_size=4, max_seq_length=32, eval_samples=4, logging_steps=1,
        save_steps=100_000, output_dir=str(tmp_path / "sched"), cache_dir=str(cache_dir), disable_tqdm=True))
    hist = json.loads((tmp_path / "sched" / "log_history.json").read_text())
    logged = {h["step"]: h["learning_rate"] for h in hist if "learning_rate" in h}
    assert sorted(logged) == list(range(1, 21))
    length = schedule_steps or 20
    for step, lr in logged.items():  # the rate logged at step k is the one step k used: the schedule at (k - 1) / N
        assert lr == pytest.approx(1e-3 * schedule_factor((step - 1) / length, 0.1, 0.02), rel=1e-6, abs=1e-12), step


class StepClock(TrainerCallback):
    """A fake monotonic clock for the time budget: exactly one second passes at the start of every training step,
    however fast the machine is."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def on_step_begin(self, args, state, control, **kwargs):
        self.now += 1.0


def test_time_budget_stops_training_at_the_end_of_its_schedule(tmp_path, cache_dir):
    clock = StepClock()
    out = tmp_path / "budget"
    run = prepare_pretraining(PretrainingOptions(
        config="tiny", max_steps=60, learning_rate=1e-3, per_device_batch_size=4, max_seq_length=32,
        max_time_minutes=0.5, eval_samples=8, logging_steps=1, save_steps=100_000, output_dir=str(out),
        cache_dir=str(cache_dir), disable_tqdm=True), clock=clock)
    run.trainer.add_callback(clock)
    facts = finish_pretraining(run)
    # a 30-second budget at one second a step: it stops after step 30, not at the 60 steps asked for
    assert facts["stopped_by_time_budget"] and facts["global_step"] == 30
    assert (out / "model.safetensors").exists()
    rates = {h["step"]: h["learning_rate"] for h in json.loads((out / "log_history.json").read_text())
             if "learning_rate" in h}
    assert sorted(rates) == list(range(1, 31))
    # the schedule ran on the budget (30 s), not on the 60 steps: warmed up, then decayed to its floor by the end
    for step, lr in rates.items():  # the rate step k used: the schedule at the budget spent before it, (k - 1) / 30
        assert lr == pytest.approx(1e-3 * schedule_factor((step - 1) / 30, 0.06, 0.02), rel=1e-6, abs=1e-12), step
    # the checkpoint saved at the stop records the time spent, for a resumed run to continue the budget
    record = out / "checkpoint-30" / TimeBudgetCallback.FILE
    assert json.loads(record.read_text()) == {"spent_seconds": 30.0, "budget_seconds": 30.0}


def test_time_budget_across_processes_reads_rank_0_at_logging_steps_only(monkeypatch):
    """With several processes, rank 0's budget fraction is broadcast at logging steps (where the Trainer synchronises
    anyway) and held in between: every process uses the same rate and stops at the same step, at most
    logging_steps steps after the budget is spent."""
    from types import SimpleNamespace

    from transformers import TrainerControl

    broadcasts = []
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "broadcast", lambda tensor, src: broadcasts.append((src, tensor.item())))
    now = [0.0]
    budget = TimeBudgetCallback(minutes=12 / 60, clock=lambda: now[0])
    args, control = SimpleNamespace(device=torch.device("cpu")), TrainerControl()
    state = SimpleNamespace(global_step=0, logging_steps=5)
    budget.on_train_begin(args, state, control)
    fractions = {}
    for step in range(1, 30):
        now[0] = float(step)  # one second a step
        budget.on_optimizer_step(args, state, control)
        state.global_step = step
        budget.on_step_end(args, state, control)
        fractions[step] = budget.fraction
        if control.should_training_stop:
            break
    assert budget.stopped_at_step == 15 and control.should_save  # spent at step 12, seen at the next logging step
    assert broadcasts == [(0, 5 / 12), (0, 10 / 12), (0, 15 / 12)]
    assert fractions[4] == 0 and fractions[7] == fractions[9] == 5 / 12 and fractions[12] == 10 / 12


def test_time_budget_continues_from_the_time_a_checkpoint_recorded(tmp_path):
    checkpoint = tmp_path / "checkpoint-40"
    checkpoint.mkdir()
    (checkpoint / TimeBudgetCallback.FILE).write_text(json.dumps({"spent_seconds": 45.0, "budget_seconds": 60.0}))
    resumed = TimeBudgetCallback.resumed(1.0, str(checkpoint))
    assert resumed.spent_seconds == 45.0 and resumed.fraction == pytest.approx(0.75)
    assert TimeBudgetCallback.resumed(1.0, None).fraction == 0.0
    assert TimeBudgetCallback.resumed(1.0, str(tmp_path)).fraction == 0.0  # a checkpoint of a run without a budget


# ------------------------------------------------------------------------------------------------ recipe settings


@pytest.mark.parametrize("on_gpu", [True, False])
def test_training_arguments_leave_the_training_step_without_host_syncs(on_gpu):
    """What the recipe hands the Trainer: no per-step token counting or NaN filter (each reads a device value every
    step), full batches only (static shapes), fused AdamW and pinned, non-blocking loader workers on GPUs."""
    from dataclasses import fields

    from transformers import TrainingArguments

    kw = training_arguments_kwargs(PretrainingOptions(), n_train=10_000, on_gpu=on_gpu)
    assert set(kw) <= {f.name for f in fields(TrainingArguments)}
    assert kw["include_num_input_tokens_seen"] == "no" and kw["logging_nan_inf_filter"] is False
    assert kw["dataloader_drop_last"] is True
    assert kw["logging_steps"] == 10 and kw["eval_strategy"] == "no"  # a short run: evaluated once, at the end
    if on_gpu:
        assert kw["optim"] == "adamw_torch_fused" and kw["per_device_train_batch_size"] == 128
        assert kw["dataloader_num_workers"] == 4 and kw["dataloader_pin_memory"] and kw["dataloader_persistent_workers"]
        assert kw["accelerator_config"] == {"non_blocking": True} and not kw["use_cpu"]
    else:
        assert kw["optim"] == "adamw_torch" and kw["dataloader_num_workers"] == 0 and kw["use_cpu"]
    args = build_training_arguments(PretrainingOptions(max_steps=30_000))  # a valid TrainingArguments here (CPU)
    assert args.include_num_input_tokens_seen == "no" and args.logging_nan_inf_filter is False
    assert args.dataloader_drop_last and args.eval_strategy == "steps" and args.eval_steps == 3000


def test_evaluation_defaults_scale_with_the_run():
    assert default_eval_steps(None) is None and default_eval_steps(5) is None and default_eval_steps(1999) is None
    assert default_eval_steps(2000) == 200 and default_eval_steps(100_000) == 10_000
    assert PretrainingOptions().eval_samples == 256
    # whole evaluation batches on every process: (samples, per-device batch)
    assert eval_layout(10_000, 256, 128, 1) == (256, 128)
    assert eval_layout(10_000, 1000, 256, 1) == (1000, 250)  # every sample kept: a divisor close to the batch
    assert eval_layout(10_000, 256, 96, 2) == (256, 64)
    assert eval_layout(997, 1000, 256, 1) == (768, 256)  # a prime: whole batches of the batch size instead
    assert eval_layout(50, 256, 128, 2) == (50, 25)
    assert eval_layout(7, 256, 4, 2) == (6, 3)
    assert eval_layout(1, 256, 4, 2) == (0, 1) and eval_layout(100, 0, 4, 1) == (0, 1)


def _script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_cli", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pretrain_command_line_is_the_options_dataclass():
    from dataclasses import fields

    cli = _script("pretrain")
    assert cli.parse_args([]) == PretrainingOptions()
    opts = cli.parse_args(["--config", "tiny", "--lr", "1e-3", "--max-steps", "7", "--train-files", "a.txt", "b",
                           "--gradient-checkpointing", "--no-progress-bar", "--resume", "--precision", "bf16",
                           "--max_time_minutes", "2.5"])
    assert (opts.config, opts.learning_rate, opts.max_steps, opts.train_files) == ("tiny", 1e-3, 7, ["a.txt", "b"])
    assert opts.activation_checkpointing and opts.disable_tqdm and opts.resume == "auto" and opts.precision == "bf16"
    assert opts.max_time_minutes == 2.5
    assert cli.parse_args(["--resume", "runs/x/checkpoint-5"]).resume == "runs/x/checkpoint-5"
    with pytest.raises(SystemExit):
        cli.parse_args(["--precision", "fp8"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--max-step", "7x"])
    with pytest.raises(SystemExit):  # options that do not go together: a usage error before anything runs
        cli.main(["--dataset", "allenai/c4"])
    with pytest.raises(ValueError, match="--max-time-minutes must be positive"):
        PretrainingOptions(max_time_minutes=0)
    assert all(f.metadata.get("help") for f in fields(PretrainingOptions)), "every option has its help"


def test_command_line_help_lists_each_option_once_with_the_examples_as_written():
    from recipes.cli import build_parser
    from recipes.pretraining import OPTION_GROUPS

    cli = _script("pretrain")
    text = build_parser(OPTION_GROUPS, cli.__doc__).format_help()
    assert "  python scripts/pretrain.py --config tiny" in text  # the examples keep their lines
    assert "--max_steps" not in text and text.count("--max-steps N") == 1
    assert "(default: 0.0005)" in text and "(default: None)" not in text
    for block in text.split("\n  --")[1:]:
        assert block.count("default:") <= 1, block


# ------------------------------------------------------------------------------------------------ GLUE


def _write_tsv(path: Path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory):
    """Tiny synthetic GLUE folder in the official layout (RTE, STS-B, MNLI with matched/mismatched, CoLA)."""
    d = tmp_path_factory.mktemp("glue")
    rng = np.random.default_rng(0)
    words = "the a cat dog sat ran on under mat house big small red blue quickly slowly".split()

    def sent():
        return " ".join(rng.choice(words, size=rng.integers(4, 12)))

    for split, n in (("train", 48), ("dev", 24)):
        _write_tsv(d / "RTE" / f"{split}.tsv", ["index", "sentence1", "sentence2", "label"],
                   [(i, sent(), sent(), rng.choice(["entailment", "not_entailment"])) for i in range(n)])
        _write_tsv(d / "STS-B" / f"{split}.tsv",
                   ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
                    "sentence2", "score"],
                   [(i, "g", "f", "y", i, "none", "none", sent(), sent(), f"{rng.uniform(0, 5):.3f}")
                    for i in range(n)])
        _write_tsv(d / "CoLA" / f"{split}.tsv", None, [("src", rng.integers(0, 2), "", sent()) for _ in range(n)])
    mnli_header = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                   "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
    for split in ("train", "dev_matched", "dev_mismatched"):
        _write_tsv(d / "MNLI" / f"{split}.tsv", mnli_header,
                   [(i, 0, 0, "g", "", "", "", "", sent(), sent(), "x",
                     rng.choice(["entailment", "neutral", "contradiction"])) for i in range(48)])
    return d


def test_read_synthetic_glue(glue_dir):
    rows = read_glue_tsv(glue_dir / "MNLI" / "dev_mismatched.tsv", GLUE_TASKS["mnli"])
    assert len(rows) == 48 and {r["label"] for r in rows} <= {0, 1, 2}
    cola = read_glue_tsv(glue_dir / "CoLA" / "train.tsv", GLUE_TASKS["cola"])
    assert len(cola) == 48 and cola[0]["b"] is None


def test_glue_rte_stsb_from_pretrained_checkpoint(pretrain_run, glue_dir, tmp_path):
    """Slices of the real RTE / STS-B TSVs when the shared data is there (synthetic ones otherwise)."""
    out, _ = pretrain_run
    gdir = SHARED_GLUE if (SHARED_GLUE / "RTE" / "train.tsv").exists() else glue_dir
    res = run_glue(GlueOptions(model=str(out), tasks=["rte", "stsb", "qqp"], glue_dir=str(gdir), seeds=[1, 2],
                               output_dir=str(tmp_path / "glue"), max_train_samples=32, max_eval_samples=16,
                               max_steps=3, disable_tqdm=True, logging_steps=1))
    data = json.loads((tmp_path / "glue" / "results.json").read_text())
    assert set(data["tasks"]["rte"]["seeds"]) == {"1", "2"}
    assert {"accuracy", "score"} <= set(data["tasks"]["rte"]["mean"]) and "accuracy" in data["tasks"]["rte"]["std"]
    assert {"pearson", "spearmanr", "score"} <= set(data["tasks"]["stsb"]["mean"])
    assert data["tasks"]["stsb"]["seeds"]["1"]["steps"] == 3
    assert data["tasks"]["qqp"] == {"skipped": "train data not available"}
    assert data["average_over"] == 2 and res["average"] == pytest.approx(data["average"])
    assert data["tasks"]["rte"]["hyperparameters"]["learning_rate"] == 1e-5
    md = (tmp_path / "glue" / "results.md").read_text()
    assert "| RTE | acc " in md and "| STS-B | Pearson " in md and "Spearman" in md and "skipped" in md


def test_glue_cli_mnli_chain_random_init(glue_dir, tmp_path):
    """scripts/glue.py end to end: random-init tiny model, MNLI (matched + mismatched), then RTE from MNLI."""
    out = tmp_path / "glue_cli"
    cmd = [sys.executable, str(REPO / "scripts" / "glue.py"), "--random-init", "tiny", "--tasks", "rte", "mnli",
           "--glue-dir", str(glue_dir), "--seeds", "7", "--max-train-samples", "32", "--max-steps", "2",
           "--init-from-mnli", "auto", "--output-dir", str(out), "--no-progress-bar"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    data = json.loads((out / "results.json").read_text())
    mnli = data["tasks"]["mnli"]["mean"]
    assert {"accuracy", "accuracy_mm"} <= set(mnli)
    assert data["tasks"]["rte"]["init"].endswith(str(Path("mnli") / "seed7" / "model"))
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(out / "mnli" / "seed7" / "model"), trust_remote_code=True)
    assert classify("A cat sat on the mat.")[0]["label"] in ("entailment", "neutral", "contradiction")


# ------------------------------------------------------------------------------------------------ merging GLUE runs


def _glue_run(tasks: dict, model="ckpt/small", lr=1e-4, limited=None, init=None) -> dict:
    """A results dict shaped like run_glue's: {task: {seed: score}}; "skipped" for a skipped task."""
    out = {"tasks": {}}
    for task, seeds in tasks.items():
        if seeds == "skipped":
            out["tasks"][task] = {"skipped": "train data not available"}
            continue
        metric = GLUE_TASKS[task].metrics[0]
        per_seed = {str(s): {metric: v, "score": v, "steps": 10, "n_train": 100, "train_runtime_s": 1.0}
                    for s, v in seeds.items()}
        mean, std = summarize(per_seed)
        out["tasks"][task] = {"seeds": per_seed, "mean": mean, "std": std,
                              "hyperparameters": {"learning_rate": lr, "epochs": 3, "batch_size": 16,
                                                  "weight_decay": 1e-5, "max_seq_length": 256},
                              "init": init or model}
    out["meta"] = {"model": model, "seeds": sorted({s for v in tasks.values() if v != "skipped" for s in v}),
                   "hardware": "NVIDIA H100 80GB HBM3", "glue_dir": "glue", "wall_time_s": 10.0 + len(out["tasks"]),
                   "limited": limited, "options": {}, "torch": "2.11"}
    return out


def test_glue_merge_results_files(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_glue_run({"rte": {1: 0.50, 2: 0.54}, "qqp": "skipped"})))
    b.write_text(json.dumps(_glue_run({"rte": {3: 0.58}, "stsb": {1: 0.40}})))
    res = merge_results([a, b], notes=["SST-2: 1 epoch"])
    rte = res["tasks"]["rte"]
    assert list(rte["seeds"]) == ["1", "2", "3"]
    assert rte["mean"]["score"] == pytest.approx(0.54)
    assert rte["std"]["accuracy"] == pytest.approx(np.std([0.50, 0.54, 0.58]))
    assert res["tasks"]["stsb"]["mean"]["pearson"] == pytest.approx(0.40)
    assert res["tasks"]["qqp"] == {"skipped": "train data not available"}
    assert list(res["tasks"]) == ["qqp", "rte", "stsb"]  # GLUE order
    assert res["average"] == pytest.approx((0.54 + 0.40) / 2) and res["average_over"] == 2
    meta = res["meta"]
    assert meta["seeds"] == [1, 2, 3] and meta["model"] == "ckpt/small" and meta["wall_time_s"] == 12.0
    assert [m["source"] for m in meta["merged_from"]] == [str(a), str(b)]
    # a task skipped in one run but trained in another is trained
    again = merge_results([_glue_run({"stsb": "skipped"}), _glue_run({"stsb": {4: 0.3}})])
    assert again["tasks"]["stsb"]["mean"]["score"] == pytest.approx(0.3)


def test_glue_merge_cli(tmp_path):
    """scripts/glue.py --merge writes results.json + results.md (called in-process: no training, no subprocess)."""
    cli = _script("glue")
    paths = []
    for i, run in enumerate([{"rte": {1: 0.5}}, {"rte": {2: 0.6}}, {"wnli": {1: 0.4}}]):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(_glue_run(run)))
    cli.main(["--merge", *map(str, paths), "--output-dir", str(tmp_path / "merged"), "--note", "a quick check",
              "--note", "a second note"])
    data = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert set(data["tasks"]["rte"]["seeds"]) == {"1", "2"} and data["average_over"] == 2
    md = (tmp_path / "merged" / "results.md").read_text()
    assert "| RTE | acc 55.00 ± 5.00 | 55.00 | 2 |" in md and "| WNLI | acc 40.00" in md
    assert "Note: a quick check" in md and "Note: a second note" in md
    with pytest.raises(SystemExit):  # --merge trains nothing
        cli.main(["--merge", str(paths[0]), "--model", "x", "--output-dir", str(tmp_path / "m2")])
    with pytest.raises(SystemExit):
        cli.main(["--model", "x", "--random-init", "tiny"])


@pytest.mark.parametrize("other, message", [
    (_glue_run({"rte": {2: 0.5}}, lr=3e-5), "rte: the runs disagree on hyperparameters"),
    (_glue_run({"rte": {2: 0.5}}, init="mnli/seed1/model"), "rte: the runs disagree on init"),
    (_glue_run({"rte": {2: 0.5}}, limited="max_steps=5"), "rte: the runs disagree on quick-run limits"),
    (_glue_run({"rte": {2: 0.5}}, model="other/model"), "runs of different models"),
    (_glue_run({"rte": {1: 0.5}}), "rte seed 1 appears twice"),
    ({"tasks": {}}, "not a GLUE results.json"),
])
def test_glue_merge_refuses(other, message):
    with pytest.raises(ValueError, match=message):
        merge_results([_glue_run({"rte": {1: 0.5}, "wnli": {1: 0.4}}), other])
    with pytest.raises(ValueError, match="nothing to merge"):
        merge_results([])


def test_glue_merge_matches_one_process_run(glue_dir, tmp_path):
    """Seeds run as separate processes and merged give the numbers of one run over both seeds."""
    common = dict(random_init="tiny", tasks=["rte"], glue_dir=str(glue_dir), max_train_samples=32,
                  max_steps=2, disable_tqdm=True)
    together = run_glue(GlueOptions(seeds=[1, 2], output_dir=str(tmp_path / "both"), **common))
    for seed in (1, 2):
        run_glue(GlueOptions(seeds=[seed], output_dir=str(tmp_path / f"s{seed}"), **common))
    merged = merge_results([tmp_path / "s2" / "results.json", tmp_path / "s1" / "results.json"])
    for key in ("mean", "std"):
        for metric in ("accuracy", "score", "train_loss", "eval_loss"):  # not the wall times
            assert merged["tasks"]["rte"][key][metric] == pytest.approx(together["tasks"]["rte"][key][metric])
    assert merged["tasks"]["rte"]["hyperparameters"] == together["tasks"]["rte"]["hyperparameters"]
    limits = "max_train_samples=32, max_steps=2, random init tiny"
    assert merged["meta"]["limited"] == together["meta"]["limited"] == limits


def test_a_process_that_sees_several_gpus_is_refused_with_the_torchrun_command():
    from types import SimpleNamespace

    from recipes.common import check_one_gpu_per_process

    check_one_gpu_per_process(SimpleNamespace(n_gpu=1))
    check_one_gpu_per_process(SimpleNamespace(n_gpu=0))
    with pytest.raises(ValueError, match="torchrun --nproc_per_node 2"):
        check_one_gpu_per_process(SimpleNamespace(n_gpu=2))
