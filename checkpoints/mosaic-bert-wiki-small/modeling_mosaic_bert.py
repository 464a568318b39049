"""PyTorch MosaicBERT: BERT with ALiBi attention, a GeGLU feed-forward and unpadded (variable-length) attention.

Tokens are unpadded once, when they enter `MosaicBertModel`: every matmul, LayerNorm and the attention itself see only
the real tokens of the batch, concatenated as (total_tokens, hidden). Attention runs sequence by sequence through
`cu_seqlens`, either in the fused Triton kernel of `flash_attn_triton.py` (CUDA, fp16/bf16) or in PyTorch.
Outputs are padded back to (batch, seqlen, ...) only when they leave the model. Two more Triton kernels fuse the rest
of a block's elementwise work on the same devices: the GeGLU activation with its dropout (`geglu_triton.py`) and
dropout + residual + LayerNorm (`layernorm_triton.py`); a fourth computes the masked-LM loss from the half-precision
logits (`cross_entropy_triton.py`). transformers' own switch, `config._attn_implementation` (set with
`attn_implementation=` in from_pretrained or `model.set_attn_implementation`), decides for all four
(`kernel_policy_reason`); under torch.compile, "sdpa" leaves the two elementwise ones to the compiler.

A forward reads the device once, at entry: one host synchronisation returns every value check of the inputs and the
labels together with the sequence lengths that unpadding needs (`read_batch`). Three situations change the route:
- torch.export / torch.onnx.export (`is_exporting`): no value checks and no unpadding. The layers run
  on every position of the padded batch, attention is scaled_dot_product_attention with the ALiBi bias of each
  sequence's real-token positions and a key-padding mask (`padded_attention`), and outputs are zeroed at padding.
- torch.compile (`torch.compiler.is_compiling()`): the checks and the unpadding run as one custom operator,
  `check_batch`. They still raise at run time; the compiler sees no value, only a token count it keeps symbolic
  (`data_dependent_size`), so there is no guard on lengths, no recompile per batch and no graph break, and the
  layers still see the real tokens only (the MLM head in training: the labelled ones). Attention is the Triton
  kernel where it runs, else `padded_attention` (no lengths on the host); GeGLU and the residual LayerNorm are the
  compiler's under "sdpa".
- torch.jit.trace is refused: a trace would freeze one batch's unpadding.
"""

import contextlib
import hashlib
import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from torch.nn.modules import module as nn_module
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.utils import logging
from transformers.utils.generic import can_return_tuple

try:  # loaded as Hub remote code, inside a package
    from .bert_padding import index_first_axis, pad_input, true_positions
    from .configuration_mosaic_bert import MosaicBertConfig
except ImportError:  # loaded from a folder on sys.path (tests, scripts)
    from bert_padding import index_first_axis, pad_input, true_positions
    from configuration_mosaic_bert import MosaicBertConfig

try:  # the Triton kernels are optional: without Triton, the model runs on PyTorch
    from .cross_entropy_triton import cross_entropy
    from .cross_entropy_triton import unsupported_reason as cross_entropy_unsupported_reason
    from .flash_attn_triton import flash_attn_varlen_qkvpacked_func, unsupported_reason
    from .geglu_triton import geglu
    from .geglu_triton import unsupported_reason as geglu_unsupported_reason
    from .layernorm_triton import dropout_add_layer_norm
    from .layernorm_triton import unsupported_reason as layer_norm_unsupported_reason
except ImportError:
    try:
        from cross_entropy_triton import cross_entropy
        from cross_entropy_triton import unsupported_reason as cross_entropy_unsupported_reason
        from flash_attn_triton import flash_attn_varlen_qkvpacked_func, unsupported_reason
        from geglu_triton import geglu
        from geglu_triton import unsupported_reason as geglu_unsupported_reason
        from layernorm_triton import dropout_add_layer_norm
        from layernorm_triton import unsupported_reason as layer_norm_unsupported_reason
    except ImportError:
        flash_attn_varlen_qkvpacked_func = unsupported_reason = geglu = geglu_unsupported_reason = None
        dropout_add_layer_norm = layer_norm_unsupported_reason = cross_entropy = None
        cross_entropy_unsupported_reason = None


logger = logging.get_logger(__name__)

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def attn_implementation_of(config) -> str:
    """config._attn_implementation, "sdpa" when unset (a config not yet seen by a model)."""
    return getattr(config, "_attn_implementation", None) or "sdpa"


def is_exporting() -> bool:
    """Whether torch.export (or the ONNX exporter on it) is tracing the model. torch.compiler.is_exporting() alone
    cannot tell: before pytorch/pytorch#176499, Dynamo answers True under plain torch.compile too (torch 2.11 does),
    which would send compiled models down the export route (no value checks, padded attention on every position).
    Under Dynamo the flag that export itself sets decides."""
    if not torch.compiler.is_exporting():
        return False
    return not torch.compiler.is_dynamo_compiling() or bool(getattr(torch.compiler, "_is_exporting_flag", True))


def kernel_policy_reason(attn_implementation: str, tensor: torch.Tensor, elementwise: bool = False) -> str | None:
    """The choice every fused Triton kernel shares: why `attn_implementation` keeps this tensor off the kernels, or
    None. "eager" never takes them, "sdpa" only for float16/bfloat16 CUDA tensors, "flash_attention_2" whenever they
    can run. Nothing is exported through them (they are Triton programs, not ONNX or ATen operators).
    elementwise: a kernel of elementwise work (GeGLU, dropout + residual + LayerNorm). Under torch.compile "sdpa"
    leaves that work to the compiler, which fuses it with its neighbours and launches it from its own code: a call
    into a kernel's Python wrapper costs the host more than the device saves, and compiled fine-tuning steps are
    bound by the host."""
    if attn_implementation == "eager":
        return "attn_implementation is 'eager'"
    if is_exporting():
        return "the model is being exported, and the Triton kernels have no exported form"
    if flash_attn_varlen_qkvpacked_func is None:
        return "Triton is not installed"
    if attn_implementation == "sdpa" and elementwise and torch.compiler.is_compiling():
        return "'sdpa' under torch.compile leaves elementwise work to the compiler"
    if attn_implementation == "sdpa" and not (tensor.is_cuda and tensor.dtype in (torch.float16, torch.bfloat16)):
        return "'sdpa' uses the kernels for float16/bfloat16 CUDA tensors only"
    return None


class MosaicBertLayerNorm(nn.LayerNorm):
    """LayerNorm that runs in the autocast dtype under autocast (plain nn.LayerNorm is upcast to float32 there), as
    MosaicBERT's low-precision LayerNorm did. Outside autocast it is nn.LayerNorm."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        device_type = hidden_states.device.type
        if not torch.is_autocast_enabled(device_type):
            return super().forward(hidden_states)
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return F.layer_norm(
                hidden_states.to(dtype), self.normalized_shape, self.weight.to(dtype), self.bias.to(dtype), self.eps
            )


def bias_is_fusable(projection: nn.Module) -> bool:
    """Whether the residual LayerNorm may run projection's matmul itself and fuse its bias: a plain nn.Linear with a
    bias that nothing hooks (forward hooks of the module or global ones: device offload, pruning, capture), since the
    fused route does not call the module."""
    return (
        type(projection) is nn.Linear and projection.bias is not None
        and not projection._forward_hooks and not projection._forward_pre_hooks
        and not nn_module._global_forward_hooks and not nn_module._global_forward_pre_hooks
    )


class MosaicBertResidualLayerNorm(MosaicBertLayerNorm):
    """The end of every encoder block, LN(dropout(projection(x)) + residual). Runs as one fused Triton kernel each way
    where `kernel_policy_reason` allows: the projection's matmul runs without its bias, which the kernel adds (and
    whose gradient its backward sums beside the LayerNorm's), and the sum and the dropout mask are never stored. Else
    the projection, dropout, add and MosaicBertLayerNorm. Parameters and state-dict keys are those of nn.LayerNorm."""

    def __init__(self, config: MosaicBertConfig, dropout_prob: float):
        super().__init__(config.hidden_size, eps=config.layer_norm_eps)
        self.config = config
        self.dropout_prob = dropout_prob

    def kernel_unsupported_reason(self, x: torch.Tensor, residual: torch.Tensor, x_bias=None) -> str | None:
        """Why the fused kernel cannot run on these (total_tokens, hidden) inputs, or None."""
        implementation = attn_implementation_of(self.config)
        return kernel_policy_reason(implementation, x, elementwise=True) or layer_norm_unsupported_reason(
            x, residual, self.weight, self.bias, x_bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor, projection: nn.Module) -> torch.Tensor:
        """x: (total_tokens, in_features), residual: (total_tokens, hidden) -> (total_tokens, hidden).
        projection: the block's output nn.Linear (in_features -> hidden). Only a plain, unhooked nn.Linear with a bias
        has its bias fused (`bias_is_fusable`); any other (a PEFT adapter, an offloaded or pruned layer) runs as it
        is."""
        dropout_p = self.dropout_prob if self.training else 0.0
        if bias_is_fusable(projection):
            projected = F.linear(x, projection.weight)
            if self.kernel_unsupported_reason(projected, residual, projection.bias) is None:
                return dropout_add_layer_norm(projected, residual, self.weight, self.bias, self.eps, dropout_p,
                                              x_bias=projection.bias)
            projected = projected + projection.bias.to(projected.dtype)
        else:
            projected = projection(x)
            if self.kernel_unsupported_reason(projected, residual) is None:
                return dropout_add_layer_norm(projected, residual, self.weight, self.bias, self.eps, dropout_p)
        return super().forward(F.dropout(projected, dropout_p, self.training) + residual)


class MosaicBertEmbeddings(nn.Module):
    """Word and token-type embeddings, LayerNorm and dropout. No position embeddings: ALiBi carries position."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = MosaicBertLayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, input_ids: torch.Tensor | None, token_type_ids: torch.Tensor, inputs_embeds: torch.Tensor | None
    ) -> torch.Tensor:
        """input_ids and token_type_ids: (total_tokens,); inputs_embeds: (total_tokens, hidden), used instead of
        input_ids when given. Returns (total_tokens, hidden)."""
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        else:
            inputs_embeds = inputs_embeds.to(self.word_embeddings.weight.dtype)
        embeddings = inputs_embeds + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(embeddings))


