"""MosaicBERT's residual LayerNorm, LN(dropout(x) + residual), with its dropout, fused into one Triton kernel each way.

Every encoder block ends in y = LayerNorm(dropout(x) + residual) over the hidden dimension. Unfused, PyTorch writes
the dropout mask, dropout(x) and the sum z = dropout(x) + residual, (total_tokens, hidden) each, and reads them back
in the backward pass. Here:

* forward reads x, residual, weight and bias once and writes y and, per row, the float32 mean and 1 / std; z is never
  written;
* backward reads dy, x and residual once, recomputes z, and writes dx, dresidual and, per group of rows, float32
  partial sums of dweight and dbias that torch adds up afterwards (no atomics: the result is deterministic).

x is the output of a projection (attention output, feed-forward output). Given that projection's bias as x_bias, the
kernels add it to x themselves, LN(dropout(x + x_bias) + residual), and the backward pass sums its gradient (the column
sums of dx) in the same partial-sum buffers, so the caller runs the projection without its bias and needs no separate
reduction over dx for the bias gradient.

The dropout mask is never stored: both passes regenerate it from a Philox seed (one int64 on the device, so no host
synchronisation) and the element's index, four numbers per Philox call (triton_utils.keep_mask, shared with
geglu_triton).

This is MosaicBERT's "low-precision LayerNorm": under autocast x and residual are bfloat16 while weight and bias stay
float32 parameters. The math runs in float32 whatever the input dtypes; y has x's dtype, dx x's, dresidual
residual's, and dweight / dbias the parameters' own dtypes.

Public API::

    dropout_add_layer_norm(x, residual, weight, bias, eps, dropout_p=0.0, x_bias=None) -> y
    unsupported_reason(x, residual, weight, bias, x_bias=None) -> str | None

One program normalises a whole row, so hidden is limited to MAX_HIDDEN. The operations are PyTorch custom ops
(`fwd_op` / `bwd_op`, ``torch.ops.<OP_NAMESPACE>.dropout_add_layer_norm_fwd`` / ``dropout_add_layer_norm_bwd``) with
fake implementations and autograd, so torch.compile can trace a model that calls `dropout_add_layer_norm`. With
``TRITON_INTERPRET=1`` set before import, the kernels run on CPU tensors in Triton's interpreter (tests). Shipped as
Hugging Face remote code: imports only torch, triton and its sibling triton_utils.py.

Credits: the low-precision residual LayerNorm is MosaicML's MosaicBERT (Portes et al., 2023). The kernels follow the
Triton tutorials "Layer Normalization" (one program per row forward; backward partial sums of dweight / dbias per
group of rows, reduced afterwards) and "Low-Memory Dropout" (the mask regenerated from a seed).
"""

import torch
import triton
import triton.language as tl

try:  # loaded as Hub remote code, inside a package
    from .triton_utils import (INTERPRET, autograd_or_op, contiguous_reason, define_ops, dropout_seed,  # noqa: I001
                               dtype_reason, eager_or_op, keep_mask, new_output, op_namespace, seed_arg,
                               tensors_reason, unit_stride_reason)
except ImportError:  # loaded from a folder on sys.path (tests, scripts)
    from triton_utils import (INTERPRET, autograd_or_op, contiguous_reason, define_ops, dropout_seed, dtype_reason,  # noqa: I001
                              eager_or_op, keep_mask, new_output, op_namespace, seed_arg, tensors_reason,
                              unit_stride_reason)

MAX_HIDDEN = 8192  # one row per program: BLOCK = next power of two >= hidden columns live in registers
ROW_GROUPS_PER_SM = 4  # backward programs per multiprocessor; each reduces dweight / dbias over its group of rows
INTERPRET_ROW_GROUPS = 4  # backward programs in Triton's interpreter (small, so that tests exercise row groups)


