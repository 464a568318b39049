"""The GeGLU activation of MosaicBERT's feed-forward, with its dropout, fused into one Triton kernel each way.

The feed-forward computes one projection x = h W, (total_tokens, 2 * inner), whose first half is the gate g and
second half the value v. Unfused, PyTorch reads and writes the (total_tokens, inner) intermediates five or six times
(gelu, product, dropout mask, dropout) and, in the backward pass, concatenates the two gradient halves into a new
(total_tokens, 2 * inner) tensor. Here:

* forward reads x once and writes y = dropout(gelu(g) * v), (total_tokens, inner);
* backward reads x and dy once and writes dx, (total_tokens, 2 * inner), in place of the concatenation.

The dropout mask is never stored: both passes regenerate it from a Philox seed (one int64 on the device, so no host
synchronisation) and the element's position, four numbers per Philox call (triton_utils.keep_mask).

Public API::

    geglu(x, dropout_p=0.0) -> y
    unsupported_reason(x) -> str | None

`gelu` is the exact (erf) GELU, the "gelu" activation of transformers. The operations are PyTorch custom ops
(`fwd_op` / `bwd_op`, ``torch.ops.<OP_NAMESPACE>.geglu_fwd`` / ``geglu_bwd``) with fake implementations and autograd,
so torch.compile can trace a model that calls `geglu`. With ``TRITON_INTERPRET=1`` set before import, the kernels run
on CPU tensors in Triton's interpreter (tests). Shipped as Hugging Face remote code: imports only torch, triton and
its sibling triton_utils.py.

Credits: the gated feed-forward with GeGLU is MosaicML's MosaicBERT (Portes et al., 2023), after Shazeer (2020),
"GLU Variants Improve Transformer". The kernels follow the Triton tutorials: one program per block of a row as in
"Fused Softmax" / "Layer Normalization", and the dropout mask regenerated from a seed as in "Low-Memory Dropout".
"""

import torch
import triton
import triton.language as tl

try:  # loaded as Hub remote code, inside a package
    from .triton_utils import (autograd_or_op, define_ops, dropout_seed, dtype_reason, eager_or_op, keep_mask,  # noqa: I001
                               new_output, op_namespace, seed_arg, tensors_reason, unit_stride_reason)
except ImportError:  # loaded from a folder on sys.path (tests, scripts)
    from triton_utils import (autograd_or_op, define_ops, dropout_seed, dtype_reason, eager_or_op, keep_mask,  # noqa: I001
                              new_output, op_namespace, seed_arg, tensors_reason, unit_stride_reason)

BLOCK = 1024  # columns of one row per program: 8 elements (16 bytes in half precision) per thread with 4 warps
NUM_WARPS = 4


# Forward, per element (t, j) with g = x[t, j], v = x[t, inner + j]:
#     gelu(g) = g * Phi(g) = 0.5 * g * (1 + erf(g / sqrt(2)))
#     y[t, j] = gelu(g) * v * keep(t, j) / (1 - p),   keep from keep_mask of the program's chunk   (1 if p = 0)
# One program covers BLOCK columns of one row; the math runs in float32.
@triton.jit
def _geglu_fwd_kernel(X, Y, Seed, inner, stride_xt, stride_yt, p, HAS_DROPOUT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < inner
    g = tl.load(X + row * stride_xt + cols, mask=in_row, other=0.0).to(tl.float32)
    v = tl.load(X + row * stride_xt + inner + cols, mask=in_row, other=0.0).to(tl.float32)
    y = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476)) * v
    if HAS_DROPOUT:
        y = tl.where(keep_mask(Seed, p, row * tl.num_programs(1) + tl.program_id(1), BLOCK), y / (1.0 - p), 0.0)
    tl.store(Y + row * stride_yt + cols, y.to(Y.dtype.element_ty), mask=in_row)