class MosaicBertGatedMLP(nn.Module):
    """The GeGLU feed-forward with its residual LayerNorm: LN(x + W_o · drop(gelu(x W_g) ⊙ (x W_u)))."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.config = config
        self.intermediate_size = config.intermediate_size
        # One matmul computes gate (first half of the outputs) and value (second half).
        self.gated_layers = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.act = ACT2FN[config.hidden_act]
        self.fusable_act = config.hidden_act == "gelu"
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.wo = nn.Linear(config.intermediate_size, config.hidden_size)
        self.layernorm = MosaicBertResidualLayerNorm(config, dropout_prob=0.0)

    def kernel_unsupported_reason(self, projected: torch.Tensor) -> str | None:
        """Why the fused GeGLU kernel cannot run on the (total_tokens, 2 * intermediate) projection, or None."""
        if not self.fusable_act:
            return "the fused kernel computes the exact 'gelu' activation only"
        implementation = attn_implementation_of(self.config)
        reason = kernel_policy_reason(implementation, projected, elementwise=True)
        return reason or geglu_unsupported_reason(projected)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(total_tokens, hidden) -> (total_tokens, hidden)."""
        projected = self.gated_layers(hidden_states)
        if self.kernel_unsupported_reason(projected) is None:
            activated = geglu(projected, self.dropout.p if self.training else 0.0)
        else:
            gate, value = projected.split(self.intermediate_size, dim=-1)
            activated = self.dropout(self.act(gate) * value)
        return self.layernorm(activated, hidden_states, self.wo)


def upcast_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision dtypes, the dtype itself for float32 and float64."""
    return torch.promote_types(dtype, torch.float32)


def upcast(logits: torch.Tensor) -> torch.Tensor:
    """Logits for a loss: half precision goes up to float32, float64 stays float64."""
    return logits.to(upcast_dtype(logits.dtype))


@dataclass
class TokenLayout:
    """Where the rows of the (rows, hidden) tensors that the layers work on sit in the padded (batch, seqlen) batch.

    mask: (batch, seqlen) bool, True on real tokens. cu_seqlens: (batch + 1,) int32 boundaries of the sequences,
    whose real tokens are consecutive rows; max_seqlen: at least the longest sequence.
    Two layouts:
    - unpadded: the rows are the real tokens, sequence after sequence. indices: (tokens,) int64 flat position of each
      row in (batch * seqlen). lengths: the sequence lengths, read on the host with the input checks (eager); None
      under torch.compile, where the token count is a symbolic size and max_seqlen is the padded seqlen.
    - padded (export): the rows are the positions of the padded batch in order; indices is None.
    """

    mask: torch.Tensor
    indices: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    lengths: list[int] | None = None

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def seqlen(self) -> int:
        return self.mask.shape[1]

    def pad(self, rows: torch.Tensor) -> torch.Tensor:
        """(rows, ...) -> (batch, seqlen, ...), zeros at padded positions."""
        if self.indices is not None:  # unpadded: the padded positions are zeros already
            return pad_input(rows, self.indices, self.batch_size, self.seqlen)
        padded = rows.view(self.batch_size, self.seqlen, *rows.shape[1:])
        return torch.where(self.mask.view(*self.mask.shape, *([1] * (rows.dim() - 1))), padded, 0)

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """(batch, seqlen, ...) -> (rows, ...)."""
        if self.indices is None:
            return padded.flatten(0, 1)
        return index_first_axis(padded, self.indices)

    def positions(self) -> torch.Tensor:
        """(batch, seqlen) int64 ALiBi position of each real token: how many real tokens precede it in its row."""
        return torch.cumsum(self.mask.to(torch.int64), dim=-1) - 1

    def first_token_states(self, rows: torch.Tensor) -> torch.Tensor:
        """(rows, hidden) -> (batch, hidden): each sequence's first real token; zeros for a row with no real token.
        Reads no value on the host (the row of a sequence with no token points at an appended zero row)."""
        has_tokens = self.mask.any(dim=-1)
        if self.indices is None:
            first = torch.argmax(self.mask.to(torch.int32), dim=-1)  # the first real position (0 in an empty row)
            rows_of_first = torch.arange(self.batch_size, device=rows.device) * self.seqlen + first
            return torch.where(has_tokens[:, None], rows.index_select(0, rows_of_first), 0)
        if self.lengths is not None:  # eager: the row count is known, gather directly
            if rows.shape[0] == 0:
                return rows.new_zeros(self.batch_size, rows.shape[-1])
            rows_of_first = self.cu_seqlens[:-1].to(torch.int64).clamp(max=rows.shape[0] - 1)
            return torch.where(has_tokens[:, None], rows.index_select(0, rows_of_first), 0)
        with_zero_row = torch.cat([rows, rows.new_zeros(1, rows.shape[-1])])
        rows_of_first = torch.where(has_tokens, self.cu_seqlens[:-1].to(torch.int64), rows.shape[0])
        return with_zero_row.index_select(0, rows_of_first)


def alibi_slopes(num_heads: int, device: torch.device | None = None, dtype=torch.float32) -> torch.Tensor:
    """ALiBi slopes m_h, (num_heads,): head h adds -m_h * |i - j| to its scores. float32, or float64 for a float64
    model. Built on `device` directly (no host-to-device copy on the forward path).

    For n heads, n a power of two, m_h = 2^(-8(h+1)/n). Otherwise the largest power of two n' below n gives the first
    n' slopes and every other slope of 2n' (2^(-8(k+1)/2n') for k = 0, 2, 4, ...) fills the rest.
    """
    base = 2 ** math.floor(math.log2(num_heads))
    first = torch.arange(1, base + 1, device=device, dtype=dtype) * (-8.0 / base)
    rest = (2 * torch.arange(num_heads - base, device=device, dtype=dtype) + 1) * (-8.0 / (2 * base))
    return torch.exp2(torch.cat([first, rest]))


def alibi_bias(slopes: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """The symmetric ALiBi bias of one sequence length: (heads, length, length), -m_h * |i - j|."""
    positions = torch.arange(length, device=slopes.device, dtype=slopes.dtype)
    distance = (positions[:, None] - positions[None, :]).abs()
    return (-slopes[:, None, None] * distance).to(dtype)


def scaled_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor, dropout_p: float, explicit: bool
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v on (..., heads, L, head_dim) tensors with a bias broadcast to
    (..., heads, L, L): in PyTorch ops with `explicit` (the "eager" implementation), else through
    scaled_dot_product_attention ("sdpa")."""
    if not explicit:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout_p)
    probs = (query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1]) + bias).softmax(dim=-1)
    return F.dropout(probs, p=dropout_p) @ value


def torch_varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lengths: list[int],
    slopes: torch.Tensor,
    dropout_p: float,
    explicit: bool,
) -> torch.Tensor:
    """Attention within each sequence of an unpadded batch, on PyTorch, with the lengths known on the host.

    Sequences of equal length are batched into one attention call with the (1, heads, L, L) ALiBi bias of that length
    (a slice of one bias built for the longest sequence), so no (batch, heads, max_len, max_len) tensor is built and
    padding costs nothing. A length held by one sequence only attends on views of its rows.

    Args:
        query, key, value: (total_tokens, heads, head_dim).
        lengths: the batch's sequence lengths, in order (they sum to total_tokens).
        slopes: (heads,) ALiBi slopes.
        dropout_p: dropout on the attention probabilities.
        explicit: softmax in PyTorch ops ("eager") instead of scaled_dot_product_attention ("sdpa").

    Returns:
        (total_tokens, heads, head_dim) context.
    """
    if max(lengths) == 0:
        return query.new_zeros(query.shape)
    starts = [0]
    for length in lengths[:-1]:
        starts.append(starts[-1] + length)
    full_bias = alibi_bias(slopes, max(lengths), query.dtype)[None]  # (1, heads, max_len, max_len)
    outputs = [None] * len(lengths)  # per sequence, (length, heads, head_dim)
    for length in sorted(set(lengths) - {0}):
        seq_ids = [b for b, seq_len in enumerate(lengths) if seq_len == length]
        q, k, v = (_sequences_of_one_length(t, starts, seq_ids, length, len(lengths)) for t in (query, key, value))
        out = scaled_attention(q, k, v, full_bias[..., :length, :length], dropout_p, explicit)
        for i, b in enumerate(seq_ids):
            outputs[b] = out[i].transpose(0, 1)
    if len(set(lengths)) == 1:  # one length: the sequences' rows are already in order
        return out.transpose(1, 2).flatten(0, 1)
    return torch.cat([o for o in outputs if o is not None])


