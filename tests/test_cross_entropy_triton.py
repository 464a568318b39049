"""Tests of cross_entropy_triton.py (the fused cross-entropy kernels) against a float64 PyTorch reference on CPU.

Tests marked `interpreter` run the kernels: on a GPU, or in Triton's CPU interpreter with TRITON_INTERPRET=1 set
before Python starts (the second stage of scripts/test.sh):
    TRITON_INTERPRET=1 python -m pytest -q -m interpreter tests/test_cross_entropy_triton.py
Tests marked `gpu` need CUDA (and no TRITON_INTERPRET); unmarked tests run in every mode.

Kernel outputs (losses, the saved log-sum-exp and the gradient) are poisoned with NaN before the kernels write them;
errors are relative, ||x - ref|| / ||ref|| (printed with -s). The label column, softmax - 1, dominates the gradient's
norm, so the other columns (the softmax alone) are also compared on their own ("grad_off_label").

Bounds, from the errors measured in the interpreter. The kernels read the logits exactly and compute in float32, so
the losses agree to float32 rounding in every dtype (at most 2.8e-7): bound 1e-5. The gradient is written in the
logits' dtype, so its error is mostly that dtype's rounding:
* float32: at most 3.5e-7 on ordinary rows; softmax = exp(x - lse) inherits the float32 rounding of lse, about
  |lse| * 6e-8, so rows offset by +200 measure 1.9e-6: bound 1e-5;
* float16: at most 2.9e-4: bound 1e-3;
* bfloat16 (GPU only): the float64 gradient of the GPU cases rounded to nearest bfloat16 is off by 1.6e-3 (1.8e-3 on
  the off-label columns): bound 5e-3. (The interpreter converts float32 to bfloat16 by truncation, which doubles that
  error, 3.2e-3 to 3.8e-3 in a trial run; the GPU rounds to nearest, cvt.rn.bf16.f32.)
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
import triton

import cross_entropy_triton as ce
import triton_utils
from conftest import HAS_CUDA, INTERPRET, rel_err
from conftest import KERNEL_DEVICE as DEVICE

LOSS_BOUND = 1e-5
GRAD_BOUNDS = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}


def reference(logits: torch.Tensor, labels: torch.Tensor, dlosses: torch.Tensor, ignore_index: int = -100):
    """float64 losses (reduction "none") and dlogits for the upstream gradient dlosses, on CPU."""
    x = logits.detach().cpu().double().requires_grad_()
    losses = F.cross_entropy(x, labels.cpu(), reduction="none", ignore_index=ignore_index)
    (dx,) = torch.autograd.grad(losses, x, dlosses.cpu().double())
    return losses.detach(), dx


def run_kernel(logits: torch.Tensor, labels: torch.Tensor, dlosses: torch.Tensor, ignore_index: int = -100,
               poison: bool = True):
    """losses and dlogits of the public function, with poisoned outputs."""
    x = logits.detach().requires_grad_()
    with triton_utils.poisoned_outputs() if poison else contextlib.nullcontext():
        losses = ce.cross_entropy(x, labels, ignore_index)
        (dx,) = torch.autograd.grad(losses, x, dlosses)
    return losses.detach(), dx


def off_label(grad: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """grad on CPU in float64 with each row's label column set to 0: the softmax part alone."""
    grad = grad.detach().cpu().double()
    on_label = torch.arange(grad.shape[1])[None, :] == labels.cpu()[:, None]
    return grad.masked_fill(on_label, 0.0)


def random_inputs(n: int, v: int, dtype: torch.dtype, seed: int, scale: float = 3.0):
    """logits (scale * randn), labels in [0, V) and a random upstream gradient (not the 1 / N of a mean)."""
    gen = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(n, v, generator=gen)).to(dtype=dtype, device=DEVICE)
    labels = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    dlosses = torch.randn(n, generator=gen).to(DEVICE)
    return logits, labels, dlosses


