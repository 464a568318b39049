"""Tests of layernorm_triton.py (the fused dropout + residual add + LayerNorm kernels) against a float64 PyTorch
reference on CPU.

Tests marked `interpreter` run the kernels: on a GPU, or in Triton's CPU interpreter with TRITON_INTERPRET=1 set
before Python starts (the second stage of scripts/test.sh):
    TRITON_INTERPRET=1 python -m pytest -q -m interpreter tests/test_layernorm_triton.py
Tests marked `gpu` need CUDA (and no TRITON_INTERPRET); unmarked tests run in every mode.

Kernel outputs (and the backward pass's partial-sum buffers) are poisoned with NaN before the kernels write them;
errors are relative, ||x - ref|| / ||ref||.
"""

import pytest
import torch
import torch.nn.functional as F

import layernorm_triton as ln
import triton_utils
from conftest import KERNEL_DEVICE as DEVICE
from conftest import rel_err

EPS = 1e-5


def reference(inputs, dy: torch.Tensor, keep: torch.Tensor | None, p: float, eps: float = EPS):
    """float64 y, row mean, row rstd and the gradients (dx, dresidual, dweight, dbias[, dx_bias]), on CPU.
    inputs: (x, residual, weight, bias) or (x, residual, weight, bias, x_bias)."""
    leaves = tuple(t.detach().cpu().double().requires_grad_() for t in inputs)
    x, residual, weight, bias = leaves[:4]
    projected = x if len(leaves) == 4 else x + leaves[4]
    dropped = projected if keep is None else projected * keep.cpu().double() / (1 - p)
    z = dropped + residual
    y = F.layer_norm(z, (x.shape[1],), weight, bias, eps)
    grads = torch.autograd.grad(y, leaves, dy.cpu().double())
    mean = z.detach().mean(1)
    rstd = ((z.detach() - mean[:, None]).square().mean(1) + eps).rsqrt()
    return y.detach(), mean, rstd, grads


def run_kernel(inputs, dy: torch.Tensor, p: float = 0.0, eps: float = EPS):
    """y and the gradients of the public function (one per input; a fifth input is x_bias), with poisoned outputs."""
    leaves = tuple(t.detach().requires_grad_() for t in inputs)
    with triton_utils.poisoned_outputs():
        y = ln.dropout_add_layer_norm(*leaves[:4], eps, p, *leaves[4:])
        grads = torch.autograd.grad(y, leaves, dy)
    return y.detach(), grads


def random_inputs(tokens: int, hidden: int, dtype: torch.dtype, seed: int, param_dtype: torch.dtype | None = None):
    """x, residual, weight, bias and dy; weight and bias random (not 1 and 0) so that every term of the math shows."""
    gen = torch.Generator().manual_seed(seed)
    param_dtype = dtype if param_dtype is None else param_dtype
    x = (2.0 * torch.randn(tokens, hidden, generator=gen) + 0.5).to(dtype=dtype, device=DEVICE)
    residual = torch.randn(tokens, hidden, generator=gen).to(dtype=dtype, device=DEVICE)
    weight = (1.0 + 0.5 * torch.randn(hidden, generator=gen)).to(dtype=param_dtype, device=DEVICE)
    bias = (0.5 * torch.randn(hidden, generator=gen)).to(dtype=param_dtype, device=DEVICE)
    dy = torch.randn(tokens, hidden, generator=gen).to(dtype=dtype, device=DEVICE)
    return (x, residual, weight, bias), dy


