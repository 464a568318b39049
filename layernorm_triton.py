"""MosaicBERT's residual LayerNorm, LN(dropout(x) + residual), with its dropout, fused into one Triton kernel each way.

Every encoder block ends in y = LayerNorm(dropout(x) + residual) over the hidden dimension. Unfused, PyTorch writes
the dropout mask, dropout(x) and the sum z = dropout(x) + residual, (total_tokens, hidden) each, and reads them back
in the backward pass. Here:

* forward reads x, residual, weight and bias once and writes y and, per row, the float32 mean and 1 / std; z is never
  written;
* backward reads dy, x and residual once, recomputes z, and writes dx, dresidual and, per group of rows, float32
  partial sums of dweight and dbias that torch adds up afterwards (no atomics: the result is deterministic).

The dropout mask is never stored: both passes regenerate it from a Philox seed (one int64 on the device, so no host
synchronisation) and the element's index, four numbers per Philox call, as geglu_triton does.

This is MosaicBERT's "low-precision LayerNorm": under autocast x and residual are bfloat16 while weight and bias stay
float32 parameters. The math runs in float32 whatever the input dtypes; y has x's dtype, dx x's, dresidual
residual's, and dweight / dbias the parameters' own dtypes.

Public API::

    dropout_add_layer_norm(x, residual, weight, bias, eps, dropout_p=0.0) -> y
    unsupported_reason(x, residual, weight, bias) -> str | None

One program normalises a whole row, so hidden is limited to MAX_HIDDEN. The operations are PyTorch custom ops
(``torch.ops.mosaic_bert.dropout_add_layer_norm_fwd`` / ``dropout_add_layer_norm_bwd``) with fake implementations and
autograd, so torch.compile can trace a model that calls `dropout_add_layer_norm`. With ``TRITON_INTERPRET=1`` set
before import, the kernels run on CPU tensors in Triton's interpreter (tests). Shipped as Hugging Face remote code:
imports only torch and triton.
"""

import torch
import triton
import triton.language as tl

MAX_HIDDEN = 8192  # one row per program: BLOCK = next power of two >= hidden columns live in registers
ROW_GROUPS_PER_SM = 4  # backward programs per multiprocessor; each reduces dweight / dbias over its group of rows
INTERPRET_ROW_GROUPS = 4  # backward programs in Triton's interpreter (small, so that tests exercise row groups)

# Tests set this to True to fill freshly allocated outputs with NaN, so that an element the kernels forget to write
# shows up as NaN instead of stale memory.
_POISON_OUTPUTS = False


# The dropout keep-mask of row t: [u >= p] for BLOCK uniforms u in [0, 1) from BLOCK / 4 Philox calls on the counters
# t * BLOCK / 4 + [0, BLOCK / 4) (four numbers per call: one call per element would cost more than the row's memory
# traffic). Forward and backward, passing the same row, get the same mask.
@triton.jit
def _keep_mask(Seed, p, row, BLOCK: tl.constexpr):
    counters = (row * (BLOCK // 4) + tl.arange(0, BLOCK // 4)).to(tl.uint32)
    r0, r1, r2, r3 = tl.rand4x(tl.load(Seed), counters)
    return tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK,)) >= p


