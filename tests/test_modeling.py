"""Behaviour of the MosaicBERT model classes, pinned against the independent
float64 reference in tests/reference.py."""

from __future__ import annotations

import pytest
import torch

import reference as ref
from conftest import assert_close, build, make_config, ragged_batch, real_tokens
from reference import Dims

LENGTHS = [7, 1, 5, 3]  # ragged, includes a length-1 sequence


def _models():
    import modeling_mosaic_bert as m

    return m


# --------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------


def test_config_defaults_match_spec():
    from configuration_mosaic_bert import MosaicBertConfig

    c = MosaicBertConfig()
    assert c.model_type == "mosaic_bert"
    expected = dict(
        vocab_size=30528,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.0,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        initializer_range=0.02,
        pad_token_id=0,
        classifier_dropout=None,
        alibi_starting_size=512,
    )
    for k, v in expected.items():
        assert getattr(c, k) == v, f"{k}: {getattr(c, k)!r} != {v!r}"
    assert c.tie_word_embeddings is True
    assert c._attn_implementation is None  # a model resolves it to "sdpa"
    assert "attention_backend" not in c.to_dict()


def test_config_round_trips_through_dict():
    from configuration_mosaic_bert import MosaicBertConfig

    c = MosaicBertConfig(hidden_size=48, num_attention_heads=12, alibi_starting_size=64)
    c2 = MosaicBertConfig.from_dict(c.to_dict())
    assert c2.hidden_size == 48 and c2.alibi_starting_size == 64


@pytest.mark.parametrize(
    "backend, implementation", [("auto", "sdpa"), ("torch", "eager"), ("triton", "flash_attention_2")]
)
def test_former_attention_backend_maps_onto_attn_implementation(backend, implementation):
    """Configs saved before attn_implementation carry attention_backend: it is read once, mapped, and not saved."""
    from configuration_mosaic_bert import MosaicBertConfig

    saved = {**MosaicBertConfig(hidden_size=48, num_attention_heads=12).to_dict(), "attention_backend": backend}
    c = MosaicBertConfig.from_dict(saved)
    assert c._attn_implementation == implementation
    assert "attention_backend" not in c.to_dict()
    c.attention_backend = "torch"  # code written for the former switch sets the current one
    assert c._attn_implementation == "eager"
    explicit = MosaicBertConfig(attention_backend=backend, attn_implementation="eager")
    assert explicit._attn_implementation == "eager"
    with pytest.raises(ValueError, match="attn_implementation"):
        MosaicBertConfig(attention_backend="cuda")


def test_classes_have_bert_aliases():
    m = _models()
    for name in [
        "Model",
        "ForMaskedLM",
        "ForSequenceClassification",
        "ForMultipleChoice",
        "ForTokenClassification",
        "ForQuestionAnswering",
    ]:
        assert getattr(m, "Bert" + name) is getattr(m, "MosaicBert" + name)


# --------------------------------------------------------------------------
# Reference agreement (float64, eval)
# --------------------------------------------------------------------------


def test_base_model_matches_reference_hidden_states_and_attentions(dims):
    m = _models()
    model, sd = build(m.MosaicBertModel, dims, "base", seed=1)
    has_pooler = any(k.startswith("pooler.") for k in model.state_dict())
    ids, mask, tt = ragged_batch(dims, LENGTHS, seqlen=9)
    out = model(
        input_ids=ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True, output_attentions=True
    )
    exp = ref.base(sd, dims, ids, mask, tt, with_pooler=has_pooler)
    assert_close(out.last_hidden_state, exp["last_hidden_state"], msg="last_hidden_state (zeros at pads)")
    assert len(out.hidden_states) == dims.num_hidden_layers + 1
    for i, (a, e) in enumerate(zip(out.hidden_states, exp["hidden_states"])):
        assert_close(a, e, msg=f"hidden_states[{i}]")
    assert len(out.attentions) == dims.num_hidden_layers
    for i, (a, e) in enumerate(zip(out.attentions, exp["attentions"])):
        assert_close(a, e, msg=f"attentions[{i}] (B,heads,S,S), zero rows/cols at pads")
    if has_pooler:
        assert_close(out.pooler_output, exp["pooled"], msg="pooler_output")


def test_masked_lm_logits_match_reference_at_real_tokens(dims):
    m = _models()
    model, sd = build(m.MosaicBertForMaskedLM, dims, "mlm")
    ids, mask, tt = ragged_batch(dims, LENGTHS, seqlen=8)
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    exp = ref.mlm(sd, dims, ids, mask, tt)
    assert out.logits.shape == (len(LENGTHS), 8, dims.vocab_size)
    for b in range(len(LENGTHS)):
        expected = real_tokens(exp["logits_full"], mask, b)
        assert_close(real_tokens(out.logits, mask, b), expected, msg=f"MLM logits seq {b}")


