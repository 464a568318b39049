"""The shipped checkpoint (checkpoints/mosaic-bert-wiki-small): complete, generated from the package, and working.

Its code files, config and shards are written by scripts/refresh_checkpoint.py (save_pretrained from the root code);
when one of these tests says the folder is stale, run: python scripts/refresh_checkpoint.py
"""

import filecmp
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import TOKENIZER_FILES, make_config
from reference import Dims

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = os.path.join(REPO_ROOT, "checkpoints", "mosaic-bert-wiki-small")
STALE = "checkpoints/mosaic-bert-wiki-small is stale: run python scripts/refresh_checkpoint.py"


def _code_files(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith(".py"))


def _refresh_script():
    spec = importlib.util.spec_from_file_location("refresh_checkpoint", os.path.join(REPO_ROOT, "scripts",
                                                                                     "refresh_checkpoint.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_shipped_checkpoint_holds_the_code_files_save_pretrained_writes(tmp_path):
    from modeling_mosaic_bert import MosaicBertForMaskedLM

    MosaicBertForMaskedLM(make_config(Dims())).save_pretrained(tmp_path)
    assert _code_files(CHECKPOINT) == _code_files(tmp_path), STALE


@pytest.mark.parametrize("name", _code_files(CHECKPOINT) + list(TOKENIZER_FILES))
def test_shipped_checkpoint_files_equal_the_package_files(name):
    root = os.path.join(REPO_ROOT, name)
    assert os.path.exists(root), f"{name}: no such file at the root any more; {STALE}"
    assert filecmp.cmp(root, os.path.join(CHECKPOINT, name), shallow=False), f"{name} differs; {STALE}"


def test_shipped_checkpoint_auto_map_is_the_package_one():
    shipped = json.load(open(os.path.join(CHECKPOINT, "config.json")))
    root = json.load(open(os.path.join(REPO_ROOT, "config.json")))
    assert shipped["auto_map"] == root["auto_map"], STALE


def test_shipped_checkpoint_card_lists_what_the_folder_holds():
    card = open(os.path.join(CHECKPOINT, "README.md"), encoding="utf-8").read()
    assert _refresh_script().card_file_list(CHECKPOINT) in card, STALE


def test_shipped_checkpoint_is_under_25_mb():
    size = sum(
        os.path.getsize(os.path.join(CHECKPOINT, f)) for f in os.listdir(CHECKPOINT) if f.endswith(".safetensors")
    )
    assert 0 < size <= 25_000_000


def test_shipped_checkpoint_loads_offline_without_missing_keys_and_predicts_a_date():
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    model, info = AutoModelForMaskedLM.from_pretrained(CHECKPOINT, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT, trust_remote_code=True)
    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer)
    predictions = [p["token_str"] for p in fill("The Second World War ended in [MASK].", top_k=5)]
    assert "1945" in predictions


def test_readme_main_job_prints_predictions_offline():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "scripts", "fill_mask.py"), "The cat sat on the [MASK]."],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "The cat sat on the [MASK]." in result.stdout and "->" in result.stdout
