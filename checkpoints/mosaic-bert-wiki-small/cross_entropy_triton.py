"""Per-row cross-entropy of MosaicBERT's masked-LM logits, one Triton kernel each way, reading the logits as they are.

The masked-LM loss takes the (N, V) logits of the N labelled tokens (V = 30,528 classes). Under bf16 autocast,
F.cross_entropy upcasts them to a float32 copy, writes a float32 log-softmax, and in the backward pass writes a float32
gradient of the NLL, reads it with the log-softmax, writes the float32 gradient and casts it back to bf16: counting
eager PyTorch's kernels, an (N, V) float32 tensor is read or written eight times and a bf16 one twice, about 11 GB a
step at N = 9,830. Here:

* forward reads the logits once, in their own dtype, and writes per row the loss and the float32 log-sum-exp (LSE);
* backward reads the logits once more, recomputes softmax = exp(x - LSE) and writes the gradient directly in the
  logits' dtype.

In bf16 at N = 9,830, V = 30,528 that is 0.6 GB read, then 0.6 GB read and 0.6 GB written: about 1.8 GB a step.

Public API::

    cross_entropy(logits, labels, ignore_index=-100) -> losses
    unsupported_reason(logits, labels) -> str | None

`cross_entropy` means F.cross_entropy(logits.float(), labels, reduction="none", ignore_index=ignore_index): float32
losses, 0 (and a zero gradient) on rows whose label is ignore_index. The kernels do not check labels on the host: a
label outside [0, V) that is not ignore_index gives its row a NaN loss and a NaN gradient (never an out-of-bounds read
or a plausible wrong number); callers validate labels (the model does, in one host synchronisation).

The operations are PyTorch custom ops (`fwd_op` / `bwd_op`, ``torch.ops.<OP_NAMESPACE>.cross_entropy_fwd`` /
``cross_entropy_bwd``) with fake implementations and autograd, so torch.compile can trace a model that calls
`cross_entropy`. With ``TRITON_INTERPRET=1`` set before import, the kernels run on CPU tensors in Triton's interpreter
(tests; float32 and float16 there). Shipped as Hugging Face remote code: imports only torch, triton and its sibling
triton_utils.py.

Credits: the masked-LM head and loss are MosaicML's MosaicBERT (Portes et al., 2023). The forward kernel's streaming
log-sum-exp is the online softmax (Milakov and Gimelshein, 2018) that FlashAttention (Dao et al., 2022; Dao, 2023)
uses; the forward kernel follows the Triton tutorial "Fused Softmax" (one program per row, the row's maximum
subtracted before exponentiating), and both use exp2 with log2(e) folded in, as the tutorial "Fused Attention" does.
"""

import torch
import triton
import triton.language as tl

try:  # loaded as Hub remote code, inside a package
    from .triton_utils import (INTERPRET, autograd_or_op, contiguous_reason, define_ops, dtype_reason, eager_or_op,  # noqa: I001
                               new_output, op_namespace, tensors_reason, unit_stride_reason)
except ImportError:  # loaded from a folder on sys.path (tests, scripts)
    from triton_utils import (INTERPRET, autograd_or_op, contiguous_reason, define_ops, dtype_reason, eager_or_op,  # noqa: I001
                              new_output, op_namespace, tensors_reason, unit_stride_reason)

# Columns of a row per chunk: 16 elements per thread with 8 warps (num_warps = block / 512), i.e. two 16-byte loads
# per thread in half precision (four in float32). The forward program pays two block-wide reductions (max and sum)
# per chunk, so chunks this wide keep them rare (8 per row at V = 30,528), while both kernels stay at 32 registers a
# thread (ptxas for sm_90a, no spills): 8 programs of 256 threads fill a multiprocessor, enough loads in flight to
# saturate HBM. Narrow rows get the next power of two >= V (and fewer warps) instead.
MAX_BLOCK = 4096
INTERPRET_BLOCK = 1024  # chunk width in Triton's interpreter (small, so that tests at V = 3001 cross several chunks)

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = 2^(x * log2(e)); a constexpr, so that the kernels may read it