def test_masked_lm_with_labels_logits_shape_full_in_eval_compact_in_training_or_when_asked(dims):
    m = _models()
    model, sd = build(m.MosaicBertForMaskedLM, dims, "mlm")
    ids, mask, tt = ragged_batch(dims, LENGTHS, seqlen=8)
    g = torch.Generator().manual_seed(3)
    labels = torch.full_like(ids, -100)
    sel = (torch.rand(ids.shape, generator=g) < 0.5) & (mask == 1)
    sel[1, 0] = True  # the length-1 sequence is labelled
    labels[sel] = torch.randint(0, dims.vocab_size, (int(sel.sum()),), generator=g)
    exp = ref.mlm(sd, dims, ids, mask, tt, labels=labels)
    n = int((labels != -100).sum())
    # eval: transformers' shape, zeros at padding, so that logits line up with labels
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels)
    assert out.logits.shape == (*ids.shape, dims.vocab_size)
    assert_close(out.logits[labels != -100], exp["logits_labelled"], msg="labelled logits at their positions")
    assert torch.all(out.logits[mask == 0] == 0)
    assert_close(out.loss, exp["loss"], msg="MLM loss")
    # asked for, or training with labels: only the labelled rows, in row-major order
    compact = model(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels, compact_logits=True)
    assert compact.logits.shape == (n, dims.vocab_size), "compact logits must be (N_labelled, V)"
    assert_close(compact.logits, exp["logits_labelled"], msg="labelled logits in row-major order")
    assert_close(compact.loss, exp["loss"], msg="MLM loss")
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    trained = model(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels)
    assert trained.logits.shape == (n, dims.vocab_size)
    assert_close(trained.loss, exp["loss"], msg="MLM loss in training")
    full = model(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels, compact_logits=False)
    assert full.logits.shape == (*ids.shape, dims.vocab_size)
    with pytest.raises(ValueError, match="labels"):
        model(input_ids=ids, attention_mask=mask, compact_logits=True)


def test_masked_lm_label_at_padded_position_raises(dims):
    m = _models()
    model, _ = build(m.MosaicBertForMaskedLM, dims, "mlm")
    ids, mask, tt = ragged_batch(dims, [4, 2], seqlen=4)
    labels = torch.full_like(ids, -100)
    labels[1, 3] = 5  # padded position
    with pytest.raises(ValueError):
        model(input_ids=ids, attention_mask=mask, labels=labels)


@pytest.mark.parametrize(
    "problem_type,num_labels",
    [
        (None, 1),  # inferred regression
        (None, 3),  # inferred single-label (long labels)
        ("multi_label_classification", 3),
        ("regression", 1),
        ("single_label_classification", 3),
    ],
)
def test_sequence_classification_matches_reference(problem_type, num_labels):
    m = _models()
    d = Dims(num_labels=num_labels)
    model, sd = build(m.MosaicBertForSequenceClassification, d, "seq", problem_type=problem_type)
    ids, mask, tt = ragged_batch(d, LENGTHS, seqlen=9)
    g = torch.Generator().manual_seed(5)
    pt = problem_type or ("regression" if num_labels == 1 else "single_label_classification")
    if pt == "regression":
        labels = torch.randn(len(LENGTHS), generator=g, dtype=torch.float64)
    elif pt == "single_label_classification":
        labels = torch.randint(0, num_labels, (len(LENGTHS),), generator=g)
    else:
        labels = (torch.rand(len(LENGTHS), num_labels, generator=g) < 0.5).double()
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels)
    exp = ref.seq_cls(sd, d, ids, mask, tt, labels=labels, problem_type=pt)
    assert_close(out.logits, exp["logits"], msg="sequence classification logits")
    assert_close(out.loss, exp["loss"], msg=f"loss ({pt})")


def test_multiple_choice_matches_reference(dims):
    m = _models()
    model, sd = build(m.MosaicBertForMultipleChoice, dims, "mc")
    B, C, S = 2, 3, 6
    ids, mask, tt = ragged_batch(dims, [6, 1, 4, 2, 5, 3], seqlen=S)
    ids, mask, tt = (t.reshape(B, C, S) for t in (ids, mask, tt))
    labels = torch.tensor([2, 0])
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels)
    exp = ref.multiple_choice(sd, dims, ids, mask, tt, labels=labels)
    assert out.logits.shape == (B, C)
    assert_close(out.logits, exp["logits"], msg="multiple choice logits")
    assert_close(out.loss, exp["loss"], msg="multiple choice loss")


def test_token_classification_matches_reference_with_zero_logits_at_pads(dims):
    m = _models()
    model, sd = build(m.MosaicBertForTokenClassification, dims, "tok")
    ids, mask, tt = ragged_batch(dims, LENGTHS, seqlen=8)
    labels = torch.randint(0, dims.num_labels, ids.shape).masked_fill(mask == 0, -100)
    labels[0, 2] = -100
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels)
    exp = ref.token_cls(sd, dims, ids, mask, tt, labels=labels)
    assert out.logits.shape == (len(LENGTHS), 8, dims.num_labels)
    assert_close(out.logits, exp["logits"], msg="token classification logits (zeros at pads)")
    assert_close(out.loss, exp["loss"], msg="token classification loss")


def test_token_classification_label_at_padded_position_raises(dims):
    m = _models()
    model, _ = build(m.MosaicBertForTokenClassification, dims, "tok")
    ids, mask, tt = ragged_batch(dims, [4, 2], seqlen=4)
    labels = torch.full_like(ids, -100)
    labels[1, 2] = 1
    with pytest.raises(ValueError):
        model(input_ids=ids, attention_mask=mask, labels=labels)


