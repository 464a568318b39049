"""save/load, Auto classes, original checkpoints, HF cache layout, pipeline."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import reference as ref
from conftest import REPO_ROOT, TOKENIZER_FILES, assert_close, build, make_config, ragged_batch, real_tokens
from reference import Dims

# The package is the python files at the repository root; save_pretrained must write every one of them (the modeling
# file and, through its relative imports, the others), or a Hub copy of a saved folder would miss a module.
CODE_FILES = tuple(sorted(name for name in os.listdir(REPO_ROOT) if name.endswith(".py")))
AUTO_CLASSES = (
    "AutoConfig",
    "AutoModel",
    "AutoModelForMaskedLM",
    "AutoModelForSequenceClassification",
    "AutoModelForMultipleChoice",
    "AutoModelForTokenClassification",
    "AutoModelForQuestionAnswering",
)


def _m():
    import modeling_mosaic_bert as m

    return m


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def capture_warnings():
    """Collects python warnings and WARNING+ records of the transformers / safetensors / torch loggers."""
    h = _Records()
    loggers = [logging.getLogger(n) for n in ("transformers", "safetensors", "torch", "huggingface_hub")]
    for lg in loggers:
        lg.addHandler(h)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            yield h.messages
        finally:
            for lg in loggers:
                lg.removeHandler(h)
            h.messages.extend(str(x.message) for x in w)


# --------------------------------------------------------------------------
# save_pretrained -> from_pretrained via Auto classes
# --------------------------------------------------------------------------

HEADS = [
    # (model class, Auto class, reference kind)
    ("MosaicBertModel", "AutoModel", "base"),
    ("MosaicBertForMaskedLM", "AutoModelForMaskedLM", "mlm"),
    ("MosaicBertForSequenceClassification", "AutoModelForSequenceClassification", "seq"),
    ("MosaicBertForMultipleChoice", "AutoModelForMultipleChoice", "mc"),
    ("MosaicBertForTokenClassification", "AutoModelForTokenClassification", "tok"),
    ("MosaicBertForQuestionAnswering", "AutoModelForQuestionAnswering", "qa"),
]


def _reference_outputs(kind, sd, d, ids, mask, tt, model_sd_keys):
    if kind == "base":
        with_pooler = any(k.startswith("pooler.") for k in model_sd_keys)
        return {"last_hidden_state": ref.base(sd, d, ids, mask, tt, with_pooler=with_pooler)["last_hidden_state"]}
    if kind == "mlm":
        return {"logits": ref.mlm(sd, d, ids, mask, tt)["logits_full"]}
    if kind == "seq":
        return {"logits": ref.seq_cls(sd, d, ids, mask, tt)["logits"]}
    if kind == "mc":
        return {"logits": ref.multiple_choice(sd, d, ids, mask, tt)["logits"]}
    if kind == "tok":
        return {"logits": ref.token_cls(sd, d, ids, mask, tt)["logits"]}
    if kind == "qa":
        return ref.question_answering(sd, d, ids, mask, tt)
    raise ValueError(kind)


def _check_against_reference(model, kind, sd, d):
    ids, mask, tt = ragged_batch(d, [6, 1, 4, 3], seqlen=6, seed=7)
    if kind == "mc":
        ids, mask, tt = (t.reshape(2, 2, 6) for t in (ids, mask, tt))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    exp = _reference_outputs(kind, sd, d, ids, mask, tt, model.state_dict().keys())
    for k, v in exp.items():
        got = getattr(out, k)
        if kind == "mlm":
            for b in range(ids.shape[0]):
                assert_close(real_tokens(got, mask, b), real_tokens(v, mask, b), msg=f"{kind}.{k} seq {b}")
        else:
            assert_close(got, v, msg=f"{kind}.{k}")


@pytest.mark.parametrize("cls_name,auto_name,kind", HEADS)
def test_save_pretrained_then_auto_from_pretrained_round_trip(tmp_path, cls_name, auto_name, kind):
    import transformers

    d = Dims()
    model, sd = build(getattr(_m(), cls_name), d, kind)
    model.save_pretrained(tmp_path)
    auto = getattr(transformers, auto_name)
    loaded = auto.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float64).eval()
    assert type(loaded).__name__ == cls_name
    assert loaded.dtype == torch.float64
    _check_against_reference(loaded, kind, sd, d)


def test_save_pretrained_writes_config_safetensors_and_code_without_shared_tensor_warnings(tmp_path):
    d = Dims()
    model, _ = build(_m().MosaicBertForMaskedLM, d, "mlm", dtype=torch.float32)
    with capture_warnings() as msgs:
        model.save_pretrained(tmp_path)
    bad = [m for m in msgs if "shared" in m.lower() or "tied" in m.lower() or "duplicate" in m.lower()]
    assert not bad, bad
    files = set(os.listdir(tmp_path))
    assert "config.json" in files and "model.safetensors" in files
    assert "pytorch_model.bin" not in files
    for f in CODE_FILES:
        assert f in files, f"{f} not written by save_pretrained ({sorted(files)})"
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["model_type"] == "mosaic_bert"
    assert "AutoConfig" in cfg["auto_map"] and "AutoModelForMaskedLM" in cfg["auto_map"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "bert.embeddings.word_embeddings.weight" in keys
    assert "cls.predictions.decoder.bias" in keys
    assert not [k for k in keys if "alibi" in k]


def test_saved_config_auto_map_lists_every_auto_class(tmp_path):
    d = Dims()
    model = _m().MosaicBertForMaskedLM(make_config(d))
    model.save_pretrained(tmp_path)
    auto_map = json.load(open(tmp_path / "config.json"))["auto_map"]
    assert set(AUTO_CLASSES) <= set(auto_map), sorted(auto_map)


def test_masked_lm_folder_loads_as_base_model_and_as_classifier(tmp_path):
    import transformers

    d = Dims()
    model, sd = build(_m().MosaicBertForMaskedLM, d, "mlm")
    model.save_pretrained(tmp_path)
    base = transformers.AutoModel.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float64).eval()
    assert type(base).__name__ == "MosaicBertModel"
    ids, mask, tt = ragged_batch(d, [5, 2], seed=3)
    with torch.no_grad():
        out = base(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    exp = ref.encode(sd, d, ids, mask, tt)
    assert_close(out.last_hidden_state, exp["last_hidden_state"], msg="encoder weights transferred from MLM checkpoint")
    clf = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path, trust_remote_code=True, num_labels=2
    )
    torch.testing.assert_close(
        clf.bert.embeddings.word_embeddings.weight.double(), sd["bert.embeddings.word_embeddings.weight"]
    )


def test_tied_weights_stay_tied_after_load(tmp_path):
    import transformers

    d = Dims()
    model, _ = build(_m().MosaicBertForMaskedLM, d, "mlm", dtype=torch.float32)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, trust_remote_code=True)
    dec = loaded.cls.predictions.decoder.weight
    emb = loaded.bert.embeddings.word_embeddings.weight
    assert dec.data_ptr() == emb.data_ptr(), "decoder.weight no longer shares storage with word_embeddings"
    torch.testing.assert_close(loaded.cls.predictions.decoder.bias, model.cls.predictions.decoder.bias)
    # direct class load too
    direct = _m().MosaicBertForMaskedLM.from_pretrained(tmp_path)
    assert direct.cls.predictions.decoder.weight.data_ptr() == direct.bert.embeddings.word_embeddings.weight.data_ptr()


def test_direct_class_from_pretrained_reports_no_missing_keys(tmp_path):
    d = Dims()
    model, sd = build(_m().MosaicBertForSequenceClassification, d, "seq")
    model.save_pretrained(tmp_path)
    loaded, info = _m().MosaicBertForSequenceClassification.from_pretrained(
        tmp_path, output_loading_info=True, dtype=torch.float64
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    _check_against_reference(loaded.eval(), "seq", sd, d)


# --------------------------------------------------------------------------
# Original MosaicBERT checkpoint layout
# --------------------------------------------------------------------------


def _write_original_checkpoint(folder, d: Dims, seed=0):
    sd = ref.random_state_dict(d, "mlm", seed=seed, dtype=torch.float32)
    # an original checkpoint stores the tied decoder weight as its own entry
    sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"].clone()
    torch.save(sd, os.path.join(folder, "pytorch_model.bin"))
    cfg = ref.original_config(d)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return {k: v.double() for k, v in sd.items()}


def test_original_checkpoint_loads_without_missing_or_unexpected_keys(tmp_path):
    d = Dims()
    sd = _write_original_checkpoint(tmp_path, d)
    model, info = _m().MosaicBertForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info.get("mismatched_keys"), info["mismatched_keys"]
    assert model.config.hidden_size == d.hidden_size and model.config.num_attention_heads == d.num_attention_heads
    assert model.config.attention_probs_dropout_prob == 0.0
    assert model.cls.predictions.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
    model = model.double().eval()
    ids, mask, tt = ragged_batch(d, [6, 1, 4], seed=9)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    exp = ref.mlm(sd, d, ids, mask, tt)["logits_full"]
    for b in range(3):
        assert_close(real_tokens(out.logits, mask, b), real_tokens(exp, mask, b), atol=1e-9, msg=f"orig ckpt seq {b}")


def test_original_checkpoint_loads_into_sequence_classifier_encoder(tmp_path):
    d = Dims()
    sd = _write_original_checkpoint(tmp_path, d)
    model, info = _m().MosaicBertForSequenceClassification.from_pretrained(
        tmp_path, output_loading_info=True, num_labels=2)
    missing = set(info["missing_keys"])
    new_head = {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}
    assert missing == new_head, missing
    torch.testing.assert_close(
        model.bert.encoder.layer[1].mlp.gated_layers.weight.double(), sd["bert.encoder.layer.1.mlp.gated_layers.weight"]
    )


# --------------------------------------------------------------------------
# HF cache layout (subprocess, offline)
# --------------------------------------------------------------------------

_CACHE_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForMaskedLM
    work, mode = sys.argv[1], sys.argv[2]
    kw = {"cache_dir": sys.argv[3]} if mode == "cache_dir" else {}
    m = AutoModelForMaskedLM.from_pretrained(
        "org/tiny-mosaic-bert", trust_remote_code=True, dtype=torch.float64, **kw).eval()
    inp = torch.load(work + "/inputs.pt")
    with torch.no_grad():
        out = m(**inp).logits
    torch.save({"logits": out, "cls": type(m).__name__}, work + "/out.pt")
    """
)


