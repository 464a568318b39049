"""Bad inputs and edge cases: every one either works or raises a ValueError that says what is wrong.

CPU cases run everywhere on tiny models (hidden 32, 2 layers, 4 heads). Cases marked `cuda` repeat the check on the
GPU through the Triton kernel (attn_implementation="flash_attention_2", fp16/bf16, head_dim 16) and are skipped
without CUDA.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from conftest import build, ragged_batch, real_tokens
from reference import Dims

needs_cuda = pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _m():
    import modeling_mosaic_bert

    return modeling_mosaic_bert


def tiny(cls_name="MosaicBertForMaskedLM", dtype=torch.float32, device="cpu", d: Dims | None = None, seed=0, **cfg):
    """A tiny model of class `cls_name` with the reference's random weights (far from init), eval mode."""
    d = d or Dims()
    kind = {
        "MosaicBertForMaskedLM": "mlm",
        "MosaicBertForSequenceClassification": "seq",
        "MosaicBertForMultipleChoice": "mc",
        "MosaicBertForTokenClassification": "tok",
        "MosaicBertForQuestionAnswering": "qa",
        "MosaicBertModel": "base",
    }[cls_name]
    cfg.setdefault("attn_implementation", "eager" if device == "cpu" else "flash_attention_2")
    # float64 weights cast down, so that they equal the reference's float64 state dict of the same seed
    model, _ = build(getattr(_m(), cls_name), d, kind, seed=seed, dtype=torch.float64, **cfg)
    return model.to(device=device, dtype=dtype)


# A GPU model whose heads the Triton kernel supports (head_dim 16).
GPU_DIMS = Dims(hidden_size=64, num_attention_heads=4, intermediate_size=128)

def _put(ids: torch.Tensor, row: int, col: int, value: int) -> torch.Tensor:
    """ids with ids[row, col] = value (a copy)."""
    return ids.index_put((torch.tensor([row]), torch.tensor([col])), torch.tensor(value))


DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def _device_model(device, cls_name="MosaicBertForMaskedLM", **cfg):
    if device == "cpu":
        return tiny(cls_name, **cfg), Dims()
    return tiny(cls_name, dtype=torch.float16, device="cuda", d=GPU_DIMS, **cfg), GPU_DIMS


def _outputs(out):
    """The tensors of a model output that must be finite."""
    return [v for v in out.values() if isinstance(v, torch.Tensor)]


# --------------------------------------------------------------------------
# Token ids, attention_mask, token_type_ids, inputs_embeds
# --------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda ids, V: _put(ids, 1, 2, V), r"holds 97\b.*\[0, 97\)"),
        (lambda ids, V: _put(ids, 0, 0, 10**9), r"holds 1000000000\b.*97"),
        (lambda ids, V: _put(ids, 0, 3, -1), r"holds -1\b.*\[0, 97\)"),
        (lambda ids, V: ids.float(), r"integer token ids.*float32"),
        (lambda ids, V: ids.double(), r"integer token ids.*float64"),
        (lambda ids, V: ids.bool(), r"integer token ids.*bool"),
        (lambda ids, V: ids.to(torch.uint8), r"integer token ids.*uint8"),
        (lambda ids, V: ids[0], r"shape \(batch, seqlen\)"),
        (lambda ids, V: ids[..., None], r"shape \(batch, seqlen\)"),
    ],
    ids=["vocab_size", "huge", "negative", "float32", "float64", "bool", "uint8", "1d", "3d"],
)
def test_bad_input_ids_raise_value_error_naming_value_and_vocab(device, bad, message):
    model, d = _device_model(device)
    ids, mask, _ = ragged_batch(d, [5, 3, 4])
    bad_ids = bad(ids, d.vocab_size).to(device)
    if device == "cuda":
        message = message.replace("97", str(d.vocab_size))
    with pytest.raises(ValueError, match=message):
        model(input_ids=bad_ids)
    # the model still works afterwards (no device-side assert poisoned the context)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device))
    assert torch.isfinite(out.logits).all()


