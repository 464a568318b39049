"""Fused variable-length ("unpadded") attention with ALiBi, written in Triton.

MosaicBERT packs the real tokens of a batch into one (total_tokens, heads, head_dim)
tensor and describes the sequences with ``cu_seqlens`` (int32, batch + 1 entries,
``cu_seqlens[b]:cu_seqlens[b + 1]`` are the tokens of sequence b). Attention is
bidirectional (non-causal) within each sequence and never crosses sequences.
ALiBi adds ``-slope[h] * |i - j|`` to the scaled score of query i and key j, where i
and j are positions inside the sequence. The bias is computed in the kernels, so no
(seq, seq) tensor is ever built.

Public API::

    flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen,
                                     alibi_slopes=None, softmax_scale=None) -> out
    flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen,
                           alibi_slopes=None, softmax_scale=None) -> out
    unsupported_reason(q, k, v, cu_seqlens, alibi_slopes=None) -> str | None

The packed form is the one the model calls: its backward writes dq, dk and dv into one
(total_tokens, 3, heads, head_dim) gradient, so nothing concatenates them afterwards.

The kernels follow FlashAttention-2:

* forward: one program per (query block, sequence, head); it streams the key/value
  blocks of its sequence through an online softmax and saves the log-sum-exp (LSE);
* backward: ``delta = rowsum(dO * O)`` (preprocess), then one program per key block
  accumulates dK and dV over the query blocks, and one program per query block
  accumulates dQ over the key blocks (two kernels, no atomics).

All exponentials are base 2: ``log2(e)`` is folded into the softmax scale and into
the ALiBi slopes, so ``exp(x) = exp2(x * log2(e))`` costs one MUFU instruction. The
saved LSE is in the same base-2 units.

The operations are registered as PyTorch custom ops (`fwd_op` / `bwd_op`,
``torch.ops.<OP_NAMESPACE>.*``) with fake (meta) implementations and autograd, so
``torch.compile(fullgraph=True)`` can trace a model that calls either function.

Running on CPU: with ``TRITON_INTERPRET=1`` set in the environment *before this
module is imported* (Triton reads it when ``@triton.jit`` decorates a kernel), the
kernels run in Triton's interpreter on CPU tensors (float32 and float16; bfloat16
matrix products are not reliable in the interpreter, so they are refused there).

This file is shipped as Hugging Face remote code: it imports only torch, triton, math
and its sibling triton_utils.py, and touches no GPU at import time.

Credits: the algorithm is FlashAttention-2 (Tri Dao, "FlashAttention-2: Faster
Attention with Better Parallelism and Work Partitioning", 2023), after FlashAttention
(Dao et al., 2022); the kernels' structure (an inner loop over key blocks, exp2 with
log2(e) folded into the scale, a preprocess kernel for delta, separate dK/dV and dQ
kernels) follows the Triton tutorial "Fused Attention". Unpadded attention with ALiBi
(Press et al., 2022) is MosaicML's MosaicBERT (Portes et al., 2023), which called
a Triton FlashAttention kernel the same way.
"""

import math

import torch
import triton
import triton.language as tl

try:  # loaded as Hub remote code, inside a package
    from .triton_utils import (INTERPRET, autograd_or_op, contiguous_reason, define_ops, dtype_reason, eager_or_op,  # noqa: I001
                               new_output, op_namespace, tensors_reason, unit_stride_reason)
except ImportError:  # loaded from a folder on sys.path (tests, scripts)
    from triton_utils import (INTERPRET, autograd_or_op, contiguous_reason, define_ops, dtype_reason, eager_or_op,  # noqa: I001
                              new_output, op_namespace, tensors_reason, unit_stride_reason)

LOG2E = 1.4426950408889634