# Forward, per row i of V logits x (read in their dtype, math in float32), one chunk of BLOCK columns at a time:
#     m' = max(m, max_j x[j]),   s' = s * 2^((m - m') * log2(e)) + sum_j 2^((x[j] - m') * log2(e))   (m = -inf, s = 0)
#     lse[i]  = m + log(s)                                                         (natural units, saved as float32)
#     loss[i] = lse[i] - x[labels[i]]   if 0 <= labels[i] < V
#               0                       if labels[i] == ignore_index   (takes precedence: it may lie in [0, V))
#               NaN                     otherwise (x[labels[i]] is never read)
# Subtracting the running max keeps 2^(...) <= 1: no overflow for large logits, no underflow of the sum for very
# negative ones. While every column so far is -inf the max is -inf, and -inf - -inf would be NaN, so the kernel
# subtracts 0 instead (every term is then 0 anyway). One program covers one row: the row's sum is a reduction, and
# N (about 10k labelled tokens) programs already fill the GPU many times over.
@triton.jit
def _ce_fwd_kernel(X, Labels, Losses, Lse, V, stride_xn, ignore_index, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xn
    offs = tl.arange(0, BLOCK)
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK):
        cols = start + offs
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp2((m - m_ref) * LOG2E) + tl.sum(tl.exp2((x - m_ref) * LOG2E), axis=0)
        m = m_new
    lse = m + tl.log(s)
    label = tl.load(Labels + row)
    ignored = label == ignore_index
    valid = (label >= 0) & (label < V)
    x_label = tl.load(x_row + label, mask=valid & (label != ignore_index), other=0.0).to(tl.float32)
    loss = tl.where(valid, lse - x_label, float("nan"))
    tl.store(Losses + row, tl.where(ignored, 0.0, loss))
    tl.store(Lse + row, lse)


