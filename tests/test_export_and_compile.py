"""Graph capture: torch.export and torch.onnx.export take the padded path and match eager on new shapes; torch.compile
compiles once per shape kind (no recompile per set of lengths, no graph break), runs the layers on the real tokens
only and matches eager; torch.jit.trace is
refused with a clear error.

Tiny fp32 models on CPU. Batches mix right, left and middle padding and a row with no real token, in shapes the
graph was not captured with.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from conftest import INTERPRET, make_config, ragged_batch
from reference import Dims

HEADS = [
    "MosaicBertModel",
    "MosaicBertForMaskedLM",
    "MosaicBertForSequenceClassification",
    "MosaicBertForTokenClassification",
    "MosaicBertForQuestionAnswering",
]
DIMS = Dims()


def _m():
    import modeling_mosaic_bert

    return modeling_mosaic_bert


def tiny(cls_name: str, **config):
    torch.manual_seed(0)
    model = getattr(_m(), cls_name)(make_config(DIMS, hidden_dropout_prob=0.0, **config)).eval()
    with torch.no_grad():  # away from init, so that every weight matters (the pooler starts as the identity)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def mixed_padding_batch(batch: int, seqlen: int, seed: int):
    """(input_ids, attention_mask, token_type_ids): right, left and middle padding in turn, the last row all padding,
    garbage ids and token types at padded positions."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, seqlen + 1, (batch,), generator=g).tolist()
    ids, mask, types = ragged_batch(DIMS, lengths, seqlen=seqlen, seed=seed)
    for b in range(batch):
        _, row_mask, _ = ragged_batch(DIMS, [lengths[b]], seqlen=seqlen, padding=("right", "left", "middle")[b % 3])
        mask[b] = row_mask[0]
    mask[-1] = 0
    return ids, mask, types


def _outputs(out) -> dict:
    return {k: v for k, v in dict(out).items() if isinstance(v, torch.Tensor)}


def _dynamic_shapes(names=("input_ids", "attention_mask", "token_type_ids")):
    batch, seqlen = torch.export.Dim("batch"), torch.export.Dim("seqlen")
    return {name: {0: batch, 1: seqlen} for name in names}


@pytest.mark.parametrize("cls_name", HEADS)
def test_torch_export_with_dynamic_batch_and_seqlen_matches_eager_on_new_shapes(cls_name):
    model = tiny(cls_name)
    ids, mask, types = mixed_padding_batch(3, 8, seed=0)
    program = torch.export.export(
        model, (), {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}, dynamic_shapes=_dynamic_shapes()
    )
    graph = str(program.graph)
    assert "nonzero" not in graph and "_local_scalar_dense" not in graph  # no value read, no unpadding
    exported = program.module()
    for batch, seqlen, seed in [(5, 13, 1), (2, 4, 2), (7, 30, 3)]:
        ids, mask, types = mixed_padding_batch(batch, seqlen, seed)
        got = _outputs(exported(input_ids=ids, attention_mask=mask, token_type_ids=types))
        expected = _outputs(model(input_ids=ids, attention_mask=mask, token_type_ids=types))
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            assert got[name].shape == value.shape, name
            torch.testing.assert_close(got[name], value, atol=1e-4, rtol=1e-4, msg=f"{cls_name} {name}")
        if "last_hidden_state" in expected:
            assert torch.all(got["last_hidden_state"][mask == 0] == 0)