def test_int32_ids_equal_int64_ids():
    model = tiny()
    ids, mask, tt = ragged_batch(Dims(), [5, 3])
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
        b = model(input_ids=ids.int(), attention_mask=mask.int(), token_type_ids=tt.int()).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "make_mask, message",
    [
        (lambda m: m * 2, r"0 \(padding\) and 1 \(real token\), got 2"),
        (lambda m: m - 1, r"0 \(padding\) and 1 \(real token\), got -1"),
        (lambda m: m.float() * 0.5, r"got 0.5"),
        (lambda m: m.float().masked_fill(m == 0, float("nan")), r"got nan"),
        (lambda m: m[:, :-1], r"attention_mask must have the inputs' shape \(3, 6\), got \(3, 5\)"),
        (lambda m: m[:2], r"attention_mask must have the inputs' shape \(3, 6\), got \(2, 6\)"),
        (lambda m: m[..., None], r"attention_mask must have the inputs' shape \(3, 6\), got \(3, 6, 1\)"),
        (lambda m: m.flatten(), r"attention_mask must have the inputs' shape"),
    ],
    ids=["two", "minus_one", "half", "nan", "short", "rows", "3d", "flat"],
)
def test_bad_attention_mask_raises_value_error(device, make_mask, message):
    model, d = _device_model(device)
    ids, mask, _ = ragged_batch(d, [6, 3, 4], seqlen=6)
    with pytest.raises(ValueError, match=message):
        model(input_ids=ids.to(device), attention_mask=make_mask(mask).to(device))


def test_attention_mask_dtypes_give_the_same_outputs():
    model = tiny()
    ids, mask, tt = ragged_batch(Dims(), [6, 2, 4], padding="middle")
    with torch.no_grad():
        outs = [
            model(input_ids=ids, attention_mask=mask.to(dt), token_type_ids=tt).logits
            for dt in (torch.long, torch.int32, torch.bool, torch.float32, torch.float16, torch.uint8)
        ]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "make_tt, message",
    [
        (lambda t: t + 2, r"token_type_ids holds [23], outside \[0, 2\)"),
        (lambda t: t - 1, r"token_type_ids holds -1, outside \[0, 2\)"),
        (lambda t: t.float(), r"token_type_ids must be integer ids.*float32"),
        (lambda t: t[:, :-1], r"token_type_ids must have the inputs' shape"),
    ],
    ids=["too_big", "negative", "float", "shape"],
)
def test_bad_token_type_ids_raise_value_error(device, make_tt, message):
    model, d = _device_model(device)
    ids, mask, tt = ragged_batch(d, [6, 3, 4])
    with pytest.raises(ValueError, match=message):
        model(input_ids=ids.to(device), attention_mask=mask.to(device), token_type_ids=make_tt(tt).to(device))


@pytest.mark.parametrize(
    "shape",
    [(0, 6), (3, 0), (0, 0)],
)
@pytest.mark.parametrize("use_embeds", [False, True])
def test_empty_batch_raises_value_error(shape, use_embeds):
    model = tiny()
    if use_embeds:
        kwargs = {"inputs_embeds": torch.randn(*shape, 32)}
    else:
        kwargs = {"input_ids": torch.ones(shape, dtype=torch.long)}
    with pytest.raises(ValueError, match="Empty batch"):
        model(**kwargs)


def test_input_ids_and_inputs_embeds_conflict():
    model = tiny("MosaicBertModel")
    ids, mask, _ = ragged_batch(Dims(), [4, 2])
    embeds = model.get_input_embeddings()(ids)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(input_ids=ids, inputs_embeds=embeds)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(attention_mask=mask)
    with pytest.raises(ValueError, match=r"inputs_embeds must have shape \(batch, seqlen, 32\)"):
        model(inputs_embeds=embeds[..., :16])
    with pytest.raises(ValueError, match=r"inputs_embeds must have shape"):
        model(inputs_embeds=embeds[0])
    with pytest.raises(ValueError, match="inputs_embeds must be floating point"):
        model(inputs_embeds=embeds.long())


def test_inputs_embeds_alone_without_mask_or_token_types():
    """Nothing to value-check: must not trip over an empty list of checks."""
    model = tiny("MosaicBertModel")
    ids = ragged_batch(Dims(), [4, 4])[0]
    with torch.no_grad():
        a = model(inputs_embeds=model.get_input_embeddings()(ids)).last_hidden_state
        b = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------