@pytest.mark.parametrize("mode", ["env", "cache_dir"])
def test_load_by_repo_id_from_offline_hf_cache(tmp_path, mode):
    d = Dims()
    model, sd = build(_m().MosaicBertForMaskedLM, d, "mlm")
    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny-mosaic-bert"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model.save_pretrained(snap)
    for f in TOKENIZER_FILES:
        shutil.copy(os.path.join(REPO_ROOT, f), snap / f)
    ids, mask, tt = ragged_batch(d, [5, 2], seed=4)
    torch.save({"input_ids": ids, "attention_mask": mask, "token_type_ids": tt}, tmp_path / "inputs.pt")
    script = tmp_path / "load.py"
    script.write_text(_CACHE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH="")
    if mode == "env":
        env["HF_HUB_CACHE"] = str(cache)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), mode, str(cache)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = torch.load(tmp_path / "out.pt")
    assert res["cls"] == "MosaicBertForMaskedLM"
    exp = ref.mlm(sd, d, ids, mask, tt)["logits_full"]
    for b in range(2):
        assert_close(real_tokens(res["logits"], mask, b), real_tokens(exp, mask, b), msg=f"cache-loaded seq {b}")


# --------------------------------------------------------------------------
# Root folder: config + tokenizer; pipeline
# --------------------------------------------------------------------------