def test_question_answering_matches_reference_with_zero_logits_at_pads(dims):
    m = _models()
    model, sd = build(m.MosaicBertForQuestionAnswering, dims, "qa")
    ids, mask, tt = ragged_batch(dims, LENGTHS, seqlen=8)
    sp = torch.tensor([3, 0, 4, 1])
    ep = torch.tensor([6, 0, 4, 2])
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt, start_positions=sp, end_positions=ep)
    exp = ref.question_answering(sd, dims, ids, mask, tt, sp, ep)
    assert_close(out.start_logits, exp["start_logits"], msg="start_logits (zeros at pads)")
    assert_close(out.end_logits, exp["end_logits"], msg="end_logits (zeros at pads)")
    assert_close(out.loss, exp["loss"], msg="QA loss")


def test_twelve_heads_non_power_of_two_matches_reference():
    m = _models()
    d = Dims(hidden_size=48, num_attention_heads=12, intermediate_size=64)
    model, sd = build(m.MosaicBertForMaskedLM, d, "mlm")
    ids, mask, tt = ragged_batch(d, [10, 4], seqlen=10)
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    exp = ref.mlm(sd, d, ids, mask, tt)
    for b in range(2):
        expected = real_tokens(exp["logits_full"], mask, b)
        assert_close(real_tokens(out.logits, mask, b), expected, msg=f"12 heads seq {b}")


def test_defaults_for_attention_mask_and_token_type_ids(dims):
    m = _models()
    model, sd = build(m.MosaicBertForMaskedLM, dims, "mlm")
    ids, _, _ = ragged_batch(dims, [6, 6])
    out = model(input_ids=ids)
    exp = ref.mlm(sd, dims, ids)  # mask = all ones, token types = zeros
    assert_close(out.logits, exp["logits_full"], msg="defaults")


# --------------------------------------------------------------------------
# Gradients vs reference
# --------------------------------------------------------------------------


def _param_grads_vs_reference(model, sd_keys_map, ref_loss_fn, model_loss):
    params = dict(model.named_parameters())
    model_grads = torch.autograd.grad(model_loss, list(params.values()), allow_unused=True)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    ref_sd = sd_keys_map(leaves)
    loss = ref_loss_fn(ref_sd)
    ref_grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    assert_close(model_loss, loss, msg="loss")
    for (name, _), gm, gr in zip(params.items(), model_grads, ref_grads):
        gm = torch.zeros_like(params[name]) if gm is None else gm
        gr = torch.zeros_like(params[name]) if gr is None else gr
        assert_close(gm, gr, atol=1e-8, rtol=1e-6, msg=f"grad of {name}")


def test_masked_lm_parameter_gradients_match_reference(dims):
    m = _models()
    model, sd = build(m.MosaicBertForMaskedLM, dims, "mlm")
    ids, mask, tt = ragged_batch(dims, [5, 1, 3], seqlen=6)
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 1] = -100
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels)

    def keys_map(leaves):
        s = dict(leaves)
        s.setdefault("cls.predictions.decoder.weight", s["bert.embeddings.word_embeddings.weight"])
        return s

    _param_grads_vs_reference(
        model, keys_map, lambda s: ref.mlm(s, dims, ids, mask, tt, labels=labels)["loss"], out.loss
    )


def test_sequence_classification_parameter_gradients_match_reference(dims):
    m = _models()
    model, sd = build(m.MosaicBertForSequenceClassification, dims, "seq")
    ids, mask, tt = ragged_batch(dims, [5, 1, 3], seqlen=6)
    labels = torch.tensor([0, 2, 1])
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels)
    _param_grads_vs_reference(
        model, dict, lambda s: ref.seq_cls(s, dims, ids, mask, tt, labels=labels)["loss"], out.loss
    )


def test_inputs_embeds_gradient_matches_reference(dims):
    m = _models()
    model, sd = build(m.MosaicBertForTokenClassification, dims, "tok")
    ids, mask, tt = ragged_batch(dims, [5, 2, 4], seqlen=5)
    emb = sd["bert.embeddings.word_embeddings.weight"][ids].clone().requires_grad_(True)
    labels = torch.randint(0, dims.num_labels, ids.shape).masked_fill(mask == 0, -100)
    out = model(inputs_embeds=emb, attention_mask=mask, token_type_ids=tt, labels=labels)
    (g_model,) = torch.autograd.grad(out.loss, emb)
    emb2 = emb.detach().clone().requires_grad_(True)
    # reference with inputs_embeds
    e = ref.encode(sd, dims, None, mask, tt, inputs_embeds=emb2)
    logits = ref.linear(e["last_hidden_state"], sd["classifier.weight"], sd["classifier.bias"])
    loss = ref.cross_entropy(logits, labels)
    (g_ref,) = torch.autograd.grad(loss, emb2)
    assert_close(out.loss, loss, msg="loss via inputs_embeds")
    assert_close(g_model, g_ref, atol=1e-9, msg="d loss / d inputs_embeds (zeros at pads)")


# --------------------------------------------------------------------------
# ALiBi
# --------------------------------------------------------------------------