def check(logits, labels, dlosses, ignore_index=-100, tag=""):
    """Runs the kernels, compares with the float64 reference, prints and returns the relative errors."""
    n, v = logits.shape
    losses, dx = run_kernel(logits, labels, dlosses, ignore_index)
    losses_ref, dx_ref = reference(logits, labels, dlosses, ignore_index)
    assert losses.shape == (n,) and losses.dtype == torch.float32
    assert dx.shape == (n, v) and dx.dtype == logits.dtype
    errs = {"loss": rel_err(losses, losses_ref), "grad": rel_err(dx, dx_ref),
            "grad_off_label": rel_err(off_label(dx, labels), off_label(dx_ref, labels))}
    print(f"\nRELERR {tag} dtype={logits.dtype} N={n} V={v} " + " ".join(f"{k}={e:.2e}" for k, e in errs.items()))
    grad_bound = GRAD_BOUNDS[logits.dtype]
    for name, e in errs.items():
        bound = LOSS_BOUND if name == "loss" else grad_bound
        assert e < bound, f"{name}: relative error {e:.3e} >= {bound:.1e}"
    return losses, dx


# ---------------------------------------------------------------- correctness

# V: one class (loss and gradient exactly 0), a few, one partial chunk, an odd V over several chunks (the interpreter's
# chunk is 1024 columns). N: no rows at all, one, a few, an odd number.
@pytest.mark.interpreter
@pytest.mark.parametrize("v", [1, 7, 1000, 3001])
@pytest.mark.parametrize("n", [0, 1, 5, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_losses_and_gradient_match_float64_reference(n, v, dtype):
    logits, labels, dlosses = random_inputs(n, v, dtype, seed=n * 7919 + v)
    check(logits, labels, dlosses)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_row_offsets_are_handled_by_the_max_subtraction(dtype):
    """exp(x) overflows float32 above x = 88.7 and underflows to 0 below about -104: rows shifted by +200 and -120
    only give finite, correct losses and gradients if the running max is subtracted before exponentiating."""
    logits, labels, dlosses = random_inputs(6, 3001, torch.float32, seed=4)
    logits = (logits + torch.tensor([200.0, -120.0, 0.0, 200.0, -120.0, 30.0], device=DEVICE)[:, None]).to(dtype)
    check(logits, labels, dlosses, tag="offsets")


@pytest.mark.interpreter
def test_running_max_rising_in_a_later_chunk_rescales_the_sum():
    """Each row's maximum lies in a later chunk than its first large values, so the sum of the earlier chunks must be
    rescaled when the running max rises (ascending rows), or it is right from the start (descending rows)."""
    v = 9001  # three chunks on the GPU, nine in the interpreter
    assert triton.cdiv(v, ce._launch_config(v)[0]) >= 3
    ramp = torch.linspace(-20.0, 20.0, v, device=DEVICE)
    logits = torch.stack([ramp, ramp.flip(0), ramp + 5.0, torch.zeros(v, device=DEVICE)])
    labels = torch.tensor([v - 1, 0, 4500, 17], device=DEVICE)
    check(logits, labels, torch.tensor([1.0, -2.0, 0.5, 3.0], device=DEVICE), tag="ramps")


@pytest.mark.interpreter
def test_minus_infinity_over_whole_chunks_gives_finite_results():
    """A row whose first chunks are all -inf (a masked-out part of the vocabulary) has a running max of -inf until its
    first finite logit: the kernel must not compute -inf - (-inf) = NaN on the way."""
    logits, labels, dlosses = random_inputs(3, 9000, torch.float32, seed=5)
    logits[0, :8200] = float("-inf")  # more than two chunks, on the GPU (4096) as in the interpreter (1024)
    logits[1, 1000:5000] = float("-inf")
    labels[0], labels[1] = 8500, 6000
    check(logits, labels, dlosses, tag="-inf")


@pytest.mark.interpreter
@pytest.mark.parametrize("n,v", [(37, 3001), (5, 1), (0, 7)])
def test_forward_saves_float32_row_logsumexp(n, v):
    logits, labels, _ = random_inputs(n, v, torch.float16, seed=2)
    labels[::3] = -100  # ignored rows still get their log-sum-exp
    with triton_utils.poisoned_outputs():
        losses, lse = ce.fwd_op(logits, labels, -100)
    lse_ref = torch.logsumexp(logits.cpu().double(), dim=1)
    assert lse.shape == losses.shape == (n,) and lse.dtype == torch.float32
    assert rel_err(lse, lse_ref) < 1e-6


@pytest.mark.interpreter
@pytest.mark.parametrize("ignore_index", [-100, 3])
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # interpreter: inf * 0
def test_ignored_rows_get_zero_loss_and_exactly_zero_gradient(ignore_index):
    """ignore_index wins even inside [0, V) (3 here); the ignored rows' upstream gradient is inf or NaN, and their
    gradient is still exactly 0, as in PyTorch."""
    logits, labels, dlosses = random_inputs(37, 3001, torch.float16, seed=6)
    labels[labels == ignore_index] = 4
    ignored = torch.zeros(37, dtype=torch.bool, device=DEVICE)
    ignored[[0, 5, 6, 7, 20, 36]] = True
    labels[ignored] = ignore_index
    dlosses[0], dlosses[5] = float("inf"), float("nan")
    losses, dx = run_kernel(logits, labels, dlosses, ignore_index)
    assert (losses[ignored] == 0).all()
    assert (dx[ignored] == 0).all()
    kept = ~ignored
    check(logits[kept], labels[kept], dlosses[kept], ignore_index, tag=f"ignore_index={ignore_index}")
    losses_ref, dx_ref = reference(logits, labels, torch.where(ignored, 0.0, dlosses), ignore_index)
    assert rel_err(losses, losses_ref) < LOSS_BOUND and rel_err(dx, dx_ref) < GRAD_BOUNDS[torch.float16]


@pytest.mark.interpreter
def test_all_rows_ignored_give_zero_losses_and_gradient():
    logits, labels, dlosses = random_inputs(5, 1000, torch.float32, seed=7)
    losses, dx = run_kernel(logits, torch.full_like(labels, -100), dlosses)
    assert (losses == 0).all() and (dx == 0).all()


@pytest.mark.interpreter
def test_out_of_range_label_gives_nan_for_its_row_only():
    """Labels are not checked on the host; V, -1 and a huge label give their own rows a NaN loss and gradient (never
    a number read out of bounds). Outputs are not poisoned here, so the NaN must come from the kernels."""
    v = 1000
    logits, labels, dlosses = random_inputs(8, v, torch.float32, seed=8)
    bad = torch.tensor([1, 4, 6], device=DEVICE)
    labels[bad] = torch.tensor([v, -1, 2**40], device=DEVICE)
    labels[7] = -100
    losses, dx = run_kernel(logits, labels, dlosses, poison=False)
    good = torch.ones(8, dtype=torch.bool, device=DEVICE)
    good[bad] = False
    assert losses[bad].isnan().all() and dx[bad].isnan().all()
    assert torch.isfinite(losses[good]).all() and torch.isfinite(dx[good]).all()
    losses_ref, dx_ref = reference(logits[good], labels[good], dlosses[good])
    assert rel_err(losses[good], losses_ref) < LOSS_BOUND and rel_err(dx[good], dx_ref) < 1e-6


@pytest.mark.interpreter
def test_row_strided_views_match_reference():
    """logits may be a slice of a bigger tensor: every other row, and a column window (row stride 2 * V + 3)."""
    big, _, _ = random_inputs(2 * 9, 2 * 1000 + 3, torch.float32, seed=9)
    _, labels, dlosses = random_inputs(9, 1000, torch.float32, seed=10)
    for view in (big[::2, :1000], big[3:12, 5:1005]):
        assert not view.is_contiguous() and view.stride(1) == 1
        check(view, labels, dlosses, tag=f"strides={view.stride()}")


@pytest.mark.interpreter
def test_expanded_upstream_gradient_of_a_sum_matches_reference():
    """losses.sum() / N hands the backward pass an expanded (stride 0) gradient of 1 / N."""
    logits, labels, _ = random_inputs(37, 1000, torch.float16, seed=11)
    x = logits.detach().requires_grad_()
    seen = []
    with triton_utils.poisoned_outputs():
        losses = ce.cross_entropy(x, labels)
        losses.register_hook(lambda grad: seen.append(grad.stride()))
        (dx,) = torch.autograd.grad(losses.sum() / 37, x)
    assert seen == [(0,)]
    _, dx_ref = reference(logits, labels, torch.full((37,), 1 / 37, dtype=torch.float64))
    assert rel_err(dx, dx_ref) < GRAD_BOUNDS[torch.float16]


# ---------------------------------------------------------------- operator registration and errors


@pytest.mark.interpreter
def test_operators_pass_opcheck():
    logits, labels, dlosses = random_inputs(5, 24, torch.float16, seed=1)
    labels[2] = -100
    torch.library.opcheck(ce.fwd_op.default, (logits, labels, -100))
    _, lse = ce.fwd_op(logits, labels, -100)
    torch.library.opcheck(ce.bwd_op.default, (dlosses, logits, labels, lse, -100))


@pytest.mark.interpreter
def test_torch_compile_fullgraph_traces_the_ops():
    """Fake implementations and autograd let dynamo and AOTAutograd trace forward and backward in one
    graph (the aot_eager backend runs the operators as they are, so this also works in the interpreter)."""
    logits, labels, _ = random_inputs(7, 300, torch.float16, seed=14)
    labels[3] = -100
    compiled = torch.compile(lambda x, y: ce.cross_entropy(x, y).sum() * 2.0, fullgraph=True, backend="aot_eager")
    x = logits.detach().requires_grad_()
    loss_comp = compiled(x, labels)
    (dx_comp,) = torch.autograd.grad(loss_comp, x)
    losses_eager, dx_eager = run_kernel(logits, labels, torch.ones(7, device=DEVICE))
    torch.testing.assert_close(loss_comp, 2.0 * losses_eager.sum())
    torch.testing.assert_close(dx_comp, 2.0 * dx_eager)


@pytest.mark.interpreter
def test_identical_copy_imported_under_another_name_shares_the_operators():
    """Hub remote code loads this file under its own module name next to a local copy: an identical copy must not
    define the operators again (their namespace is named after the code), and its cross_entropy runs the same ops.
    (Copies that differ register their own: tests/test_remote_code.py.)"""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cross_entropy_triton_second_copy", ce.__file__)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    assert copy.OP_NAMESPACE == ce.OP_NAMESPACE and copy.fwd_op is ce.fwd_op
    logits, labels, dlosses = random_inputs(5, 100, torch.float32, seed=15)
    assert torch.equal(copy.cross_entropy(logits, labels), ce.cross_entropy(logits, labels))


def valid_inputs(n=3, v=8):
    return torch.zeros(n, v, device=DEVICE), torch.zeros(n, dtype=torch.int64, device=DEVICE)


@pytest.mark.interpreter
def test_unsupported_reason_accepts_valid_inputs():
    assert ce.unsupported_reason(*valid_inputs()) is None
    logits, labels = valid_inputs(n=0, v=1)
    assert ce.unsupported_reason(logits.half(), labels) is None
    logits, labels = valid_inputs(v=30528)
    assert ce.unsupported_reason(logits[:, :1000], labels) is None


@pytest.mark.interpreter
@pytest.mark.parametrize("make,fragment", [
    (lambda d: (torch.zeros(3, 8, dtype=torch.int64, device=d), torch.zeros(3, dtype=torch.int64, device=d)),
     "logits dtype"),
    (lambda d: (torch.zeros(3, 8, dtype=torch.float64, device=d), torch.zeros(3, dtype=torch.int64, device=d)),
     "logits dtype"),
    (lambda d: (torch.zeros(3, 8, device=d), torch.zeros(3, dtype=torch.int32, device=d)), "labels dtype"),
    (lambda d: (torch.zeros(3, 8, device=d), torch.zeros(3, device=d)), "labels dtype"),
    (lambda d: (torch.zeros(2, 3, 8, device=d), torch.zeros(2, dtype=torch.int64, device=d)), "logits must be (N, V)"),
    (lambda d: (torch.zeros(8, device=d), torch.zeros(8, dtype=torch.int64, device=d)), "logits must be (N, V)"),
    (lambda d: (torch.zeros(3, 0, device=d), torch.zeros(3, dtype=torch.int64, device=d)), "V >= 1"),
    (lambda d: (torch.zeros(3, 8, device=d), torch.zeros(4, dtype=torch.int64, device=d)), "labels must have shape"),
    (lambda d: (torch.zeros(3, 8, device=d), torch.zeros(3, 1, dtype=torch.int64, device=d)), "labels must have shape"),
    (lambda d: (torch.zeros(8, 3, device=d).t(), torch.zeros(3, dtype=torch.int64, device=d)), "unit stride"),
    (lambda d: (torch.zeros(3, 8, device=d), torch.zeros(6, dtype=torch.int64, device=d)[::2]), "contiguous"),
    (lambda d: ([[0.0] * 8] * 3, torch.zeros(3, dtype=torch.int64, device=d)), "logits must be a torch.Tensor"),
    (lambda d: (torch.zeros(3, 8, device=d), [0, 1, 2]), "labels must be a torch.Tensor"),
])
def test_unsupported_reason_explains_bad_inputs(make, fragment):
    logits, labels = make(DEVICE)
    reason = ce.unsupported_reason(logits, labels)
    assert reason is not None and fragment in reason, reason
    with pytest.raises(ValueError):
        ce.cross_entropy(logits, labels)


def test_unsupported_reason_names_the_device_the_kernels_need():
    logits, labels = valid_inputs()
    if INTERPRET:
        reason = ce.unsupported_reason(logits.to("meta"), labels.to("meta"))
        assert reason is not None and "CPU tensors" in reason, reason
    elif not HAS_CUDA:
        reason = ce.unsupported_reason(logits, labels)
        assert reason is not None and "CUDA" in reason, reason
    else:
        reason = ce.unsupported_reason(logits.cpu(), labels.cpu())
        assert reason is not None and "CUDA" in reason, reason


@pytest.mark.interpreter
def test_inputs_on_different_devices_are_refused():
    logits, labels = valid_inputs()
    reason = ce.unsupported_reason(logits, labels.to("meta"))
    assert reason is not None and "labels is on" in reason, reason


@pytest.mark.interpreter
def test_bfloat16_logits_are_refused_only_in_the_interpreter():
    logits, labels = valid_inputs()
    reason = ce.unsupported_reason(logits.bfloat16(), labels)
    assert (reason is not None and "logits dtype" in reason) == INTERPRET, reason


@pytest.mark.interpreter
@pytest.mark.parametrize("ignore_index", [-100.0, True, None])
def test_non_integer_ignore_index_raises_value_error(ignore_index):
    with pytest.raises(ValueError, match="ignore_index"):
        ce.cross_entropy(*valid_inputs(), ignore_index)


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_model_sized_inputs_match_float64_reference(dtype):
    """The masked-LM shape: V = 30,528 (not a power of two), about 7.5 chunks of 4096 per row."""
    logits, labels, dlosses = random_inputs(1000, 30528, dtype, seed=21)
    check(logits, labels, dlosses, tag="gpu")


@pytest.mark.gpu
def test_gpu_ignored_rows_mixed_with_labelled_rows_match_reference():
    logits, labels, dlosses = random_inputs(1000, 30528, torch.bfloat16, seed=22)
    ignored = torch.rand(1000, generator=torch.Generator().manual_seed(3)).to(DEVICE) < 0.3
    labels[ignored] = -100
    losses, dx = check(logits, labels, dlosses, tag="gpu ignore")
    assert (losses[ignored] == 0).all() and (dx[ignored] == 0).all()


@pytest.mark.gpu
def test_gpu_large_row_offsets_in_bf16_match_reference():
    logits, labels, dlosses = random_inputs(64, 30528, torch.float32, seed=23)
    logits = (logits + 200.0 * torch.randn(64, 1, device=DEVICE)).bfloat16()
    check(logits, labels, dlosses, tag="gpu offsets")


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph_matches_eager():
    logits, labels, _ = random_inputs(257, 30528, torch.bfloat16, seed=8)
    labels[::5] = -100
    n_labelled = (labels != -100).sum()
    compiled = torch.compile(lambda x, y: ce.cross_entropy(x, y).sum() / n_labelled, fullgraph=True)
    x = logits.detach().requires_grad_()
    loss_comp = compiled(x, labels)
    (dx_comp,) = torch.autograd.grad(loss_comp, x)
    losses_eager, dx_eager = run_kernel(logits, labels, torch.full((257,), 1.0, device=DEVICE) / n_labelled)
    torch.testing.assert_close(loss_comp, losses_eager.sum() / n_labelled)
    torch.testing.assert_close(dx_comp, dx_eager)
    reference_loss = F.cross_entropy(logits.float(), labels)  # the model's mean over labelled rows
    torch.testing.assert_close(loss_comp, reference_loss, rtol=1e-5, atol=1e-5)