def dropout_mask(shape, p: float, torch_seed: int) -> torch.Tensor:
    """The kernel's keep-mask for a call made right after torch.manual_seed(torch_seed): the mask depends only on
    the seed and the element's index, so a known input reveals it exactly. LayerNorm cannot tell an all-kept row from
    an all-dropped one (it removes the mean), so each of two calls sets x = 1 on one parity of columns and x = 0 on the
    other (residual 0, weight 1, bias 0): the x = 0 columns give z = 0 whatever the mask, the row's smallest y, and a
    kept x = 1 column (z = 1 / (1 - p) > 0) lies strictly above it, a dropped one exactly on it."""
    tokens, hidden = shape
    assert hidden >= 2
    keep = torch.zeros(shape, dtype=torch.bool)
    parity = torch.arange(hidden) % 2
    for side in (0, 1):
        x = (parity == side).float().expand(tokens, hidden).to(DEVICE)
        torch.manual_seed(torch_seed)
        y = ln.dropout_add_layer_norm(x, torch.zeros_like(x), torch.ones(hidden, device=DEVICE),
                                      torch.zeros(hidden, device=DEVICE), EPS, p).cpu()
        above = y > y.amin(1, keepdim=True)
        keep[:, side::2] = above[:, side::2]
    return keep.to(DEVICE)


# ---------------------------------------------------------------- correctness without dropout

# tokens x hidden: one element, odd sizes, row groups of unequal length (37 rows), a non power of two hidden (100),
# MosaicBERT's 768, hidden 1 (the row normalises to bias) and no rows at all
SHAPES = [(1, 1), (3, 5), (37, 32), (3, 100), (37, 768), (1, 768), (37, 1), (0, 32)]
DTYPES = [  # x / residual dtype, weight / bias dtype, bound
    (torch.float32, torch.float32, 1e-5),
    (torch.float16, torch.float16, 2e-3),
    (torch.float16, torch.float32, 2e-3),  # autocast: low-precision activations, float32 parameters
]


def assert_outputs_match(y, grads, inputs, dy, ref, bound):
    y_ref, _, _, grads_ref = ref
    x = inputs[0]
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    for grad, like in zip(grads, inputs, strict=True):
        assert grad.shape == like.shape and grad.dtype == like.dtype
    assert rel_err(y, y_ref) < bound, "y"
    # A row of one element normalises to the bias: its x and residual gradients are zero, but rstd = 1 / sqrt(eps)
    # (316 here) multiplies g - mean(g), which the GPU computes with a fused multiply-add, so one rounding of g = w * dy
    # (2^-24 relative) can survive, times rstd (measured on an H100: 8e-6 at |g| = 0.9). No real layer is that
    # narrow, and the bound still fails on any wrong term. The projection bias's gradient sums dx's residues.
    residue = (inputs[2].float()[None, :] * dy.float()).abs().cpu() * 2.0**-23 / EPS**0.5
    allowed_residue = {"dx": residue, "dresidual": residue, "dx_bias": residue.sum(0)}
    names = ("dx", "dresidual", "dweight", "dbias", "dx_bias")[:len(inputs)]
    for name, grad, grad_ref in zip(names, grads, grads_ref, strict=True):
        if not (grad_ref.abs() > 1e-9).any():  # no rows, or hidden 1 (y = bias): no gradient (up to rounding)
            allowed = allowed_residue.get(name, 1e-9)
            assert (grad.cpu().abs() <= allowed + 1e-9).all(), name
        else:
            assert rel_err(grad, grad_ref) < bound, name


@pytest.mark.interpreter
@pytest.mark.parametrize("tokens,hidden", SHAPES)
@pytest.mark.parametrize("dtype,param_dtype,bound", DTYPES)
def test_forward_and_backward_match_float64_reference(tokens, hidden, dtype, param_dtype, bound):
    inputs, dy = random_inputs(tokens, hidden, dtype, seed=tokens * 7919 + hidden, param_dtype=param_dtype)
    y, grads = run_kernel(inputs, dy)
    assert_outputs_match(y, grads, inputs, dy, reference(inputs, dy, None, 0.0), bound)


@pytest.mark.interpreter
@pytest.mark.parametrize("tokens,hidden", [(37, 100), (3, 768), (1, 1), (0, 8)])
def test_forward_saves_float32_row_mean_and_rstd(tokens, hidden):
    inputs, dy = random_inputs(tokens, hidden, torch.float16, seed=2, param_dtype=torch.float32)
    with triton_utils.poisoned_outputs():
        _, mean, rstd = ln.fwd_op(*inputs, EPS, None, 0.0)
    _, mean_ref, rstd_ref, _ = reference(inputs, dy, None, 0.0)
    assert mean.shape == rstd.shape == (tokens,) and mean.dtype == rstd.dtype == torch.float32
    assert rel_err(mean, mean_ref) < 1e-6 and rel_err(rstd, rstd_ref) < 1e-6