def test_torch_export_of_the_padded_path_matches_the_float64_reference():
    """The exported graph itself is right, not only equal to eager: float64 weights and inputs, padding anywhere."""
    import reference as ref
    from conftest import build

    model, sd = build(_m().MosaicBertModel, DIMS, "base", dtype=torch.float64)
    ids, mask, types = mixed_padding_batch(3, 8, seed=0)
    program = torch.export.export(
        model, (), {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}, dynamic_shapes=_dynamic_shapes()
    )
    ids, mask, types = mixed_padding_batch(4, 11, seed=5)
    got = program.module()(input_ids=ids, attention_mask=mask, token_type_ids=types)
    expected = ref.base(sd, DIMS, ids, mask, types, with_pooler=True)
    real = mask.bool()
    torch.testing.assert_close(got.last_hidden_state[real], expected["last_hidden_state"][real], atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(got.pooler_output[:-1], expected["pooled"][:-1], atol=1e-9, rtol=1e-7)


def test_onnx_export_dynamo_runs_in_onnxruntime_on_new_shapes():
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = tiny("MosaicBertModel")
    ids, mask, types = mixed_padding_batch(3, 8, seed=0)
    names = ("input_ids", "attention_mask", "token_type_ids")
    program = torch.onnx.export(
        model, (), kwargs=dict(zip(names, (ids, mask, types))), dynamo=True, dynamic_shapes=_dynamic_shapes(names),
        input_names=list(names), output_names=["last_hidden_state", "pooler_output"], verbose=False,
    )
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString())
    ids, mask, types = mixed_padding_batch(5, 17, seed=4)
    got = session.run(None, {n: t.numpy() for n, t in zip(names, (ids, mask, types))})
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    torch.testing.assert_close(torch.from_numpy(got[0]), expected.last_hidden_state, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(got[1]), expected.pooler_output, atol=1e-4, rtol=1e-4)


def test_flash_attention_2_refuses_export_with_a_clear_error():
    model = tiny("MosaicBertModel", attn_implementation="flash_attention_2")
    ids, mask, types = mixed_padding_batch(2, 6, seed=0)
    with pytest.raises(ValueError, match="flash_attention_2.*exported"):
        torch.export.export(model, (), {"input_ids": ids, "attention_mask": mask})


def test_jit_trace_is_refused_with_a_clear_error():
    model = tiny("MosaicBertModel")
    ids, mask, _ = mixed_padding_batch(2, 6, seed=0)
    with pytest.raises(ValueError, match="torch.jit.trace"):
        torch.jit.trace(model, (ids, mask), strict=False)


def _batches(count: int, seed: int = 0):
    """`count` right-padded batches of new shapes (batch >= 2) and lengths, with 30% MLM labels."""
    g = torch.Generator().manual_seed(seed)
    for i in range(count):
        batch, seqlen = 2 + i % 4, 5 + 3 * i
        lengths = torch.randint(1, seqlen + 1, (batch,), generator=g)
        mask = (torch.arange(seqlen)[None] < lengths[:, None]).long()
        ids = torch.randint(1, DIMS.vocab_size, (batch, seqlen), generator=g)
        labels = torch.where((torch.rand(batch, seqlen, generator=g) < 0.3) & (mask == 1), ids, -100)
        yield ids, mask, labels


@pytest.mark.parametrize("cls_name", ["MosaicBertForMaskedLM", "MosaicBertForSequenceClassification"])
def test_compile_does_not_recompile_for_new_lengths_and_matches_eager(cls_name):
    """8 batches of new shapes and lengths: one static compile, then one dynamic one; outputs equal eager."""
    torch._dynamo.reset()
    model = tiny(cls_name)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    for ids, mask, token_labels in _batches(8):
        labels = token_labels if cls_name.endswith("MaskedLM") else token_labels[:, 0].clamp(0, 1)
        got = compiled(input_ids=ids, attention_mask=mask, labels=labels)
        expected = model(input_ids=ids, attention_mask=mask, labels=labels)
        torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=1e-5)
    assert counter.frame_count <= 2


