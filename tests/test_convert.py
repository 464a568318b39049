"""scripts/convert_original_checkpoint.py / recipes.conversion: original MosaicBERT folders in, folders of this package
out, loaded back through the Auto classes with trust_remote_code and compared with the float64 reference."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

import reference as ref
from conftest import REPO_ROOT, TOKENIZER_FILES, ragged_batch
from reference import Dims, original_config

D = Dims()


def _conversion():
    from recipes import conversion

    return conversion


def write_original(folder, state: dict, config: dict, wrap: str = "plain", tokenizer=True, fmt="bin"):
    """wrap: "plain" state dict, "prefixed" (every key `model.`), "composer" ({"state": {"model": prefixed}, ...})."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if wrap in ("prefixed", "composer"):
        state = {f"model.{k}": v for k, v in state.items()}
    if wrap == "composer":
        state = {"state": {"model": state, "timestamp": {"epoch": 1, "batch": 10}}, "rng": [{"seed": 17}]}
    if fmt == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous().clone() for k, v in state.items()}, str(folder / "model.safetensors"))
    if tokenizer:
        for name in TOKENIZER_FILES:
            shutil.copy2(REPO_ROOT + "/" + name, folder / name)
    return folder


def fp32_state(kind: str, d: Dims = D, seed=0) -> tuple[dict, dict]:
    """(float32 state dict to save, float64 dict with the same values for the reference)."""
    sd64 = ref.random_state_dict(d, kind, seed=seed, dtype=torch.float64)
    sd32 = {k: v.float() for k, v in sd64.items()}
    if kind == "mlm":  # tied, as the original saves it: one storage under both names
        sd32["cls.predictions.decoder.weight"] = sd32["bert.embeddings.word_embeddings.weight"]
    sd64 = {k: v.float().double() for k, v in sd64.items()}
    return sd32, sd64


@pytest.mark.parametrize("wrap", ["plain", "prefixed", "composer"])
def test_convert_masked_lm_then_load_with_auto_class(tmp_path, wrap):
    from transformers import AutoModelForMaskedLM

    from configuration_mosaic_bert import AUTO_MAP

    sd32, sd64 = fp32_state("mlm")
    src = write_original(tmp_path / "orig", sd32, original_config(D), wrap=wrap)
    dst = tmp_path / f"converted_{wrap}"
    report = _conversion().convert_checkpoint(src, dst)
    assert report.head == "masked_lm" and report.model_class == "MosaicBertForMaskedLM"
    assert report.stripped_prefix == ("" if wrap == "plain" else "model.")
    assert report.max_abs_diff <= 1e-6
    files = {p.name for p in dst.iterdir()}
    assert {"model.safetensors", "config.json", "configuration_mosaic_bert.py", "modeling_mosaic_bert.py",
            "bert_padding.py"} <= files
    assert set(TOKENIZER_FILES) <= files and "pytorch_model.bin" not in files
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["model_type"] == "mosaic_bert" and cfg["auto_map"] == AUTO_MAP
    assert cfg["architectures"] == ["MosaicBertForMaskedLM"] and cfg["alibi_starting_size"] == 512
    assert "position_embedding_type" not in cfg and "max_position_embeddings" not in cfg

    model = AutoModelForMaskedLM.from_pretrained(str(dst), trust_remote_code=True, dtype=torch.float64).eval()
    assert type(model).__name__ == "MosaicBertForMaskedLM"
    ids, mask, tt = ragged_batch(D, [9, 1, 5], padding="middle")
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
    exp = ref.mlm(sd64, D, ids, mask, tt)["logits_full"]
    m = mask.bool()
    torch.testing.assert_close(out[m], exp[m], atol=1e-9, rtol=1e-9)
    # tied decoder survived the round trip
    assert model.cls.predictions.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()