@pytest.mark.interpreter
def test_row_strided_view_inputs_match_reference():
    """x and residual may be column slices of wider tensors: only unit stride on the last dimension is needed."""
    (wide_x, wide_r, weight, bias), wide_dy = random_inputs(9, 80, torch.float32, seed=3)
    x, residual = wide_x[:, 8:40], wide_r[:, 40:72]
    dy = wide_dy[:, 16:48]
    assert not x.is_contiguous() and not residual.is_contiguous() and not dy.is_contiguous()
    inputs = (x, residual, weight[:32].contiguous(), bias[:32].contiguous())
    y, grads = run_kernel(inputs, dy)
    assert_outputs_match(y, grads, inputs, dy, reference(inputs, dy, None, 0.0), 1e-5)


@pytest.mark.interpreter
def test_mixed_activation_dtypes_give_each_gradient_its_input_dtype():
    """A float32 residual stream (the embeddings' sum) with a float16 x: y is float16, dresidual float32."""
    (x, residual, weight, bias), dy = random_inputs(5, 48, torch.float16, seed=6, param_dtype=torch.bfloat16)
    inputs = (x, residual.float(), weight, bias)
    y, grads = run_kernel(inputs, dy)
    assert_outputs_match(y, grads, inputs, dy, reference(inputs, dy, None, 0.0), 1e-2)


def with_projection_bias(inputs, seed: int):
    """inputs + (x_bias,): a random projection bias in the parameters' dtype."""
    hidden, param_dtype = inputs[2].shape[0], inputs[2].dtype
    x_bias = 0.5 * torch.randn(hidden, generator=torch.Generator().manual_seed(seed))
    return (*inputs, x_bias.to(dtype=param_dtype, device=DEVICE))


@pytest.mark.interpreter
@pytest.mark.parametrize("tokens,hidden", [(11, 100), (3, 768), (1, 1), (0, 8)])
@pytest.mark.parametrize("dtype,param_dtype,bound", DTYPES)
def test_projection_bias_joins_x_before_dropout_and_gets_its_gradient(tokens, hidden, dtype, param_dtype, bound):
    """x_bias (the bias of the projection that produced x) is added to x before the sum; its gradient, the column
    sums of dx, comes out of the backward kernel's row groups (11 rows: unequal groups), in x_bias's dtype."""
    inputs, dy = random_inputs(tokens, hidden, dtype, seed=tokens + 17 * hidden, param_dtype=param_dtype)
    inputs = with_projection_bias(inputs, seed=hidden)
    y, grads = run_kernel(inputs, dy)
    assert_outputs_match(y, grads, inputs, dy, reference(inputs, dy, None, 0.0), bound)


@pytest.mark.interpreter
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_projection_bias_is_dropped_with_x_and_its_gradient_follows_the_mask(p):
    """LN(dropout(x + x_bias) + residual): a dropped element loses its bias too, and contributes nothing to the bias
    gradient."""
    inputs, dy = random_inputs(11, 100, torch.float16, seed=21, param_dtype=torch.float32)
    inputs = with_projection_bias(inputs, seed=22)
    torch.manual_seed(6)
    y, grads = run_kernel(inputs, dy, p)
    keep = dropout_mask((11, 100), p, torch_seed=6)
    assert_outputs_match(y, grads, inputs, dy, reference(inputs, dy, keep, p), 2e-3)


@pytest.mark.interpreter
def test_without_projection_bias_the_op_returns_an_empty_bias_gradient():
    (x, residual, weight, bias), dy = random_inputs(5, 24, torch.float32, seed=23)
    _, mean, rstd = ln.fwd_op(x, residual, weight, bias, EPS, None, 0.0)
    *_, dx_bias = ln.bwd_op(dy, x, residual, weight, bias, mean, rstd, None, 0.0)
    assert dx_bias.shape == (0,)