def test_compile_has_no_graph_break():
    model = tiny("MosaicBertForMaskedLM")
    ids, mask, labels = next(_batches(1))
    explanation = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask, labels=labels)
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_compiled_layers_run_on_the_real_tokens_only():
    """Under torch.compile the encoder's linear layers see the real tokens only, not every padded position: their
    row count is the symbolic count that the checks return (unbacked: one graph serves every count), never
    batch * seqlen. The heads' linear layers see one row per sequence."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    torch._dynamo.reset()
    model = tiny("MosaicBertForSequenceClassification")
    row_counts = []

    def backend(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in (torch._C._nn.linear, torch.nn.functional.linear):
                row_counts.append(node.meta["example_value"].shape[0])
        return gm

    ids, mask, _ = mixed_padding_batch(4, 9, seed=3)
    torch.compile(model, backend=backend, fullgraph=True)(input_ids=ids, attention_mask=mask)
    in_layers = [n for n in row_counts if not (isinstance(n, int) and n == 4)]  # the heads: one row per sequence
    assert len(in_layers) == 4 * DIMS.num_hidden_layers, row_counts
    assert all(isinstance(n, torch.SymInt) and free_unbacked_symbols(n) for n in in_layers), row_counts


def test_compile_without_torchs_size_helper_breaks_the_graph_at_the_checks_only_and_matches_eager(monkeypatch):
    """Where torch lacks the shape-environment helper that `data_dependent_size` uses, the fake implementation asks
    for the size through the public ctx.new_dynamic_size(): Dynamo then breaks the graph at the checks operator, and
    nowhere else, and the outputs still equal eager's."""
    import torch._library.fake_impl as fake_impl

    monkeypatch.delattr(fake_impl, "allocate_size")
    torch._dynamo.reset()
    model = tiny("MosaicBertForMaskedLM")
    ids, mask, labels = next(_batches(1))
    explanation = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask, labels=labels)
    reasons = [str(r.reason) for r in explanation.break_reasons]
    assert reasons and all("check_batch" in reason for reason in reasons), reasons  # once per enclosing frame
    torch._dynamo.reset()
    got = torch.compile(model, backend="aot_eager")(input_ids=ids, attention_mask=mask, labels=labels)
    expected = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=1e-5)


def test_compiled_training_step_gives_eager_loss_and_gradients():
    """In training with labels: padding anywhere, the loss and every parameter's gradient as in eager (where the MLM
    head runs on the labelled rows only)."""
    torch._dynamo.reset()
    model = tiny("MosaicBertForMaskedLM").train()
    compiled = torch.compile(model, backend="aot_eager")
    ids, mask, types = mixed_padding_batch(4, 9, seed=7)
    labels = torch.where(mask == 1, ids, -100)
    labels[:, ::2] = -100
    results = []
    for run in (compiled, model):
        out = run(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
        results.append((out.logits, out.loss, torch.autograd.grad(out.loss, list(model.parameters()))))
    (logits, loss, grads), (eager_logits, eager_loss, eager_grads) = results
    assert logits.shape == (int((labels != -100).sum()), DIMS.vocab_size)  # compact, as in eager
    torch.testing.assert_close(logits, eager_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    for (name, _), g, e in zip(model.named_parameters(), grads, eager_grads):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4, msg=name)


EDGE_BATCHES = {  # a row without tokens beside real ones: mixed_padding_batch, in the tests above
    "one sequence": ([5], None),
    "no real token at all": ([0, 0], 4),
}


@pytest.mark.parametrize("case", sorted(EDGE_BATCHES))
@pytest.mark.parametrize("cls_name", ["MosaicBertForMaskedLM", "MosaicBertForTokenClassification",
                                      "MosaicBertForQuestionAnswering", "MosaicBertForSequenceClassification"])
def test_compiled_heads_match_eager_on_edge_batches(cls_name, case):
    """Batches of one sequence or with no real token at all, for every kind of head in training (MLM: every label
    -100 where nothing is real): the compiled model's outputs, loss and gradients equal eager's."""
    lengths, seqlen = EDGE_BATCHES[case]
    torch._dynamo.reset()
    model = tiny(cls_name).train()
    ids, mask, types = ragged_batch(DIMS, lengths, seqlen=seqlen, seed=3)
    batch = len(lengths)
    labels = {
        "MosaicBertForMaskedLM": torch.where(mask == 1, ids, -100),
        "MosaicBertForTokenClassification": torch.where(mask == 1, ids % 2, -100),
        "MosaicBertForSequenceClassification": torch.arange(batch) % 2,
    }.get(cls_name)
    kwargs = {"labels": labels} if labels is not None else {
        "start_positions": torch.zeros(batch, dtype=torch.long), "end_positions": torch.zeros(batch, dtype=torch.long)}
    results = []
    for run in (torch.compile(model, backend="aot_eager"), model):
        out = run(input_ids=ids, attention_mask=mask, token_type_ids=types, **kwargs)
        outputs = _outputs(out)
        results.append((outputs, torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)))
    (got, grads), (expected, eager_grads) = results
    assert got.keys() == expected.keys()
    for key in expected:  # equal_nan: a token-classification loss over no label is NaN in both, as in BERT
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-5, equal_nan=True, msg=key)
    for (name, _), g, e in zip(model.named_parameters(), grads, eager_grads):
        if e is None:
            assert g is None or not g.any(), name
        else:
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4, msg=name)