@pytest.mark.parametrize(
    "kind, architectures, head, auto_name",
    [
        ("seq", ["BertForSequenceClassification"], "sequence_classification", "AutoModelForSequenceClassification"),
        ("mc", ["BertForMultipleChoice"], "multiple_choice", "AutoModelForMultipleChoice"),
        ("tok", ["BertForTokenClassification"], "token_classification", "AutoModelForTokenClassification"),
        ("qa", ["BertForQuestionAnswering"], "question_answering", "AutoModelForQuestionAnswering"),
        ("base_pooler", ["BertModel"], "base", "AutoModel"),
    ],
)
def test_convert_every_head(tmp_path, kind, architectures, head, auto_name):
    import transformers

    sd32, sd64 = fp32_state(kind)
    src = write_original(tmp_path / "orig", sd32, original_config(D, architectures), wrap="prefixed", tokenizer=False)
    report = _conversion().convert_checkpoint(src, tmp_path / "dst")
    assert report.head == head and report.max_abs_diff <= 1e-6
    assert not (tmp_path / "dst" / "tokenizer.json").exists()
    model = getattr(transformers, auto_name).from_pretrained(
        str(tmp_path / "dst"), trust_remote_code=True, dtype=torch.float64
    ).eval()
    ids, mask, tt = ragged_batch(D, [6, 2, 4, 6])
    with torch.no_grad():
        if kind == "seq":
            assert model.config.num_labels == D.num_labels
            got = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
            exp = ref.seq_cls(sd64, D, ids, mask, tt)["logits"]
        elif kind == "mc":
            v = lambda t: t.view(2, 2, -1)  # noqa: E731
            got = model(input_ids=v(ids), attention_mask=v(mask), token_type_ids=v(tt)).logits
            exp = ref.multiple_choice(sd64, D, v(ids), v(mask), v(tt))["logits"]
        elif kind == "tok":
            got = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
            exp = ref.token_cls(sd64, D, ids, mask, tt)["logits"]
        elif kind == "qa":
            got = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).start_logits
            exp = ref.question_answering(sd64, D, ids, mask, tt)["start_logits"]
        else:
            got = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).pooler_output
            exp = ref.base(sd64, D, ids, mask, tt, with_pooler=True)["pooled"]
    torch.testing.assert_close(got, exp, atol=1e-9, rtol=1e-9)


def test_head_detection_from_keys():
    c = _conversion()
    enc = list(ref.encoder_keys(D))
    assert c.detect_head(enc + ["cls.predictions.decoder.bias"]) == "masked_lm"
    assert c.detect_head(enc + ["bert.pooler.dense.weight", "classifier.weight"]) == "sequence_classification"
    assert c.detect_head(enc + ["bert.pooler.dense.weight", "classifier.weight"], ["BertForMultipleChoice"]) == (
        "multiple_choice"
    )
    assert c.detect_head(enc + ["classifier.weight"]) == "token_classification"
    assert c.detect_head(enc + ["qa_outputs.weight"]) == "question_answering"
    assert c.detect_head(list(ref.encoder_keys(D, prefix=""))) == "base"
    # keys win over a config that names another head
    assert c.detect_head(enc + ["cls.predictions.decoder.bias"], ["BertForSequenceClassification"]) == "masked_lm"