# Forward, per row t of H = hidden elements, with keep(t, j) entry j of keep_mask(Seed, p, t)   (keep = 1 if p = 0)
# and xb the projection's bias x_bias (0 without one):
#     z[j]    = (x[t, j] + xb[j]) * keep(t, j) / (1 - p) + residual[t, j]
#     mean    = sum_j z[j] / H
#     rstd    = 1 / sqrt(sum_j (z[j] - mean)^2 / H + eps)                                     (biased variance)
#     y[t, j] = (z[j] - mean) * rstd * weight[j] + bias[j]
# mean and rstd are saved (float32) for the backward pass. One program covers one row; the math runs in float32.
@triton.jit
def _ln_fwd_kernel(X, XB, R, W, B, Y, Mean, Rstd, Seed, hidden, stride_xt, stride_rt, stride_yt, eps, p,
                   HAS_X_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    in_row = cols < hidden
    x = tl.load(X + row * stride_xt + cols, mask=in_row, other=0.0).to(tl.float32)
    if HAS_X_BIAS:
        x += tl.load(XB + cols, mask=in_row, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = keep_mask(Seed, p, row, BLOCK)
        x = tl.where(keep, x / (1.0 - p), 0.0)
    z = x + tl.load(R + row * stride_rt + cols, mask=in_row, other=0.0).to(tl.float32)
    mean = tl.sum(z, axis=0) / hidden
    zc = tl.where(in_row, z - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(zc * zc, axis=0) / hidden + eps)
    w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=in_row, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_yt + cols, (zc * rstd * w + b).to(Y.dtype.element_ty), mask=in_row)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


# Backward, per row t, with z recomputed as in the forward pass (the same mask), xhat = (z - mean) * rstd and
# g = weight * dy[t]:
#     dz[j]   = rstd * (g[j] - mean_k(g[k]) - xhat[j] * mean_k(xhat[k] * g[k]))
#     dresidual[t, j] = dz[j],   dx[t, j] = dz[j] * keep(t, j) / (1 - p)
#     dweight[j] = sum_t dy[t, j] * xhat[j],   dbias[j] = sum_t dy[t, j],   dxb[j] = sum_t dx[t, j]
# Program i covers rows [i * rows_per_program, min((i + 1) * rows_per_program, tokens)), keeps its share of dweight,
# dbias (and dxb) in float32 registers and writes it to row i of the (programs, hidden) buffers DWp and DBp (and DXBp).
# tokens and rows_per_program change with the batch: not specialised on, so new token counts do not compile new
# variants.
@triton.jit(do_not_specialize=["tokens", "rows_per_program"])
def _ln_bwd_kernel(DY, X, XB, R, W, Mean, Rstd, Seed, DX, DR, DWp, DBp, DXBp, tokens, hidden, rows_per_program,
                   stride_dyt, stride_xt, stride_rt, stride_dxt, stride_drt, p,
                   HAS_X_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK: tl.constexpr):
    group = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    in_row = cols < hidden
    w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    db = tl.zeros((BLOCK,), dtype=tl.float32)
    dxb = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_X_BIAS:
        xb = tl.load(XB + cols, mask=in_row, other=0.0).to(tl.float32)
    row_start = group * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, tokens)
    for row in range(row_start, row_end):
        x = tl.load(X + row * stride_xt + cols, mask=in_row, other=0.0).to(tl.float32)
        if HAS_X_BIAS:
            x += xb
        if HAS_DROPOUT:
            keep = keep_mask(Seed, p, row, BLOCK)
            x = tl.where(keep, x / (1.0 - p), 0.0)
        z = x + tl.load(R + row * stride_rt + cols, mask=in_row, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + row)
        xhat = tl.where(in_row, (z - tl.load(Mean + row)) * rstd, 0.0)
        dy = tl.load(DY + row * stride_dyt + cols, mask=in_row, other=0.0).to(tl.float32)
        g = w * dy
        dz = (g - tl.sum(g, axis=0) / hidden - xhat * (tl.sum(xhat * g, axis=0) / hidden)) * rstd
        tl.store(DR + row * stride_drt + cols, dz.to(DR.dtype.element_ty), mask=in_row)
        if HAS_DROPOUT:
            dz = tl.where(keep, dz / (1.0 - p), 0.0)
        tl.store(DX + row * stride_dxt + cols, dz.to(DX.dtype.element_ty), mask=in_row)
        dw += dy * xhat
        db += dy
        if HAS_X_BIAS:
            dxb += dz
    tl.store(DWp + group * hidden + cols, dw, mask=in_row)
    tl.store(DBp + group * hidden + cols, db, mask=in_row)
    if HAS_X_BIAS:
        tl.store(DXBp + group * hidden + cols, dxb, mask=in_row)


# ----------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------

_ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_PARAMETER_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def unsupported_reason(x, residual, weight, bias, x_bias=None) -> str | None:
    """Why `dropout_add_layer_norm` cannot run on these inputs, or None. Checks metadata only (no synchronisation)."""
    parameters = {"weight": weight, "bias": bias} if x_bias is None else {"weight": weight, "bias": bias,
                                                                          "x_bias": x_bias}
    reason = tensors_reason(x=x, residual=residual, **parameters)
    for name, t in (("x", x), ("residual", residual)):
        reason = reason or dtype_reason(name, t, _ACTIVATION_DTYPES)
    for name, t in parameters.items():
        reason = reason or dtype_reason(name, t, _PARAMETER_DTYPES)
    if reason is not None:
        return reason
    if x.dim() != 2:
        return f"x must be (tokens, hidden), got shape {tuple(x.shape)}"
    if residual.shape != x.shape:
        return f"residual shape {tuple(residual.shape)} does not match x shape {tuple(x.shape)}"
    hidden = x.shape[1]
    for name, t in parameters.items():
        if t.shape != (hidden,):
            return f"{name} must have shape ({hidden},) (hidden of x), got {tuple(t.shape)}"
    if not 1 <= hidden <= MAX_HIDDEN:
        return (f"hidden size {hidden} is not supported: one program normalises a whole row, so hidden must be in "
                f"[1, {MAX_HIDDEN}]")
    reason = unit_stride_reason("x", x) or unit_stride_reason("residual", residual)
    for name, t in parameters.items():
        reason = reason or contiguous_reason(name, t)
    return reason


