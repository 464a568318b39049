"""Tests of geglu_triton.py (the fused GeGLU + dropout kernels) against a float64 PyTorch reference on CPU.

Tests marked `interpreter` run the kernels: on a GPU, or in Triton's CPU interpreter with TRITON_INTERPRET=1 set
before Python starts (the second stage of scripts/test.sh):
    TRITON_INTERPRET=1 python -m pytest -q -m interpreter tests/test_geglu_triton.py
Tests marked `gpu` need CUDA (and no TRITON_INTERPRET); unmarked tests run in every mode.

Kernel outputs are poisoned with NaN before the kernels write them; errors are relative, ||x - ref|| / ||ref||.
"""

import pytest
import torch
import torch.nn.functional as F

import geglu_triton as gg
import triton_utils
from conftest import KERNEL_DEVICE as DEVICE
from conftest import rel_err


def reference(x: torch.Tensor, dy: torch.Tensor, keep: torch.Tensor | None, p: float):
    """float64 y = gelu(g) * v (* keep / (1 - p)) and dx, on CPU."""
    x = x.detach().cpu().double().requires_grad_()
    gate, value = x.chunk(2, dim=-1)
    y = F.gelu(gate) * value
    if keep is not None:
        y = y * keep.cpu().double() / (1 - p)
    (dx,) = torch.autograd.grad(y, x, dy.cpu().double())
    return y.detach(), dx


def run_kernel(x: torch.Tensor, dy: torch.Tensor, p: float = 0.0):
    x = x.detach().requires_grad_()
    with triton_utils.poisoned_outputs():
        y = gg.geglu(x, p)
        (dx,) = torch.autograd.grad(y, x, dy)
    return y.detach(), dx


def random_inputs(tokens: int, inner: int, dtype: torch.dtype, seed: int, scale: float = 2.0):
    gen = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(tokens, 2 * inner, generator=gen)).to(dtype=dtype, device=DEVICE)
    dy = torch.randn(tokens, inner, generator=gen).to(dtype=dtype, device=DEVICE)
    return x, dy


def dropout_mask(shape, p: float, torch_seed: int) -> torch.Tensor:
    """The kernel's keep-mask for a call made right after torch.manual_seed(torch_seed): the mask depends only on
    the seed and the element's index, so a gate = value = 1 input (gelu(1) * 1 > 0) reveals it exactly."""
    torch.manual_seed(torch_seed)
    return gg.geglu(torch.ones(shape, device=DEVICE), p) != 0


# ---------------------------------------------------------------- correctness without dropout

SHAPES = [(1, 1), (3, 5), (37, 1024), (5, 1500)]  # one element, one partial block, exact blocks, a block and a part


@pytest.mark.interpreter
@pytest.mark.parametrize("tokens,inner", SHAPES)
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
def test_forward_and_backward_match_float64_reference(tokens, inner, dtype, bound):
    x, dy = random_inputs(tokens, inner, dtype, seed=tokens * 7919 + inner)
    y, dx = run_kernel(x, dy)
    y_ref, dx_ref = reference(x, dy, None, 0.0)
    assert y.shape == (tokens, inner) and y.dtype == dtype and y.is_contiguous()
    assert dx.shape == x.shape and dx.dtype == dtype
    assert rel_err(y, y_ref) < bound
    assert rel_err(dx, dx_ref) < bound


@pytest.mark.interpreter
def test_row_strided_view_input_matches_reference():
    """The projection may be a column slice of a wider tensor: only unit stride on the last dimension is needed."""
    wide, dy = random_inputs(9, 40, torch.float32, seed=3)
    x = wide[:, 8:72]  # (9, 64): inner 32, row stride 80
    assert not x.is_contiguous()
    y, dx = run_kernel(x, dy[:, :32])
    y_ref, dx_ref = reference(x, dy[:, :32], None, 0.0)
    assert rel_err(y, y_ref) < 1e-6 and rel_err(dx, dx_ref) < 1e-6


@pytest.mark.interpreter
def test_zero_tokens_give_empty_outputs():
    x, dy = random_inputs(0, 16, torch.float32, seed=0)
    y, dx = run_kernel(x, dy)
    assert y.shape == (0, 16) and dx.shape == (0, 32)


@pytest.mark.interpreter
def test_large_gates_saturate_without_overflow():
    """gelu(g) -> g for large g and -> 0 for very negative g; the float32 math must not produce inf or NaN."""
    x = torch.tensor([[30.0, -30.0, 0.0, 1.0, 2.0, 3.0]], device=DEVICE)
    dy = torch.ones(1, 3, device=DEVICE)
    y, dx = run_kernel(x, dy)
    y_ref, dx_ref = reference(x, dy, None, 0.0)
    assert rel_err(y, y_ref) < 1e-6 and rel_err(dx, dx_ref) < 1e-6


# ---------------------------------------------------------------- dropout


@pytest.mark.interpreter
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_forward_and_backward_share_one_mask(p):
    """Backward regenerates the forward mask: dx equals the reference gradient under the mask seen in y."""
    x, dy = random_inputs(16, 300, torch.float32, seed=11)
    torch.manual_seed(5)
    y, dx = run_kernel(x, dy, p)
    keep = dropout_mask(x.shape, p, torch_seed=5)
    assert (y.cpu()[~keep.cpu()] == 0).all()
    y_ref, dx_ref = reference(x, dy, keep, p)
    assert rel_err(y, y_ref) < 1e-6 and rel_err(dx, dx_ref) < 1e-6
    # dropped elements get no gradient in either half
    assert (dx.cpu()[:, :300][~keep.cpu()] == 0).all() and (dx.cpu()[:, 300:][~keep.cpu()] == 0).all()