# Tile shapes per head dimension: (BLOCK_M, BLOCK_N, num_warps, num_stages).
# Fixed tables instead of triton.autotune: autotuning would re-run at every new
# shape in the model (and costs GPU time in tests). The values are the fastest of
# the sweep in benchmarks/attention.py on an H100 (bf16, 12 heads, ragged 64-512 and
# 2048-token workloads; see benchmarks/README.md); head dims 16 and 32 reuse the 64 choices.
# Forward: BLOCK_M query rows per program, BLOCK_N keys per inner step.
FWD_CONFIGS = {
    16: (64, 64, 4, 3),
    32: (64, 64, 4, 3),
    64: (64, 64, 4, 3),
    128: (64, 32, 4, 3),
}
# Backward dK/dV: BLOCK_M queries per inner step, BLOCK_N key rows per program.
BWD_DKDV_CONFIGS = {
    16: (64, 128, 4, 4),
    32: (64, 128, 4, 4),
    64: (64, 128, 4, 4),
    128: (64, 128, 8, 3),
}
# Backward dQ: BLOCK_M query rows per program, BLOCK_N keys per inner step.
BWD_DQ_CONFIGS = {
    16: (128, 64, 4, 3),
    32: (128, 64, 4, 3),
    64: (128, 64, 4, 3),
    128: (64, 64, 4, 2),
}
SUPPORTED_HEAD_DIMS = tuple(sorted(FWD_CONFIGS))

# The integer arguments that change from batch to batch (block counts, token counts) are marked
# do_not_specialize: Triton would otherwise compile a separate variant of a kernel when such a value is 1
# or divisible by 16, so a variable-length run would keep compiling during its first steps.

# ----------------------------------------------------------------------------------
# Grid: every kernel below runs one program per (row block, sequence, head), with a
# flat 1-D grid of  num_blocks * batch * heads  programs, num_blocks computed from
# max_seqlen. Programs whose block starts past the end of their (shorter) sequence
# exit at once. We chose this over a precomputed (sequence, block) table because the
# table needs either cu_seqlens on the host (a device sync in every layer) or several
# extra small launches to build it on the device; an idle program costs well under a
# microsecond, and for BERT-style batches (lengths within a factor of ~8) at most a
# few tens of percent of the programs are idle. For very ragged batches (one long
# sequence among many short ones) the idle programs grow in number but remain cheap.
# Within one (sequence, head) the blocks are adjacent in launch order, so they run
# at about the same time and share that head's K and V through the L2 cache.
# A flat grid also avoids the 65535 limit of the grid's second and third axes.
# ----------------------------------------------------------------------------------


# The program's place in that grid: program id = (sequence * heads + head) * num_blocks + block. Returns block, head,
# the sequence's first token in the packed tensors (int64) and its length (int32).
@triton.jit
def _program_block(CuSeqlens, num_heads, num_blocks):
    pid = tl.program_id(0)
    seq = pid // num_blocks // num_heads
    start = tl.load(CuSeqlens + seq).to(tl.int64)
    seqlen = (tl.load(CuSeqlens + seq + 1) - start).to(tl.int32)
    return pid % num_blocks, pid // num_blocks % num_heads, start, seqlen


# Pointers to the (len(rows), HEAD_DIM) tile of one head at token rows `rows` of a packed (total_tokens, heads,
# HEAD_DIM) tensor whose token and head strides are stride_t and stride_h.
@triton.jit
def _tile(Base, rows, head, stride_t, stride_h, offs_d):
    return Base + rows[:, None] * stride_t + head * stride_h + offs_d[None, :]