def _slopes_from_attention_probs(n_heads, head_dim=4):
    """Zero Q/K projections => scores are the ALiBi bias alone; read slopes back."""
    m = _models()
    d = Dims(hidden_size=n_heads * head_dim, num_attention_heads=n_heads, intermediate_size=32)
    cfg = make_config(d)
    model = m.MosaicBertModel(cfg).double().eval()
    H = d.hidden_size
    with torch.no_grad():
        w = model.encoder.layer[0].attention.self.Wqkv
        w.weight[: 2 * H].zero_()
        w.bias[: 2 * H].zero_()
    ids = torch.randint(1, d.vocab_size, (1, 3))
    out = model(input_ids=ids, output_attentions=True)
    p = out.attentions[0][0]  # (heads, S, S)
    slopes_01 = torch.log(p[:, 0, 0] / p[:, 0, 1])
    slopes_02 = torch.log(p[:, 0, 0] / p[:, 0, 2]) / 2
    torch.testing.assert_close(slopes_01, slopes_02, atol=1e-10, rtol=0)  # linear in distance
    return slopes_01


def test_alibi_slopes_eight_heads_exact():
    s = _slopes_from_attention_probs(8)
    exp = torch.tensor([2.0 ** -(h + 1) for h in range(8)], dtype=torch.float64)
    torch.testing.assert_close(s, exp, atol=1e-10, rtol=0)


def test_alibi_slopes_twelve_heads_exact():
    s = _slopes_from_attention_probs(12)
    exp = torch.tensor([2.0 ** -(h + 1) for h in range(8)] + [2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5], dtype=torch.float64)
    torch.testing.assert_close(s, exp, atol=1e-10, rtol=0)
    assert ref.alibi_slopes(12) == pytest.approx(exp.tolist(), abs=0)


def test_alibi_has_no_state_dict_entries(dims):
    m = _models()
    model = m.MosaicBertForMaskedLM(make_config(dims))
    assert not [k for k in model.state_dict() if "alibi" in k.lower()]


def test_sequences_longer_than_alibi_starting_size_match_reference():
    m = _models()
    d = Dims(hidden_size=32, num_attention_heads=4, intermediate_size=64)
    model, sd = build(m.MosaicBertForMaskedLM, d, "mlm", alibi_starting_size=8)
    for lengths in ([20, 13], [5, 3], [30, 1]):  # grow, then shorter again, then longer
        ids, mask, tt = ragged_batch(d, lengths)
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt)
        exp = ref.mlm(sd, d, ids, mask, tt)
        for b in range(len(lengths)):
            expected = real_tokens(exp["logits_full"], mask, b)
            assert_close(real_tokens(out.logits, mask, b), expected, msg=f"{lengths} seq {b}")


def test_length_600_with_default_alibi_starting_size():
    m = _models()
    d = Dims(hidden_size=32, num_attention_heads=4, intermediate_size=64)
    model, sd = build(m.MosaicBertModel, d, "base", seed=2)
    has_pooler = any(k.startswith("pooler.") for k in model.state_dict())
    assert model.config.alibi_starting_size == 512
    ids, mask, tt = ragged_batch(d, [600, 300])
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    exp = ref.base(sd, d, ids, mask, tt, with_pooler=has_pooler)
    assert_close(out.last_hidden_state, exp["last_hidden_state"], msg="length 600")


# --------------------------------------------------------------------------
# Batch invariance / padding placement (fp32)
# --------------------------------------------------------------------------


