"""The model on CUDA: the Triton kernels (attention, GeGLU, residual LayerNorm) are the default and agree with the
PyTorch path.

Marked `gpu` (skipped without CUDA); run on a GPU machine with `python -m pytest -m gpu tests/test_model_gpu.py`.
Tolerances: bf16 autocast runs both paths in bf16 matmuls, so the kernel path must match the PyTorch path within a
relative Frobenius error of 2e-2 on hidden states and gradients (measured values are printed with -s).
"""

import copy

import pytest
import torch

from conftest import rel_err

pytestmark = pytest.mark.gpu


def tiny_model(cls, **overrides):
    from configuration_mosaic_bert import MosaicBertConfig

    kwargs = dict(
        vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
        hidden_dropout_prob=0.0,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return cls(MosaicBertConfig(**kwargs)).cuda()


def ragged(lengths, vocab=512, seed=0, seqlen=None):
    g = torch.Generator().manual_seed(seed)
    seqlen = seqlen or max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), seqlen), generator=g)
    mask = (torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids.cuda(), mask.cuda()


def test_kernel_is_the_default_attention_on_cuda_in_bf16():
    from modeling_mosaic_bert import MosaicBertModel, flash_attn_varlen_qkvpacked_func

    assert flash_attn_varlen_qkvpacked_func is not None, "Triton kernel failed to import on a CUDA machine"
    model = tiny_model(MosaicBertModel)
    calls = []
    import modeling_mosaic_bert

    original = modeling_mosaic_bert.flash_attn_varlen_qkvpacked_func

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    modeling_mosaic_bert.flash_attn_varlen_qkvpacked_func = counting
    try:
        ids, mask = ragged([5, 17, 1])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(ids, attention_mask=mask)
    finally:
        modeling_mosaic_bert.flash_attn_varlen_qkvpacked_func = original
    assert len(calls) == model.config.num_hidden_layers


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_path_matches_torch_path_forward_and_gradients_within_2e_2(dtype):
    from modeling_mosaic_bert import MosaicBertForMaskedLM

    kernel_model = tiny_model(MosaicBertForMaskedLM)
    torch_model = copy.deepcopy(kernel_model)
    torch_model.set_attn_implementation("eager")  # attention, feed-forward, residual LayerNorms and loss on PyTorch
    ids, mask = ragged([1, 7, 127, 128, 129, 300], seed=1)
    labels = torch.where(torch.rand_like(ids, dtype=torch.float) < 0.3, ids, -100).masked_fill(mask == 0, -100)
    results = []
    for model in (kernel_model, torch_model):
        with torch.autocast("cuda", dtype=dtype):
            out = model(ids, attention_mask=mask, labels=labels, output_hidden_states=True)
        out.loss.backward()
        results.append((out, [p.grad.clone() for p in model.parameters()]))
    (k_out, k_grads), (t_out, t_grads) = results
    assert torch.isfinite(k_out.loss)
    for k_h, t_h in zip(k_out.hidden_states, t_out.hidden_states):
        assert rel_err(k_h, t_h) < 2e-2
    assert rel_err(k_out.logits, t_out.logits) < 2e-2
    for (name, _), k_grad, t_grad in zip(kernel_model.named_parameters(), k_grads, t_grads):
        assert rel_err(k_grad, t_grad) < 2e-2, name


def test_fused_feed_forward_and_layer_norm_kernels_are_the_default_on_cuda_in_bf16():
    import modeling_mosaic_bert

    model = tiny_model(modeling_mosaic_bert.MosaicBertModel)
    calls = {"geglu": 0, "dropout_add_layer_norm": 0}
    originals = {name: getattr(modeling_mosaic_bert, name) for name in calls}

    def counting(name):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)
        return wrapper

    for name in calls:
        setattr(modeling_mosaic_bert, name, counting(name))
    try:
        ids, mask = ragged([5, 17, 1])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(ids, attention_mask=mask)
    finally:
        for name, fn in originals.items():
            setattr(modeling_mosaic_bert, name, fn)
    layers = model.config.num_hidden_layers
    assert calls == {"geglu": layers, "dropout_add_layer_norm": 2 * layers}