@pytest.mark.interpreter
def test_zero_tokens_give_empty_outputs_and_zero_parameter_gradients():
    inputs, dy = random_inputs(0, 16, torch.float16, seed=0, param_dtype=torch.float32)
    y, (dx, dresidual, dweight, dbias) = run_kernel(inputs, dy)
    assert y.shape == dx.shape == dresidual.shape == (0, 16)
    assert dweight.dtype == dbias.dtype == torch.float32
    assert (dweight == 0).all() and (dbias == 0).all() and dweight.shape == (16,)


@pytest.mark.interpreter
def test_parameter_gradients_are_deterministic():
    inputs, dy = random_inputs(37, 100, torch.float32, seed=9)
    _, first = run_kernel(inputs, dy)
    _, again = run_kernel(inputs, dy)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.interpreter
def test_constant_rows_normalise_to_bias_without_nan():
    """A row with zero variance gives z - mean = 0 and rstd = 1 / sqrt(eps): y = bias, finite gradients."""
    (x, residual, weight, bias), dy = random_inputs(4, 32, torch.float32, seed=5)
    x = torch.full_like(x, 3.0)
    residual = torch.full_like(residual, -1.0)
    inputs = (x, residual, weight, bias)
    y, grads = run_kernel(inputs, dy)
    assert_outputs_match(y, grads, inputs, dy, reference(inputs, dy, None, 0.0), 1e-5)
    assert torch.equal(y.cpu(), bias.cpu().expand(4, 32))


# ---------------------------------------------------------------- dropout


@pytest.mark.interpreter
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_forward_and_backward_share_one_mask(p):
    """Backward regenerates the forward mask: every gradient equals the reference under the mask seen in the
    forward pass."""
    inputs, dy = random_inputs(11, 100, torch.float32, seed=11)  # interpreter: row groups of 3, 3, 3, 2
    torch.manual_seed(5)
    y, grads = run_kernel(inputs, dy, p)
    keep = dropout_mask((11, 100), p, torch_seed=5)
    assert 0 < keep.double().mean() < 1
    assert_outputs_match(y, grads, inputs, dy, reference(inputs, dy, keep, p), 1e-5)
    # dropped elements of x get no gradient, while the residual gets dz everywhere
    dx, dresidual = grads[0].cpu(), grads[1].cpu()
    assert (dx[~keep.cpu()] == 0).all() and (dresidual[~keep.cpu()] != 0).all()
    torch.testing.assert_close(dx[keep.cpu()], dresidual[keep.cpu()] / (1 - p))


@pytest.mark.interpreter
@pytest.mark.parametrize("hidden", [1, 3])
def test_dropout_on_rows_narrower_than_one_philox_draw(hidden):
    """Rows of fewer than the four numbers one Philox call gives run with dropout: y is the bias where hidden is 1,
    and with 3 columns y and the gradients match the reference under the forward's mask. (With 2 columns LayerNorm's
    output is +-weight + bias whatever the input, so its input gradients are pure rounding: not compared.)"""
    inputs, dy = random_inputs(9, hidden, torch.float32, seed=30 + hidden)
    torch.manual_seed(4)
    y, grads = run_kernel(inputs, dy, 0.5)
    if hidden == 1:
        torch.testing.assert_close(y.cpu(), inputs[3].cpu().expand(9, 1))
    else:
        keep = dropout_mask((9, hidden), 0.5, torch_seed=4)
        assert_outputs_match(y, grads, inputs, dy, reference(inputs, dy, keep, 0.5), 1e-5)


@pytest.mark.interpreter
def test_dropout_in_half_precision_with_float32_parameters_matches_reference():
    inputs, dy = random_inputs(11, 768, torch.float16, seed=12, param_dtype=torch.float32)
    torch.manual_seed(8)
    y, grads = run_kernel(inputs, dy, 0.2)
    keep = dropout_mask((11, 768), 0.2, torch_seed=8)
    assert_outputs_match(y, grads, inputs, dy, reference(inputs, dy, keep, 0.2), 2e-3)