def test_repo_root_config_is_mosaic_bert_base_with_full_auto_map():
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(REPO_ROOT, trust_remote_code=True)
    assert type(cfg).__name__ == "MosaicBertConfig"
    assert cfg.model_type == "mosaic_bert"
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (
        30528,
        768,
        12,
        12,
        3072,
    )
    raw = json.load(open(os.path.join(REPO_ROOT, "config.json")))
    assert set(AUTO_CLASSES) <= set(raw["auto_map"]), sorted(raw["auto_map"])
    assert raw["auto_map"]["AutoModelForMaskedLM"].endswith("MosaicBertForMaskedLM") or raw["auto_map"][
        "AutoModelForMaskedLM"
    ].endswith("BertForMaskedLM")


def test_repo_root_config_builds_tiny_model_via_auto_from_config():
    from transformers import AutoConfig, AutoModelForMaskedLM

    cfg = AutoConfig.from_pretrained(
        REPO_ROOT, trust_remote_code=True, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64,
    )
    model = AutoModelForMaskedLM.from_config(cfg, trust_remote_code=True)
    assert type(model).__name__ == "MosaicBertForMaskedLM"
    out = model(input_ids=torch.tensor([[101, 2054, 102]]))
    assert out.logits.shape == (1, 3, 30528)