# Forward, for one block of queries i of one (sequence, head), in base-2 units:
#   s_ij = (q_i . k_j) * scale * log2(e) - slope_h * log2(e) * |i - j|
#   m_i  = max_j s_ij,  l_i = sum_j 2^(s_ij - m_i)       (online, block by block)
#   o_i  = sum_j 2^(s_ij - m_i) v_j / l_i
#   lse_i = m_i + log2(l_i)          (saved for the backward pass)
# When a new key block raises the running max from m to m', the old sums are
# rescaled by 2^(m - m').
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
               lo, hi, offs_m, offs_n, offs_d, seqlen, qk_scale, neg_slope,
               BLOCK_N: tl.constexpr, HAS_ALIBI: tl.constexpr, MASK_N: tl.constexpr):
    """Runs the online softmax over key blocks [lo, hi). Only the last, partial key
    block of a sequence needs MASK_N (keys past the sequence end get score -inf)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASK_N:
            k = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None],
                        mask=cols[None, :] < seqlen, other=0.0)
        else:
            k = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None])
        s = tl.dot(q, k) * qk_scale                                # (BLOCK_M, BLOCK_N)
        if HAS_ALIBI:
            dist = (offs_m - start_n).to(tl.float32)[:, None] - offs_n.to(tl.float32)[None, :]
            s += tl.abs(dist) * neg_slope
        if MASK_N:
            s = tl.where(cols[None, :] < seqlen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASK_N:
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :],
                        mask=cols[:, None] < seqlen, other=0.0)
        else:
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :])
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


# Forward kernel: o_i and lse_i of one block of queries of one (sequence, head) by the math above, over the full
# key blocks, then over the last, partial one with masking.
@triton.jit(do_not_specialize=["num_m_blocks"])
def _fwd_kernel(Q, K, V, Out, Lse, CuSeqlens, Slopes,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                stride_ot, stride_oh, stride_lh, stride_sh,
                qk_scale, num_heads, num_m_blocks,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_ALIBI: tl.constexpr):
    """Q, K, V: (total_tokens, heads, HEAD_DIM), any token/head strides.
    Out: (total_tokens, heads, HEAD_DIM). Lse: (heads, total_tokens) float32, base 2."""
    pid_m, head, start, seqlen = _program_block(CuSeqlens, num_heads, num_m_blocks)
    if pid_m * BLOCK_M >= seqlen:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen
    q = tl.load(_tile(Q, start + offs_m, head, stride_qt, stride_qh, offs_d), mask=row_ok[:, None], other=0.0)
    if HAS_ALIBI:
        neg_slope = -tl.load(Slopes + head * stride_sh).to(tl.float32) * 1.4426950408889634
    else:
        neg_slope = 0.0

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_base = K + start * stride_kt + head * stride_kh
    v_base = V + start * stride_vt + head * stride_vh
    n_full = (seqlen // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                               0, n_full, offs_m, offs_n, offs_d, seqlen, qk_scale, neg_slope,
                               BLOCK_N, HAS_ALIBI, False)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                               n_full, seqlen, offs_m, offs_n, offs_d, seqlen, qk_scale, neg_slope,
                               BLOCK_N, HAS_ALIBI, True)

    acc = acc / l_i[:, None]
    tl.store(Lse + head * stride_lh + start + offs_m, m_i + tl.log2(l_i), mask=row_ok)
    tl.store(_tile(Out, start + offs_m, head, stride_ot, stride_oh, offs_d), acc.to(Out.dtype.element_ty),
             mask=row_ok[:, None])


# Backward preprocess:  delta_i = sum_d dO_id * O_id  (= sum_j P_ij dP_ij), per token
# and head. It is the softmax-Jacobian term used in dS = P * (dP - delta).
@triton.jit(do_not_specialize=["total_tokens"])
def _bwd_preprocess_kernel(Out, DOut, Delta, stride_ot, stride_oh, stride_dot, stride_doh,
                           stride_deltah, total_tokens,
                           HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr):
    """Out, DOut: (total_tokens, heads, HEAD_DIM). Delta: (heads, total_tokens) float32."""
    pid_t = tl.program_id(0)
    head = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = (offs_t < total_tokens)[:, None]
    rows = offs_t.to(tl.int64)[:, None]
    o = tl.load(Out + rows * stride_ot + head * stride_oh + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DOut + rows * stride_dot + head * stride_doh + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + head * stride_deltah + offs_t, delta, mask=offs_t < total_tokens)


# Backward for one block of keys j, looping over the query blocks i (base 2 as above):
#   P_ij  = 2^(s_ij - lse_i)                       (recomputed, exact softmax)
#   dV_j  = sum_i P_ij dO_i
#   dP_ij = dO_i . v_j
#   dS_ij = P_ij (dP_ij - delta_i)                 (gradient w.r.t. the natural-log score)
#   dK_j  = scale * sum_i dS_ij q_i
# The kernel works on transposed tiles (keys along rows), so no tile is transposed
# in registers except dO for dP.
@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                    lo, hi, offs_n, offs_m, offs_d, seqlen, qk_scale, neg_slope,
                    BLOCK_M: tl.constexpr, HAS_ALIBI: tl.constexpr, MASK_M: tl.constexpr):
    """Accumulates dK, dV of one key block over query blocks [lo, hi). Only the last,
    partial query block needs MASK_M (queries past the end contribute nothing)."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        if MASK_M:
            row_ok = rows < seqlen
            q_t = tl.load(q_base + rows[None, :] * stride_qt + offs_d[:, None],
                          mask=row_ok[None, :], other=0.0)                  # (HEAD_DIM, BLOCK_M)
            lse = tl.load(lse_base + rows, mask=row_ok, other=0.0)
        else:
            q_t = tl.load(q_base + rows[None, :] * stride_qt + offs_d[:, None])
            lse = tl.load(lse_base + rows)
        s_t = tl.dot(k, q_t) * qk_scale                                      # (BLOCK_N, BLOCK_M)
        if HAS_ALIBI:
            dist = offs_n.to(tl.float32)[:, None] - (offs_m + start_m).to(tl.float32)[None, :]
            s_t += tl.abs(dist) * neg_slope
        p_t = tl.exp2(s_t - lse[None, :])
        if MASK_M:
            p_t = tl.where(row_ok[None, :], p_t, 0.0)
            do = tl.load(do_base + rows[:, None] * stride_dot + offs_d[None, :],
                         mask=row_ok[:, None], other=0.0)                   # (BLOCK_M, HEAD_DIM)
            delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        else:
            do = tl.load(do_base + rows[:, None] * stride_dot + offs_d[None, :])
            delta = tl.load(delta_base + rows)
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))                                       # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk)
    return dk, dv