@pytest.mark.interpreter
def test_dropout_keeps_the_expected_fraction_and_is_seeded():
    p, n = 0.3, 16 * 1024  # the GPU test below checks 4096 x 768 elements to +-0.002
    first = dropout_mask((16, 1024), p, torch_seed=0)
    again = dropout_mask((16, 1024), p, torch_seed=0)
    other = dropout_mask((16, 1024), p, torch_seed=1)
    kept = first.double().mean().item()
    assert abs(kept - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5  # five standard deviations of a binomial
    assert torch.equal(first, again), "the same torch seed must give the same mask"
    assert not torch.equal(first, other), "another torch seed must give another mask"
    # rows and columns get independent masks, not one pattern repeated
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[:, 0], first[:, 1])


@pytest.mark.interpreter
def test_zero_dropout_probability_leaves_x_untouched():
    inputs, dy = random_inputs(3, 100, torch.float32, seed=13)
    torch.manual_seed(0)
    y, _ = run_kernel(inputs, dy, 0.0)
    y_ref, _, _, _ = reference(inputs, dy, None, 0.0)
    assert rel_err(y, y_ref) < 1e-6


# ---------------------------------------------------------------- operator registration and errors


@pytest.mark.interpreter
@pytest.mark.parametrize("with_dropout,residual_dtype", [(False, torch.float16), (True, torch.float32)])
def test_operators_pass_opcheck(with_dropout, residual_dtype):
    (x, residual, weight, bias), dy = random_inputs(5, 24, torch.float16, seed=1, param_dtype=torch.float32)
    residual = residual.to(residual_dtype)
    seed = torch.tensor([1234], dtype=torch.int64, device=DEVICE) if with_dropout else None
    p = 0.25 if with_dropout else 0.0
    for x_bias in (None, torch.randn(24, device=DEVICE)):
        args = (x, residual, weight, bias, EPS, seed, p, x_bias)
        torch.library.opcheck(ln.fwd_op.default, args)
        _, mean, rstd = ln.fwd_op(*args)
        torch.library.opcheck(ln.bwd_op.default, (dy, x, residual, weight, bias, mean, rstd, seed, p, x_bias))


@pytest.mark.interpreter
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_torch_compile_fullgraph_traces_the_ops(p):
    """Fake implementations and autograd let dynamo and AOTAutograd trace forward and backward in one graph (the
    aot_eager backend runs the custom ops as they are, so this also works in the interpreter)."""
    inputs, dy = random_inputs(7, 48, torch.float16, seed=14, param_dtype=torch.float32)
    compiled = torch.compile(lambda *t: ln.dropout_add_layer_norm(*t, EPS, p) * 2.0, fullgraph=True,
                             backend="aot_eager")
    leaves = tuple(t.detach().requires_grad_() for t in inputs)
    y_comp = compiled(*leaves)
    grads_comp = torch.autograd.grad(y_comp, leaves, dy)
    assert y_comp.shape == (7, 48) and [g.dtype for g in grads_comp] == [t.dtype for t in inputs]
    if p == 0.0:
        y_eager, grads_eager = run_kernel(inputs, dy)
        torch.testing.assert_close(y_comp, 2.0 * y_eager)
        for grad_comp, grad_eager in zip(grads_comp, grads_eager):
            torch.testing.assert_close(grad_comp, 2.0 * grad_eager)


def valid_inputs(tokens=3, hidden=8):
    return (torch.zeros(tokens, hidden, device=DEVICE), torch.zeros(tokens, hidden, device=DEVICE),
            torch.ones(hidden, device=DEVICE), torch.zeros(hidden, device=DEVICE))