def test_auto_tokenizer_loads_from_repo_root():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(REPO_ROOT)
    assert tok("hello world")["input_ids"] == [101, 7592, 2088, 102]
    assert tok.mask_token == "[MASK]" and tok.mask_token_id == 103 and tok.pad_token_id == 0


def test_fill_mask_pipeline_returns_top_k_predictions(tmp_path):
    from transformers import AutoTokenizer, pipeline

    d = Dims(vocab_size=30528, hidden_size=32, num_attention_heads=4, intermediate_size=64)
    model, _ = build(_m().MosaicBertForMaskedLM, d, "mlm", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(REPO_ROOT)
    target = tok.convert_tokens_to_ids("capital")
    with torch.no_grad():
        model.cls.predictions.decoder.bias[target] += 50.0  # make the answer unmistakable
    model.save_pretrained(tmp_path)
    for f in TOKENIZER_FILES:
        shutil.copy(os.path.join(REPO_ROOT, f), tmp_path / f)
    fill = pipeline("fill-mask", model=str(tmp_path), tokenizer=str(tmp_path), trust_remote_code=True, device="cpu")
    res = fill("paris is the [MASK] of france.", top_k=3)
    assert isinstance(res, list) and len(res) == 3
    for r in res:
        assert set(r) >= {"score", "token", "token_str", "sequence"}
    scores = [r["score"] for r in res]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0 + 1e-6
    assert res[0]["token"] == target and res[0]["token_str"] == "capital"
    assert res[0]["sequence"] == "paris is the capital of france."
    # batch of inputs of different lengths
    res2 = fill(["the [MASK] is here.", "a much longer sentence with a [MASK] in it and more words."], top_k=2)
    assert len(res2) == 2 and all(len(r) == 2 for r in res2)
    assert res2[0][0]["token"] == target and res2[1][0]["token"] == target


CHECKPOINT = os.path.join(REPO_ROOT, "checkpoints", "mosaic-bert-wiki-small")


def test_model_loads_and_runs_on_pytorch_when_triton_is_not_installed(tmp_path):
    """Triton is optional: with `import triton` failing, remote-code loading works and attention runs on PyTorch."""
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from transformers import AutoModelForMaskedLM\n"
        f"m = AutoModelForMaskedLM.from_pretrained({CHECKPOINT!r}, trust_remote_code=True)\n"
        "assert sys.modules[type(m).__module__].flash_attn_varlen_qkvpacked_func is None\n"
        "out = m(torch.tensor([[101, 2023, 103, 102]])).logits\n"
        "assert out.shape == (1, 4, 30528) and torch.isfinite(out).all()\n"
        "print('ok')\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
