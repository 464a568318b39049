"""The GeGLU activation of MosaicBERT's feed-forward, with its dropout, fused into one Triton kernel each way.

The feed-forward computes one projection x = h W, (total_tokens, 2 * inner), whose first half is the gate g and
second half the value v. Unfused, PyTorch reads and writes the (total_tokens, inner) intermediates five or six times
(gelu, product, dropout mask, dropout) and, in the backward pass, concatenates the two gradient halves into a new
(total_tokens, 2 * inner) tensor. Here:

* forward reads x once and writes y = dropout(gelu(g) * v), (total_tokens, inner);
* backward reads x and dy once and writes dx, (total_tokens, 2 * inner), in place of the concatenation.

The dropout mask is never stored: both passes regenerate it from a Philox seed (one int64 on the device, so no host
synchronisation) and the element's position, four numbers per Philox call.

Public API::

    geglu(x, dropout_p=0.0) -> y
    unsupported_reason(x) -> str | None

`gelu` is the exact (erf) GELU, the "gelu" activation of transformers. The operations are PyTorch custom ops
(``torch.ops.mosaic_bert.geglu_fwd`` / ``geglu_bwd``) with fake implementations and autograd, so torch.compile can
trace a model that calls `geglu`. With ``TRITON_INTERPRET=1`` set before import, the kernels run on CPU tensors in
Triton's interpreter (tests). Shipped as Hugging Face remote code: imports only torch and triton.
"""

import torch
import triton
import triton.language as tl

BLOCK = 1024  # columns of one row per program: 8 elements (16 bytes in half precision) per thread with 4 warps
NUM_WARPS = 4

# Tests set this to True to fill freshly allocated outputs with NaN, so that an element the kernels forget to write
# shows up as NaN instead of stale memory.
_POISON_OUTPUTS = False


# The dropout keep-mask of the chunk-th BLOCK of elements: [u >= p] for BLOCK uniforms u in [0, 1) from BLOCK / 4
# Philox calls on the counters chunk * BLOCK / 4 + [0, BLOCK / 4) (each call gives four numbers; one call per element
# would make the random numbers, not the memory traffic, the cost of the kernel). Distinct chunks get distinct
# counters, and forward and backward, passing the same chunk, get the same mask.
@triton.jit
def _keep_mask(Seed, p, chunk, BLOCK: tl.constexpr):
    counters = (chunk * (BLOCK // 4) + tl.arange(0, BLOCK // 4)).to(tl.uint32)
    r0, r1, r2, r3 = tl.rand4x(tl.load(Seed), counters)
    return tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK,)) >= p


# Forward, per element (t, j) with g = x[t, j], v = x[t, inner + j]:
#     gelu(g) = g * Phi(g) = 0.5 * g * (1 + erf(g / sqrt(2)))
#     y[t, j] = gelu(g) * v * keep(t, j) / (1 - p),   keep from _keep_mask of this program's chunk   (1 if p = 0)
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
        y = tl.where(_keep_mask(Seed, p, row * tl.num_programs(1) + tl.program_id(1), BLOCK), y / (1.0 - p), 0.0)
    tl.store(Y + row * stride_yt + cols, y.to(Y.dtype.element_ty), mask=in_row)