@pytest.mark.interpreter
def test_unsupported_reason_accepts_valid_inputs():
    assert ln.unsupported_reason(*valid_inputs()) is None
    x, residual, weight, bias = valid_inputs(hidden=ln.MAX_HIDDEN)
    assert ln.unsupported_reason(x.half(), residual.bfloat16(), weight.double(), bias.half()) is None


@pytest.mark.interpreter
@pytest.mark.parametrize("x_bias,fragment", [
    (lambda d: torch.zeros(9, device=d), "x_bias must have shape"),
    (lambda d: torch.zeros(8, dtype=torch.int64, device=d), "x_bias dtype"),
    (lambda d: torch.zeros(16, device=d)[::2], "x_bias must be contiguous"),
    (lambda d: torch.zeros(8, device="meta"), "x_bias is on meta"),
    (lambda d: [0.0] * 8, "x_bias must be a torch.Tensor"),
])
def test_unsupported_projection_bias_is_explained(x_bias, fragment):
    inputs = valid_inputs()
    bad = x_bias(DEVICE)
    reason = ln.unsupported_reason(*inputs, bad)
    assert reason is not None and fragment in reason, reason
    with pytest.raises(ValueError, match=fragment.split()[0]):
        ln.dropout_add_layer_norm(*inputs, EPS, 0.0, bad)


def test_tensors_on_a_device_the_kernels_cannot_reach_are_refused():
    inputs = [t.to("meta") for t in valid_inputs()]
    reason = ln.unsupported_reason(*inputs)
    assert reason is not None and ("CUDA" in reason or "CPU tensors" in reason), reason
    with pytest.raises(ValueError, match="is on meta"):
        ln.dropout_add_layer_norm(*inputs, EPS)


def _replace(index, make):
    def build(d):
        inputs = list(valid_inputs())
        inputs[index] = make(d)
        return inputs
    return build


@pytest.mark.interpreter
@pytest.mark.parametrize("build,fragment", [
    (_replace(0, lambda d: torch.zeros(3, 8, dtype=torch.int64, device=d)), "x dtype"),
    (_replace(1, lambda d: torch.zeros(3, 8, dtype=torch.float64, device=d)), "residual dtype"),
    (_replace(2, lambda d: torch.ones(8, dtype=torch.int32, device=d)), "weight dtype"),
    (_replace(3, lambda d: torch.zeros(8, dtype=torch.bool, device=d)), "bias dtype"),
    (_replace(0, lambda d: torch.zeros(2, 3, 8, device=d)), "(tokens, hidden)"),
    (_replace(1, lambda d: torch.zeros(3, 9, device=d)), "does not match"),
    (_replace(1, lambda d: torch.zeros(4, 8, device=d)), "does not match"),
    (_replace(2, lambda d: torch.ones(9, device=d)), "weight must have shape"),
    (_replace(3, lambda d: torch.zeros(1, 8, device=d)), "bias must have shape"),
    (_replace(0, lambda d: torch.zeros(8, 3, device=d).t()), "unit stride"),
    (_replace(1, lambda d: torch.zeros(8, 3, device=d).t()), "unit stride"),
    (_replace(2, lambda d: torch.ones(16, device=d)[::2]), "contiguous"),
    (lambda d: [torch.zeros(3, ln.MAX_HIDDEN + 1, device=d), torch.zeros(3, ln.MAX_HIDDEN + 1, device=d),
                torch.ones(ln.MAX_HIDDEN + 1, device=d), torch.zeros(ln.MAX_HIDDEN + 1, device=d)], "hidden size"),
    (lambda d: [torch.zeros(3, 0, device=d), torch.zeros(3, 0, device=d),
                torch.ones(0, device=d), torch.zeros(0, device=d)], "hidden size"),
    (_replace(3, lambda d: [0.0] * 8), "torch.Tensor"),
])
def test_unsupported_reason_explains_bad_inputs(build, fragment):
    inputs = build(DEVICE)
    reason = ln.unsupported_reason(*inputs)
    assert reason is not None and fragment in reason, reason
    with pytest.raises(ValueError):
        ln.dropout_add_layer_norm(*inputs, EPS)