def test_masked_lm_bad_labels():
    model = tiny("MosaicBertForMaskedLM")
    ids, mask, _ = ragged_batch(Dims(), [6, 3], seqlen=6)
    labels = ids.masked_fill(mask == 0, -100)
    for bad in (labels[:, :-1], labels.flatten(), labels[:1], labels[..., None]):
        with pytest.raises(ValueError, match=r"labels must have shape \(2, 6\) \(one per token\)"):
            model(input_ids=ids, attention_mask=mask, labels=bad)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 97\) or be -100, got values \[97\]"):
        model(input_ids=ids, attention_mask=mask, labels=labels.masked_fill(labels == labels[0, 0], 97))
    with pytest.raises(ValueError, match=r"got values \[-5\]"):
        model(input_ids=ids, attention_mask=mask, labels=labels.masked_fill(labels == labels[0, 0], -5))
    with pytest.raises(ValueError, match="int64"):
        model(input_ids=ids, attention_mask=mask, labels=labels.float())
    with pytest.raises(ValueError, match="padded position"):
        model(input_ids=ids, attention_mask=mask, labels=ids)
    assert torch.isfinite(model(input_ids=ids, attention_mask=mask, labels=labels).loss)


def test_token_classification_bad_labels():
    model = tiny("MosaicBertForTokenClassification")
    ids, mask, _ = ragged_batch(Dims(), [6, 3], seqlen=6)
    labels = torch.zeros_like(ids).masked_fill(mask == 0, -100)
    for bad in (labels[:, :-1], labels.flatten(), labels[..., None]):
        with pytest.raises(ValueError, match=r"labels must have shape \(2, 6\)"):
            model(input_ids=ids, attention_mask=mask, labels=bad)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) or be -100, got values \[3\]"):
        model(input_ids=ids, attention_mask=mask, labels=labels.masked_fill(labels == 0, 3))
    with pytest.raises(ValueError, match="int64"):
        model(input_ids=ids, attention_mask=mask, labels=labels.float())
    with pytest.raises(ValueError, match="padded position"):
        model(input_ids=ids, attention_mask=mask, labels=torch.zeros_like(ids))


def test_sequence_classification_bad_labels():
    ids, mask, _ = ragged_batch(Dims(), [6, 3, 2])
    model = tiny("MosaicBertForSequenceClassification")
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\), got \(2,\)"):
        model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) or be -100, got values \[3\]"):
        model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError):
        model(input_ids=ids, attention_mask=mask, labels=torch.zeros(3, 2, dtype=torch.long))
    multi = tiny("MosaicBertForSequenceClassification", problem_type="multi_label_classification")
    with pytest.raises(ValueError, match=r"multi-label labels must have shape \(3, 3\)"):
        multi(input_ids=ids, attention_mask=mask, labels=torch.ones(3, 2))
    mc = tiny("MosaicBertForMultipleChoice")
    with pytest.raises(ValueError):
        mc(input_ids=ids[:2].view(1, 2, -1), labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        mc(input_ids=ids[:2].view(1, 2, -1), labels=torch.tensor([2]))


# --------------------------------------------------------------------------
# Rows with no real token
# --------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_all_padding_row_is_zero_and_leaves_other_rows_alone(device):
    model, d = _device_model(device, "MosaicBertForSequenceClassification")
    ids, mask, tt = ragged_batch(d, [5, 0, 3, 0], seqlen=6)
    ids, mask, tt = ids.to(device), mask.to(device), tt.to(device)
    keep = [0, 2]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True)
        alone = model(
            input_ids=ids[keep], attention_mask=mask[keep], token_type_ids=tt[keep], output_hidden_states=True
        )
        pooler = model.bert.pooler
        empty_pooled = pooler(torch.zeros(1, d.hidden_size, device=device, dtype=out.logits.dtype))
        empty_logits = model.classifier(empty_pooled)
    for t in _outputs(out) + list(out.hidden_states):
        assert torch.isfinite(t).all()
    for states in out.hidden_states:
        assert (states[[1, 3]] == 0).all(), "an all-padding row must be zero-filled"
    tol = 1e-6 if device == "cpu" else 1e-2  # float16 on the GPU
    torch.testing.assert_close(out.hidden_states[-1][keep], alone.hidden_states[-1], atol=tol, rtol=tol)
    torch.testing.assert_close(out.logits[keep], alone.logits, atol=tol, rtol=tol)
    # the pooler of an empty row sees a zero vector
    torch.testing.assert_close(out.logits[[1, 3]], empty_logits.expand(2, -1), atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "cls_name", ["MosaicBertForMaskedLM", "MosaicBertForTokenClassification", "MosaicBertForQuestionAnswering"]
)
def test_all_padding_row_token_heads(cls_name):
    model = tiny(cls_name)
    ids, mask, tt = ragged_batch(Dims(), [4, 0, 2], seqlen=4)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt, output_attentions=True)
    for t in _outputs(out):
        assert torch.isfinite(t).all()
        if t.dim() >= 2 and t.shape[0] == 3:
            assert (t[1] == 0).all()
    for att in out.attentions:
        assert (att[1] == 0).all() and torch.isfinite(att).all()
    # labels: the empty row carries -100 everywhere
    if cls_name != "MosaicBertForQuestionAnswering":
        labels = (ids if cls_name == "MosaicBertForMaskedLM" else torch.zeros_like(ids)).masked_fill(mask == 0, -100)
        assert torch.isfinite(model(input_ids=ids, attention_mask=mask, labels=labels).loss)


