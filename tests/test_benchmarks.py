"""The benchmark scripts run against the current package: their CPU smoke modes (tiny models, seconds), and the
inputs they give every model are what a tokenizer and a collator give users. No timing is asserted."""

import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))


def run_script(args, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OUT=str(tmp_path), PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, env=env,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("workload", ["pretrain", "finetune", "infer-base", "infer-mlm", "long"])
def test_model_benchmark_batches_carry_what_a_collator_gives(workload):
    import model as bench

    spec = bench.workload_spec(workload, smoke=True)
    batches = bench.make_batches(spec, bench.load_tokenizer(), seed=0)
    for batch in batches:
        inputs = batch["inputs"]
        assert {"input_ids", "attention_mask", "token_type_ids"} <= set(inputs)
        assert inputs["attention_mask"].shape == inputs["input_ids"].shape
        assert int(inputs["attention_mask"].sum()) == sum(batch["lengths"]) == batch["real_tokens"]
        if workload == "pretrain":  # packed: no padding, and still a mask (of ones)
            assert bool(inputs["attention_mask"].all())
            labelled = inputs["labels"] != -100
            assert 0.1 < labelled.float().mean() < 0.5  # 30% of the non-special tokens
            assert not labelled[:, 0].any() and not labelled[:, -1].any()  # never [CLS] / [SEP]
        if workload == "finetune":
            assert inputs["labels"].shape == (spec["batch"],)


def test_model_benchmark_feeds_every_model_an_attention_mask(tmp_path):
    run_script(["benchmarks/model.py", "--smoke", "--workloads", "pretrain,long", "--extra", "bert,ours-nomask",
                "--out", str(tmp_path)], tmp_path)
    results = json.loads((tmp_path / "model_bench.json").read_text())
    assert [r["workload"] for r in results["results"]] == ["pretrain", "long"]
    measured = 0
    for result in results["results"]:
        for row in result["rows"]:
            assert "error" not in row.get("note", ""), row
            if row["contender"] == "bert" and result["workload"] == "long":
                assert row["note"].startswith("n/a"), row  # 8192 tokens are past BERT's positions
                continue
            assert row["tokens_per_s"] > 0, row
            measured += 1
            if row["contender"].endswith("-nomask"):
                assert "attention_mask" not in row["inputs"] and not row["mask"]
            else:
                assert "attention_mask" in row["inputs"], row
                assert row["mask"]
        assert result["comparison"]["ratio_min"] <= result["comparison"]["ratio_median"]
    assert measured == 9  # pretrain: ours, ours-nographs, two BERT vocabularies, eager BERT, ours without mask; long: 3
    assert (tmp_path / "model_bench.png").exists()
    table = run_script(["benchmarks/report.py", str(tmp_path / "model_bench.json")], tmp_path)
    assert "| workload | model |" in table and "ours / fastest peer" in table


def test_gap_table_splits_each_step_into_kernel_categories_and_device_idle_time():
    import report

    def row(name, step_ms, busy, kernels):
        return {"contender": name, "mask": True, "step_ms": step_ms, "busy_ms_per_step": busy, "kernel_ms": kernels}

    results = {"workloads": {"pretrain": {"desc": "MLM training step", "target": 1.25}}, "results": [{
        "workload": "pretrain", "comparison": {"peer": "bert"},
        "rows": [row("ours", 60.0, 54.0, {"matmul": 40.0, "attention kernel": 14.0}),
                 row("bert", 62.5, 62.0, {"matmul": 45.0, "attention kernel": 17.0})]}]}
    table = report.gap_table(results)
    assert "| matmul | 40.0 | 45.0 |" in table
    assert "| **GPU work** (kernel sum) | **54.0** | **62.0** |" in table
    assert "| device idle (waiting on the host) | 6.0 | 0.5 |" in table
    assert "| step the target needs | 1.25x: 50.0 |  |" in table


def test_recipe_benchmark_times_recipe_bare_step_and_plain_trainer(tmp_path):
    run_script(["benchmarks/recipe.py", "--smoke", "--steps", "4", "--timed", "2", "--out", str(tmp_path),
                "--work-dir", str(tmp_path / "work")], tmp_path)
    results = json.loads((tmp_path / "recipe_bench.json").read_text())
    assert set(results["runs"]) == {"recipe", "bare", "plain_trainer"}
    for run in results["runs"].values():
        assert run["tokens_per_s"] > 0, run
        assert "attention_mask" in run["batch_keys"], run
    assert results["runs"]["recipe"]["steps_run"] == 4
    assert set(results["ratios"]) == {"recipe / bare step", "recipe / plain Trainer"}


def test_trainer_finetune_benchmark_feeds_variable_lengths_to_every_contender(tmp_path):
    stdout = run_script(["benchmarks/finetune_trainer.py", "--smoke", "--out", str(tmp_path)], tmp_path)
    results = json.loads((tmp_path / "finetune_trainer.json").read_text())
    assert set(results["contenders"]) == {"ours", "ours-compiled", "bert-compiled", "ours-nosync",
                                          "ours-compiled-nosync"}
    for row in results["contenders"].values():
        assert row["tokens_per_s"] > 0 and row["steps_run"] == 6, row
        assert row["distinct_lengths"] > 1, row  # padded to the longest: new lengths from batch to batch
        assert row["real_tokens_per_step"] < 4 * 48, row  # real tokens only, never the padding
    assert set(results["ratios"]) == {"ours-compiled / ours", "bert-compiled / ours", "ours-nosync / ours",
                                      "ours-compiled-nosync / ours"}
    assert "| contender |" in stdout


def test_profile_step_smoke_writes_its_categories(tmp_path):
    stdout = run_script(["benchmarks/profile_step.py", "--smoke", "--by-op", "--out", str(tmp_path)], tmp_path)
    profile = json.loads((tmp_path / "profile_step.json").read_text())
    assert profile["wall_ms"] > 0 and profile["categories"]
    assert "| category |" in stdout


def test_host_time_smoke_reports_each_phase_and_one_entry_check_per_step(tmp_path):
    workload = "finetune"
    run_script(["benchmarks/host_time.py", "--smoke", "--steps", "2", "--workload", workload, "--out", str(tmp_path)],
               tmp_path)
    result = json.loads((tmp_path / f"host_time_{workload}.json").read_text())
    assert set(result["host_ms_per_step"]) == {"forward", "backward", "optimizer"}
    assert result["entry_checks_per_step"] == 1.0  # on the CPU every batch is checked first


def test_gpu_suite_runs_a_part_and_summarises(tmp_path):
    stdout = run_script(["benchmarks/gpu_suite.py", "--smoke", "--parts", "profile", "--out", str(tmp_path)],
                        tmp_path)
    assert "| profile | ok |" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs.tgz", "profile_step.json", "summary.md"]