def _sequences_of_one_length(t: torch.Tensor, starts: list[int], seq_ids: list[int], length: int, batch: int):
    """(total_tokens, heads, head_dim) -> (len(seq_ids), heads, length, head_dim): the rows of sequences `seq_ids`,
    all of `length` tokens; a view when they are the whole batch."""
    if len(seq_ids) == batch:
        return t.view(len(seq_ids), length, *t.shape[1:]).transpose(1, 2)
    return torch.stack([t[starts[b] : starts[b] + length] for b in seq_ids]).transpose(1, 2)


def padded_attention(
    qkv: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    slopes: torch.Tensor,
    dropout_p: float,
    explicit: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention on the padded batch, with no value read on the host: what export, torch.compile (off the kernel)
    and output_attentions use.

    The bias of head h between positions i and j of a row is -m_h * |p_i - p_j|, p counting real tokens only (so
    padding may sit anywhere in a row), and -inf on padded keys. A row with no real token attends to every position
    instead (finite numbers that the caller zeroes), so no softmax sees only -inf.

    Args:
        qkv: (batch, seqlen, 3, heads, head_dim) queries, keys and values.
        mask: (batch, seqlen) bool, True on real tokens.
        positions: (batch, seqlen) int64 real-token positions (`TokenLayout.positions`).
        slopes: (heads,) ALiBi slopes.
        dropout_p: dropout on the attention probabilities.
        explicit: compute and return the probabilities (the "eager" implementation, and output_attentions) instead
            of calling scaled_dot_product_attention.

    Returns:
        (batch, seqlen, heads, head_dim) context, and with `explicit` the (batch, heads, seqlen, seqlen)
        probabilities with zeros on padded rows and columns (else None).
    """
    query, key, value = qkv.transpose(1, 3).unbind(dim=2)  # each (batch, heads, seqlen, head_dim)
    distance = (positions[:, :, None] - positions[:, None, :]).abs().to(slopes.dtype)  # (batch, seqlen, seqlen)
    bias = -slopes[None, :, None, None] * distance[:, None]  # (batch, heads, seqlen, seqlen)
    keys = mask | ~mask.any(dim=-1, keepdim=True)
    bias = bias.masked_fill(~keys[:, None, None, :], float("-inf")).to(query.dtype)
    if not explicit:
        context, probs = scaled_attention(query, key, value, bias, dropout_p, explicit=False), None
    else:  # the returned probabilities are the ones the context is computed from (gradients reach them)
        probs = (query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1]) + bias).softmax(dim=-1)
        probs = torch.where(mask[:, None, :, None], probs, 0)
        context = F.dropout(probs, p=dropout_p) @ value
    return context.transpose(1, 2), probs


class MosaicBertSelfAttention(nn.Module):
    """Multi-head self-attention with ALiBi. Owns the fused QKV projection and picks, for each call, the Triton kernel
    (unpadded rows), `torch_varlen_attention` (unpadded rows, lengths on the host: eager PyTorch) or
    `padded_attention` (export, torch.compile off the kernel, output_attentions)."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.dropout_p = config.attention_probs_dropout_prob
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)

    def kernel_unsupported_reason(self, qkv, layout: TokenLayout, slopes, output_attentions) -> str | None:
        """Why the Triton kernel cannot run this call, or None when it can."""
        if output_attentions:
            return "the fused kernel does not return attention probabilities (output_attentions=True)"
        if self.training and self.dropout_p > 0:
            return "attention dropout is active"
        if layout.indices is None:
            return "the model is being exported (padded path), and the Triton kernel has no exported form"
        return kernel_policy_reason(attn_implementation_of(self.config), qkv) or unsupported_reason(
            *qkv.unbind(dim=1), layout.cu_seqlens, slopes
        )

    def forward(
        self, hidden_states: torch.Tensor, layout: TokenLayout, slopes: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tokens, hidden) -> (tokens, hidden) context, and with output_attentions the
        (batch, heads, seqlen, seqlen) probabilities that the context was computed from."""
        qkv = self.Wqkv(hidden_states).view(-1, 3, self.num_heads, self.head_dim)
        implementation = attn_implementation_of(self.config)
        reason = self.kernel_unsupported_reason(qkv, layout, slopes, output_attentions)
        dropout_p = self.dropout_p if self.training else 0.0
        explicit = output_attentions or implementation == "eager"
        probabilities = None
        if reason is None:
            context = flash_attn_varlen_qkvpacked_func(qkv, layout.cu_seqlens, layout.max_seqlen, alibi_slopes=slopes)
        elif implementation == "flash_attention_2":
            raise ValueError(f"attn_implementation='flash_attention_2' (the Triton kernel) cannot run here: {reason}")
        elif layout.lengths is None or output_attentions:
            context, probabilities = padded_attention(
                layout.pad(qkv), layout.mask, layout.positions(), slopes, dropout_p, explicit
            )
            context = layout.unpad(context)
        else:
            context = torch_varlen_attention(*qkv.unbind(dim=1), layout.lengths, slopes, dropout_p, explicit)
        return context.reshape(hidden_states.shape), probabilities


class MosaicBertSelfOutput(nn.Module):
    """Attention output projection, dropout and residual LayerNorm."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = MosaicBertResidualLayerNorm(config, config.hidden_dropout_prob)

    def forward(self, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """(tokens, hidden) twice -> (tokens, hidden)."""
        return self.LayerNorm(context, residual, self.dense)


class MosaicBertAttention(nn.Module):
    """Self-attention and its output block (`attention.self`, `attention.output` in checkpoints)."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.self = MosaicBertSelfAttention(config)
        self.output = MosaicBertSelfOutput(config)

    def forward(self, hidden_states, layout, slopes, output_attentions=False):
        context, probabilities = self.self(hidden_states, layout, slopes, output_attentions)
        return self.output(context, hidden_states), probabilities


class MosaicBertLayer(GradientCheckpointingLayer):
    """One post-LayerNorm encoder layer: attention block, then the gated MLP block."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.attention = MosaicBertAttention(config)
        self.mlp = MosaicBertGatedMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        layout: TokenLayout,
        slopes: torch.Tensor,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tokens, hidden) -> (tokens, hidden), and the attention probabilities when asked."""
        hidden_states, probabilities = self.attention(hidden_states, layout, slopes, output_attentions)
        return self.mlp(hidden_states), probabilities


def autocast_without_cache(device_type: str):
    """The autocast state in force, with its weight-cast cache off (a cast cached before a CUDA graph capture would
    be read, stale, by every replay); a null context outside autocast."""
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=False)


class LayerGraphs:
    """The encoder layers' forward and backward over one packed batch, captured as two CUDA graphs and replayed by
    `ReplayedLayers` (`config.cuda_graphs`).

    Packed pretraining repeats one batch shape with every position a real token, so every kernel launch of the layers
    (whose host time can rival the GPU's work at base size) can become one of two graph launches. Captured on a side
    stream after one warm-up pass there, under the caller's autocast with its cache off; dropout stays random on
    replay (the Philox seeds are drawn on the device inside the graph). The graphs keep the batch's activations and
    gradients in their own memory pool, and read the parameters in place: `key` names everything a capture assumes.

    static_input: (tokens, hidden) the layers' input; static_output: (tokens, hidden); static_grads: the gradients
    of the input and of each parameter in `params` (those that require grad), or None where unused. generation counts
    the forward replays; awaiting_backward is a weak reference to the autograd context of the last one until its
    backward has run.
    run_layers: (static_input, layout) -> (tokens, hidden), the layers run eagerly (warm-up and capture).
    """

    def __init__(self, key: tuple, run_layers, hidden_states: torch.Tensor, layout: TokenLayout, params: list):
        self.key, self.layout, self.params = key, layout, params  # the layout's tensors are read by the graphs
        self.generation, self.awaiting_backward = 0, None
        device = hidden_states.device
        self.static_input = hidden_states.detach().clone().requires_grad_(True)
        inputs = [self.static_input, *params]
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        # One eager pass on the capture stream first: libraries allocate per-stream state (cuBLAS workspaces) on
        # first use, which a capture cannot do.
        with torch.cuda.stream(stream), autocast_without_cache(device.type):
            warm = run_layers(self.static_input, layout)
            torch.autograd.grad(warm, inputs, torch.zeros_like(warm), allow_unused=True)
            del warm
        torch.cuda.current_stream(device).wait_stream(stream)
        self.forward_graph, self.backward_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with autocast_without_cache(device.type):
            with torch.cuda.graph(self.forward_graph, stream=stream, capture_error_mode="thread_local"):
                self.static_output = run_layers(self.static_input, layout)
            self.static_grad_output = torch.empty_like(self.static_output)
            with torch.cuda.graph(self.backward_graph, pool=self.forward_graph.pool(), stream=stream,
                                  capture_error_mode="thread_local"):
                self.static_grads = torch.autograd.grad(self.static_output, inputs, self.static_grad_output,
                                                        allow_unused=True)

    def busy(self) -> bool:
        """Whether a replay's backward is still due: its activations live in the graphs' buffers, so another batch
        must run eagerly until that backward runs (or its result is dropped)."""
        return self.awaiting_backward is not None and self.awaiting_backward() is not None


class ReplayedLayers(torch.autograd.Function):
    """The encoder layers as replays of `LayerGraphs`: (tokens, hidden) -> (tokens, hidden). Forward copies the input
    into the captured one and replays the forward graph; backward replays the backward graph and returns copies of its
    gradients, so autograd accumulates them as usual (gradient accumulation, DDP's hooks)."""

    @staticmethod
    def forward(ctx, graphs: LayerGraphs, hidden_states: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        graphs.static_input.copy_(hidden_states)
        graphs.forward_graph.replay()
        graphs.generation += 1
        ctx.graphs, ctx.generation, ctx.backward_done = graphs, graphs.generation, False
        graphs.awaiting_backward = weakref.ref(ctx)
        return graphs.static_output.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        graphs = ctx.graphs
        if ctx.backward_done or ctx.generation != graphs.generation:
            raise RuntimeError(
                "a second backward through CUDA-graphed MosaicBERT layers (retain_graph=True), or one through a "
                "forward older than their last: the replayed backward reuses the buffers of the last forward's "
                "activations, which its first backward overwrote. Set config.cuda_graphs=False to backpropagate "
                "more than once"
            )
        graphs.static_grad_output.copy_(grad_output)
        graphs.backward_graph.replay()
        ctx.backward_done, graphs.awaiting_backward = True, None
        return None, *(None if grad is None else grad.clone() for grad in graphs.static_grads)


@dataclass
class GraphState:
    """What an encoder knows about its CUDA graphs: the key last seen (a capture waits for a second batch with the
    same key, so parameters that move from batch to batch are never captured), the graphs, or why capturing failed."""

    last_key: tuple | None = None
    graphs: LayerGraphs | None = None
    failed: str | None = None


# Each encoder's GraphState, kept beside the module rather than on it, so that deepcopy, pickling and state dicts of
# a model never meet a CUDA graph.
_GRAPH_STATES: "weakref.WeakKeyDictionary[nn.Module, GraphState]" = weakref.WeakKeyDictionary()


# Where the modules inside the encoder may come from for a capture: this file's, and the plain torch and transformers
# modules it builds on. Anything else (a PEFT adapter, a wrapper such as FSDP's) may read Python state at every call
# that a replay would not see.
GRAPHABLE_MODULES = (__name__, "torch.nn.modules.linear", "torch.nn.modules.dropout", "torch.nn.modules.container",
                     "torch.nn.modules.normalization", "transformers.activations")


def graphs_unsupported_reason(encoder: "MosaicBertEncoder", hidden_states: torch.Tensor) -> str | None:
    """Why the layers of this call cannot run as CUDA graph replays, or None."""
    if not (encoder.training and torch.is_grad_enabled() and hidden_states.requires_grad):
        return "not training (or the embeddings' output needs no gradient)"
    if any(getattr(layer, "gradient_checkpointing", False) for layer in encoder.layer):
        return "gradient checkpointing recomputes the layers"
    modules = list(encoder.modules())
    foreign = next((type(m).__name__ for m in modules if type(m).__module__ not in GRAPHABLE_MODULES), None)
    if foreign is not None:
        return f"the layers hold a {foreign}, which may read Python state at every call"
    if (nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks or nn_module._global_backward_hooks
            or nn_module._global_backward_pre_hooks or any(
                m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                for m in modules)):
        return "hooks on the layers must run in Python"
    params = list(encoder.parameters())
    if not params or any(type(p) is not nn.Parameter for p in params):
        return "the parameters are sharded or flattened by a wrapper (FSDP's DTensor or FlatParameter)"
    if not hidden_states.is_cuda:
        return "not on CUDA"
    if torch.cuda.is_current_stream_capturing():
        return "the caller is capturing a CUDA graph"
    return None


def graph_key(encoder: "MosaicBertEncoder", hidden_states: torch.Tensor, layout: TokenLayout) -> tuple:
    """Everything a capture of the layers reads once and a replay takes as given: the batch's shape and dtype, the
    autocast state, the attention implementation, every module's training flag and dropout probabilities, the matmul
    precision settings, and every parameter's storage, dtype and requires_grad."""
    device_type = hidden_states.device.type
    return (
        tuple(hidden_states.shape), hidden_states.dtype, hidden_states.device, layout.seqlen,
        torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type),
        attn_implementation_of(encoder.config),
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
        tuple((m.training, getattr(m, "p", None), getattr(m, "dropout_p", None), getattr(m, "dropout_prob", None))
              for m in encoder.modules()),
        tuple((p.data_ptr(), p.dtype, p.requires_grad) for p in encoder.parameters()),
    )


def layer_graphs(encoder: "MosaicBertEncoder", hidden_states: torch.Tensor, layout: TokenLayout) -> LayerGraphs | None:
    """The encoder's graphs for this packed batch, captured on the second consecutive call with the same key; None
    while the layers must run eagerly (first sight of a key, `graphs_unsupported_reason`, or a failed capture, which
    warns once)."""
    if graphs_unsupported_reason(encoder, hidden_states) is not None:
        return None
    state = _GRAPH_STATES.setdefault(encoder, GraphState())
    if state.failed is not None:
        return None
    key = graph_key(encoder, hidden_states, layout)
    if state.graphs is not None and state.graphs.key == key:
        return state.graphs
    if state.last_key != key:
        state.last_key, state.graphs = key, None  # frees graphs of another key
        return None
    try:
        state.graphs = LayerGraphs(key, lambda states, rows: encoder.run_layers(states, rows)[0], hidden_states,
                                   layout, [p for p in encoder.parameters() if p.requires_grad])
    except RuntimeError as exc:
        state.failed, state.graphs = f"{type(exc).__name__}: {exc}", None
        logger.warning(f"MosaicBERT: capturing the layers as CUDA graphs failed, running them eagerly: {state.failed}")
        return None
    return state.graphs


class MosaicBertEncoder(nn.Module):
    """The stack of layers over one batch."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.layer = nn.ModuleList([MosaicBertLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(
        self,
        hidden_states: torch.Tensor,
        layout: TokenLayout,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        graphable: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        """(tokens, hidden) -> (tokens, hidden); with the flags, also the padded input and every layer's padded
        output (each (batch, seqlen, hidden)) and every layer's (batch, heads, seqlen, seqlen) probabilities.
        graphable: a packed batch (every position a real token, no per-layer outputs) that, with
        `config.cuda_graphs`, may run as replays of `LayerGraphs`."""
        if graphable and self.config.cuda_graphs and not output_attentions and not output_hidden_states:
            graphs = layer_graphs(self, hidden_states, layout)
            if graphs is not None and not graphs.busy():
                return ReplayedLayers.apply(graphs, hidden_states, *graphs.params), None, None
        elif graphable and not self.config.cuda_graphs:  # turned off: free any graphs kept from before
            self.release_graphs()
        return self.run_layers(hidden_states, layout, output_attentions, output_hidden_states)

    def train(self, mode: bool = True):
        """nn.Module.train; leaving training also frees the CUDA graphs and their memory (captured again on return)."""
        if not mode:
            self.release_graphs()
        return super().train(mode)

    def release_graphs(self) -> None:
        """Frees this encoder's CUDA graphs (`LayerGraphs`) and the memory pool holding their activations."""
        _GRAPH_STATES.pop(self, None)

    def run_layers(
        self,
        hidden_states: torch.Tensor,
        layout: TokenLayout,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ):
        """The layers, eagerly (`forward` gives the shapes).

        The returned tensors are on the path of the computation: a layer's input is unpadded from the padded tensor
        returned for the previous one, so gradients reach them (retain_grad, torch.autograd.grad)."""
        # Computed here, so nothing about ALiBi lives in the state dict or on the meta device.
        slopes = alibi_slopes(self.num_heads, hidden_states.device, upcast_dtype(hidden_states.dtype))
        all_hidden_states = [] if output_hidden_states else None
        all_probabilities = [] if output_attentions else None

        def keep(states: torch.Tensor) -> torch.Tensor:
            padded = layout.pad(states)
            all_hidden_states.append(padded)
            return layout.unpad(padded)

        if output_hidden_states:
            hidden_states = keep(hidden_states)
        for layer in self.layer:
            hidden_states, probabilities = layer(hidden_states, layout, slopes, output_attentions=output_attentions)
            if output_hidden_states:
                hidden_states = keep(hidden_states)
            if output_attentions:
                all_probabilities.append(probabilities)
        return (
            hidden_states,
            tuple(all_hidden_states) if output_hidden_states else None,
            tuple(all_probabilities) if output_attentions else None,
        )


class MosaicBertPooler(nn.Module):
    """dense + tanh on the first real token of each sequence. Its weights start as the identity (zero bias), so a
    checkpoint without pooler weights (MosaicBERT is pretrained without one) always loads the same pooler."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, first_token_states: torch.Tensor) -> torch.Tensor:
        """(batch, hidden) -> (batch, hidden)."""
        return self.activation(self.dense(first_token_states))


class MosaicBertPredictionHeadTransform(nn.Module):
    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACT2FN[config.hidden_act]
        self.LayerNorm = MosaicBertLayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class MosaicBertLMPredictionHead(nn.Module):
    """transform, then the decoder, whose weight is tied to the word embeddings and whose bias is its own."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.transform = MosaicBertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(tokens, hidden) -> (tokens, vocab)."""
        return self.decoder(self.transform(hidden_states))


class MosaicBertOnlyMLMHead(nn.Module):
    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.predictions = MosaicBertLMPredictionHead(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.predictions(hidden_states)


@dataclass
class Encoding:
    """The encoder's result in the layout the layers used, with what is needed to pad it back.

    hidden_states: (tokens, hidden) last layer. layout: where those rows sit in the padded batch.
    all_hidden_states: embeddings and every layer, each (batch, seqlen, hidden), when asked.
    attentions: per layer, (batch, heads, seqlen, seqlen), when asked.
    labels: (rows,) the token labels of the rows, when token labels were given (-100 on rows of padding).
    labelled: (num_labelled,) int64 rows whose label is not -100, in (batch, position) order (a symbolic count under
    torch.compile); None while exporting, where no count is read. With a `guess`, (bound,) instead: the labelled
    rows, then the row count (one past the last row) as filler up to the guess's bound.
    guess: the `PackedBatchGuess` the encoder ran on, which the head must confirm before returning.
    """

    hidden_states: torch.Tensor
    layout: TokenLayout
    all_hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    labels: torch.Tensor | None = None
    labelled: torch.Tensor | None = None
    guess: "PackedBatchGuess | None" = None

    def pad(self, rows: torch.Tensor) -> torch.Tensor:
        """(tokens, ...) -> (batch, seqlen, ...), zeros at padded positions."""
        return self.layout.pad(rows)

    def first_token_states(self) -> torch.Tensor:
        """(batch, hidden): each sequence's first real token; zeros for a sequence with no real token."""
        return self.layout.first_token_states(self.hidden_states)

    def last_hidden_state(self) -> torch.Tensor:
        """(batch, seqlen, hidden), the same tensor as the last of all_hidden_states when those were asked for."""
        if self.all_hidden_states is not None:
            return self.all_hidden_states[-1]
        return self.pad(self.hidden_states)


# Index dtypes nn.Embedding accepts.
_INDEX_DTYPES = (torch.int64, torch.int32)


def check_shapes(config, input_ids, attention_mask, token_type_ids, inputs_embeds) -> tuple[int, int]:
    """Raises ValueError for inputs of a shape or dtype the model cannot take; reads no value. Returns
    (batch, seqlen).

    input_ids (batch, seqlen) integer ids, or inputs_embeds (batch, seqlen, hidden) floats; attention_mask
    (batch, seqlen) of any real dtype; token_type_ids (batch, seqlen) integer ids.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
    if input_ids is not None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seqlen), got {tuple(input_ids.shape)}")
        if input_ids.dtype not in _INDEX_DTYPES:
            raise ValueError(f"input_ids must be integer token ids (int64 or int32), got dtype {input_ids.dtype}")
        shape = tuple(input_ids.shape)
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(
                f"inputs_embeds must have shape (batch, seqlen, {config.hidden_size}), got {tuple(inputs_embeds.shape)}"
            )
        if not inputs_embeds.dtype.is_floating_point:
            raise ValueError(f"inputs_embeds must be floating point, got dtype {inputs_embeds.dtype}")
        shape = tuple(inputs_embeds.shape[:2])
    if 0 in shape:
        raise ValueError(f"Empty batch: inputs have shape {shape}")
    for name, tensor in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have the inputs' shape {shape}, got {tuple(tensor.shape)}")
    if token_type_ids is not None and token_type_ids.dtype not in _INDEX_DTYPES:
        raise ValueError(f"token_type_ids must be integer ids (int64 or int32), got dtype {token_type_ids.dtype}")
    if attention_mask is not None and attention_mask.dtype.is_complex:
        raise ValueError(f"attention_mask must hold 0/1 (bool, integer or float), got dtype {attention_mask.dtype}")
    return shape


def check_label_shapes(labels: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    """Token labels (batch, seqlen) or class labels (batch,): int64 ids, the shape given."""
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"labels must have shape {tuple(shape)} ({what}), got {tuple(labels.shape)}")
    if labels.dtype != torch.int64:  # what cross_entropy takes
        raise ValueError(f"class labels must be int64 (torch.long) ids, got dtype {labels.dtype}")


def batch_checks(
    attention_mask: torch.Tensor,
    input_ids: torch.Tensor | None,
    token_type_ids: torch.Tensor | None,
    labels: torch.Tensor | None,
    num_label_classes: int,
    labels_per_token: bool,
) -> tuple[list[str], torch.Tensor]:
    """The values every check of a batch needs, computed on the batch's device: their names, and one (checks + batch,)
    int64 tensor holding them followed by the sequence lengths. Reads nothing on the host (`check_batch_values`
    judges them once they are there)."""
    real = attention_mask != 0
    checks = {"mask_bad": ((attention_mask != 0) & (attention_mask != 1)).sum()}
    if input_ids is not None:
        checks["ids_min"], checks["ids_max"] = input_ids.min(), input_ids.max()
    if token_type_ids is not None:
        checks["types_min"], checks["types_max"] = token_type_ids.min(), token_type_ids.max()
    if labels is not None:
        labelled = labels != -100
        checks["labels_bad"] = (labelled & ((labels < 0) | (labels >= num_label_classes))).sum()
        if labels_per_token:
            checks["labelled"] = (labelled & real).sum()
            checks["labelled_padding"] = (labelled & ~real).sum()
    head = torch.stack([v.to(torch.int64) for v in checks.values()])
    return list(checks), torch.cat([head, real.sum(dim=-1).to(torch.int64)])


def check_batch_values(
    names: list[str],
    values: list[int],
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None,
    vocab_size: int,
    type_vocab_size: int,
    num_label_classes: int,
) -> tuple[list[int], int]:
    """Raises ValueError naming what is wrong with a batch, from the host copy of `batch_checks`' tensor. Returns the
    sequence lengths (a list of batch ints) and the number of token labels other than -100."""
    checks, lengths = dict(zip(names, values[: len(names)])), values[len(names) :]
    if checks["mask_bad"]:
        bad = attention_mask[(attention_mask != 0) & (attention_mask != 1)].flatten()[0].item()
        raise ValueError(f"attention_mask must hold only 0 (padding) and 1 (real token), got {bad}")
    if "ids_min" in checks and (checks["ids_min"] < 0 or checks["ids_max"] >= vocab_size):
        bad = checks["ids_min"] if checks["ids_min"] < 0 else checks["ids_max"]
        raise ValueError(f"input_ids holds {int(bad)}, outside the vocabulary [0, {vocab_size})")
    if "types_min" in checks and (checks["types_min"] < 0 or checks["types_max"] >= type_vocab_size):
        bad = checks["types_min"] if checks["types_min"] < 0 else checks["types_max"]
        raise ValueError(f"token_type_ids holds {int(bad)}, outside [0, {type_vocab_size})")
    if checks.get("labelled_padding"):
        raise ValueError("labels set a target on a padded position (attention_mask 0); use -100 there")
    if checks.get("labels_bad"):
        bad = labels[(labels != -100) & ((labels < 0) | (labels >= num_label_classes))].unique()[:5].tolist()
        raise ValueError(f"labels must lie in [0, {num_label_classes}) or be -100, got values {bad}")
    return lengths, checks.get("labelled", 0)


def read_batch(
    attention_mask: torch.Tensor,
    input_ids: torch.Tensor | None,
    token_type_ids: torch.Tensor | None,
    labels: torch.Tensor | None,
    vocab_size: int,
    type_vocab_size: int,
    num_label_classes: int,
    labels_per_token: bool,
) -> tuple[list[int], int]:
    """Every value check of a batch, in one host synchronisation; raises ValueError naming what is wrong.

    attention_mask (batch, seqlen) must hold 0/1; input_ids lie in [0, vocab_size); token_type_ids in
    [0, type_vocab_size). labels hold class ids in [0, num_label_classes) or -100: per token ((batch, seqlen), and
    -100 on every padded position) or per example ((batch,)).
    Returns the sequence lengths (a list of batch ints) and the number of token labels other than -100.
    """
    names, values = batch_checks(attention_mask, input_ids, token_type_ids, labels, num_label_classes, labels_per_token)
    return check_batch_values(names, values.tolist(), attention_mask, labels, vocab_size, type_vocab_size,
                              num_label_classes)  # .tolist(): the one host synchronisation


# Devices where a forward may run on a `PackedBatchGuess`: where reading a value on the host waits for the device.
GUESS_DEVICES = ("cuda",)


class PackedBatchGuess:
    """A forward that does not wait for the device, for batches of the shape the last one had when it held no padding
    (packed pretraining: every batch is full): the layers run at once on every position as real tokens, and the MLM
    head on a bound of the labelled count, while the checks of `batch_checks` travel to pinned host memory behind
    them. `confirm` reads them once the forward is queued: by then the device has long passed them, so the host
    waits for nothing that keeps the device busy, and the host can queue the next step while the device works.
    A bad batch raises the same ValueError as the checked path; a batch that turns out to have padding, or more
    labels than the bound, is computed again on the checked path (and the guess stops until the next full batch).
    The embeddings read clamped ids meanwhile, so bad ids never index out of bounds before the error is raised.
    """

    def __init__(self, names: list[str], values: torch.Tensor, num_labelled_bound: int, attention_mask, labels,
                 config):
        self.names = names
        self.num_labelled_bound = num_labelled_bound
        self.attention_mask, self.labels = attention_mask, labels
        self.vocab_size, self.type_vocab_size = config.vocab_size, config.type_vocab_size
        on_cuda = values.is_cuda
        self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=on_cuda)
        self.host.copy_(values, non_blocking=on_cuda)
        self.ready = torch.cuda.Event() if on_cuda else None
        if on_cuda:
            self.ready.record(torch.cuda.current_stream(values.device))

    def confirm(self) -> int | None:
        """The number of labelled tokens when the guess held; None when the batch must be computed again. Raises
        ValueError for a bad batch."""
        if self.ready is not None:
            self.ready.synchronize()
        lengths, num_labelled = check_batch_values(self.names, self.host.tolist(), self.attention_mask, self.labels,
                                                   self.vocab_size, self.type_vocab_size, self.vocab_size)
        if min(lengths) < self.attention_mask.shape[1] or num_labelled > self.num_labelled_bound:
            return None
        return num_labelled


def unpad_rows(mask: torch.Tensor, labels: torch.Tensor | None, total_tokens: int, num_labelled: int):
    """The unpadding of a checked batch whose counts are known: indices (total_tokens,) int64 flat positions of the
    real tokens, cu_seqlens (batch + 1,) int32, and, with token labels, labelled (num_labelled,) int64 rows (among
    the real tokens) whose label is not -100 (else an empty tensor). Gathers with known counts: no synchronisation."""
    indices = true_positions(mask.flatten(), total_tokens)
    cu_seqlens = F.pad(torch.cumsum(mask.sum(dim=-1, dtype=torch.int32), dim=0, dtype=torch.int32), (1, 0))
    if labels is None:
        labelled = indices.new_zeros(0)
    else:
        labelled = true_positions(index_first_axis(labels, indices) != -100, num_labelled)
    return indices, cu_seqlens, labelled


def _op_namespace() -> str:
    """The torch.library namespace of this copy of the file's operator: "mosaic_bert_" and a hash of the file. Hub
    remote code may import several copies (a checkpoint's older code beside the package's): each registers and runs
    its own operator, identical copies share one."""
    with open(__file__, "rb") as f:
        return f"mosaic_bert_{hashlib.sha256(f.read()).hexdigest()[:16]}"


_OPS_NAMESPACE = _op_namespace()


def _op_registered(name: str) -> bool:
    try:
        getattr(getattr(torch.ops, _OPS_NAMESPACE), name)
        return True
    except (AttributeError, RuntimeError):
        return False


def data_dependent_size(ctx) -> torch.SymInt:
    """A size that the compiler keeps symbolic and bounds by nothing it knows (the real-token count), for a fake
    implementation. `ctx.new_dynamic_size()` refuses unless the global torch._dynamo.config.
    capture_dynamic_output_shape_ops is set, and Dynamo then breaks the graph at the operator; the count only sizes
    this model's own rows, whose code is tested with it under torch.compile, so the size is made directly from the
    shape environment where this torch provides the means (torch 2.5 and later), else through the public call."""
    allocate = getattr(getattr(torch._library, "fake_impl", None), "allocate_size", None)
    shape_env = getattr(ctx, "_shape_env", None)
    if allocate is None or shape_env is None:
        return ctx.new_dynamic_size()
    return allocate(shape_env)


if not _op_registered("check_batch"):

    # It reads the device (the checks), so CUDA graphs must not capture it: inductor leaves it out of them.
    @torch.library.custom_op(
        f"{_OPS_NAMESPACE}::check_batch",
        mutates_args=(),
        tags=(torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else (),
    )
    def check_batch(
        attention_mask: torch.Tensor,
        input_ids: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        labels: torch.Tensor | None,
        vocab_size: int,
        type_vocab_size: int,
        num_label_classes: int,
        labels_per_token: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`read_batch` and `unpad_rows` as an operator, for torch.compile: at run time the checks raise as in eager
        (one host synchronisation), while the compiler sees an opaque call whose output sizes are symbolic (no graph
        break, no guard on any value, one graph for every batch). Returns `unpad_rows`' three tensors: the (tokens,)
        int64 flat positions of the real tokens, the (batch + 1,) int32 cu_seqlens and, with token labels, the
        (num_labelled,) rows whose label is not -100 (else an empty tensor)."""
        lengths, num_labelled = read_batch(attention_mask, input_ids, token_type_ids, labels, vocab_size,
                                           type_vocab_size, num_label_classes, labels_per_token)
        return unpad_rows(attention_mask != 0, labels if labels_per_token else None, sum(lengths), num_labelled)

    @check_batch.register_fake
    def _(attention_mask, input_ids, token_type_ids, labels, vocab_size, type_vocab_size, num_label_classes,
          labels_per_token):
        ctx = torch.library.get_ctx()
        indices = attention_mask.new_empty(data_dependent_size(ctx), dtype=torch.int64)
        cu_seqlens = attention_mask.new_empty(attention_mask.shape[0] + 1, dtype=torch.int32)
        with_labels = labels is not None and labels_per_token
        labelled = attention_mask.new_empty(data_dependent_size(ctx) if with_labels else 0, dtype=torch.int64)
        return indices, cu_seqlens, labelled


def check_call(config, input_ids, attention_mask, token_type_ids, inputs_embeds, labels, labels_per_token):
    """What can be refused before any value is read: tracing by torch.jit.trace, and inputs or labels of a shape or
    dtype the model cannot take (ValueError). Returns (batch, seqlen)."""
    if torch.jit.is_tracing():
        raise ValueError(
            "torch.jit.trace cannot record MosaicBERT: the unpadding depends on the attention mask's values, so a "
            "trace would give wrong numbers on other inputs. Use torch.export.export or "
            "torch.onnx.export(..., dynamo=True), which take the padded path."
        )
    batch_size, seqlen = check_shapes(config, input_ids, attention_mask, token_type_ids, inputs_embeds)
    if labels is not None:
        shape = (batch_size, seqlen) if labels_per_token else labels.shape[:1]
        check_label_shapes(labels, shape, "one per token" if labels_per_token else "one per example")
    return batch_size, seqlen


def compiled_layout(args: tuple, mask: torch.Tensor) -> tuple[TokenLayout, torch.Tensor]:
    """The unpadded layout torch.compile runs on, and the labelled rows, after the checks of `check_batch` (an opaque
    operator: no guard on any value, no graph break). The counts are sizes the compiler does not know, so no length
    is on the host: attention bounds every sequence by the padded seqlen."""
    indices, cu_seqlens, labelled = getattr(torch.ops, _OPS_NAMESPACE).check_batch(*args)
    torch._check(indices.shape[0] <= mask.numel())
    torch._check(labelled.shape[0] <= indices.shape[0])
    return TokenLayout(mask, indices, cu_seqlens, max_seqlen=mask.shape[1]), labelled


def _output_flags(config, output_attentions, output_hidden_states) -> dict:
    return {
        "output_attentions": bool(output_attentions if output_attentions is not None else config.output_attentions),
        "output_hidden_states": bool(
            output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        ),
    }


class MosaicBertPreTrainedModel(PreTrainedModel):
    """Weights init and the attention switch. `attn_implementation` ("sdpa" by default, "eager",
    "flash_attention_2"; see MosaicBertConfig) is read at every call, so `set_attn_implementation` takes effect at
    once. "flash_attention_2" names this package's Triton FlashAttention-2 kernel: the flash_attn package is not
    needed."""

    config_class = MosaicBertConfig
    config: MosaicBertConfig
    base_model_prefix = "bert"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MosaicBertLayer"]
    _supports_sdpa = True

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        return True

    def _check_and_adjust_attn_implementation(
        self, attn_implementation: str | None, is_init_check: bool = False, allow_all_kernels: bool = False
    ) -> str:
        if attn_implementation is None:
            return "sdpa"
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation={attn_implementation!r} is not supported by MosaicBERT: use 'sdpa' (default: the "
                "Triton kernels on CUDA in float16/bfloat16, PyTorch's scaled_dot_product_attention elsewhere), "
                "'eager' (PyTorch only) or 'flash_attention_2' (the Triton kernels always; no flash_attn package)"
            )
        return attn_implementation

    def _init_weights(self, module: nn.Module):
        """BERT's init: normal(0, initializer_range) weights, zero biases and padding row, unit LayerNorms; the
        pooler starts as the identity with a zero bias (deterministic where a checkpoint has no pooler)."""
        std = self.config.initializer_range
        pooler = getattr(self, "pooler", None)
        if pooler is not None and module is pooler.dense:
            init.eye_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class MosaicBertModel(MosaicBertPreTrainedModel):
    """The MosaicBERT encoder: embeddings, layers and (optionally) the pooler."""

    def __init__(self, config: MosaicBertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = MosaicBertEmbeddings(config)
        self.encoder = MosaicBertEncoder(config)
        self.pooler = MosaicBertPooler(config) if add_pooling_layer else None
        # What the last checked batch showed, for `PackedBatchGuess`: its (batch, seqlen) if it held no padding, and
        # its labelled-token count.
        self.packed_shape: tuple[int, int] | None = None
        self.last_num_labelled = 0
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def encode(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_label_classes: int = 0,
        labels_per_token: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        guess_packed: bool = False,
    ) -> Encoding:
        """Checks the inputs and the head's labels, then runs the encoder and returns its result in the layout it ran
        on (what the heads build on): the real tokens only, except while exporting, where it is every position
        (`TokenLayout`).

        input_ids, attention_mask, token_type_ids: (batch, seqlen); inputs_embeds: (batch, seqlen, hidden).
        labels: the head's class labels, checked against num_label_classes with the inputs (one host
        synchronisation for all): (batch, seqlen) per token (-100 on padding) or (batch,) per example.
        Padding may sit anywhere in a row; ALiBi positions count real tokens only.
        guess_packed: with token labels on CUDA, run on a `PackedBatchGuess` when the last batch of this shape held no
        padding; the caller must then confirm `Encoding.guess` before using the result.
        """
        batch_size, seqlen = check_call(self.config, input_ids, attention_mask, token_type_ids, inputs_embeds, labels,
                                        labels_per_token)
        padded = input_ids if input_ids is not None else inputs_embeds
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, seqlen, dtype=torch.int32, device=padded.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros(batch_size, seqlen, dtype=torch.int64, device=padded.device)
        mask = attention_mask != 0
        token_labels = labels if labels is not None and labels_per_token else None
        guess = None
        if is_exporting():  # no value checks, no unpadding: the layers run on every position
            layout, labelled = TokenLayout(mask), None
        else:
            args = (attention_mask, input_ids, token_type_ids, labels, self.config.vocab_size,
                    self.config.type_vocab_size, num_label_classes, labels_per_token)
            if torch.compiler.is_compiling():  # the token count stays a symbolic size: nothing read on the host
                layout, labelled = compiled_layout(args, mask)
            elif guess_packed and token_labels is not None and self.guess_applies(padded, output_attentions,
                                                                                   output_hidden_states):
                guess, layout, labelled = self.guess_packed_layout(attention_mask, input_ids, token_type_ids, labels)
                input_ids = input_ids.clamp(0, self.config.vocab_size - 1)  # read before the checks arrive
                token_type_ids = token_type_ids.clamp(0, self.config.type_vocab_size - 1)
                padded = input_ids
            else:
                layout, labelled = self.checked_layout(args, mask, token_labels, note=guess_packed)
        rows = layout.unpad(padded)
        hidden_states = self.embeddings(
            rows if input_ids is not None else None, layout.unpad(token_type_ids),
            rows if input_ids is None else None,
        )
        hidden_states, all_hidden_states, all_probabilities = self.encoder(
            hidden_states, layout, output_attentions, output_hidden_states, graphable=guess is not None
        )
        return Encoding(
            hidden_states=hidden_states,
            layout=layout,
            all_hidden_states=all_hidden_states,
            attentions=all_probabilities,
            labels=None if token_labels is None else layout.unpad(token_labels),
            labelled=None if token_labels is None else labelled,
            guess=guess,
        )

    def checked_layout(self, args: tuple, mask: torch.Tensor, token_labels: torch.Tensor | None, note: bool):
        """The unpadded layout after `read_batch` (its one host read), and the (num_labelled,) labelled rows. With
        `note` (a batch that could have been guessed: not an evaluation batch, whose labelling rate may differ),
        notes for `PackedBatchGuess` whether the batch was full and how many tokens it labelled."""
        lengths, num_labelled = read_batch(*args)
        indices, cu_seqlens, labelled = unpad_rows(mask, token_labels, sum(lengths), num_labelled)
        if note:
            self.packed_shape = tuple(mask.shape) if min(lengths) == mask.shape[1] else None
            self.last_num_labelled = num_labelled
        return TokenLayout(mask, indices, cu_seqlens, max_seqlen=max(lengths), lengths=lengths), labelled

    def guess_applies(self, padded: torch.Tensor, output_attentions: bool, output_hidden_states: bool) -> bool:
        """Whether this batch may run on a `PackedBatchGuess`: token ids on CUDA (where a host read waits for the
        device), of the shape of the last checked batch, which held no padding; no per-layer outputs asked for."""
        return (
            padded.device.type in GUESS_DEVICES and not padded.dtype.is_floating_point
            and self.packed_shape == tuple(padded.shape) and not output_attentions and not output_hidden_states
        )

    def guess_packed_layout(self, attention_mask, input_ids, token_type_ids, labels):
        """The `PackedBatchGuess` of a (batch, seqlen) batch with token labels: every position a real token, and the
        labelled rows up to a bound 3% + 128 above the last batch's count (filled with the row count). Returns the
        guess, the layout and the (bound,) labelled rows."""
        batch_size, seqlen = attention_mask.shape
        rows, device = batch_size * seqlen, attention_mask.device
        names, values = batch_checks(attention_mask, input_ids, token_type_ids, labels, self.config.vocab_size, True)
        bound = min(rows, -(-(self.last_num_labelled * 103 // 100 + 128) // 64) * 64)
        guess = PackedBatchGuess(names, values, bound, attention_mask, labels, self.config)
        layout = TokenLayout(
            attention_mask != 0, torch.arange(rows, device=device),
            torch.arange(0, rows + 1, seqlen, dtype=torch.int32, device=device), max_seqlen=seqlen,
            lengths=[seqlen] * batch_size,
        )
        labelled = torch.nonzero_static(labels.flatten() != -100, size=bound, fill_value=rows).flatten()
        return guess, layout, labelled

    def confirm_guess(self, guess: PackedBatchGuess) -> int | None:
        """`PackedBatchGuess.confirm`, remembering the labelled count (or, when the guess failed, that the next batch
        must be checked first)."""
        num_labelled = guess.confirm()
        if num_labelled is None:
            self.packed_shape = None
        else:
            self.last_num_labelled = num_labelled
        return num_labelled

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> BaseModelOutputWithPooling:
        """Returns last_hidden_state (batch, seqlen, hidden) with zeros at padded positions, pooler_output
        (batch, hidden) from each sequence's first real token (when the model has a pooler), and, when asked,
        hidden_states (embeddings and each layer, each (batch, seqlen, hidden)) and attentions (each layer's
        (batch, heads, seqlen, seqlen) probabilities, computed in PyTorch)."""
        encoding = self.encode(
            input_ids, attention_mask, token_type_ids, inputs_embeds,
            **_output_flags(self.config, output_attentions, output_hidden_states),
        )
        pooled = self.pooler(encoding.first_token_states()) if self.pooler is not None else None
        return BaseModelOutputWithPooling(
            last_hidden_state=encoding.last_hidden_state(),
            pooler_output=pooled,
            hidden_states=encoding.all_hidden_states,
            attentions=encoding.attentions,
        )


def masked_lm_loss(logits: torch.Tensor, targets: torch.Tensor, attn_implementation: str) -> torch.Tensor:
    """Mean cross-entropy over the rows whose target is not -100: (rows, vocab) logits, (rows,) targets; float32
    (float64 stays float64). Runs on the fused kernel where `kernel_policy_reason` allows (it reads the half-precision
    logits once each way, where F.cross_entropy first copies them to float32), else on F.cross_entropy. The count
    stays on the device (no synchronisation); with nothing labelled the loss is zero (not NaN) and still reaches every
    head weight."""
    count = (targets != -100).sum().clamp(min=1)
    if (
        kernel_policy_reason(attn_implementation, logits) is None
        and cross_entropy_unsupported_reason(logits, targets) is None
    ):
        losses = cross_entropy(logits, targets)
    else:
        losses = F.cross_entropy(upcast(logits), targets, reduction="none")
    return losses.sum() / count


class MosaicBertForMaskedLM(MosaicBertPreTrainedModel):
    """MosaicBERT with the masked-language-modelling head. In training with labels, the head runs only on the
    labelled tokens."""

    _tied_weights_keys = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"}

    def __init__(self, config: MosaicBertConfig):
        super().__init__(config)
        self.bert = MosaicBertModel(config, add_pooling_layer=False)
        self.cls = MosaicBertOnlyMLMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings

    def guessed_head(self, encoding: Encoding) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The head and loss on the (bound,) labelled rows of a `PackedBatchGuess`, then its confirmation: returns
        the (num_labelled, vocab) logits and the loss, or (None, None) when the guess failed. The filler rows (index
        = row count) score the last row against -100, and out-of-range targets count as -100 until the checks
        arrive, so nothing indexes out of bounds before a bad batch raises."""
        rows = encoding.labelled.clamp(max=encoding.hidden_states.shape[0] - 1)
        targets = encoding.labels.index_select(0, rows)
        in_range = (encoding.labelled < encoding.labels.shape[0]) & (targets >= 0) & (targets < self.config.vocab_size)
        logits = self.cls(encoding.hidden_states.index_select(0, rows))
        loss = masked_lm_loss(logits, targets.where(in_range, -100), attn_implementation_of(self.config))
        num_labelled = self.bert.confirm_guess(encoding.guess)
        if num_labelled is None:
            return None, None
        return logits[:num_labelled], loss

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        compact_logits: bool | None = None,
    ) -> MaskedLMOutput:
        """labels: (batch, seqlen) target ids, -100 where no prediction is wanted (and on every padded position).
        loss: mean cross-entropy over the labelled tokens.

        logits: (batch, seqlen, vocab), zeros at padded positions, as in transformers' BERT; except in training with
        labels (or with compact_logits=True), where the MLM transform and decoder run on the labelled tokens only and
        logits is (num_labelled, vocab): one row per label other than -100, in (batch, position) order, so that
        `logits.argmax(-1)` compares with `labels[labels != -100]`. compact_logits=False asks for the full shape in
        training too. Eager and compiled models behave alike; an exported graph reads no count, so there the head runs
        on every row and logits has the full shape.
        """
        if compact_logits and labels is None:
            raise ValueError("compact_logits=True keeps the rows of labelled tokens: it needs labels")
        encoding = self.bert.encode(
            input_ids, attention_mask, token_type_ids, inputs_embeds,
            labels=labels, num_label_classes=self.config.vocab_size, labels_per_token=True,
            **_output_flags(self.config, output_attentions, output_hidden_states),
            guess_packed=compact_logits if compact_logits is not None else self.training,
        )
        if compact_logits and encoding.labelled is None:
            raise ValueError("compact_logits=True needs the labelled count, which an exported graph does not read")
        compact = compact_logits if compact_logits is not None else self.training and encoding.labelled is not None
        implementation = attn_implementation_of(self.config)
        loss = None
        if labels is None:
            logits = encoding.pad(self.cls(encoding.hidden_states))
        elif compact and encoding.guess is not None:
            logits, loss = self.guessed_head(encoding)
            if logits is None:  # the batch had padding, or more labels than the bound: the checked path
                del encoding  # frees the guessed forward's graph before the second one
                return self.forward(input_ids, attention_mask, token_type_ids, inputs_embeds, labels,
                                    output_attentions, output_hidden_states, compact_logits, return_dict=True)
        elif compact:
            targets = encoding.labels.index_select(0, encoding.labelled)
            logits = self.cls(encoding.hidden_states.index_select(0, encoding.labelled))
            loss = masked_lm_loss(logits, targets, implementation)
        else:
            logits = self.cls(encoding.hidden_states)
            loss = masked_lm_loss(logits, encoding.labels, implementation)
            logits = encoding.pad(logits)
        return MaskedLMOutput(
            loss=loss, logits=logits, hidden_states=encoding.all_hidden_states, attentions=encoding.attentions
        )


def _classifier_dropout(config: MosaicBertConfig) -> nn.Dropout:
    dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
    return nn.Dropout(dropout)


class MosaicBertForSequenceClassification(MosaicBertPreTrainedModel):
    """Pooled first token -> dropout -> classifier. Regression, single- or multi-label by `config.problem_type`."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = MosaicBertModel(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> SequenceClassifierOutput:
        """labels: (batch,) class ids or floats for regression, or (batch, num_labels) multi-hot targets.
        Returns logits (batch, num_labels)."""
        class_labels = None
        if labels is not None:
            problem_type = self._problem_type(labels)
            batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
            if problem_type in ("regression", "single_label_classification"):
                if tuple(labels.shape) not in ((batch,), (batch, 1)):
                    raise ValueError(f"{problem_type} labels must have shape ({batch},), got {tuple(labels.shape)}")
            elif tuple(labels.shape) != (batch, self.num_labels):
                raise ValueError(
                    f"multi-label labels must have shape {(batch, self.num_labels)}, got {tuple(labels.shape)}"
                )
            if problem_type == "single_label_classification":
                class_labels = labels.view(-1)
        encoding = self.bert.encode(
            input_ids, attention_mask, token_type_ids, inputs_embeds,
            labels=class_labels, num_label_classes=self.num_labels, labels_per_token=False,
            **_output_flags(self.config, output_attentions, output_hidden_states),
        )
        pooled = self.bert.pooler(encoding.first_token_states())
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            if self.config.problem_type == "regression":
                loss = MSELoss()(upcast(logits).squeeze(-1), labels.view(-1).to(upcast_dtype(logits.dtype)))
            elif self.config.problem_type == "single_label_classification":
                loss = CrossEntropyLoss()(upcast(logits), class_labels)
            else:
                loss = BCEWithLogitsLoss()(upcast(logits), labels.to(upcast_dtype(logits.dtype)))
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=encoding.all_hidden_states, attentions=encoding.attentions
        )

    def _problem_type(self, labels: torch.Tensor) -> str:
        """config.problem_type, set from the labels' dtype and num_labels the first time, as transformers' BERT."""
        if self.config.problem_type is None:
            if self.num_labels == 1:
                self.config.problem_type = "regression"
            elif self.num_labels > 1 and not labels.dtype.is_floating_point:
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        return self.config.problem_type


class MosaicBertForMultipleChoice(MosaicBertPreTrainedModel):
    """Each (batch, choice) pair is encoded, pooled and scored; logits (batch, num_choices)."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__(config)
        self.bert = MosaicBertModel(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> MultipleChoiceModelOutput:
        """input_ids, attention_mask, token_type_ids: (batch, num_choices, seqlen); inputs_embeds:
        (batch, num_choices, seqlen, hidden); labels: (batch,) index of the right choice."""
        inputs = input_ids if input_ids is not None else inputs_embeds
        if inputs is None or inputs.dim() < 3:
            raise ValueError("Multiple choice inputs must have shape (batch, num_choices, seqlen)")
        batch, num_choices = inputs.shape[:2]
        if labels is not None and tuple(labels.shape) != (batch,):
            raise ValueError(f"labels must have shape ({batch},), one choice index per example")

        def flat(t):
            return None if t is None else t.flatten(0, 1)

        encoding = self.bert.encode(
            flat(input_ids), flat(attention_mask), flat(token_type_ids), flat(inputs_embeds),
            labels=labels, num_label_classes=num_choices, labels_per_token=False,
            **_output_flags(self.config, output_attentions, output_hidden_states),
        )
        pooled = self.bert.pooler(encoding.first_token_states())
        logits = self.classifier(self.dropout(pooled)).view(-1, num_choices)
        loss = None if labels is None else CrossEntropyLoss()(upcast(logits), labels)
        return MultipleChoiceModelOutput(
            loss=loss, logits=logits, hidden_states=encoding.all_hidden_states, attentions=encoding.attentions
        )


class MosaicBertForTokenClassification(MosaicBertPreTrainedModel):
    """A classifier on every real token; logits (batch, seqlen, num_labels), zeros at padded positions."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = MosaicBertModel(config, add_pooling_layer=False)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> TokenClassifierOutput:
        """labels: (batch, seqlen) class ids, -100 where ignored (and on every padded position)."""
        encoding = self.bert.encode(
            input_ids, attention_mask, token_type_ids, inputs_embeds,
            labels=labels, num_label_classes=self.num_labels, labels_per_token=True,
            **_output_flags(self.config, output_attentions, output_hidden_states),
        )
        token_logits = self.classifier(self.dropout(encoding.hidden_states))  # (tokens, num_labels)
        loss = None if labels is None else CrossEntropyLoss()(upcast(token_logits), encoding.labels)
        return TokenClassifierOutput(
            loss=loss,
            logits=encoding.pad(token_logits),
            hidden_states=encoding.all_hidden_states,
            attentions=encoding.attentions,
        )


class MosaicBertForQuestionAnswering(MosaicBertPreTrainedModel):
    """Span extraction: start and end logits (batch, seqlen) for every real token, zeros at padded positions."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = MosaicBertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> QuestionAnsweringModelOutput:
        """start_positions, end_positions: (batch,) token positions of the answer span; positions outside the
        sequence are clamped and ignored, as in transformers' BERT."""
        encoding = self.bert.encode(
            input_ids, attention_mask, token_type_ids, inputs_embeds,
            **_output_flags(self.config, output_attentions, output_hidden_states),
        )
        start_logits, end_logits = encoding.pad(self.qa_outputs(encoding.hidden_states)).unbind(dim=-1)
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored_index = start_logits.shape[1]
            for name, positions in (("start_positions", start_positions), ("end_positions", end_positions)):
                if positions.numel() != start_logits.shape[0]:
                    raise ValueError(f"{name} must hold one position per example ({start_logits.shape[0]})")
            start_positions = start_positions.view(-1).clamp(0, ignored_index)
            end_positions = end_positions.view(-1).clamp(0, ignored_index)
            loss_fct = CrossEntropyLoss(ignore_index=ignored_index)
            loss = (loss_fct(upcast(start_logits), start_positions) + loss_fct(upcast(end_logits), end_positions)) / 2
        return QuestionAnsweringModelOutput(
            loss=loss,
            start_logits=start_logits,
            end_logits=end_logits,
            hidden_states=encoding.all_hidden_states,
            attentions=encoding.attentions,
        )


# The original MosaicBERT class names.
BertModel = MosaicBertModel
BertForMaskedLM = MosaicBertForMaskedLM
BertForSequenceClassification = MosaicBertForSequenceClassification
BertForMultipleChoice = MosaicBertForMultipleChoice
BertForTokenClassification = MosaicBertForTokenClassification
BertForQuestionAnswering = MosaicBertForQuestionAnswering

# save_pretrained writes this code beside the weights, so a saved folder loads anywhere with trust_remote_code.
MosaicBertConfig.register_for_auto_class()
MosaicBertModel.register_for_auto_class("AutoModel")
MosaicBertForMaskedLM.register_for_auto_class("AutoModelForMaskedLM")
MosaicBertForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
MosaicBertForMultipleChoice.register_for_auto_class("AutoModelForMultipleChoice")
MosaicBertForTokenClassification.register_for_auto_class("AutoModelForTokenClassification")
MosaicBertForQuestionAnswering.register_for_auto_class("AutoModelForQuestionAnswering")

__all__ = [
    "MosaicBertPreTrainedModel",
    "MosaicBertModel",
    "MosaicBertForMaskedLM",
    "MosaicBertForSequenceClassification",
    "MosaicBertForMultipleChoice",
    "MosaicBertForTokenClassification",
    "MosaicBertForQuestionAnswering",
]