def test_compiled_model_still_raises_value_errors_for_bad_inputs():
    torch._dynamo.reset()
    model = tiny("MosaicBertForMaskedLM")
    compiled = torch.compile(model, backend="aot_eager")
    ids, mask, labels = next(_batches(1))
    compiled(input_ids=ids, attention_mask=mask)
    bad_ids = ids.clone()
    bad_ids[0, 0] = DIMS.vocab_size
    with pytest.raises(ValueError, match="outside the vocabulary"):
        compiled(input_ids=bad_ids, attention_mask=mask)
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="padded position"):
        compiled(input_ids=ids, attention_mask=mask, labels=torch.where(mask == 0, 1, labels))


def test_compile_takes_the_compiled_route_not_the_export_route(monkeypatch):
    """Under torch.compile the model runs the unpadded layout with its value checks, never the export route (which
    checks nothing): `is_exporting` must say False there even where torch.compiler.is_exporting() says True (Dynamo
    before pytorch/pytorch#176499, as in torch 2.11; tests/test_model_gpu.py runs the GPU variant on such a torch)."""
    torch._dynamo.reset()
    model = tiny("MosaicBertForMaskedLM")
    layouts = []
    compiled_layout = _m().compiled_layout

    def spy(*args):
        layouts.append(1)
        return compiled_layout(*args)

    monkeypatch.setattr(_m(), "compiled_layout", spy)
    compiled = torch.compile(model, backend="aot_eager")
    ids, mask, _ = next(_batches(1))
    torch.testing.assert_close(compiled(input_ids=ids, attention_mask=mask).logits,
                               model(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-4)
    assert layouts, "the compiled model took the export route"
    flag = torch.compile(lambda x: x + float(_m().is_exporting()), backend="eager", fullgraph=True)(torch.zeros(1))
    assert flag.item() == 0.0


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRET, reason="the CPU variant of the kernel path; tests/test_model_gpu.py covers CUDA")
def test_compiled_kernel_path_matches_eager_and_does_not_recompile():
    """attn_implementation="flash_attention_2" in fp32 under the Triton interpreter: the compiled graph calls the
    attention kernel on the real tokens and gives eager's loss and gradients."""
    torch._dynamo.reset()
    d = Dims(hidden_size=32, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    model = _m().MosaicBertForMaskedLM(
        make_config(d, hidden_dropout_prob=0.0, attn_implementation="flash_attention_2")
    ).train()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    for ids, mask, labels in _batches(3, seed=1):
        mask[0] = mask[0].flip(0)  # left padding
        labels = torch.where(mask == 1, labels, -100)
        results = []
        for run in (compiled, model):
            loss = run(input_ids=ids, attention_mask=mask, labels=labels).loss
            results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
        (loss, grads), (eager_loss, eager_grads) = results
        torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
        for (name, _), g, e in zip(model.named_parameters(), grads, eager_grads):
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4, msg=name)
    assert counter.frame_count <= 2
