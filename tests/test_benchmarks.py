"""The benchmark scripts still run against the current package: their CPU smoke modes, tiny models, a few seconds.
(Their numbers come from GPU runs; these tests only keep the scripts from rotting when the package changes.)"""

import json
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(args, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OUT=str(tmp_path))
    result = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def test_model_benchmark_smoke_measures_every_model_without_errors(tmp_path):
    run_script(["benchmarks/model.py", "--device", "cpu", "--smoke", "--workloads", "pretrain,train,infer,cpu",
                "--models", "ours,ours-torch,bert,modernbert", "--out", str(tmp_path)], tmp_path)
    rows = json.loads((tmp_path / "model_bench.json").read_text())["rows"]
    assert len(rows) == 16
    for row in rows:
        assert "error" not in row.get("note", ""), row
        assert row["samples_per_s"] > 0, row


def test_profile_step_smoke_writes_its_categories(tmp_path):
    stdout = run_script(["benchmarks/profile_step.py", "--smoke", "--by-op", "--out", str(tmp_path)], tmp_path)
    profile = json.loads((tmp_path / "profile_step.json").read_text())
    assert profile["wall_ms"] > 0 and profile["categories"]
    assert "| category |" in stdout