def test_batch_invariance_fp32(dims):
    m = _models()
    model, _ = build(m.MosaicBertForMaskedLM, dims, "mlm", dtype=torch.float32)
    ids, mask, tt = ragged_batch(dims, LENGTHS, seqlen=10)
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
        for b, L in enumerate(LENGTHS):
            alone = model(input_ids=ids[b : b + 1, :L], token_type_ids=tt[b : b + 1, :L]).logits[0]
            torch.testing.assert_close(batched[b, :L], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padding", ["left", "middle"])
def test_left_and_middle_padding_equal_right_padding(dims, padding):
    m = _models()
    model, sd = build(m.MosaicBertForSequenceClassification, dims, "seq", dtype=torch.float32)
    lengths = [6, 1, 4]
    ids_r, mask_r, tt_r = ragged_batch(dims, lengths, seqlen=9, padding="right", garbage_pads=False)
    ids_o, mask_o, tt_o = ragged_batch(dims, lengths, seqlen=9, padding=padding, seed=11)
    # put the same real tokens into the other layout
    for b in range(len(lengths)):
        ids_o[b][mask_o[b] == 1] = real_tokens(ids_r, mask_r, b)
        tt_o[b][mask_o[b] == 1] = real_tokens(tt_r, mask_r, b)
    with torch.no_grad():
        r = model(input_ids=ids_r, attention_mask=mask_r, token_type_ids=tt_r, output_hidden_states=True)
        o = model(input_ids=ids_o, attention_mask=mask_o, token_type_ids=tt_o, output_hidden_states=True)
    for b in range(len(lengths)):
        torch.testing.assert_close(
            real_tokens(o.hidden_states[-1], mask_o, b), real_tokens(r.hidden_states[-1], mask_r, b),
            atol=1e-5, rtol=1e-5,
        )
    # pooler reads the first REAL token
    torch.testing.assert_close(o.logits, r.logits, atol=1e-5, rtol=1e-5)
    # pads are zeros
    assert torch.all(o.hidden_states[-1][mask_o == 0] == 0)


def test_middle_padding_matches_reference_float64(dims):
    m = _models()
    model, sd = build(m.MosaicBertForQuestionAnswering, dims, "qa")
    ids, mask, tt = ragged_batch(dims, [6, 1, 4], seqlen=9, padding="middle")
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    exp = ref.question_answering(sd, dims, ids, mask, tt)
    assert_close(out.start_logits, exp["start_logits"], msg="middle padding start logits")
    assert_close(out.end_logits, exp["end_logits"], msg="middle padding end logits")


def test_pad_token_contents_do_not_affect_outputs(dims):
    m = _models()
    model, _ = build(m.MosaicBertForMaskedLM, dims, "mlm", dtype=torch.float32)
    ids, mask, tt = ragged_batch(dims, [5, 2], seqlen=7)
    ids2 = ids.clone()
    ids2[mask == 0] = (ids2[mask == 0] + 17) % dims.vocab_size
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
        b = model(input_ids=ids2, attention_mask=mask, token_type_ids=tt).logits
    assert torch.equal(a[mask == 1], b[mask == 1])


# --------------------------------------------------------------------------
# Input paths, output formats
# --------------------------------------------------------------------------


def test_inputs_embeds_equals_input_ids(dims):
    m = _models()
    model, sd = build(m.MosaicBertForMaskedLM, dims, "mlm")
    ids, mask, tt = ragged_batch(dims, LENGTHS, seqlen=8)
    a = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
    emb = model.get_input_embeddings()(ids)
    b = model(inputs_embeds=emb, attention_mask=mask, token_type_ids=tt).logits
    for i in range(len(LENGTHS)):
        assert_close(real_tokens(b, mask, i), real_tokens(a, mask, i), atol=1e-12, msg="inputs_embeds vs input_ids")


def test_attentions_on_eager_rows_sum_to_one_and_zero_at_pads(dims):
    m = _models()
    model, _ = build(m.MosaicBertModel, dims, "base", attn_implementation="eager")
    ids, mask, tt = ragged_batch(dims, [5, 2], seqlen=6)
    out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    for a in out.attentions:
        assert a.shape == (2, dims.num_attention_heads, 6, 6)
        rows = a.sum(-1)  # (B, heads, S)
        torch.testing.assert_close(rows, mask[:, None, :].expand_as(rows).double(), atol=1e-12, rtol=0)
        pad = mask == 0
        assert torch.all(a.permute(0, 2, 1, 3)[pad] == 0)  # pad query rows
        assert torch.all(a.permute(0, 3, 1, 2)[pad] == 0)  # pad key cols


def test_flash_attention_2_rejects_output_attentions(dims):
    m = _models()
    model = m.MosaicBertModel(make_config(dims, attn_implementation="flash_attention_2")).eval()
    ids = torch.randint(1, dims.vocab_size, (1, 4))
    with pytest.raises(ValueError):
        model(input_ids=ids, output_attentions=True)


def test_return_dict_false_gives_tuples_with_loss_first(dims):
    m = _models()
    model, _ = build(m.MosaicBertForSequenceClassification, dims, "seq")
    ids, mask, tt = ragged_batch(dims, [4, 2])
    labels = torch.tensor([1, 0])
    d = model(input_ids=ids, attention_mask=mask, labels=labels)
    t = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(t, tuple)
    assert_close(t[0], d.loss, msg="tuple[0] is loss")
    assert_close(t[1], d.logits, msg="tuple[1] is logits")
    t2 = model(input_ids=ids, attention_mask=mask, return_dict=False)
    assert_close(t2[0], d.logits, msg="without labels tuple[0] is logits")

    qa, _ = build(m.MosaicBertForQuestionAnswering, dims, "qa")
    span = {"start_positions": torch.tensor([1, 0]), "end_positions": torch.tensor([2, 1])}
    dq = qa(input_ids=ids, attention_mask=mask, **span)
    tq = qa(input_ids=ids, attention_mask=mask, **span, return_dict=False)
    assert_close(tq[0], dq.loss)
    assert_close(tq[1], dq.start_logits)
    assert_close(tq[2], dq.end_logits)

    base, _ = build(m.MosaicBertModel, dims, "base")
    db = base(input_ids=ids, attention_mask=mask)
    tb = base(input_ids=ids, attention_mask=mask, return_dict=False)
    assert_close(tb[0], db.last_hidden_state)


def test_dropout_active_in_train_mode_only(dims):
    m = _models()
    model, _ = build(m.MosaicBertForMaskedLM, dims, "mlm", dtype=torch.float32, hidden_dropout_prob=0.5)
    ids, mask, tt = ragged_batch(dims, [6, 3])
    with torch.no_grad():
        e1 = model(input_ids=ids, attention_mask=mask).logits
        e2 = model(input_ids=ids, attention_mask=mask).logits
        model.train()
        t1 = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(e1[mask == 1], e2[mask == 1])
    assert not torch.allclose(t1[mask == 1], e1[mask == 1])


# --------------------------------------------------------------------------
# Structure, meta device, init, tying, resize
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls_name,has_pooler",
    [
        ("MosaicBertForMaskedLM", False),
        ("MosaicBertForTokenClassification", False),
        ("MosaicBertForQuestionAnswering", False),
        ("MosaicBertForSequenceClassification", True),
        ("MosaicBertForMultipleChoice", True),
    ],
)
def test_pooler_present_only_where_specified(dims, cls_name, has_pooler):
    m = _models()
    model = getattr(m, cls_name)(make_config(dims))
    keys = model.state_dict().keys()
    assert any(k.startswith("bert.pooler.") for k in keys) == has_pooler