@pytest.mark.interpreter
def test_dropout_keeps_the_expected_fraction_and_is_seeded():
    p, n = 0.3, 16 * 512  # the GPU test below checks 1000 x 3072 elements to +-0.002
    first = dropout_mask((16, 1024), p, torch_seed=0)
    again = dropout_mask((16, 1024), p, torch_seed=0)
    other = dropout_mask((16, 1024), p, torch_seed=1)
    kept = first.double().mean().item()
    assert abs(kept - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5  # five standard deviations of a binomial
    assert torch.equal(first, again), "the same torch seed must give the same mask"
    assert not torch.equal(first, other), "another torch seed must give another mask"
    # rows and columns get independent masks, not one pattern repeated
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[:, 0], first[:, 1])


# ---------------------------------------------------------------- operator registration and errors


@pytest.mark.interpreter
def test_operators_pass_opcheck():
    x, dy = random_inputs(4, 8, torch.float32, seed=1)
    torch.library.opcheck(gg.fwd_op.default, (x, None, 0.0))
    torch.library.opcheck(gg.bwd_op.default, (dy, x, None, 0.0))


@pytest.mark.interpreter
def test_unsupported_reason_accepts_valid_inputs():
    assert gg.unsupported_reason(torch.zeros(3, 8, device=DEVICE)) is None


def test_tensors_on_a_device_the_kernels_cannot_reach_are_refused():
    x = torch.zeros(3, 8, device="meta")
    reason = gg.unsupported_reason(x)
    assert reason is not None and ("CUDA" in reason or "CPU tensors" in reason), reason
    with pytest.raises(ValueError, match="is on meta"):
        gg.geglu(x)


@pytest.mark.interpreter
@pytest.mark.parametrize("make,fragment", [
    (lambda d: torch.zeros(3, 8, dtype=torch.int64, device=d), "dtype"),
    (lambda d: torch.zeros(3, 7, device=d), "2 * inner"),
    (lambda d: torch.zeros(2, 3, 8, device=d), "2 * inner"),
    (lambda d: torch.zeros(8, 3, device=d).t(), "unit stride"),
    (lambda d: [[0.0, 1.0]], "torch.Tensor"),
])
def test_unsupported_reason_explains_bad_inputs(make, fragment):
    x = make(DEVICE)
    reason = gg.unsupported_reason(x)
    assert reason is not None and fragment in reason, reason
    with pytest.raises(ValueError):
        gg.geglu(x)


@pytest.mark.interpreter
@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_dropout_probability_out_of_range_raises_value_error(p):
    with pytest.raises(ValueError, match="dropout_p"):
        gg.geglu(torch.zeros(2, 4, device=DEVICE), p)


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,bound", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_gpu_model_sized_inputs_match_float64_reference(dtype, bound):
    x, dy = random_inputs(4099, 3072, dtype, seed=21)
    y, dx = run_kernel(x, dy)
    y_ref, dx_ref = reference(x, dy, None, 0.0)
    assert rel_err(y, y_ref) < bound and rel_err(dx, dx_ref) < bound


@pytest.mark.gpu
def test_gpu_dropout_mask_matches_between_passes_in_bf16():
    x, dy = random_inputs(1000, 3072, torch.bfloat16, seed=4)
    torch.manual_seed(3)
    y, dx = run_kernel(x, dy, 0.1)
    keep = dropout_mask(x.shape, 0.1, torch_seed=3)
    assert abs(keep.double().mean().item() - 0.9) < 0.002
    y_ref, dx_ref = reference(x, dy, keep, 0.1)
    assert rel_err(y, y_ref) < 1e-2 and rel_err(dx, dx_ref) < 1e-2


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph_matches_eager():
    x, dy = random_inputs(257, 640, torch.bfloat16, seed=8)
    compiled = torch.compile(lambda t: gg.geglu(t) * 2.0, fullgraph=True)
    y_eager, dx_eager = run_kernel(x, dy)
    xc = x.detach().requires_grad_()
    y_comp = compiled(xc)
    (dx_comp,) = torch.autograd.grad(y_comp, xc, dy)
    torch.testing.assert_close(y_comp, 2.0 * y_eager)
    torch.testing.assert_close(dx_comp, 2.0 * dx_eager)


# ---------------------------------------------------------------- in the model


@pytest.mark.interpreter
def test_feed_forward_block_takes_the_kernel_and_matches_the_pytorch_path():
    """MosaicBertGatedMLP with attention_backend='triton' runs the kernel (fp32 here) and agrees with 'torch'."""
    from configuration_mosaic_bert import MosaicBertConfig
    from modeling_mosaic_bert import MosaicBertGatedMLP

    torch.manual_seed(0)
    blocks = {}
    for backend in ("triton", "torch"):
        config = MosaicBertConfig(hidden_size=32, intermediate_size=48, num_attention_heads=2,
                                  attention_backend=backend)
        blocks[backend] = MosaicBertGatedMLP(config).to(DEVICE).eval()
    blocks["torch"].load_state_dict(blocks["triton"].state_dict())
    h = torch.randn(11, 32, device=DEVICE)
    assert blocks["triton"].kernel_unsupported_reason(torch.zeros(11, 96, device=DEVICE)) is None
    assert blocks["torch"].kernel_unsupported_reason(torch.zeros(11, 96, device=DEVICE)) is not None
    outs, grads = {}, {}
    for backend, block in blocks.items():
        x = h.clone().requires_grad_()
        outs[backend] = block(x)
        (grads[backend],) = torch.autograd.grad(outs[backend].square().sum(), x)
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=1e-5, atol=1e-5)