# dK / dV kernel: dK_j and dV_j of one block of keys of one (sequence, head) by the math above, over the full
# query blocks, then over the last, partial one with masking; the softmax scale multiplies dK once at the end.
@triton.jit(do_not_specialize=["num_n_blocks"])
def _bwd_dkdv_kernel(Q, K, V, DOut, Lse, Delta, DK, DV, CuSeqlens, Slopes,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                     stride_lh, stride_sh, qk_scale, sm_scale, num_heads, num_n_blocks,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_ALIBI: tl.constexpr):
    """Q, K, V, DOut, DK, DV: (total_tokens, heads, HEAD_DIM).
    Lse, Delta: (heads, total_tokens) float32. One program per BLOCK_N keys."""
    pid_n, head, start, seqlen = _program_block(CuSeqlens, num_heads, num_n_blocks)
    if pid_n * BLOCK_N >= seqlen:
        return

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = (offs_n < seqlen)[:, None]
    k = tl.load(_tile(K, start + offs_n, head, stride_kt, stride_kh, offs_d), mask=col_ok, other=0.0)
    v = tl.load(_tile(V, start + offs_n, head, stride_vt, stride_vh, offs_d), mask=col_ok, other=0.0)
    if HAS_ALIBI:
        neg_slope = -tl.load(Slopes + head * stride_sh).to(tl.float32) * 1.4426950408889634
    else:
        neg_slope = 0.0

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    q_base = Q + start * stride_qt + head * stride_qh
    do_base = DOut + start * stride_dot + head * stride_doh
    lse_base = Lse + head * stride_lh + start
    delta_base = Delta + head * stride_lh + start
    m_full = (seqlen // BLOCK_M) * BLOCK_M
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                             stride_dot, 0, m_full, offs_n, offs_m, offs_d, seqlen, qk_scale,
                             neg_slope, BLOCK_M, HAS_ALIBI, False)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt,
                             stride_dot, m_full, seqlen, offs_n, offs_m, offs_d, seqlen, qk_scale,
                             neg_slope, BLOCK_M, HAS_ALIBI, True)

    dk = dk * sm_scale
    tl.store(_tile(DK, start + offs_n, head, stride_dkt, stride_dkh, offs_d), dk.to(DK.dtype.element_ty), mask=col_ok)
    tl.store(_tile(DV, start + offs_n, head, stride_dvt, stride_dvh, offs_d), dv.to(DV.dtype.element_ty), mask=col_ok)