def test_state_dict_keys_are_exactly_the_original_layout(dims):
    m = _models()
    model = m.MosaicBertForMaskedLM(make_config(dims))
    expected = set(ref.encoder_keys(dims)) | set(ref.head_keys(dims, "mlm"))
    assert set(model.state_dict().keys()) == expected


def test_meta_device_construction(dims):
    m = _models()
    cfg = make_config(dims)
    with torch.device("meta"):
        model = m.MosaicBertForMaskedLM(cfg)
    assert all(p.device.type == "meta" for p in model.parameters())
    cpu = m.MosaicBertForMaskedLM(cfg)
    assert set(model.state_dict()) == set(cpu.state_dict())


def test_weight_init_like_bert():
    m = _models()
    d = Dims(hidden_size=64, intermediate_size=128, vocab_size=1000, num_labels=3)
    init = 0.05
    model = m.MosaicBertForSequenceClassification(make_config(d, initializer_range=init))
    pooler = model.bert.pooler.dense  # the identity: a checkpoint without a pooler always loads the same one
    assert torch.equal(pooler.weight, torch.eye(d.hidden_size)) and torch.all(pooler.bias == 0)
    for name, mod in model.named_modules():
        if mod is pooler:
            continue
        if isinstance(mod, torch.nn.Linear):
            assert abs(mod.weight.std().item() - init) < 0.2 * init, f"{name}.weight std {mod.weight.std().item()}"
            assert abs(mod.weight.mean().item()) < 0.2 * init
            if mod.bias is not None:
                assert torch.all(mod.bias == 0), f"{name}.bias not zero"
        elif isinstance(mod, torch.nn.LayerNorm):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0), name
        elif isinstance(mod, torch.nn.Embedding):
            w = mod.weight
            if mod.padding_idx is not None:
                assert torch.all(w[mod.padding_idx] == 0), f"{name} padding row not zero"
            rows = [i for i in range(w.shape[0]) if i != mod.padding_idx]
            assert abs(w[rows].std().item() - init) < 0.2 * init, f"{name}.weight std {w[rows].std().item()}"
    assert model.bert.embeddings.word_embeddings.padding_idx == d.pad_token_id


def test_decoder_weight_tied_to_word_embeddings(dims):
    m = _models()
    model = m.MosaicBertForMaskedLM(make_config(dims))
    dec = model.cls.predictions.decoder
    emb = model.bert.embeddings.word_embeddings
    assert dec.weight.data_ptr() == emb.weight.data_ptr()
    assert model.get_output_embeddings() is dec
    assert dec.bias is not None and dec.bias.shape == (dims.vocab_size,)


@pytest.mark.parametrize("new_size", [110, 50])
def test_resize_token_embeddings_resizes_decoder_and_bias_and_keeps_tying(dims, new_size):
    m = _models()
    model, sd = build(m.MosaicBertForMaskedLM, dims, "mlm", dtype=torch.float32)
    old_bias = model.cls.predictions.decoder.bias.detach().clone()
    model.resize_token_embeddings(new_size)
    dec = model.cls.predictions.decoder
    emb = model.bert.embeddings.word_embeddings
    assert emb.weight.shape == (new_size, dims.hidden_size)
    assert dec.weight.shape == (new_size, dims.hidden_size)
    assert dec.bias.shape == (new_size,)
    assert dec.weight.data_ptr() == emb.weight.data_ptr(), "tying lost after resize"
    keep = min(new_size, dims.vocab_size)
    torch.testing.assert_close(dec.bias[:keep].detach(), old_bias[:keep])
    assert model.config.vocab_size == new_size
    ids = torch.randint(1, min(new_size, dims.vocab_size), (2, 5))
    with torch.no_grad():
        out = model(input_ids=ids)
    assert out.logits.shape == (2, 5, new_size)


@pytest.mark.parametrize("kind", ["mlm", "seq_regression", "seq", "seq_multi", "mc", "tok", "qa"])
def test_loss_is_not_downcast_below_model_dtype(kind):
    """A float64 model must produce a float64 loss (upcasting half precision is fine, downcasting is not)."""
    m = _models()
    d = Dims(num_labels=1 if kind == "seq_regression" else 3)
    ids, mask, tt = ragged_batch(d, [4, 2, 3, 1], seqlen=4)
    if kind == "mlm":
        model, _ = build(m.MosaicBertForMaskedLM, d, "mlm")
        out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    elif kind.startswith("seq"):
        model, _ = build(m.MosaicBertForSequenceClassification, d, "seq")
        labels = {
            "seq_regression": torch.randn(4, dtype=torch.float64),
            "seq": torch.tensor([0, 1, 2, 0]),
            "seq_multi": torch.ones(4, 3, dtype=torch.float64),
        }[kind]
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    elif kind == "mc":
        model, _ = build(m.MosaicBertForMultipleChoice, d, "mc")
        out = model(input_ids=ids.view(2, 2, 4), attention_mask=mask.view(2, 2, 4), labels=torch.tensor([0, 1]))
    elif kind == "tok":
        model, _ = build(m.MosaicBertForTokenClassification, d, "tok")
        out = model(input_ids=ids, attention_mask=mask, labels=torch.zeros_like(ids).masked_fill(mask == 0, -100))
    else:
        model, _ = build(m.MosaicBertForQuestionAnswering, d, "qa")
        z = torch.zeros(4, dtype=torch.long)
        out = model(input_ids=ids, attention_mask=mask, start_positions=z, end_positions=z)
    assert out.loss.dtype == torch.float64, f"loss computed in {out.loss.dtype}"


