"""The shipped checkpoint (checkpoints/mosaic-bert-wiki-small): complete, in sync with the package, and working."""

import filecmp
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = os.path.join(REPO_ROOT, "checkpoints", "mosaic-bert-wiki-small")
CODE_FILES = ("configuration_mosaic_bert.py", "modeling_mosaic_bert.py", "bert_padding.py", "flash_attn_triton.py",
              "geglu_triton.py", "layernorm_triton.py", "cross_entropy_triton.py")


@pytest.mark.parametrize("name", CODE_FILES)
def test_shipped_checkpoint_carries_the_current_package_code(name):
    assert filecmp.cmp(os.path.join(REPO_ROOT, name), os.path.join(CHECKPOINT, name), shallow=False), (
        f"checkpoints/mosaic-bert-wiki-small/{name} differs from the package's {name}: copy it over"
    )


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