# Backward, per element (i, j) of the chunk, with x = logits[i, j] in float32 and lse[i] from the forward pass:
#     softmax[j]   = exp(x - lse[i]) = 2^((x - lse[i]) * log2(e))
#     dx[i, j]     = dloss[i] * (softmax[j] - [j == labels[i]])       written in the logits' dtype
#     dx[i, :]     = 0     if labels[i] == ignore_index   (the logits of such a row are not read)
#                  = NaN   if labels[i] is otherwise outside [0, V)
# One program per (row, chunk of BLOCK columns), not one per row with a loop: nothing is reduced, so every program is
# independent, N * cdiv(V, BLOCK) of them (about 80k at N = 10k, V = 30.5k) keep many loads in flight and leave no
# tail of long programs; the per-row scalars (label, lse, dloss) that each program loads again come from cache. dloss
# may have any stride (0 when it is the expanded gradient of a sum or mean).
@triton.jit
def _ce_bwd_kernel(DLoss, X, Labels, Lse, DX, V, stride_dl, stride_xn, stride_dxn, ignore_index,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < V
    label = tl.load(Labels + row)
    ignored = label == ignore_index
    end = tl.where(ignored, 0, V)  # an ignored row reads nothing (`in_row & ~ignored` fails in the interpreter)
    x = tl.load(X + row * stride_xn + cols, mask=cols < end, other=float("-inf")).to(tl.float32)
    softmax = tl.exp2((x - tl.load(Lse + row)) * LOG2E)
    dx = tl.load(DLoss + row * stride_dl) * (softmax - tl.where(cols == label, 1.0, 0.0))
    dx = tl.where((label >= 0) & (label < V), dx, float("nan"))
    dx = tl.where(ignored, 0.0, dx)
    tl.store(DX + row * stride_dxn + cols, dx.to(DX.dtype.element_ty), mask=in_row)


# ----------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------

# bfloat16 is refused in Triton's interpreter, which converts float32 to bfloat16 by truncation (the GPU rounds).
_DTYPES = (torch.float32, torch.float16) if INTERPRET else (torch.float16, torch.bfloat16, torch.float32)


def unsupported_reason(logits, labels) -> str | None:
    """Why `cross_entropy` cannot run on these inputs, or None. Checks metadata only (no device synchronisation):
    the values of labels are not checked (see `cross_entropy`)."""
    reason = (tensors_reason(logits=logits, labels=labels) or dtype_reason("logits", logits, _DTYPES)
              or dtype_reason("labels", labels, (torch.int64,)))
    if reason is not None:
        return reason
    if logits.dim() != 2 or logits.shape[1] < 1:
        return f"logits must be (N, V) with V >= 1 classes, got shape {tuple(logits.shape)}"
    if labels.shape != logits.shape[:1]:
        return f"labels must have shape ({logits.shape[0]},) (N of logits), got {tuple(labels.shape)}"
    return unit_stride_reason("logits", logits) or contiguous_reason("labels", labels)


def _launch_config(num_classes):
    block = min(INTERPRET_BLOCK if INTERPRET else MAX_BLOCK, triton.next_power_of_2(num_classes))
    return block, min(max(block // 512, 1), 8)  # 16 elements per thread (two 16-byte loads in half precision)


def _forward(logits, labels, ignore_index):
    n, num_classes = logits.shape
    losses = new_output((n,), logits, torch.float32)
    lse = new_output((n,), logits, torch.float32)
    if n:
        block, num_warps = _launch_config(num_classes)
        _ce_fwd_kernel[(n,)](
            logits, labels, losses, lse, num_classes, logits.stride(0), ignore_index, BLOCK=block,
            num_warps=num_warps)
    return losses, lse


def _backward(dlosses, logits, labels, lse, ignore_index):
    n, num_classes = logits.shape
    dlosses = dlosses.to(torch.float32)
    dlogits = new_output(logits.shape, logits)
    if n:
        block, num_warps = _launch_config(num_classes)
        _ce_bwd_kernel[(n, triton.cdiv(num_classes, block))](
            dlosses, logits, labels, lse, dlogits, num_classes, dlosses.stride(0), logits.stride(0),
            dlogits.stride(0), ignore_index, BLOCK=block, num_warps=num_warps)
    return dlogits


def _fwd_fake(logits, labels, ignore_index):
    n = logits.shape[0]
    return logits.new_empty((n,), dtype=torch.float32), logits.new_empty((n,), dtype=torch.float32)


def _bwd_fake(dlosses, logits, labels, lse, ignore_index):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, labels, ignore_index = inputs
    _, lse = output
    ctx.save_for_backward(logits, labels, lse)
    ctx.mark_non_differentiable(lse)
    ctx.ignore_index = ignore_index


def _backward_of_forward(ctx, dlosses, dlse):
    logits, labels, lse = ctx.saved_tensors
    return backward_call(dlosses, logits, labels, lse, ctx.ignore_index), None, None


# The custom ops, in this copy's own namespace (triton_utils.op_namespace: another copy of the code in the process
# registers and runs its own ops), e.g. torch.ops.<OP_NAMESPACE>.cross_entropy_fwd.
OP_NAMESPACE = op_namespace(__file__)
fwd_op, bwd_op = define_ops(
    OP_NAMESPACE,
    ("cross_entropy_fwd", "(Tensor logits, Tensor labels, int ignore_index) -> (Tensor, Tensor)",  # losses, lse
     _forward, _fwd_fake),
    ("cross_entropy_bwd", "(Tensor dlosses, Tensor logits, Tensor labels, Tensor lse, int ignore_index) -> Tensor",
     _backward, _bwd_fake),
    _setup_context, _backward_of_forward)
# What the public functions call: the implementations directly in eager mode, the ops when traced.
forward_call = autograd_or_op(fwd_op, _forward, _setup_context, _backward_of_forward)
backward_call = eager_or_op(bwd_op, _backward)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-row cross-entropy, logsumexp(logits[i]) - logits[i, labels[i]], computed in float32.

    logits: (N, V), float16 / bfloat16 / float32 on CUDA, unit stride on the last dimension (any row stride, e.g. a
        row slice of a bigger tensor); N >= 0, V >= 1.
    labels: (N,), int64, contiguous, on the logits' device. Rows with labels[i] == ignore_index get loss 0 and a zero
        gradient. Labels are not checked: any other label outside [0, V) gives its row a NaN loss and a NaN gradient,
        so callers validate labels beforehand.
    Returns losses, (N,) float32 (reduction "none"); differentiable in logits, the gradient in the logits' dtype.
    Raises ValueError for inputs it cannot run.
    """
    reason = unsupported_reason(logits, labels)
    if reason is not None:
        raise ValueError(reason)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    losses, _ = forward_call(logits, labels, ignore_index)
    return losses