@pytest.mark.interpreter
def test_inputs_on_different_devices_are_refused():
    x, residual, weight, bias = valid_inputs()
    reason = ln.unsupported_reason(x, residual, weight.to("meta"), bias)
    assert reason is not None and "device" in reason, reason


@pytest.mark.interpreter
@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_probability_out_of_range_raises_value_error(p):
    with pytest.raises(ValueError, match="dropout_p"):
        ln.dropout_add_layer_norm(*valid_inputs(), EPS, p)


@pytest.mark.interpreter
@pytest.mark.parametrize("eps", [-1e-5, float("nan")])
def test_negative_or_nan_eps_raises_value_error(eps):
    with pytest.raises(ValueError, match="eps"):
        ln.dropout_add_layer_norm(*valid_inputs(), eps)


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_gpu_bf16_model_sized_inputs_match_float64_reference(p):
    inputs, dy = random_inputs(4096, 768, torch.bfloat16, seed=21, param_dtype=torch.float32)
    torch.manual_seed(3)
    y, grads = run_kernel(inputs, dy, p)
    keep = dropout_mask((4096, 768), p, torch_seed=3) if p else None
    if p:
        assert abs(keep.double().mean().item() - (1 - p)) < 0.002
    assert_outputs_match(y, grads, inputs, dy, reference(inputs, dy, keep, p), 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [1000, ln.MAX_HIDDEN])
def test_gpu_wide_rows_match_float64_reference(hidden):
    inputs, dy = random_inputs(300, hidden, torch.float16, seed=22, param_dtype=torch.float32)
    y, grads = run_kernel(inputs, dy)
    assert_outputs_match(y, grads, inputs, dy, reference(inputs, dy, None, 0.0), 2e-3)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph_matches_eager():
    inputs, dy = random_inputs(257, 768, torch.bfloat16, seed=8, param_dtype=torch.float32)
    compiled = torch.compile(lambda *t: ln.dropout_add_layer_norm(*t, EPS) * 2.0, fullgraph=True)
    y_eager, grads_eager = run_kernel(inputs, dy)
    leaves = tuple(t.detach().requires_grad_() for t in inputs)
    y_comp = compiled(*leaves)
    grads_comp = torch.autograd.grad(y_comp, leaves, dy)
    torch.testing.assert_close(y_comp, 2.0 * y_eager)
    for grad_comp, grad_eager in zip(grads_comp, grads_eager):
        torch.testing.assert_close(grad_comp, 2.0 * grad_eager)


# ---------------------------------------------------------------- in the model


@pytest.mark.interpreter
def test_whole_model_on_the_kernels_matches_the_pytorch_path():
    """A tiny MosaicBertForMaskedLM with attention_backend='triton' (attention, GeGLU, residual LayerNorm and
    cross-entropy kernels, fp32 here) gives the logits, loss and gradients of the same model on 'torch', with ragged
    padding."""
    from configuration_mosaic_bert import MosaicBertConfig
    from modeling_mosaic_bert import MosaicBertForMaskedLM

    torch.manual_seed(0)
    models = {}
    for backend in ("triton", "torch"):
        config = MosaicBertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=48, attention_backend=backend)
        models[backend] = MosaicBertForMaskedLM(config).to(DEVICE).eval()
    models["torch"].load_state_dict(models["triton"].state_dict())
    ids = torch.randint(5, 64, (3, 9), device=DEVICE)
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5, [1] + [0] * 8], device=DEVICE)
    labels = torch.where(mask.bool(), ids, -100)
    out = {}
    for backend, model in models.items():
        result = model(input_ids=ids, attention_mask=mask, labels=labels)
        result.loss.backward()
        out[backend] = (result.logits, result.loss, [p.grad for p in model.parameters()])
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["triton"][1], out["torch"][1], rtol=1e-5, atol=1e-5)
    for g_kernel, g_torch in zip(out["triton"][2], out["torch"][2]):
        torch.testing.assert_close(g_kernel, g_torch, rtol=1e-4, atol=1e-5)