def test_safetensors_source_and_bfloat16_weights(tmp_path):
    from transformers import AutoModelForMaskedLM

    sd32, _ = fp32_state("mlm")
    sd16 = {k: v.to(torch.bfloat16) for k, v in sd32.items() if k != "cls.predictions.decoder.weight"}
    src = write_original(tmp_path / "orig", sd16, original_config(D), fmt="safetensors", tokenizer=False)
    report = _conversion().convert_checkpoint(src, tmp_path / "dst")
    assert report.weights_file.endswith("model.safetensors") and report.max_abs_diff <= 1e-6
    from safetensors import safe_open

    with safe_open(str(tmp_path / "dst" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("bert.embeddings.word_embeddings.weight").dtype == torch.bfloat16
    model = AutoModelForMaskedLM.from_pretrained(str(tmp_path / "dst"), trust_remote_code=True)
    torch.testing.assert_close(
        model.bert.embeddings.word_embeddings.weight.float(), sd16["bert.embeddings.word_embeddings.weight"].float()
    )


def test_alibi_buffer_in_original_state_dict_is_dropped(tmp_path):
    sd32, _ = fp32_state("mlm")
    sd32["bert.encoder.alibi"] = torch.zeros(1, D.num_attention_heads, 8, 8)
    src = write_original(tmp_path / "orig", sd32, original_config(D), wrap="prefixed", tokenizer=False)
    report = _conversion().convert_checkpoint(src, tmp_path / "dst")
    assert "bert.encoder.alibi" in report.dropped_keys


def test_unknown_keys_are_refused_with_their_names(tmp_path):
    c = _conversion()
    sd32, _ = fp32_state("mlm")
    sd32["bert.encoder.layer.0.attention.self.rotary.inv_freq"] = torch.zeros(4)
    sd32["bert.embeddings.position_embeddings.weight"] = torch.zeros(512, D.hidden_size)
    src = write_original(tmp_path / "orig", sd32, original_config(D), wrap="prefixed", tokenizer=False)
    with pytest.raises(c.ConversionError) as e:
        c.convert_checkpoint(src, tmp_path / "dst")
    msg = str(e.value)
    assert "2 unknown key(s)" in msg
    assert "bert.encoder.layer.0.attention.self.rotary.inv_freq" in msg
    assert "bert.embeddings.position_embeddings.weight" in msg
    assert not (tmp_path / "dst").exists()


def test_missing_keys_are_refused_with_their_names(tmp_path):
    c = _conversion()
    sd32, _ = fp32_state("mlm")
    del sd32["bert.encoder.layer.1.mlp.wo.bias"]
    del sd32["cls.predictions.transform.LayerNorm.weight"]
    src = write_original(tmp_path / "orig", sd32, original_config(D), tokenizer=False)
    with pytest.raises(c.ConversionError, match=r"2 missing key\(s\)") as e:
        c.convert_checkpoint(src, tmp_path / "dst")
    assert "bert.encoder.layer.1.mlp.wo.bias" in str(e.value)
    assert "cls.predictions.transform.LayerNorm.weight" in str(e.value)


def test_shape_mismatch_with_config_is_refused(tmp_path):
    c = _conversion()
    sd32, _ = fp32_state("mlm")
    src = write_original(tmp_path / "orig", sd32, original_config(D, intermediate_size=96), tokenizer=False)
    with pytest.raises(c.ConversionError, match=r"shape mismatch.*mlp\.gated_layers\.weight"):
        c.convert_checkpoint(src, tmp_path / "dst")


def test_destination_not_empty_is_refused_without_overwrite(tmp_path):
    c = _conversion()
    sd32, _ = fp32_state("base_pooler")
    src = write_original(tmp_path / "orig", sd32, original_config(D, ["BertModel"]), tokenizer=False)
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("x")
    with pytest.raises(c.ConversionError, match="not empty"):
        c.convert_checkpoint(src, tmp_path / "dst")
    c.convert_checkpoint(src, tmp_path / "dst", overwrite=True)
    with pytest.raises(c.ConversionError, match="must differ"):
        c.convert_checkpoint(src, src)


class _NotATensor:
    pass


def test_bin_with_arbitrary_objects_is_refused_not_unpickled(tmp_path):
    c = _conversion()
    sd32, _ = fp32_state("mlm")
    src = write_original(tmp_path / "orig", sd32, original_config(D), tokenizer=False)
    torch.save({"state": {"model": sd32}, "callback": _NotATensor()}, src / "pytorch_model.bin")
    with pytest.raises(c.ConversionError, match=r"refusing to load .*pytorch_model\.bin.*weights_only"):
        c.convert_checkpoint(src, tmp_path / "dst")


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_truncated_weights_file_error_names_the_file(tmp_path, fmt):
    """The converter names the file. transformers' from_pretrained raises too, but its message (safetensors'
    "incomplete metadata" / torch's "[Errno 22] Invalid argument") does not name the file: pinned as raising only."""
    from transformers import AutoModelForMaskedLM

    c = _conversion()
    sd32, _ = fp32_state("mlm")
    src = write_original(tmp_path / "orig", sd32, original_config(D), fmt=fmt, tokenizer=False)
    name = "pytorch_model.bin" if fmt == "bin" else "model.safetensors"
    data = (src / name).read_bytes()
    (src / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(c.ConversionError, match=rf"{name}.*truncated or corrupted"):
        c.convert_checkpoint(src, tmp_path / "dst")
    with pytest.raises(c.ConversionError, match=rf"{name}.*truncated or corrupted"):
        c.load_weights_file(src / name)

    # a converted folder whose model.safetensors / pytorch_model.bin is truncated afterwards
    good = write_original(tmp_path / "orig2", sd32, original_config(D), tokenizer=False)
    dst = tmp_path / "dst2"
    c.convert_checkpoint(good, dst)
    if fmt == "bin":  # a package folder holding a .bin instead of safetensors
        from safetensors.torch import load_file

        torch.save(load_file(str(dst / "model.safetensors")), dst / "pytorch_model.bin")
        (dst / "model.safetensors").unlink()
    data = (dst / name).read_bytes()
    (dst / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception):  # noqa: B017 - the error type varies with the format (see the docstring)
        AutoModelForMaskedLM.from_pretrained(str(dst), trust_remote_code=True)


def test_missing_weights_or_config(tmp_path):
    c = _conversion()
    (tmp_path / "empty").mkdir()
    with pytest.raises(c.ConversionError, match="has no config.json"):
        c.convert_checkpoint(tmp_path / "empty", tmp_path / "dst")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(original_config(D)))
    with pytest.raises(c.ConversionError, match="holds no weights file"):
        c.convert_checkpoint(tmp_path / "empty", tmp_path / "dst")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(original_config(D, model_type="roberta")))
    with pytest.raises(c.ConversionError, match="model_type 'roberta'"):
        c.convert_checkpoint(tmp_path / "empty", tmp_path / "dst")


def _script():
    path = REPO_ROOT + "/scripts/convert_original_checkpoint.py"
    spec = importlib.util.spec_from_file_location("convert_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_cli(tmp_path, capsys):
    sd32, _ = fp32_state("mlm")
    src = write_original(tmp_path / "orig", sd32, original_config(D), wrap="composer")
    script = _script()
    assert script.main([str(src), str(tmp_path / "dst")]) == 0
    assert "MosaicBertForMaskedLM written to" in capsys.readouterr().out
    assert script.main([str(src), str(tmp_path / "dst"), "--overwrite", "--no-verify", "--atol", "0"]) == 0
    assert "(max output difference 0)" in capsys.readouterr().out  # not verified: nothing compared
    with pytest.raises(SystemExit):
        script.main([str(src)])  # DST missing: usage error
    assert "required: DST" in capsys.readouterr().err
    del sd32["bert.embeddings.LayerNorm.bias"]
    bad = write_original(tmp_path / "bad", sd32, original_config(D), wrap="composer")
    assert script.main([str(bad), str(tmp_path / "dst_bad")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: refusing to convert") and "bert.embeddings.LayerNorm.bias" in err


def test_untied_decoder_is_kept_untied(tmp_path):
    from transformers import AutoModelForMaskedLM

    sd32, _ = fp32_state("mlm")
    sd32["cls.predictions.decoder.weight"] = 0.5 * sd32["bert.embeddings.word_embeddings.weight"]
    src = write_original(tmp_path / "orig", sd32, original_config(D), tokenizer=False)
    report = _conversion().convert_checkpoint(src, tmp_path / "dst")
    assert report.max_abs_diff <= 1e-6
    model = AutoModelForMaskedLM.from_pretrained(str(tmp_path / "dst"), trust_remote_code=True)
    assert model.config.tie_word_embeddings is False
    assert torch.equal(model.cls.predictions.decoder.weight, sd32["cls.predictions.decoder.weight"])
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, sd32["bert.embeddings.word_embeddings.weight"])