def test_every_row_padding_gives_zeros_not_nan():
    model = tiny("MosaicBertForSequenceClassification")
    ids = torch.randint(1, 97, (2, 5))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.zeros_like(ids), output_hidden_states=True)
    assert all((h == 0).all() for h in out.hidden_states)
    assert torch.isfinite(out.logits).all()
    torch.testing.assert_close(out.logits[0], out.logits[1])


# --------------------------------------------------------------------------
# Long inputs
# --------------------------------------------------------------------------


@contextlib.contextmanager
def no_warnings_or_logs():
    """Fails if the block emits a Python warning or a log record of level WARNING or above (transformers' loggers
    do not propagate to the root logger, so a handler goes on both)."""
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Collect(level=logging.WARNING)
    loggers = [logging.getLogger(), logging.getLogger("transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    assert not caught, [str(w.message) for w in caught]
    assert not records, [r.getMessage() for r in records]


@pytest.mark.parametrize("length", [513, 8193])
def test_longer_than_alibi_starting_size_without_warnings(length):
    d = Dims(num_hidden_layers=1)
    model = tiny("MosaicBertForMaskedLM", d=d)
    assert model.config.alibi_starting_size == 512
    ids = torch.randint(1, d.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad(), no_warnings_or_logs():
        out = model(input_ids=ids)
        out2 = model(input_ids=ids)
    assert out.logits.shape == (1, length, d.vocab_size)
    assert torch.isfinite(out.logits).all()
    torch.testing.assert_close(out.logits, out2.logits, atol=0, rtol=0)
    if length == 513:  # spot-check against the float64 reference
        model64, sd = build(_m().MosaicBertForMaskedLM, d, "mlm")
        exp = ref.mlm(sd, d, ids)["logits_full"]
        torch.testing.assert_close(out.logits.double(), exp, atol=2e-4, rtol=1e-4)


def test_batch_mixing_lengths_1_and_4096():
    d = Dims(num_hidden_layers=1)
    model = tiny("MosaicBertForMaskedLM", d=d)
    ids, mask, tt = ragged_batch(d, [1, 4096], seed=3)
    with torch.no_grad(), no_warnings_or_logs():
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
    with torch.no_grad():
        short = model(input_ids=ids[:1, :1], token_type_ids=tt[:1, :1]).logits
        long = model(input_ids=ids[1:], token_type_ids=tt[1:]).logits
    assert (out[0, 1:] == 0).all()
    torch.testing.assert_close(out[0, :1], short[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], long[0], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------
# Where the padding sits
# --------------------------------------------------------------------------


def _relayout(d, lengths, seqlen, padding, seed):
    """The right-padded batch and the same real tokens laid out with `padding`."""
    ids_r, mask_r, tt_r = ragged_batch(d, lengths, seqlen=seqlen, padding="right", seed=seed)
    if padding == "scattered":
        g = torch.Generator().manual_seed(seed + 1)
        mask_o = torch.zeros_like(mask_r)
        for b, n in enumerate(lengths):
            mask_o[b, torch.randperm(seqlen, generator=g)[:n].sort().values] = 1
        ids_o = torch.randint(1, d.vocab_size, ids_r.shape, generator=g)
        tt_o = torch.randint(0, 2, ids_r.shape, generator=g)
    else:
        ids_o, mask_o, tt_o = ragged_batch(d, lengths, seqlen=seqlen, padding=padding, seed=seed + 1)
    for b in range(len(lengths)):
        ids_o[b][mask_o[b] == 1] = real_tokens(ids_r, mask_r, b)
        tt_o[b][mask_o[b] == 1] = real_tokens(tt_r, mask_r, b)
    return (ids_r, mask_r, tt_r), (ids_o, mask_o, tt_o)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding", ["left", "middle", "scattered"])
@pytest.mark.parametrize(
    "cls_name", ["MosaicBertForMaskedLM", "MosaicBertForTokenClassification", "MosaicBertForQuestionAnswering"]
)
def test_left_middle_and_scattered_padding_equal_right_padding(device, padding, cls_name):
    model, d = _device_model(device, cls_name)
    lengths = [7, 1, 4, 0, 9]
    right, other = _relayout(d, lengths, 11, padding, seed=5)
    with torch.no_grad():
        r = model(**dict(zip(("input_ids", "attention_mask", "token_type_ids"), (t.to(device) for t in right))))
        o = model(**dict(zip(("input_ids", "attention_mask", "token_type_ids"), (t.to(device) for t in other))))
    mask_r, mask_o = right[1].to(device), other[1].to(device)
    atol = 1e-5 if device == "cpu" else 0
    for key in ("logits", "start_logits", "end_logits"):
        if key not in r:
            continue
        for b in range(len(lengths)):
            torch.testing.assert_close(
                real_tokens(o[key], mask_o, b), real_tokens(r[key], mask_r, b), atol=atol, rtol=atol
            )
        assert (o[key][mask_o == 0] == 0).all()


# --------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------


def _precision_cases():
    cases = []
    for device in ("cpu", "cuda"):
        for weights in (torch.float32, torch.float16, torch.bfloat16):
            for autocast in (None, torch.float16, torch.bfloat16):
                marks = [needs_cuda] if device == "cuda" else []
                cases.append(pytest.param(device, weights, autocast, marks=marks))
    return cases


@pytest.mark.parametrize("device, weights, autocast", _precision_cases())
def test_precisions_and_autocast_run_without_dtype_errors_or_nan(device, weights, autocast):
    d = GPU_DIMS if device == "cuda" else Dims()
    cfg = {"attn_implementation": "sdpa"}
    mlm = tiny("MosaicBertForMaskedLM", d=d, device=device, **cfg).to(weights)
    seq = tiny("MosaicBertForSequenceClassification", d=d, device=device, **cfg).to(weights)
    ids, mask, tt = (t.to(device) for t in ragged_batch(d, [9, 1, 5], padding="middle"))
    labels = ids.masked_fill(mask == 0, -100)
    ctx = torch.autocast(device, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with ctx:
        out = mlm(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels, output_hidden_states=True)
        class_labels = torch.tensor([0, 2, 1], device=device)
        out_seq = seq(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=class_labels)
        out.loss.backward()
    for t in _outputs(out) + list(out.hidden_states) + _outputs(out_seq):
        assert torch.isfinite(t).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in mlm.parameters())
    expected = autocast or weights
    assert out.hidden_states[-1].dtype == expected
    # close to float32 in eval (no autocast, fp32 weights)
    ref32 = tiny("MosaicBertForMaskedLM", d=d, device=device, **cfg)
    with torch.no_grad():
        exp = ref32(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels).logits
    tol = 1e-4 if expected == torch.float32 else (0.05 if expected == torch.float16 else 0.4)
    torch.testing.assert_close(out.logits.float(), exp, atol=tol * exp.abs().max().item(), rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("outlier_gain", [None, 100.0])
def test_half_precision_does_not_overflow_on_realistic_activations(device, dtype, outlier_gain):
    """A length-512 batch through a model with weights of realistic magnitude, in .half()/.bfloat16() and under
    autocast: finite and close to float32. With outlier_gain, a few channels of every LayerNorm get that gain (trained
    BERTs have such outlier features), so the residual stream holds values above 256 whose squares overflow float16:
    LayerNorm and attention must not accumulate in float16. (Gains near 300 overflow the GeGLU product
    act(gate) * value itself in float16, as they would in any float16 model.)"""
    heads = 8 if device == "cpu" else 4
    d = Dims(hidden_size=128, num_attention_heads=heads, intermediate_size=256, num_hidden_layers=2)
    model = tiny("MosaicBertForMaskedLM", d=d, attn_implementation="sdpa")
    if outlier_gain is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("LayerNorm.weight", "layernorm.weight")) and "predictions" not in name:
                    p[:3] = outlier_gain
    model = model.to(device)
    ids, mask, tt = (t.to(device) for t in ragged_batch(d, [512, 300], seed=9))
    with torch.no_grad():
        exp = model(input_ids=ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True)
        if outlier_gain is not None:
            assert max(h.abs().max().item() for h in exp.hidden_states) > 256  # squares overflow float16
        half = copy.deepcopy(model).to(dtype)
        out = half(input_ids=ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True)
        with torch.autocast(device, dtype=dtype):
            auto = model(input_ids=ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True)
    bound = {torch.float16: 0.01, torch.bfloat16: 0.05}[dtype] * (10 if outlier_gain else 1)
    for o in (out, auto):
        for h in o.hidden_states:
            assert torch.isfinite(h).all()
        assert torch.isfinite(o.logits).all()
        rel = (o.logits.float() - exp.logits).norm() / exp.logits.norm()
        assert rel < bound, rel


# --------------------------------------------------------------------------
# Determinism and batch invariance
# --------------------------------------------------------------------------


@pytest.mark.parametrize("train", [False, True])
def test_same_seed_same_outputs(train):
    from configuration_mosaic_bert import MosaicBertConfig

    def run():
        torch.manual_seed(1234)
        dropout = {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
        cfg = MosaicBertConfig(**{**Dims().config_kwargs(), **dropout})
        model = _m().MosaicBertForMaskedLM(cfg).train(train)
        ids, mask, tt = ragged_batch(Dims(), [7, 3, 5])
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
        return out.logits.detach(), model.bert.embeddings.word_embeddings.weight.grad

    (a, ga), (b, gb) = run(), run()
    assert torch.equal(a, b) and torch.equal(ga, gb)


@needs_cuda
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_kernel_path_deterministic_and_batch_invariant(dtype):
    model = tiny("MosaicBertForMaskedLM", d=GPU_DIMS, device="cuda", dtype=dtype)
    lengths = [37, 1, 130, 64, 5]
    ids, mask, tt = (t.cuda() for t in ragged_batch(GPU_DIMS, lengths))
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
        b = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
        assert torch.equal(a, b)
        for i, n in enumerate(lengths):
            alone = model(input_ids=ids[i : i + 1, :n], token_type_ids=tt[i : i + 1, :n]).logits[0]
            torch.testing.assert_close(a[i, :n], alone, atol=2e-2 * alone.abs().max().item(), rtol=0)


def test_torch_path_batch_invariance_across_batch_compositions():
    model = tiny("MosaicBertForMaskedLM")
    d = Dims()
    ids, mask, tt = ragged_batch(d, [8, 8, 3, 1, 8, 5], seed=4)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
        for rows in ([0], [1, 3], [5, 2, 0], [4, 4]):
            part = model(input_ids=ids[rows], attention_mask=mask[rows], token_type_ids=tt[rows]).logits
            torch.testing.assert_close(part, full[rows], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------
# Property-based: unpad/pad and attention
# --------------------------------------------------------------------------


@st.composite
def masks(draw, max_batch=6, max_len=12):
    batch = draw(st.integers(1, max_batch))
    seqlen = draw(st.integers(1, max_len))
    bits = draw(st.lists(st.lists(st.booleans(), min_size=seqlen, max_size=seqlen), min_size=batch, max_size=batch))
    return torch.tensor(bits, dtype=torch.bool)


@settings(max_examples=60, deadline=None)
@given(mask=masks(), trailing=st.sampled_from([(), (3,), (2, 5)]))
def test_unpad_pad_round_trip(mask, trailing):
    from bert_padding import index_first_axis, pad_input, unpad_input

    batch, seqlen = mask.shape
    x = torch.randn(batch, seqlen, *trailing)
    unpadded, indices, cu_seqlens, max_seqlen = unpad_input(x, mask.int())
    lengths = mask.sum(-1)
    assert unpadded.shape == (int(lengths.sum()), *trailing)
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, *lengths.cumsum(0).tolist()]
    assert max_seqlen == int(lengths.max())
    for b in range(batch):
        assert torch.equal(unpadded[cu_seqlens[b] : cu_seqlens[b + 1]], x[b][mask[b]])
    padded = pad_input(unpadded, indices, batch, seqlen)
    assert torch.equal(padded, x * mask.view(batch, seqlen, *([1] * len(trailing))))
    assert torch.equal(index_first_axis(padded, indices), unpadded)


def _dense_reference(q, k, v, n_heads):
    """float64 attention of one sequence (L, heads, head_dim) with ALiBi, from the reference's slopes."""
    q, k, v = (t.double().transpose(0, 1) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + ref.alibi_bias(n_heads, q.shape[1])
    probs = scores.softmax(-1)
    return (probs @ v).transpose(0, 1), probs


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 20), min_size=1, max_size=6),
    heads=st.integers(1, 12),
    head_dim=st.sampled_from([1, 4, 8, 16]),
    explicit=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_torch_varlen_attention_matches_dense_reference(lengths, heads, head_dim, explicit, dtype):
    m = _m()
    total = sum(lengths)
    g = torch.Generator().manual_seed(total * 131 + heads * 7 + head_dim)
    q, k, v = (3 * torch.randn(total, heads, head_dim, generator=g, dtype=dtype) for _ in range(3))
    cu_seqlens = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    exact_slopes = torch.tensor(ref.alibi_slopes(heads), dtype=torch.float64)
    # the model's slopes are float32 (exact for power-of-two head counts, rounded otherwise)
    torch.testing.assert_close(m.alibi_slopes(heads).double(), exact_slopes, atol=0, rtol=1e-7)
    slopes = m.alibi_slopes(heads) if dtype == torch.float32 else exact_slopes
    out = m.torch_varlen_attention(q, k, v, lengths, slopes, 0.0, explicit)
    assert out.shape == q.shape and out.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 1e-10  # fp32 scores reach ~40 with these inputs: errors ~1e-5
    for b, n in enumerate(lengths):
        if n:
            s, e = cu_seqlens[b], cu_seqlens[b + 1]
            exp_out, _ = _dense_reference(q[s:e], k[s:e], v[s:e], heads)
            torch.testing.assert_close(out[s:e].double(), exp_out, atol=tol, rtol=tol)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(st.lists(st.booleans(), min_size=6, max_size=6), min_size=1, max_size=4),
    heads=st.integers(1, 12),
    head_dim=st.sampled_from([1, 8]),
    explicit=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_padded_attention_matches_dense_reference_with_padding_anywhere(rows, heads, head_dim, explicit, dtype):
    """The export/compile attention: real tokens anywhere in a row (ALiBi over real-token positions), padded keys
    ignored, probabilities zero on padded rows and columns, finite numbers in rows with no real token."""
    m = _m()
    mask = torch.tensor(rows)
    batch, seqlen = mask.shape
    g = torch.Generator().manual_seed(int(mask.sum()) * 131 + heads * 7 + head_dim)
    qkv = 3 * torch.randn(batch, seqlen, 3, heads, head_dim, generator=g, dtype=dtype)
    slopes = m.alibi_slopes(heads, dtype=dtype if dtype == torch.float64 else torch.float32)
    positions = torch.cumsum(mask.long(), -1) - 1
    out, probs = m.padded_attention(qkv, mask, positions, slopes, 0.0, explicit)
    assert out.shape == (batch, seqlen, heads, head_dim) and torch.isfinite(out).all()
    assert (probs is not None) == explicit
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for b in range(batch):
        real = mask[b]
        if not real.any():
            continue
        q, k, v = (qkv[b, real, i] for i in range(3))
        exp_out, exp_probs = _dense_reference(q, k, v, heads)
        torch.testing.assert_close(out[b, real].double(), exp_out, atol=tol, rtol=tol)
        if explicit:
            torch.testing.assert_close(probs[b][:, real][:, :, real].double(), exp_probs, atol=tol, rtol=tol)
    if explicit:
        assert torch.all(probs.permute(0, 2, 1, 3)[~mask] == 0) and torch.all(probs.permute(0, 3, 1, 2)[~mask] == 0)