def test_masked_lm_return_dict_false_with_labels(dims):
    m = _models()
    model, _ = build(m.MosaicBertForMaskedLM, dims, "mlm")
    ids, mask, tt = ragged_batch(dims, [4, 2])
    labels = ids.masked_fill(mask == 0, -100)
    d = model(input_ids=ids, attention_mask=mask, labels=labels)
    t = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(t, tuple)
    assert_close(t[0], d.loss)
    assert_close(t[1], d.logits)


# --------------------------------------------------------------------------
# The attention switch: transformers' attn_implementation
# --------------------------------------------------------------------------


def _saved_mlm(dims, folder, **config_overrides):
    model, _ = build(_models().MosaicBertForMaskedLM, dims, "mlm", dtype=torch.float32, **config_overrides)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("implementation", ["sdpa", "eager", "flash_attention_2", None])
def test_from_pretrained_honours_attn_implementation(dims, tmp_path, implementation):
    """AutoModel*.from_pretrained(..., attn_implementation=...) as sentence-transformers' model_kwargs and training
    scripts pass it; unset means "sdpa". "flash_attention_2" is this package's Triton kernel (no flash_attn package):
    where it cannot run (a CPU tensor), the forward says why."""
    from transformers import AutoModelForMaskedLM

    from conftest import INTERPRET

    saved = _saved_mlm(dims, tmp_path)
    model_kwargs = {} if implementation is None else {"attn_implementation": implementation}
    model = AutoModelForMaskedLM.from_pretrained(tmp_path, trust_remote_code=True, **model_kwargs).eval()
    assert model.config._attn_implementation == (implementation or "sdpa")
    ids, mask, tt = ragged_batch(dims, LENGTHS, seqlen=8)
    if implementation == "flash_attention_2":
        if not INTERPRET:
            with pytest.raises(ValueError, match="flash_attention_2.*cannot run"):
                model(input_ids=ids, attention_mask=mask)
        return
    expected = saved(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
    assert_close(model(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits, expected, atol=1e-5, rtol=1e-5)


def test_unknown_attn_implementation_is_refused_naming_the_choices(dims, tmp_path):
    from transformers import AutoModel

    _saved_mlm(dims, tmp_path)
    with pytest.raises(ValueError, match="'sdpa'.*'eager'.*'flash_attention_2'"):
        AutoModel.from_pretrained(tmp_path, trust_remote_code=True, attn_implementation="flex_attention")


def test_set_attn_implementation_changes_the_config_and_the_attention_that_runs(dims, monkeypatch):
    m = _models()
    model, _ = build(m.MosaicBertModel, dims, "base")
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    ids, mask, tt = ragged_batch(dims, LENGTHS, seqlen=8)
    assert model.config._attn_implementation == "sdpa"
    sdpa = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    assert calls
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    calls.clear()
    eager = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    assert not calls  # explicit softmax: no scaled_dot_product_attention call
    assert_close(eager, sdpa, atol=1e-10, rtol=1e-8)
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"


def test_checkpoint_with_former_attention_backend_loads_onto_attn_implementation(dims, tmp_path):
    import json

    from transformers import AutoModelForMaskedLM

    _saved_mlm(dims, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["attention_backend"] = "torch"
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = AutoModelForMaskedLM.from_pretrained(tmp_path, trust_remote_code=True)
    assert model.config._attn_implementation == "eager"
    assert "attention_backend" not in model.config.to_dict()
    explicit = AutoModelForMaskedLM.from_pretrained(tmp_path, trust_remote_code=True, attn_implementation="sdpa")
    assert explicit.config._attn_implementation == "sdpa"


# --------------------------------------------------------------------------
# Outputs on the autograd graph
# --------------------------------------------------------------------------


def test_retain_grad_hidden_states_attentions(dims):
    """transformers' test of the same name: the returned hidden states and attentions are the tensors the model
    went on to use, so retain_grad() fills their .grad."""
    m = _models()
    model, _ = build(m.MosaicBertModel, dims, "base", dtype=torch.float32)
    ids, mask, tt = ragged_batch(dims, LENGTHS, seqlen=8)
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True,
                output_attentions=True)
    hidden_states = out.hidden_states[0]
    attentions = out.attentions[0]
    hidden_states.retain_grad()
    attentions.retain_grad()
    out[0].flatten()[0].backward(retain_graph=True)
    assert hidden_states.grad is not None
    assert attentions.grad is not None


@pytest.mark.parametrize("cls_name, kind", [("MosaicBertForSequenceClassification", "seq"),
                                            ("MosaicBertForMaskedLM", "mlm")])
def test_gradient_through_returned_hidden_states_and_attentions_is_the_models(dims, cls_name, kind):
    """torch.autograd.grad(loss, hidden_states[i]) is d loss / d (layer i's output): nudging the layer's output in
    the model (by a forward hook) changes the loss by <grad, nudge>, float64. Same for each layer's attentions."""
    m = _models()
    model, _ = build(getattr(m, cls_name), dims, kind)
    ids, mask, tt = ragged_batch(dims, LENGTHS, seqlen=8)
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True,
                output_attentions=True)
    loss = (out.logits ** 2).sum()
    grads = torch.autograd.grad(loss, [*out.hidden_states, *out.attentions])
    real = mask.bool()
    for i, g in enumerate(grads[: len(out.hidden_states)]):
        assert torch.all(g[~real] == 0), f"hidden_states[{i}]: padded positions feed nothing"
        assert g[real].abs().sum() > 0, f"hidden_states[{i}]"
    for i, g in enumerate(grads[len(out.hidden_states) :]):
        assert g.abs().sum() > 0, f"attentions[{i}]"
    # directional derivative against a nudged layer output (layer 0's output is hidden_states[1])
    nudge = torch.randn_like(out.hidden_states[1]) * real[..., None]
    eps = 1e-6
    hook = model.bert.encoder.layer[0].register_forward_hook(
        lambda module, args, output: (output[0] + eps * nudge[real], output[1])
    )
    try:
        nudged = model(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    finally:
        hook.remove()
    change = ((nudged.logits ** 2).sum() - loss.detach()) / eps
    assert_close(change, (grads[1] * nudge).sum(), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------
# MLM logits for Trainer.predict and run_mlm-style metrics
# --------------------------------------------------------------------------


def test_trainer_predict_masked_lm_predictions_line_up_with_label_ids(dims, tmp_path):
    from transformers import Trainer, TrainingArguments

    m = _models()
    model, _ = build(m.MosaicBertForMaskedLM, dims, "mlm", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(6):
        ids, mask, _ = ragged_batch(dims, [8 - i % 4], seqlen=8, seed=i, garbage_pads=False)
        labels = torch.where((torch.rand(ids.shape, generator=g) < 0.3) & (mask == 1), ids, -100)
        labels[0, 0] = ids[0, 0]
        samples.append({"input_ids": ids[0], "attention_mask": mask[0], "labels": labels[0]})

    def preprocess_logits_for_metrics(logits, labels):  # as transformers' run_mlm.py
        return logits.argmax(dim=-1)

    def compute_metrics(eval_pred):  # as transformers' run_mlm.py
        preds, labels = eval_pred
        labels, preds = labels.reshape(-1), preds.reshape(-1)
        keep = labels != -100
        return {"accuracy": float((preds[keep] == labels[keep]).mean())}

    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, compute_metrics=compute_metrics,
                      preprocess_logits_for_metrics=preprocess_logits_for_metrics)
    prediction = trainer.predict(samples)
    labels = torch.stack([s["labels"] for s in samples])
    assert prediction.predictions.shape == tuple(labels.shape)
    assert (prediction.label_ids == labels.numpy()).all()
    with torch.no_grad():
        expected = model(input_ids=torch.stack([s["input_ids"] for s in samples]),
                         attention_mask=torch.stack([s["attention_mask"] for s in samples])).logits.argmax(-1)
    keep = labels != -100
    assert (torch.from_numpy(prediction.predictions)[keep] == expected[keep]).all()
    accuracy = float((expected[keep] == labels[keep]).float().mean())
    assert prediction.metrics["test_accuracy"] == pytest.approx(accuracy)


# --------------------------------------------------------------------------
# Heads over checkpoints without a pooler
# --------------------------------------------------------------------------


def test_checkpoint_without_pooler_loads_the_same_pooler_and_logits_every_time(dims, tmp_path):
    """MosaicBERT pretrains without a pooler; every load of such a checkpoint starts the pooler at the identity, so
    pooler_output, and the logits of a saved classifier (what PEFT's sequence-classification preset keeps), are
    the same on every load."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    _saved_mlm(dims, tmp_path)
    ids, mask, tt = ragged_batch(dims, LENGTHS, seqlen=8)
    results = []
    for seed in (1, 2):
        torch.manual_seed(seed)  # what would draw a different random pooler
        base = AutoModel.from_pretrained(tmp_path, trust_remote_code=True).eval()
        classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, trust_remote_code=True).eval()
        assert torch.equal(classifier.bert.pooler.dense.weight, torch.eye(dims.hidden_size))
        assert torch.all(classifier.bert.pooler.dense.bias == 0)
        if results:
            classifier.classifier.load_state_dict(results[0][2])
        pooled = base(input_ids=ids, attention_mask=mask, token_type_ids=tt).pooler_output
        head_pooled = classifier.bert(input_ids=ids, attention_mask=mask, token_type_ids=tt).pooler_output
        logits = classifier(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
        results.append((pooled, head_pooled, classifier.classifier.state_dict(), logits))
    (p1, h1, _, l1), (p2, h2, _, l2) = results
    assert torch.equal(p1, p2) and torch.equal(h1, h2) and torch.equal(p1, h1)
    assert torch.equal(l1, l2)


def test_forward_hooks_on_the_output_projections_still_run():
    """The residual LayerNorm fuses a projection's bias only when nothing hooks the projection: a hook (device
    offload, pruning, activation capture) sees the call and its output counts."""
    from modeling_mosaic_bert import MosaicBertModel

    config = make_config(Dims(), hidden_dropout_prob=0.0)
    model = MosaicBertModel(config).eval()
    ids, mask, _ = ragged_batch(Dims(), [5, 3])
    before = model(input_ids=ids, attention_mask=mask).last_hidden_state
    seen = []
    dense = model.encoder.layer[0].attention.output.dense
    dense.register_forward_hook(lambda module, args, output: seen.append(output.shape) or output * 0)
    after = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert seen, "the hook of a projection was skipped"
    assert not torch.allclose(before, after), "the hook's output was ignored"