def test_masked_lm_loss_runs_on_the_fused_cross_entropy_and_matches_pytorch():
    """In bf16 on CUDA the MLM loss comes from the cross-entropy kernel, equal to F.cross_entropy on float32 copies
    of the same logits, and so are the logits' gradients."""
    import modeling_mosaic_bert

    model = tiny_model(modeling_mosaic_bert.MosaicBertForMaskedLM)
    calls = []
    original = modeling_mosaic_bert.cross_entropy

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    ids, mask = ragged([5, 17, 1, 40], seed=9)
    labels = torch.where(torch.rand_like(ids, dtype=torch.float) < 0.3, ids, -100).masked_fill(mask == 0, -100)
    labels[0, 0] = ids[0, 0]  # at least one label
    modeling_mosaic_bert.cross_entropy = counting
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids, attention_mask=mask, labels=labels)
    finally:
        modeling_mosaic_bert.cross_entropy = original
    assert len(calls) == 1
    logits = out.logits.detach().requires_grad_()
    kernel_loss = modeling_mosaic_bert.masked_lm_loss(logits, labels[labels != -100], "sdpa")
    torch_loss = modeling_mosaic_bert.masked_lm_loss(logits, labels[labels != -100], "eager")
    assert kernel_loss.dtype == torch_loss.dtype == torch.float32
    torch.testing.assert_close(kernel_loss, torch_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, torch_loss.detach(), rtol=1e-5, atol=1e-5)
    (kernel_grad,) = torch.autograd.grad(kernel_loss, logits)
    (torch_grad,) = torch.autograd.grad(torch_loss, logits)
    assert rel_err(kernel_grad, torch_grad) < 1e-2  # bf16 gradient (kernel) against float32 rounded once to bf16


def test_training_with_dropout_on_the_fused_kernels_learns_a_batch():
    """With hidden dropout 0.1 on the GeGLU and LayerNorm kernels, a few AdamW steps on one batch lower the loss."""
    from modeling_mosaic_bert import MosaicBertForMaskedLM

    model = tiny_model(MosaicBertForMaskedLM, hidden_dropout_prob=0.1).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids, mask = ragged([64, 33, 128, 5], seed=3)
    labels = torch.where(torch.rand_like(ids, dtype=torch.float) < 0.3, ids, -100).masked_fill(mask == 0, -100)
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_kernel_path_is_batch_invariant():
    from modeling_mosaic_bert import MosaicBertModel

    model = tiny_model(MosaicBertModel).eval()
    ids, mask = ragged([40, 3, 200], seed=2)
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.inference_mode():
        batch = model(ids, attention_mask=mask).last_hidden_state
        alone = model(ids[1:2, :3]).last_hidden_state
    assert rel_err(batch[1, :3], alone[0]) < 1e-2


def test_mixed_lengths_1_and_8192_run_on_the_kernel():
    from modeling_mosaic_bert import MosaicBertModel

    model = tiny_model(MosaicBertModel).eval()
    ids, mask = ragged([1, 8192, 4096], seed=3)
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.inference_mode():
        out = model(ids, attention_mask=mask).last_hidden_state
    assert torch.isfinite(out).all()
    assert (out[0, 1:] == 0).all()


def test_flash_attention_2_refuses_output_attentions_with_a_clear_error():
    from modeling_mosaic_bert import MosaicBertModel

    model = tiny_model(MosaicBertModel, attn_implementation="flash_attention_2")
    ids, mask = ragged([4, 6])
    with pytest.raises(ValueError, match="output_attentions"):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(ids, attention_mask=mask, output_attentions=True)


def test_sdpa_falls_back_to_torch_for_float32_and_output_attentions():
    from modeling_mosaic_bert import MosaicBertModel

    model = tiny_model(MosaicBertModel)
    ids, mask = ragged([4, 6])
    out = model(ids, attention_mask=mask, output_attentions=True)
    assert out.attentions[0].shape == (2, 2, 6, 6)


def test_compiled_layers_match_eager_in_bf16():
    from modeling_mosaic_bert import MosaicBertForMaskedLM

    model = tiny_model(MosaicBertForMaskedLM).eval()
    ids, mask = ragged([30, 64, 5], seed=4)
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.inference_mode():
        eager = model(ids, attention_mask=mask).logits
    compiled = copy.deepcopy(model)
    for layer in compiled.bert.encoder.layer:
        layer.compile(dynamic=True, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.inference_mode():
        out = compiled(ids, attention_mask=mask).logits
    assert rel_err(out, eager) < 2e-2


def host_synchronisations(step) -> list[str]:
    """Runs step() once and returns the messages of the host synchronisations it made (CUDA sync debug mode)."""
    import warnings

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]