# Forward, per row t of H = hidden elements, with keep(t, j) from _keep_mask(t)   (keep = 1 if p = 0):
#     z[j]    = x[t, j] * keep(t, j) / (1 - p) + residual[t, j]
#     mean    = sum_j z[j] / H
#     rstd    = 1 / sqrt(sum_j (z[j] - mean)^2 / H + eps)                                     (biased variance)
#     y[t, j] = (z[j] - mean) * rstd * weight[j] + bias[j]
# mean and rstd are saved (float32) for the backward pass. One program covers one row; the math runs in float32.
@triton.jit
def _ln_fwd_kernel(X, R, W, B, Y, Mean, Rstd, Seed, hidden, stride_xt, stride_rt, stride_yt, eps, p,
                   HAS_DROPOUT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    in_row = cols < hidden
    x = tl.load(X + row * stride_xt + cols, mask=in_row, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = _keep_mask(Seed, p, row, BLOCK)
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
#     dweight[j] = sum_t dy[t, j] * xhat[j],   dbias[j] = sum_t dy[t, j]
# Program i covers rows [i * rows_per_program, min((i + 1) * rows_per_program, tokens)), keeps its share of dweight and
# dbias in float32 registers and writes it to row i of the (programs, hidden) buffers DWp and DBp. tokens and
# rows_per_program change with the batch: not specialised on, so new token counts do not compile new variants.
@triton.jit(do_not_specialize=["tokens", "rows_per_program"])
def _ln_bwd_kernel(DY, X, R, W, Mean, Rstd, Seed, DX, DR, DWp, DBp, tokens, hidden, rows_per_program,
                   stride_dyt, stride_xt, stride_rt, stride_dxt, stride_drt, p,
                   HAS_DROPOUT: tl.constexpr, BLOCK: tl.constexpr):
    group = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    in_row = cols < hidden
    w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    db = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = group * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, tokens)
    for row in range(row_start, row_end):
        x = tl.load(X + row * stride_xt + cols, mask=in_row, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            keep = _keep_mask(Seed, p, row, BLOCK)
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
    tl.store(DWp + group * hidden + cols, dw, mask=in_row)
    tl.store(DBp + group * hidden + cols, db, mask=in_row)


# ----------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------

# True when Triton decorated the kernels for its CPU interpreter (TRITON_INTERPRET=1 at import). Read once here:
# torch.compile cannot trace type() of a Triton kernel object.
_INTERPRET = type(_ln_fwd_kernel).__name__ == "InterpretedFunction"

_ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_PARAMETER_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def unsupported_reason(x, residual, weight, bias) -> str | None:
    """Why `dropout_add_layer_norm` cannot run on these inputs, or None. Checks metadata only (no synchronisation)."""
    named = {"x": x, "residual": residual, "weight": weight, "bias": bias}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            return f"{name} must be a torch.Tensor, got {type(t).__name__}"
    if x.device.type != "cuda" and not _INTERPRET:
        return f"x is on {x.device}; the Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)"
    if _INTERPRET and x.device.type != "cpu":
        return f"x is on {x.device}; in Triton's interpreter mode the kernels run on CPU tensors"
    for name, t in named.items():
        if t.device != x.device:
            return f"{name} is on {t.device} but x is on {x.device}; all four must be on one device"
    for name in ("x", "residual"):
        if named[name].dtype not in _ACTIVATION_DTYPES:
            return f"{name} dtype {named[name].dtype} is not supported (float16, bfloat16, float32)"
    for name in ("weight", "bias"):
        if named[name].dtype not in _PARAMETER_DTYPES:
            return f"{name} dtype {named[name].dtype} is not supported (float16, bfloat16, float32, float64)"
    if x.dim() != 2:
        return f"x must be (tokens, hidden), got shape {tuple(x.shape)}"
    if residual.shape != x.shape:
        return f"residual shape {tuple(residual.shape)} does not match x shape {tuple(x.shape)}"
    hidden = x.shape[1]
    for name in ("weight", "bias"):
        if named[name].shape != (hidden,):
            return f"{name} must have shape ({hidden},) (hidden of x), got {tuple(named[name].shape)}"
    if not 1 <= hidden <= MAX_HIDDEN:
        return (f"hidden size {hidden} is not supported: one program normalises a whole row, so hidden must be in "
                f"[1, {MAX_HIDDEN}]")
    for name in ("x", "residual"):
        if named[name].stride(1) != 1 and hidden > 1:
            return f"{name} must have unit stride on its last dimension, got strides {named[name].stride()}"
    for name in ("weight", "bias"):
        if not named[name].is_contiguous():
            return f"{name} must be contiguous, got stride {named[name].stride()}"
    return None


def _new_output(shape, like, dtype=None):
    dtype = like.dtype if dtype is None else dtype
    if _POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def _seed_arg(seed, x):
    return (x, False) if seed is None else (seed, True)  # x: any pointer, never read without dropout


def _launch_config(hidden):
    block = max(triton.next_power_of_2(hidden), 4)  # at least one Philox call's four numbers for the dropout mask
    return block, min(max(block // 256, 1), 8)  # about 8 elements (16 bytes in half precision) per thread


def _row_groups(tokens, device):
    """(programs, rows_per_program) of the backward pass: every program gets at least one row."""
    if _INTERPRET:
        max_groups = INTERPRET_ROW_GROUPS
    else:
        max_groups = ROW_GROUPS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    rows_per_program = triton.cdiv(tokens, min(tokens, max_groups))
    return triton.cdiv(tokens, rows_per_program), rows_per_program


def _forward(x, residual, weight, bias, eps, seed, p):
    tokens, hidden = x.shape
    y = _new_output((tokens, hidden), x)
    mean = _new_output((tokens,), x, torch.float32)
    rstd = _new_output((tokens,), x, torch.float32)
    if tokens:
        seed_ptr, has_dropout = _seed_arg(seed, x)
        block, num_warps = _launch_config(hidden)
        _ln_fwd_kernel[(tokens,)](
            x, residual, weight, bias, y, mean, rstd, seed_ptr, hidden, x.stride(0), residual.stride(0), y.stride(0),
            eps, p, HAS_DROPOUT=has_dropout, BLOCK=block, num_warps=num_warps)
    return y, mean, rstd


def _backward(dy, x, residual, weight, bias, mean, rstd, seed, p):
    tokens, hidden = x.shape
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    dx = _new_output(x.shape, x)
    dresidual = _new_output(x.shape, residual)
    if not tokens:
        return dx, dresidual, torch.zeros_like(weight), torch.zeros_like(bias)
    programs, rows_per_program = _row_groups(tokens, x.device)
    dweight_partial = _new_output((programs, hidden), x, torch.float32)
    dbias_partial = _new_output((programs, hidden), x, torch.float32)
    seed_ptr, has_dropout = _seed_arg(seed, x)
    block, num_warps = _launch_config(hidden)
    _ln_bwd_kernel[(programs,)](
        dy, x, residual, weight, mean, rstd, seed_ptr, dx, dresidual, dweight_partial, dbias_partial, tokens, hidden,
        rows_per_program, dy.stride(0), x.stride(0), residual.stride(0), dx.stride(0), dresidual.stride(0), p,
        HAS_DROPOUT=has_dropout, BLOCK=block, num_warps=num_warps)
    return dx, dresidual, dweight_partial.sum(0).to(weight.dtype), dbias_partial.sum(0).to(bias.dtype)


_NS = "mosaic_bert"


def _registered(name):
    try:
        getattr(getattr(torch.ops, _NS), name)
        return True
    except (AttributeError, RuntimeError):
        return False


if not _registered("dropout_add_layer_norm_fwd"):

    @torch.library.custom_op(
        f"{_NS}::dropout_add_layer_norm_fwd", mutates_args=(),
        schema="(Tensor x, Tensor residual, Tensor weight, Tensor bias, float eps, Tensor? seed, float p) "
               "-> (Tensor, Tensor, Tensor)")
    def _fwd_op(x, residual, weight, bias, eps, seed, p):
        return _forward(x, residual, weight, bias, eps, seed, p)

    @_fwd_op.register_fake
    def _fwd_fake(x, residual, weight, bias, eps, seed, p):
        tokens = x.shape[0]
        return (x.new_empty(x.shape), x.new_empty((tokens,), dtype=torch.float32),
                x.new_empty((tokens,), dtype=torch.float32))

    @torch.library.custom_op(
        f"{_NS}::dropout_add_layer_norm_bwd", mutates_args=(),
        schema="(Tensor dy, Tensor x, Tensor residual, Tensor weight, Tensor bias, Tensor mean, Tensor rstd, "
               "Tensor? seed, float p) -> (Tensor, Tensor, Tensor, Tensor)")
    def _bwd_op(dy, x, residual, weight, bias, mean, rstd, seed, p):
        return _backward(dy, x, residual, weight, bias, mean, rstd, seed, p)

    @_bwd_op.register_fake
    def _bwd_fake(dy, x, residual, weight, bias, mean, rstd, seed, p):
        return x.new_empty(x.shape), residual.new_empty(x.shape), weight.new_empty(weight.shape), \
            bias.new_empty(bias.shape)

    def _setup_context(ctx, inputs, output):
        x, residual, weight, bias, _eps, seed, p = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, residual, weight, bias, mean, rstd, seed)
        ctx.mark_non_differentiable(mean, rstd)
        ctx.p = p

    def _fwd_op_backward(ctx, dy, dmean, drstd):
        x, residual, weight, bias, mean, rstd, seed = ctx.saved_tensors
        dx, dresidual, dweight, dbias = torch.ops.mosaic_bert.dropout_add_layer_norm_bwd(
            dy, x, residual, weight, bias, mean, rstd, seed, ctx.p)
        return dx, dresidual, dweight, dbias, None, None, None

    _fwd_op.register_autograd(_fwd_op_backward, setup_context=_setup_context)


def dropout_add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           eps: float, dropout_p: float = 0.0) -> torch.Tensor:
    """LayerNorm(dropout(x) + residual) over the last dimension, with elementwise affine weight and bias.

    x, residual: (tokens, hidden), float16 / bfloat16 / float32 (each its own) on CUDA, unit stride on the last
        dimension (any row stride); 1 <= hidden <= MAX_HIDDEN.
    weight, bias: (hidden,), contiguous, any float dtype (float32 parameters under autocast are fine).
    eps: added to the variance, >= 0.
    dropout_p: probability of zeroing an element of x before the sum (kept elements are scaled by 1 / (1 - p)); the
        mask comes from torch's CUDA generator through one random seed per call, so torch.manual_seed makes it
        repeatable.
    Returns y, (tokens, hidden), contiguous, dtype of x; differentiable in x, residual, weight and bias (gradients in
    their own dtypes). Raises ValueError for inputs it cannot run.
    """
    reason = unsupported_reason(x, residual, weight, bias)
    if reason is not None:
        raise ValueError(reason)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    seed = torch.randint(2**31 - 1, (1,), device=x.device, dtype=torch.int64) if dropout_p > 0 else None
    y, _, _ = torch.ops.mosaic_bert.dropout_add_layer_norm_fwd(x, residual, weight, bias, float(eps), seed,
                                                               float(dropout_p))
    return y