# Backward for one block of queries i, looping over the key blocks j:
#   P_ij  = 2^(s_ij - lse_i),  dP_ij = dO_i . v_j,  dS_ij = P_ij (dP_ij - delta_i)
#   dQ_i  = scale * sum_j dS_ij k_j
@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt,
                  lo, hi, offs_m, offs_n, offs_d, seqlen, qk_scale, neg_slope,
                  BLOCK_N: tl.constexpr, HAS_ALIBI: tl.constexpr, MASK_N: tl.constexpr):
    """Accumulates dQ of one query block over key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASK_N:
            k_t = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None],
                          mask=cols[None, :] < seqlen, other=0.0)            # (HEAD_DIM, BLOCK_N)
            v_t = tl.load(v_base + cols[None, :] * stride_vt + offs_d[:, None],
                          mask=cols[None, :] < seqlen, other=0.0)
        else:
            k_t = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None])
            v_t = tl.load(v_base + cols[None, :] * stride_vt + offs_d[:, None])
        s = tl.dot(q, k_t) * qk_scale                                        # (BLOCK_M, BLOCK_N)
        if HAS_ALIBI:
            dist = (offs_m - start_n).to(tl.float32)[:, None] - offs_n.to(tl.float32)[None, :]
            s += tl.abs(dist) * neg_slope
        p = tl.exp2(s - lse[:, None])
        if MASK_N:
            p = tl.where(cols[None, :] < seqlen, p, 0.0)
        dp = tl.dot(do, v_t)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq)
    return dq


# dQ kernel: dQ_i of one block of queries of one (sequence, head) by the math above, over the full key blocks,
# then over the last, partial one with masking; the softmax scale multiplies dQ once at the end.
@triton.jit(do_not_specialize=["num_m_blocks"])
def _bwd_dq_kernel(Q, K, V, DOut, Lse, Delta, DQ, CuSeqlens, Slopes,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lh, stride_sh,
                   qk_scale, sm_scale, num_heads, num_m_blocks,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HAS_ALIBI: tl.constexpr):
    """Q, K, V, DOut, DQ: (total_tokens, heads, HEAD_DIM).
    Lse, Delta: (heads, total_tokens) float32. One program per BLOCK_M queries."""
    pid_m, head, start, seqlen = _program_block(CuSeqlens, num_heads, num_m_blocks)
    if pid_m * BLOCK_M >= seqlen:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen
    q = tl.load(_tile(Q, start + offs_m, head, stride_qt, stride_qh, offs_d), mask=row_ok[:, None], other=0.0)
    do = tl.load(_tile(DOut, start + offs_m, head, stride_dot, stride_doh, offs_d), mask=row_ok[:, None], other=0.0)
    lse = tl.load(Lse + head * stride_lh + start + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(Delta + head * stride_lh + start + offs_m, mask=row_ok, other=0.0)
    if HAS_ALIBI:
        neg_slope = -tl.load(Slopes + head * stride_sh).to(tl.float32) * 1.4426950408889634
    else:
        neg_slope = 0.0

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_base = K + start * stride_kt + head * stride_kh
    v_base = V + start * stride_vt + head * stride_vh
    n_full = (seqlen // BLOCK_N) * BLOCK_N
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt,
                       0, n_full, offs_m, offs_n, offs_d, seqlen, qk_scale, neg_slope,
                       BLOCK_N, HAS_ALIBI, False)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt,
                       n_full, seqlen, offs_m, offs_n, offs_d, seqlen, qk_scale, neg_slope,
                       BLOCK_N, HAS_ALIBI, True)

    dq = dq * sm_scale
    tl.store(_tile(DQ, start + offs_m, head, stride_dqt, stride_dqh, offs_d), dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


# ----------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------

# bfloat16 matrix products are not reliable in Triton's interpreter: refused there.
_DTYPES = (torch.float32, torch.float16) if INTERPRET else (torch.float16, torch.bfloat16, torch.float32)


def unsupported_reason(q, k, v, cu_seqlens, alibi_slopes=None):
    """Returns why flash_attn_varlen_func cannot run on these inputs, or None.

    Checks only metadata (device, dtype, shape, strides): no device synchronization.
    It cannot check the values of cu_seqlens; callers must pass cu_seqlens[0] == 0,
    non-decreasing entries, cu_seqlens[-1] == total_tokens and max_seqlen >= every
    sequence length.
    """
    named = {"q": q, "k": k, "v": v, "cu_seqlens": cu_seqlens}
    if alibi_slopes is not None:
        named["alibi_slopes"] = alibi_slopes
    reason = tensors_reason(**named) or dtype_reason("q", q, _DTYPES)
    if reason is not None:
        return reason
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.dim() != 3:
        return f"q must be (total_tokens, heads, head_dim), got shape {tuple(q.shape)}"
    if k.shape != q.shape or v.shape != q.shape:
        return f"q, k, v must have one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    head_dim = q.shape[2]
    if head_dim not in FWD_CONFIGS:
        return f"head_dim {head_dim} is not supported (supported: {SUPPORTED_HEAD_DIMS})"
    reason = unit_stride_reason("q", q) or unit_stride_reason("k", k) or unit_stride_reason("v", v)
    if reason is not None:
        return reason
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        return (f"cu_seqlens must be 1-D int32 with batch + 1 >= 2 entries, "
                f"got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    reason = contiguous_reason("cu_seqlens", cu_seqlens)
    if reason is not None or alibi_slopes is None:
        return reason
    if alibi_slopes.dtype != torch.float32:
        return f"alibi_slopes must be float32, got {alibi_slopes.dtype}"
    if alibi_slopes.shape != (q.shape[1],):
        return f"alibi_slopes must have shape (heads,) = ({q.shape[1]},), got {tuple(alibi_slopes.shape)}"
    return None


def _slopes_args(alibi_slopes, q):
    if alibi_slopes is None:
        return q, 0, False   # any pointer; never read when HAS_ALIBI is False
    return alibi_slopes, alibi_slopes.stride(0), True


def _forward(q, k, v, cu_seqlens, max_seqlen, alibi_slopes, softmax_scale):
    """q, k, v: (T, H, D). Returns out (T, H, D) contiguous and lse (H, T) float32 (base 2)."""
    total, heads, head_dim = q.shape
    batch = cu_seqlens.numel() - 1
    out = new_output((total, heads, head_dim), q)
    lse = new_output((heads, total), q, torch.float32)
    if total == 0 or batch == 0 or max_seqlen <= 0:
        return out, lse
    block_m, block_n, num_warps, num_stages = FWD_CONFIGS[head_dim]
    num_m_blocks = triton.cdiv(max_seqlen, block_m)
    slopes, stride_s, has_alibi = _slopes_args(alibi_slopes, q)
    grid = (num_m_blocks * batch * heads,)
    _fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens, slopes,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), stride_s,
        softmax_scale * LOG2E, heads, num_m_blocks,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, HAS_ALIBI=has_alibi,
        num_warps=num_warps, num_stages=num_stages)
    return out, lse


def _backward(dout, qkv, out, lse, cu_seqlens, max_seqlen, alibi_slopes, softmax_scale):
    """qkv: (T, 3, H, D). Returns dqkv, (T, 3, H, D) contiguous: the kernels write dq, dk and dv into its three
    slices, so autograd never concatenates three gradients."""
    q, k, v = qkv.unbind(1)
    total, heads, head_dim = q.shape
    batch = cu_seqlens.numel() - 1
    dqkv = new_output((total, 3, heads, head_dim), q)
    if total == 0 or batch == 0 or max_seqlen <= 0:
        return dqkv
    dq, dk, dv = dqkv.unbind(1)
    if dout.stride(2) != 1:
        dout = dout.contiguous()
    delta = torch.empty((heads, total), dtype=torch.float32, device=q.device)
    block_t = 64
    _bwd_preprocess_kernel[(triton.cdiv(total, block_t), heads)](
        out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        delta.stride(0), total, HEAD_DIM=head_dim, BLOCK_T=block_t)

    slopes, stride_s, has_alibi = _slopes_args(alibi_slopes, q)
    qk_scale = softmax_scale * LOG2E
    block_m, block_n, num_warps, num_stages = BWD_DKDV_CONFIGS[head_dim]
    num_n_blocks = triton.cdiv(max_seqlen, block_n)
    _bwd_dkdv_kernel[(num_n_blocks * batch * heads,)](
        q, k, v, dout, lse, delta, dk, dv, cu_seqlens, slopes,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        lse.stride(0), stride_s, qk_scale, softmax_scale, heads, num_n_blocks,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, HAS_ALIBI=has_alibi,
        num_warps=num_warps, num_stages=num_stages)

    block_m, block_n, num_warps, num_stages = BWD_DQ_CONFIGS[head_dim]
    num_m_blocks = triton.cdiv(max_seqlen, block_m)
    _bwd_dq_kernel[(num_m_blocks * batch * heads,)](
        q, k, v, dout, lse, delta, dq, cu_seqlens, slopes,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
        lse.stride(0), stride_s, qk_scale, softmax_scale, heads, num_m_blocks,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, HAS_ALIBI=has_alibi,
        num_warps=num_warps, num_stages=num_stages)
    return dqkv


# ----------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------


def _fwd_packed(qkv, cu_seqlens, max_seqlen, alibi_slopes, softmax_scale):
    q, k, v = qkv.unbind(1)
    return _forward(q, k, v, cu_seqlens, max_seqlen, alibi_slopes, softmax_scale)


def _fwd_fake(qkv, cu_seqlens, max_seqlen, alibi_slopes, softmax_scale):
    total, _, heads, head_dim = qkv.shape
    return qkv.new_empty((total, heads, head_dim)), qkv.new_empty((heads, total), dtype=torch.float32)


def _bwd_fake(dout, qkv, out, lse, cu_seqlens, max_seqlen, alibi_slopes, softmax_scale):
    return qkv.new_empty(qkv.shape)


def _setup_context(ctx, inputs, output):
    qkv, cu_seqlens, max_seqlen, alibi_slopes, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, cu_seqlens, alibi_slopes)
    ctx.max_seqlen = max_seqlen
    ctx.softmax_scale = softmax_scale
    ctx.mark_non_differentiable(lse)


def _backward_of_forward(ctx, dout, dlse):
    qkv, out, lse, cu_seqlens, alibi_slopes = ctx.saved_tensors
    dqkv = backward_call(dout, qkv, out, lse, cu_seqlens, ctx.max_seqlen, alibi_slopes, ctx.softmax_scale)
    return dqkv, None, None, None, None


# The custom ops, in this copy's own namespace (triton_utils.op_namespace: another copy of the code in the process
# registers and runs its own ops), e.g. torch.ops.<OP_NAMESPACE>.flash_attn_varlen_qkvpacked_fwd.
OP_NAMESPACE = op_namespace(__file__)
fwd_op, bwd_op = define_ops(
    OP_NAMESPACE,
    ("flash_attn_varlen_qkvpacked_fwd",
     "(Tensor qkv, Tensor cu_seqlens, SymInt max_seqlen, Tensor? alibi_slopes, float softmax_scale) "
     "-> (Tensor, Tensor)",  # out, lse
     _fwd_packed, _fwd_fake),
    ("flash_attn_varlen_qkvpacked_bwd",
     "(Tensor dout, Tensor qkv, Tensor out, Tensor lse, Tensor cu_seqlens, SymInt max_seqlen, Tensor? alibi_slopes, "
     "float softmax_scale) -> Tensor",  # dqkv
     _backward, _bwd_fake),
    _setup_context, _backward_of_forward)
# What the public functions call: the implementations directly in eager mode, the ops when traced.
forward_call = autograd_or_op(fwd_op, _fwd_packed, _setup_context, _backward_of_forward)
backward_call = eager_or_op(bwd_op, _backward)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, alibi_slopes=None, softmax_scale=None):
    """Bidirectional attention over packed variable-length sequences, with optional ALiBi.

    qkv: (total_tokens, 3, heads, head_dim), float16 / bfloat16 / float32, on CUDA: queries, keys and values of
        every real token (e.g. the fused QKV projection viewed as such); unit stride on head_dim. head_dim in
        SUPPORTED_HEAD_DIMS. Its gradient comes back as one (total_tokens, 3, heads, head_dim) tensor.
    cu_seqlens: (batch + 1,) int32, cumulative sequence lengths, starting at 0 and
        ending at total_tokens.
    max_seqlen: int, at least the longest sequence length.
    alibi_slopes: (heads,) float32 or None; adds -slope[h] * |i - j| to the scaled scores.
    softmax_scale: float, default 1 / sqrt(head_dim).
    Returns (total_tokens, heads, head_dim), contiguous, dtype of qkv. Differentiable in
    qkv. Raises ValueError(unsupported_reason(...)) for inputs it cannot handle.
    """
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 4 or qkv.shape[1] != 3:
        shape = tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__
        raise ValueError(f"qkv must be (total_tokens, 3, heads, head_dim), got {shape}")
    reason = unsupported_reason(*qkv.unbind(1), cu_seqlens, alibi_slopes)
    if reason is not None:
        raise ValueError(reason)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(qkv.shape[-1])
    out, _ = forward_call(
        qkv, cu_seqlens, max_seqlen, alibi_slopes, float(softmax_scale))
    return out


def flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, alibi_slopes=None, softmax_scale=None):
    """flash_attn_varlen_qkvpacked_func for separate q, k, v, each (total_tokens, heads, head_dim).

    Checks them, then stacks them into one (total_tokens, 3, heads, head_dim) tensor (a copy); callers that
    produce q, k, v from one projection should view it as qkv and call the packed function instead.
    """
    reason = unsupported_reason(q, k, v, cu_seqlens, alibi_slopes)
    if reason is not None:
        raise ValueError(reason)
    return flash_attn_varlen_qkvpacked_func(torch.stack((q, k, v), dim=1), cu_seqlens, max_seqlen,
                                            alibi_slopes, softmax_scale)