def collated_batch(lengths, seed, vocab=512):
    """What a tokenizer and DataCollatorForLanguageModeling give: input_ids, attention_mask, token_type_ids and
    labels on 30% of the real tokens (-100 elsewhere)."""
    ids, mask = ragged(lengths, vocab=vocab, seed=seed)
    g = torch.Generator(device="cuda").manual_seed(seed)
    chosen = (torch.rand(ids.shape, generator=g, device="cuda") < 0.3) & (mask == 1)
    labels = torch.where(chosen, ids, -100)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids), "labels": labels}


@pytest.mark.parametrize("lengths", [[128] * 8, [5, 17, 1, 64, 128, 90]], ids=["packed", "ragged"])
def test_masked_lm_training_step_synchronises_with_the_host_at_most_once(lengths):
    """Forward and backward of a bf16 MLM training step with dropout, on collator inputs: the one host read is the
    entry check (every value check and the unpadding lengths together); labels, loss and backward add none."""
    from modeling_mosaic_bert import MosaicBertForMaskedLM

    model = tiny_model(MosaicBertForMaskedLM, hidden_dropout_prob=0.1).train()
    batch = collated_batch(lengths, seed=4)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: lazy initialisation may synchronise
    syncs = host_synchronisations(step)
    assert len(syncs) <= 1, syncs


def test_sequence_classification_training_step_synchronises_with_the_host_at_most_once():
    from modeling_mosaic_bert import MosaicBertForSequenceClassification

    model = tiny_model(MosaicBertForSequenceClassification, num_labels=3, hidden_dropout_prob=0.1).train()
    batch = collated_batch([5, 17, 1, 64, 128, 90], seed=5)
    batch["labels"] = torch.tensor([0, 2, 1, 1, 0, 2], device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    syncs = host_synchronisations(step)
    assert len(syncs) <= 1, syncs


def test_compiled_model_on_cuda_runs_the_kernels_without_recompiling_for_new_lengths(monkeypatch):
    """torch.compile (inductor) of the whole model in bf16, the real tokens (a symbolic count) feeding the attention
    kernel: after
    batches that span the range of shapes (a static compile, then dynamic ones), batches of new shapes and lengths
    within that range compile nothing, and every loss is eager's."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import guard_failures

    from modeling_mosaic_bert import MosaicBertForMaskedLM

    torch._dynamo.reset()
    model = tiny_model(MosaicBertForMaskedLM).train()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter)
    warm_up = [[64, 3, 100], [7, 128], [9, 8, 7, 6, 5], [300, 2]]
    new_lengths = [[1, 30, 200, 5], [256, 256], [17, 40, 3], [120, 90, 60, 30, 2, 1], [5, 250]]
    for i, lengths in enumerate(warm_up + new_lengths):
        if i == len(warm_up):
            frames_after_warm_up = counter.frame_count
        batch = collated_batch(lengths, seed=i)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(**batch).loss
            expected = model(**batch).loss
        assert rel_err(loss, expected) < 2e-2
        loss.backward()
    failures = {code.co_name: [str(r) for r in failed] for code, failed in guard_failures.items()}
    assert counter.frame_count == frames_after_warm_up <= 3, failures
    batch = collated_batch([64, 3, 100], seed=0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        explanation = torch._dynamo.explain(model)(**batch)
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
    # The graph runs the Triton attention kernel, not the export route (Dynamo in torch 2.11 reports is_exporting()
    # under plain torch.compile). Checked last: the spy's list would itself make Dynamo recompile at every call.
    reasons = []  # why each traced attention call is off the kernel (None: on it)
    attention = type(model.bert.encoder.layer[0].attention.self)
    original = attention.kernel_unsupported_reason
    monkeypatch.setattr(attention, "kernel_unsupported_reason",
                        lambda self, *args: reasons.append(original(self, *args)) or reasons[-1])
    torch._dynamo.reset()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch.compile(model)(**batch)
    assert reasons and set(reasons) == {None}, set(reasons)