def _launch_config(hidden):
    block = max(triton.next_power_of_2(hidden), 4)  # at least one Philox call's four numbers for the dropout mask
    return block, min(max(block // 256, 1), 8)  # about 8 elements (16 bytes in half precision) per thread


def _row_groups(tokens, device):
    """(programs, rows_per_program) of the backward pass: every program gets at least one row."""
    if INTERPRET:
        max_groups = INTERPRET_ROW_GROUPS
    else:
        max_groups = ROW_GROUPS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    rows_per_program = triton.cdiv(tokens, min(tokens, max_groups))
    return triton.cdiv(tokens, rows_per_program), rows_per_program


def _forward(x, residual, weight, bias, eps, seed, p, x_bias=None):
    """Returns y, and the float32 row mean and rstd."""
    tokens, hidden = x.shape
    y = new_output((tokens, hidden), x)
    mean = new_output((tokens,), x, torch.float32)
    rstd = new_output((tokens,), x, torch.float32)
    if tokens:
        seed_ptr, has_dropout = seed_arg(seed, x)
        block, num_warps = _launch_config(hidden)
        _ln_fwd_kernel[(tokens,)](
            x, x if x_bias is None else x_bias, residual, weight, bias, y, mean, rstd, seed_ptr, hidden, x.stride(0),
            residual.stride(0), y.stride(0), eps, p, HAS_X_BIAS=x_bias is not None, HAS_DROPOUT=has_dropout,
            BLOCK=block, num_warps=num_warps)
    return y, mean, rstd


def _backward(dy, x, residual, weight, bias, mean, rstd, seed, p, x_bias=None):
    """Returns dx, dresidual, dweight, dbias and dx_bias (an empty tensor without x_bias)."""
    tokens, hidden = x.shape
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    dx = new_output(x.shape, x)
    dresidual = new_output(x.shape, residual)
    no_x_bias = x.new_empty((0,))
    if not tokens:
        dx_bias = no_x_bias if x_bias is None else torch.zeros_like(x_bias)
        return dx, dresidual, torch.zeros_like(weight), torch.zeros_like(bias), dx_bias
    programs, rows_per_program = _row_groups(tokens, x.device)
    dweight_partial = new_output((programs, hidden), x, torch.float32)
    dbias_partial = new_output((programs, hidden), x, torch.float32)
    dx_bias_partial = dbias_partial if x_bias is None else new_output((programs, hidden), x, torch.float32)
    seed_ptr, has_dropout = seed_arg(seed, x)
    block, num_warps = _launch_config(hidden)
    _ln_bwd_kernel[(programs,)](
        dy, x, x if x_bias is None else x_bias, residual, weight, mean, rstd, seed_ptr, dx, dresidual, dweight_partial,
        dbias_partial, dx_bias_partial, tokens, hidden, rows_per_program, dy.stride(0), x.stride(0),
        residual.stride(0), dx.stride(0), dresidual.stride(0), p, HAS_X_BIAS=x_bias is not None,
        HAS_DROPOUT=has_dropout, BLOCK=block, num_warps=num_warps)
    dx_bias = no_x_bias if x_bias is None else dx_bias_partial.sum(0).to(x_bias.dtype)
    return dx, dresidual, dweight_partial.sum(0).to(weight.dtype), dbias_partial.sum(0).to(bias.dtype), dx_bias


def _fwd_fake(x, residual, weight, bias, eps, seed, p, x_bias=None):
    row_stats = x.new_empty((x.shape[0],), dtype=torch.float32)
    return x.new_empty(x.shape), row_stats, row_stats.new_empty(row_stats.shape)


def _bwd_fake(dy, x, residual, weight, bias, mean, rstd, seed, p, x_bias=None):
    dx_bias = x.new_empty((0,)) if x_bias is None else x_bias.new_empty(x_bias.shape)
    return (x.new_empty(x.shape), residual.new_empty(x.shape), weight.new_empty(weight.shape),
            bias.new_empty(bias.shape), dx_bias)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, _eps, seed, p, x_bias = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, residual, weight, bias, mean, rstd, seed, x_bias)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.p = p


def _backward_of_forward(ctx, dy, dmean, drstd):
    x, residual, weight, bias, mean, rstd, seed, x_bias = ctx.saved_tensors
    dx, dresidual, dweight, dbias, dx_bias = backward_call(
        dy, x, residual, weight, bias, mean, rstd, seed, ctx.p, x_bias)
    return dx, dresidual, dweight, dbias, None, None, None, None if x_bias is None else dx_bias


# The custom ops, in this copy's own namespace (triton_utils.op_namespace: another copy of the code in the process
# registers and runs its own ops), e.g. torch.ops.<OP_NAMESPACE>.dropout_add_layer_norm_fwd.
OP_NAMESPACE = op_namespace(__file__)
fwd_op, bwd_op = define_ops(
    OP_NAMESPACE,
    ("dropout_add_layer_norm_fwd",
     "(Tensor x, Tensor residual, Tensor weight, Tensor bias, float eps, Tensor? seed, float p, "
     "Tensor? x_bias=None) -> (Tensor, Tensor, Tensor)",  # y, mean, rstd
     _forward, _fwd_fake),
    ("dropout_add_layer_norm_bwd",
     "(Tensor dy, Tensor x, Tensor residual, Tensor weight, Tensor bias, Tensor mean, Tensor rstd, Tensor? seed, "
     "float p, Tensor? x_bias=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",  # dx, dres, dw, db, dx_bias
     _backward, _bwd_fake),
    _setup_context, _backward_of_forward)
# What the public functions call: the implementations directly in eager mode, the ops when traced.
forward_call = autograd_or_op(fwd_op, _forward, _setup_context, _backward_of_forward)
backward_call = eager_or_op(bwd_op, _backward)


def dropout_add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           eps: float, dropout_p: float = 0.0, x_bias: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm(dropout(x + x_bias) + residual) over the last dimension, with elementwise affine weight and bias.

    x, residual: (tokens, hidden), float16 / bfloat16 / float32 (each its own) on CUDA, unit stride on the last
        dimension (any row stride); 1 <= hidden <= MAX_HIDDEN.
    weight, bias: (hidden,), contiguous, any float dtype (float32 parameters under autocast are fine).
    eps: added to the variance, >= 0.
    dropout_p: probability of zeroing an element of x before the sum (kept elements are scaled by 1 / (1 - p)); the
        mask comes from torch's CUDA generator through one random seed per call, so torch.manual_seed makes it
        repeatable.
    x_bias: None (the default: LayerNorm(dropout(x) + residual)), or the bias of the projection that produced x,
        (hidden,), contiguous, any float dtype: added to x before the dropout, and its gradient (the column sums of
        dx) comes out of the backward kernel, so the caller computes x without the bias.
    Returns y, (tokens, hidden), contiguous, dtype of x; differentiable in x, residual, weight, bias and x_bias
    (gradients in their own dtypes). Raises ValueError for inputs it cannot run.
    """
    reason = unsupported_reason(x, residual, weight, bias, x_bias)
    if reason is not None:
        raise ValueError(reason)
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    seed = dropout_seed(dropout_p, x.device)
    y, _, _ = forward_call(x, residual, weight, bias, float(eps), seed, float(dropout_p), x_bias)
    return y