# Backward, per element, with d = dy[t, j] * keep(t, j) / (1 - p) (the same mask as the forward pass):
#     dv = d * gelu(g)
#     dg = d * v * gelu'(g),   gelu'(g) = Phi(g) + g * phi(g) = 0.5 * (1 + erf(g / sqrt(2))) + g * exp(-g^2 / 2) / sqrt(2 pi)
# written to dx[t, j] and dx[t, inner + j].
@triton.jit
def _geglu_bwd_kernel(DY, X, DX, Seed, inner, stride_dyt, stride_xt, stride_dxt, p,
                      HAS_DROPOUT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < inner
    d = tl.load(DY + row * stride_dyt + cols, mask=in_row, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        d = tl.where(_keep_mask(Seed, p, row * tl.num_programs(1) + tl.program_id(1), BLOCK), d / (1.0 - p), 0.0)
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

# True when Triton decorated the kernels for its CPU interpreter (TRITON_INTERPRET=1 at import). Read once here:
# torch.compile cannot trace type() of a Triton kernel object.
_INTERPRET = type(_geglu_fwd_kernel).__name__ == "InterpretedFunction"


def unsupported_reason(x) -> str | None:
    """Why `geglu` cannot run on x, or None. Checks metadata only (no device synchronisation)."""
    if not isinstance(x, torch.Tensor):
        return f"x must be a torch.Tensor, got {type(x).__name__}"
    if x.device.type != "cuda" and not _INTERPRET:
        return f"x is on {x.device}; the Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)"
    if _INTERPRET and x.device.type != "cpu":
        return f"x is on {x.device}; in Triton's interpreter mode the kernels run on CPU tensors"
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"x dtype {x.dtype} is not supported (float16, bfloat16, float32)"
    if x.dim() != 2 or x.shape[1] % 2:
        return f"x must be (tokens, 2 * inner), got shape {tuple(x.shape)}"
    if x.stride(1) != 1:
        return f"x must have unit stride on its last dimension, got strides {x.stride()}"
    return None


def _new_output(shape, like):
    if _POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _seed_arg(seed, x):
    return (x, False) if seed is None else (seed, True)  # x: any pointer, never read without dropout


def _forward(x, seed, p):
    tokens, inner = x.shape[0], x.shape[1] // 2
    y = _new_output((tokens, inner), x)
    if tokens and inner:
        seed_ptr, has_dropout = _seed_arg(seed, x)
        _geglu_fwd_kernel[(tokens, triton.cdiv(inner, BLOCK))](
            x, y, seed_ptr, inner, x.stride(0), y.stride(0), p, HAS_DROPOUT=has_dropout, BLOCK=BLOCK,
            num_warps=NUM_WARPS)
    return y


def _backward(dy, x, seed, p):
    tokens, inner = x.shape[0], x.shape[1] // 2
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    dx = _new_output(x.shape, x)
    if tokens and inner:
        seed_ptr, has_dropout = _seed_arg(seed, x)
        _geglu_bwd_kernel[(tokens, triton.cdiv(inner, BLOCK))](
            dy, x, dx, seed_ptr, inner, dy.stride(0), x.stride(0), dx.stride(0), p, HAS_DROPOUT=has_dropout,
            BLOCK=BLOCK, num_warps=NUM_WARPS)
    return dx


_NS = "mosaic_bert"


def _registered(name):
    try:
        getattr(getattr(torch.ops, _NS), name)
        return True
    except (AttributeError, RuntimeError):
        return False


if not _registered("geglu_fwd"):

    @torch.library.custom_op(f"{_NS}::geglu_fwd", mutates_args=(), schema="(Tensor x, Tensor? seed, float p) -> Tensor")
    def _fwd_op(x, seed, p):
        return _forward(x, seed, p)

    @_fwd_op.register_fake
    def _fwd_fake(x, seed, p):
        return x.new_empty((x.shape[0], x.shape[1] // 2))

    @torch.library.custom_op(f"{_NS}::geglu_bwd", mutates_args=(),
                             schema="(Tensor dy, Tensor x, Tensor? seed, float p) -> Tensor")
    def _bwd_op(dy, x, seed, p):
        return _backward(dy, x, seed, p)

    @_bwd_op.register_fake
    def _bwd_fake(dy, x, seed, p):
        return x.new_empty(x.shape)

    def _setup_context(ctx, inputs, output):
        x, seed, p = inputs
        ctx.save_for_backward(x, seed)
        ctx.p = p

    def _fwd_op_backward(ctx, dy):
        x, seed = ctx.saved_tensors
        return torch.ops.mosaic_bert.geglu_bwd(dy, x, seed, ctx.p), None, None

    _fwd_op.register_autograd(_fwd_op_backward, setup_context=_setup_context)


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
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    seed = torch.randint(2**31 - 1, (1,), device=x.device, dtype=torch.int64) if dropout_p > 0 else None
    return torch.ops.mosaic_bert.geglu_fwd(x, seed, float(dropout_p))