# Backward, per element, with d = dy[t, j] * keep(t, j) / (1 - p) (the same mask as the forward pass):
#     dv = d * gelu(g)
#     dg = d * v * gelu'(g),
#     gelu'(g) = Phi(g) + g * phi(g) = 0.5 * (1 + erf(g / sqrt(2))) + g * exp(-g^2 / 2) / sqrt(2 pi)
# written to dx[t, j] and dx[t, inner + j].
@triton.jit
def _geglu_bwd_kernel(DY, X, DX, Seed, inner, stride_dyt, stride_xt, stride_dxt, p,
                      HAS_DROPOUT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < inner
    d = tl.load(DY + row * stride_dyt + cols, mask=in_row, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        d = tl.where(keep_mask(Seed, p, row * tl.num_programs(1) + tl.program_id(1), BLOCK), d / (1.0 - p), 0.0)
    g = tl.load(X + row * stride_xt + cols, mask=in_row, other=0.0).to(tl.float32)
    v = tl.load(X + row * stride_xt + inner + cols, mask=in_row, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
    pdf = tl.exp(-0.5 * g * g) * 0.3989422804014327
    dx_row = DX + row * stride_dxt
    tl.store(dx_row + cols, (d * v * (cdf + g * pdf)).to(DX.dtype.element_ty), mask=in_row)
    tl.store(dx_row + inner + cols, (d * g * cdf).to(DX.dtype.element_ty), mask=in_row)


# ----------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unsupported_reason(x) -> str | None:
    """Why `geglu` cannot run on x, or None. Checks metadata only (no device synchronisation)."""
    reason = tensors_reason(x=x) or dtype_reason("x", x, _DTYPES)
    if reason is not None:
        return reason
    if x.dim() != 2 or x.shape[1] % 2:
        return f"x must be (tokens, 2 * inner), got shape {tuple(x.shape)}"
    return unit_stride_reason("x", x)


def _forward(x, seed, p):
    tokens, inner = x.shape[0], x.shape[1] // 2
    y = new_output((tokens, inner), x)
    if tokens and inner:
        seed_ptr, has_dropout = seed_arg(seed, x)
        _geglu_fwd_kernel[(tokens, triton.cdiv(inner, BLOCK))](
            x, y, seed_ptr, inner, x.stride(0), y.stride(0), p, HAS_DROPOUT=has_dropout, BLOCK=BLOCK,
            num_warps=NUM_WARPS)
    return y


def _backward(dy, x, seed, p):
    tokens, inner = x.shape[0], x.shape[1] // 2
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    dx = new_output(x.shape, x)
    if tokens and inner:
        seed_ptr, has_dropout = seed_arg(seed, x)
        _geglu_bwd_kernel[(tokens, triton.cdiv(inner, BLOCK))](
            dy, x, dx, seed_ptr, inner, dy.stride(0), x.stride(0), dx.stride(0), p, HAS_DROPOUT=has_dropout,
            BLOCK=BLOCK, num_warps=NUM_WARPS)
    return dx


def _fwd_fake(x, seed, p):
    return x.new_empty((x.shape[0], x.shape[1] // 2))


def _bwd_fake(dy, x, seed, p):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, seed, p = inputs
    ctx.save_for_backward(x, seed)
    ctx.p = p


def _backward_of_forward(ctx, dy):
    x, seed = ctx.saved_tensors
    return backward_call(dy, x, seed, ctx.p), None, None


# The custom ops, in this copy's own namespace (triton_utils.op_namespace: another copy of the code in the process
# registers and runs its own ops), e.g. torch.ops.<OP_NAMESPACE>.geglu_fwd.
OP_NAMESPACE = op_namespace(__file__)
fwd_op, bwd_op = define_ops(
    OP_NAMESPACE,
    ("geglu_fwd", "(Tensor x, Tensor? seed, float p) -> Tensor", _forward, _fwd_fake),
    ("geglu_bwd", "(Tensor dy, Tensor x, Tensor? seed, float p) -> Tensor", _backward, _bwd_fake),
    _setup_context, _backward_of_forward)
# What the public functions call: the implementations directly in eager mode, the ops when traced.
forward_call = autograd_or_op(fwd_op, _forward, _setup_context, _backward_of_forward)
backward_call = eager_or_op(bwd_op, _backward)


def geglu(x: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """dropout(gelu(gate) * value) for x = [gate | value].

    x: (tokens, 2 * inner), float16 / bfloat16 / float32 on CUDA, unit stride on the last dimension (any row stride).
    dropout_p: probability of zeroing an element of the result (kept elements are scaled by 1 / (1 - p)); the mask
        comes from torch's CUDA generator through one random seed per call, so torch.manual_seed makes it repeatable.
    Returns (tokens, inner), contiguous, dtype of x; differentiable in x. Raises ValueError for inputs it cannot run.
    """
    reason = unsupported_reason(x)
    if reason is not None:
        raise ValueError(reason)
    return forward_call(x, dropout_seed(dropout_p, x.device), float(dropout_p))
