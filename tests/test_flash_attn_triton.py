"""Tests of flash_attn_triton.py against a float64 PyTorch reference computed on CPU.

Tests marked `interpreter` run the kernels on CPU tensors in Triton's interpreter;
they need TRITON_INTERPRET=1 in the environment before Python starts (Triton reads it
when the kernels are decorated, i.e. when flash_attn_triton is imported):
    TRITON_INTERPRET=1 python -m pytest -q -m interpreter tests/test_flash_attn_triton.py
Tests marked `gpu` need CUDA (and no TRITON_INTERPRET): fp16 / bf16, long sequences,
torch.compile. Unmarked tests run in every mode.

Every check draws fresh random inputs (its own seed), poisons the kernel outputs
with NaN, and compares out, dq, dk, dv by relative error ||x - ref|| / ||ref||.
"""

import math

import pytest
import torch

import flash_attn_triton as fa
import triton_utils
from conftest import INTERPRET, KERNEL_DEVICE, rel_err

# ---------------------------------------------------------------- helpers

def make_inputs(lens, heads, head_dim, dtype, device, seed, packed=True, alibi=True):
    """q, k, v as views of one packed (T, 3, H, D) tensor (like the model), or as three
    separate contiguous tensors; cu_seqlens, max_seqlen, slopes (or None), dout."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(lens)
    if packed:
        qkv = torch.randn(total, 3, heads, head_dim, generator=gen).to(dtype=dtype, device=device)
        q, k, v = qkv.unbind(1)
    else:
        q, k, v = (torch.randn(total, heads, head_dim, generator=gen).to(dtype=dtype, device=device)
                   for _ in range(3))
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens, dtype=torch.int64).cumsum(0).to(torch.int32)
    slopes = None
    if alibi:
        # the model's ALiBi slopes 2^(-8 h / H), shuffled and jittered so heads differ
        base = torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])
        slopes = (base[torch.randperm(heads, generator=gen)]
                  * (0.5 + torch.rand(heads, generator=gen))).float().to(device)
    dout = torch.randn(total, heads, head_dim, generator=gen).to(dtype=dtype, device=device)
    return q, k, v, cu.to(device), max(lens) if lens else 0, slopes, dout


def reference(q, k, v, cu, slopes, scale, dout):
    """float64 CPU attention per sequence with ALiBi; returns out, dq, dk, dv.
    Sequences of equal length are batched together (fast for many short ones)."""
    q, k, v = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    cu = cu.cpu().tolist()
    groups = {}
    for b in range(len(cu) - 1):
        if cu[b + 1] > cu[b]:
            groups.setdefault(cu[b + 1] - cu[b], []).append(cu[b])
    pieces, index = [], []
    for length, starts in groups.items():
        idx = torch.tensor(starts)[:, None] + torch.arange(length)[None, :]   # (n, L)
        qq, kk, vv = (t[idx].permute(0, 2, 1, 3) for t in (q, k, v))        # (n, H, L, D)
        scores = qq @ kk.transpose(-1, -2) * scale
        if slopes is not None:
            pos = torch.arange(length, dtype=torch.float64)
            dist = (pos[:, None] - pos[None, :]).abs()
            scores = scores - slopes.cpu().double()[None, :, None, None] * dist
        out = scores.softmax(-1) @ vv
        pieces.append(out.permute(0, 2, 1, 3).reshape(-1, q.shape[1], q.shape[2]))
        index.append(idx.reshape(-1))
    out = torch.zeros_like(q)
    if pieces:
        out = out.index_copy(0, torch.cat(index), torch.cat(pieces))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout.cpu().double(), allow_unused=True)
    dq, dk, dv = (torch.zeros_like(q) if g is None else g for g in (dq, dk, dv))
    return out.detach(), dq, dk, dv


def run_kernel(q, k, v, cu, max_seqlen, slopes, dout, scale=None):
    """Kernel forward + backward with NaN-poisoned outputs; results on CPU."""
    packed = q._base is not None and q._base is k._base is v._base
    with triton_utils.poisoned_outputs():
        if packed:  # the model's call: one (T, 3, H, D) input, one (T, 3, H, D) gradient
            qkv = q._base.detach().requires_grad_()
            out = fa.flash_attn_varlen_qkvpacked_func(qkv, cu, max_seqlen, alibi_slopes=slopes,
                                                      softmax_scale=scale)
            (dqkv,) = torch.autograd.grad(out, (qkv,), dout)
            assert dqkv.shape == qkv.shape and dqkv.is_contiguous()
            dq, dk, dv = dqkv.unbind(1)
        else:
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
            out = fa.flash_attn_varlen_func(q, k, v, cu, max_seqlen, alibi_slopes=slopes,
                                            softmax_scale=scale)
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    return [t.detach().cpu() for t in (out, dq, dk, dv)]


def check(lens, heads, head_dim, dtype, device, seed, bound, packed=True, alibi=True, scale=None):
    q, k, v, cu, max_seqlen, slopes, dout = make_inputs(
        lens, heads, head_dim, dtype, device, seed, packed=packed, alibi=alibi)
    got = run_kernel(q, k, v, cu, max_seqlen, slopes, dout, scale)
    ref = reference(q, k, v, cu, slopes, scale if scale else 1.0 / math.sqrt(head_dim), dout)
    errs = {name: rel_err(g, r) for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref)}
    print(f"\nRELERR dtype={dtype} hd={head_dim} alibi={alibi} lens={lens[:8]}"
          f"{'...' if len(lens) > 8 else ''} " + " ".join(f"{n}={e:.2e}" for n, e in errs.items()))
    assert got[0].shape == q.shape and got[0].is_contiguous()
    for name, e in errs.items():
        assert e < bound, f"{name}: relative error {e:.3e} >= {bound:.1e}"
    return errs


# ---------------------------------------------------------------- small sizes (interpreter or GPU)

RAGGED_SMALL = [1, 7, 127, 128, 129]
# float32 products are exact float32 in the interpreter (numpy), tf32 on a GPU's tensor cores
FP32_BOUND = 1e-4 if INTERPRET else 1e-2


@pytest.mark.interpreter
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("alibi", [True, False])
def test_fp32_fwd_bwd_relerr_below_1e4_in_the_interpreter(head_dim, alibi):
    """fp32 in the interpreter (numpy products, no tf32): out, dq, dk, dv within 1e-4 (1e-2 with a GPU's tf32)."""
    check(RAGGED_SMALL, 2, head_dim, torch.float32, KERNEL_DEVICE, seed=head_dim + alibi, bound=FP32_BOUND,
          alibi=alibi)


@pytest.mark.interpreter
@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("alibi", [True, False])
def test_fp16_fwd_bwd_relerr_below_1e3(head_dim, alibi):
    """fp16 inputs, fp32 accumulation: out, dq, dk, dv within 1e-3 (measured ~3e-4)."""
    check([129, 1, 64, 7], 2, head_dim, torch.float16, KERNEL_DEVICE, seed=100 + head_dim + alibi,
          bound=1e-3, alibi=alibi)


@pytest.mark.interpreter
def test_separate_contiguous_inputs_custom_scale_relerr_below_1e4():
    """q, k, v as three contiguous tensors, softmax_scale given, more heads."""
    check([65, 3, 200], 3, 32, torch.float32, KERNEL_DEVICE, seed=7, bound=FP32_BOUND, packed=False, scale=0.3)


@pytest.mark.interpreter
def test_empty_sequences_in_batch_relerr_below_1e4():
    """Zero-length sequences inside the batch are skipped; everything else written."""
    check([0, 5, 0, 130, 0], 2, 32, torch.float32, KERNEL_DEVICE, seed=11, bound=FP32_BOUND)


@pytest.mark.interpreter
def test_single_token_batch_returns_v_and_dout():
    """Only length-1 sequences: softmax over one key returns v, dv = dout, dq = dk = 0
    (up to fp32 rounding of dP - delta in the interpreter; a GPU's tf32 products round
    v, dout and dP to 10 mantissa bits)."""
    q, k, v, cu, max_seqlen, slopes, dout = make_inputs([1, 1, 1], 2, 64, torch.float32, KERNEL_DEVICE, 3)
    out, dq, dk, dv = run_kernel(q, k, v, cu, max_seqlen, slopes, dout)
    atol, grad_atol = (1e-6, 1e-5) if INTERPRET else (1e-2, 5e-2)
    torch.testing.assert_close(out, v.cpu(), rtol=0, atol=atol)
    torch.testing.assert_close(dv, dout.cpu(), rtol=0, atol=atol)
    assert dq.abs().max() < grad_atol and dk.abs().max() < grad_atol


@pytest.mark.interpreter
def test_operators_pass_opcheck():
    """torch.library.opcheck: schemas and fake (meta) kernels of the forward and backward operators."""
    q, k, v, cu, max_seqlen, slopes, dout = make_inputs([5, 17], 2, 16, torch.float32, KERNEL_DEVICE, 5)
    qkv = q._base
    torch.library.opcheck(fa.fwd_op.default, (qkv, cu, max_seqlen, slopes, 0.25))
    out, lse = fa.fwd_op(qkv, cu, max_seqlen, slopes, 0.25)
    torch.library.opcheck(fa.bwd_op.default,
                          (dout, qkv, out, lse, cu, max_seqlen, slopes, 0.25))


@pytest.mark.interpreter
def test_torch_compile_fullgraph_traces_forward_and_backward():
    """dynamo and AOTAutograd trace the autograd.Function and its operators in one graph (aot_eager runs the
    operators as they are, so this works in the interpreter); results equal eager."""
    q, k, v, cu, max_seqlen, slopes, dout = make_inputs([5, 1, 17], 2, 16, torch.float32, KERNEL_DEVICE, 8)
    compiled = torch.compile(lambda t: fa.flash_attn_varlen_qkvpacked_func(t, cu, max_seqlen, slopes) * 2.0,
                             fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, lambda t: fa.flash_attn_varlen_qkvpacked_func(t, cu, max_seqlen, slopes) * 2.0):
        qkv = q._base.detach().requires_grad_()
        out = fn(qkv)
        results.append((out, torch.autograd.grad(out, (qkv,), dout)[0]))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    assert results[0][1].abs().sum() > 0


def test_packed_function_rejects_a_qkv_that_is_not_t_3_h_d():
    """A wrongly shaped qkv gets a ValueError naming the expected layout, before any kernel runs."""
    cu = torch.tensor([0, 4], dtype=torch.int32)
    for bad in (torch.zeros(4, 2, 64), torch.zeros(4, 2, 2, 64), "qkv"):
        with pytest.raises(ValueError, match=r"\(total_tokens, 3, heads, head_dim\)"):
            fa.flash_attn_varlen_qkvpacked_func(bad, cu, 4)


# ---------------------------------------------------------------- GPU

# measured (H200, triton 3.6): fp16 out/grads <= 3.1e-4, bf16 <= 2.5e-3
GPU_BOUNDS = {torch.float16: 1e-3, torch.bfloat16: 6e-3}


@pytest.mark.gpu
def test_gpu_unsupported_inputs_raise_value_error():
    q, k, v, cu, max_seqlen, slopes, _ = make_inputs([4, 9], 2, 64, torch.float16, "cuda", 41)
    with pytest.raises(ValueError, match="dtype"):
        fa.flash_attn_varlen_func(q.double(), k.double(), v.double(), cu, max_seqlen)
    with pytest.raises(ValueError, match="CUDA"):
        fa.flash_attn_varlen_func(q.cpu(), k.cpu(), v.cpu(), cu.cpu(), max_seqlen)
    with pytest.raises(ValueError, match="head_dim"):
        fa.flash_attn_varlen_func(q[..., :48], k[..., :48], v[..., :48], cu, max_seqlen)
    with pytest.raises(ValueError, match="cu_seqlens"):
        fa.flash_attn_varlen_func(q, k, v, cu.long(), max_seqlen)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph_matches_eager():
    """A small function calling the op compiles with fullgraph=True; forward and
    backward agree with eager to rounding."""
    lens = [33, 1, 257, 128]
    q, k, v, cu, max_seqlen, slopes, dout = make_inputs(lens, 4, 64, torch.bfloat16, "cuda", 31)
    qkv = torch.stack((q, k, v), 1).detach()

    def attn(qkv, cu, slopes):
        q, k, v = qkv.unbind(1)
        out = fa.flash_attn_varlen_func(q, k, v, cu, max_seqlen, alibi_slopes=slopes)
        return out * 2.0

    compiled = torch.compile(attn, fullgraph=True)
    results = []
    for fn in (attn, compiled):
        x = qkv.clone().requires_grad_()
        out = fn(x, cu, slopes)
        (grad,) = torch.autograd.grad(out, (x,), dout)
        results.append((out.float(), grad.float()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-2, atol=1e-2)
    ref_out = reference(q, k, v, cu, slopes, 1 / 8.0, dout)[0]
    assert rel_err(results[1][0].cpu() / 2.0, ref_out) < GPU_BOUNDS[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_fp32_inputs_tf32_relerr_below_1e2():
    """fp32 inputs go through tf32 tensor-core products on the GPU."""
    check([3, 200, 77], 2, 64, torch.float32, "cuda", seed=21, bound=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("alibi", [True, False])
def test_gpu_ragged_fwd_bwd_relerr_fp16_below_1e3_bf16_below_6e3(dtype, head_dim, alibi):
    lens = [1, 7, 127, 128, 129, 1000, 300, 64]
    check(lens, 3, head_dim, dtype, "cuda", seed=1000 + head_dim + 7 * alibi,
          bound=GPU_BOUNDS[dtype], alibi=alibi)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_mixed_1_and_8192_relerr_fp16_below_1e3_bf16_below_6e3(dtype):
    """One batch mixing length-1 sequences with an 8192-token one."""
    check([1, 8192, 1, 517, 1], 2, 64, dtype, "cuda", seed=77, bound=GPU_BOUNDS[dtype])


@pytest.mark.gpu
def test_gpu_many_short_sequences_relerr_below_6e3():
    """Many sequences (grid larger than 65535 programs along batch * heads)."""
    gen = torch.Generator().manual_seed(5)
    lens = torch.randint(1, 40, (6000,), generator=gen).tolist()
    check(lens, 12, 32, torch.bfloat16, "cuda", seed=6, bound=GPU_BOUNDS[torch.bfloat16])


# ---------------------------------------------------------------- unsupported_reason

@pytest.mark.interpreter
def test_unsupported_reason_accepts_valid_inputs():
    q, k, v, cu, _, slopes, _ = make_inputs([3, 4], 2, 64, torch.float16, KERNEL_DEVICE, 1)
    assert fa.unsupported_reason(q, k, v, cu, slopes) is None
    assert fa.unsupported_reason(q, k, v, cu) is None


@pytest.mark.interpreter
def test_unsupported_reason_explains_bad_inputs():
    q, k, v, cu, _, slopes, _ = make_inputs([3, 4], 2, 64, torch.float16, KERNEL_DEVICE, 2)
    cases = {
        "dtype": (q.double(), k.double(), v.double(), cu, slopes),
        "share one dtype": (q, k.float(), v, cu, slopes),
        "head_dim": (q[..., :48], k[..., :48], v[..., :48], cu, slopes),
        "unit stride": (q.transpose(1, 2).contiguous().transpose(1, 2),) * 3 + (cu, slopes),
        "one shape": (q, k[:5], v, cu, slopes),
        "cu_seqlens": (q, k, v, cu.long(), slopes),
        "alibi_slopes must have shape": (q, k, v, cu, slopes[:1]),
        "alibi_slopes must be float32": (q, k, v, cu, slopes.double()),
        "(total_tokens, heads, head_dim)": (q[0], k[0], v[0], cu, slopes),
    }
    for expected, args in cases.items():
        reason = fa.unsupported_reason(*args)
        assert reason is not None and expected in reason, (expected, reason)


def test_unsupported_reason_names_the_device_the_kernels_need():
    """Tensors on a device the kernels cannot reach (meta, in every mode) are refused, naming the device needed."""
    q = k = v = torch.randn(5, 2, 64, dtype=torch.float16, device="meta")
    cu = torch.tensor([0, 5], dtype=torch.int32, device="meta")
    reason = fa.unsupported_reason(q, k, v, cu)
    assert reason is not None and "q is on meta" in reason
    assert ("CPU tensors" if INTERPRET else "CUDA") in reason, reason
    with pytest.raises(ValueError, match="CPU tensors" if INTERPRET else "CUDA"):
        fa.flash_attn_varlen_func(q, k, v, cu, 5)


@pytest.mark.interpreter
def test_unsupported_reason_refuses_mixed_devices_and_bfloat16_in_the_interpreter():
    q = k = v = torch.randn(5, 2, 64, dtype=torch.float16, device=KERNEL_DEVICE)
    cu = torch.tensor([0, 5], dtype=torch.int32, device=KERNEL_DEVICE)
    reason = fa.unsupported_reason(q, k, v, cu.to("meta"))
    assert reason is not None and "cu_seqlens is on" in reason
    reason = fa.unsupported_reason(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu)
    assert (reason is not None and "bfloat16" in reason) == INTERPRET, reason
