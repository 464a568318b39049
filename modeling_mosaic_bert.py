"""PyTorch MosaicBERT: BERT with ALiBi attention, a GeGLU feed-forward and unpadded (variable-length) attention.

Tokens are unpadded once, when they enter `MosaicBertModel`: every matmul, LayerNorm and the attention itself see only
the real tokens of the batch, concatenated as (total_tokens, hidden). Attention runs sequence by sequence through
`cu_seqlens`, either in the fused Triton kernel of `flash_attn_triton.py` (CUDA, fp16/bf16) or in PyTorch's
scaled_dot_product_attention. Outputs are padded back to (batch, seqlen, ...) only when they leave the model.
Two more Triton kernels fuse the rest of a block's elementwise work on the same devices: the GeGLU activation with its
dropout (`geglu_triton.py`) and dropout + residual + LayerNorm (`layernorm_triton.py`); a fourth computes the masked-LM
loss from the half-precision logits (`cross_entropy_triton.py`). `kernel_policy_reason` decides, for all four, from
`config.attention_backend`.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
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
from transformers.utils.generic import can_return_tuple

try:  # loaded as Hub remote code, inside a package
    from .bert_padding import index_first_axis, pad_input, true_positions, unpad_input
    from .configuration_mosaic_bert import MosaicBertConfig
except ImportError:  # loaded from a folder on sys.path (tests, scripts)
    from bert_padding import index_first_axis, pad_input, true_positions, unpad_input
    from configuration_mosaic_bert import MosaicBertConfig

try:  # the Triton kernels are optional: without Triton, the model runs on PyTorch
    from .cross_entropy_triton import cross_entropy, unsupported_reason as cross_entropy_unsupported_reason
    from .flash_attn_triton import flash_attn_varlen_qkvpacked_func, unsupported_reason
    from .geglu_triton import geglu, unsupported_reason as geglu_unsupported_reason
    from .layernorm_triton import dropout_add_layer_norm, unsupported_reason as layer_norm_unsupported_reason
except ImportError:
    try:
        from cross_entropy_triton import cross_entropy, unsupported_reason as cross_entropy_unsupported_reason
        from flash_attn_triton import flash_attn_varlen_qkvpacked_func, unsupported_reason
        from geglu_triton import geglu, unsupported_reason as geglu_unsupported_reason
        from layernorm_triton import dropout_add_layer_norm, unsupported_reason as layer_norm_unsupported_reason
    except ImportError:
        flash_attn_varlen_qkvpacked_func = unsupported_reason = geglu = geglu_unsupported_reason = None
        dropout_add_layer_norm = layer_norm_unsupported_reason = cross_entropy = None
        cross_entropy_unsupported_reason = None


def kernel_policy_reason(backend: str, tensor: torch.Tensor) -> str | None:
    """The choice every fused Triton kernel shares: why `config.attention_backend` keeps this tensor off the kernels,
    or None. "torch" never takes them, "auto" only for float16/bfloat16 CUDA tensors, "triton" whenever they can run."""
    if backend == "torch":
        return "attention_backend is 'torch'"
    if flash_attn_varlen_qkvpacked_func is None:
        return "Triton is not installed"
    if backend == "auto" and not (tensor.is_cuda and tensor.dtype in (torch.float16, torch.bfloat16)):
        return "'auto' uses the kernels for float16/bfloat16 CUDA tensors only"
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


class MosaicBertResidualLayerNorm(MosaicBertLayerNorm):
    """The end of every encoder block, LN(dropout(x) + residual). Runs as one fused Triton kernel each way where
    `kernel_policy_reason` allows (the sum and the dropout mask are never stored), else as dropout, add and
    MosaicBertLayerNorm. Parameters and state-dict keys are those of nn.LayerNorm."""

    def __init__(self, hidden_size: int, eps: float, dropout_prob: float, backend: str):
        super().__init__(hidden_size, eps=eps)
        self.dropout_prob = dropout_prob
        self.backend = backend

    def kernel_unsupported_reason(self, x: torch.Tensor, residual: torch.Tensor) -> str | None:
        """Why the fused kernel cannot run on these (total_tokens, hidden) inputs, or None."""
        return kernel_policy_reason(self.backend, x) or layer_norm_unsupported_reason(
            x, residual, self.weight, self.bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """(total_tokens, hidden) twice -> (total_tokens, hidden)."""
        dropout_p = self.dropout_prob if self.training else 0.0
        if self.kernel_unsupported_reason(x, residual) is None:
            return dropout_add_layer_norm(x, residual, self.weight, self.bias, self.eps, dropout_p)
        return super().forward(F.dropout(x, dropout_p, self.training) + residual)


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
        self.intermediate_size = config.intermediate_size
        self.backend = config.attention_backend
        # One matmul computes gate (first half of the outputs) and value (second half).
        self.gated_layers = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.act = ACT2FN[config.hidden_act]
        self.fusable_act = config.hidden_act == "gelu"
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.wo = nn.Linear(config.intermediate_size, config.hidden_size)
        self.layernorm = MosaicBertResidualLayerNorm(
            config.hidden_size, config.layer_norm_eps, dropout_prob=0.0, backend=config.attention_backend
        )

    def kernel_unsupported_reason(self, projected: torch.Tensor) -> str | None:
        """Why the fused GeGLU kernel cannot run on the (total_tokens, 2 * intermediate) projection, or None."""
        if not self.fusable_act:
            return "the fused kernel computes the exact 'gelu' activation only"
        return kernel_policy_reason(self.backend, projected) or geglu_unsupported_reason(projected)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(total_tokens, hidden) -> (total_tokens, hidden)."""
        projected = self.gated_layers(hidden_states)
        if self.kernel_unsupported_reason(projected) is None:
            activated = geglu(projected, self.dropout.p if self.training else 0.0)
        else:
            gate, value = projected.split(self.intermediate_size, dim=-1)
            activated = self.dropout(self.act(gate) * value)
        return self.layernorm(self.wo(activated), hidden_states)


def upcast_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision dtypes, the dtype itself for float32 and float64."""
    return torch.promote_types(dtype, torch.float32)


def upcast(logits: torch.Tensor) -> torch.Tensor:
    """Logits for a loss: half precision goes up to float32, float64 stays float64."""
    return logits.to(upcast_dtype(logits.dtype))


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


def torch_varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    slopes: torch.Tensor,
    dropout_p: float,
    output_attentions: bool,
) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """Attention within each sequence of an unpadded batch, on PyTorch.

    Sequences of equal length are batched into one scaled_dot_product_attention call with the (1, heads, L, L) ALiBi
    bias of that length (a slice of one bias built for the longest sequence), so no (batch, heads, max_len, max_len)
    tensor is built and padding costs nothing. A length held by one sequence only attends on views of its rows.

    Args:
        query, key, value: (total_tokens, heads, head_dim).
        cu_seqlens: (batch + 1,) int32 sequence boundaries.
        slopes: (heads,) ALiBi slopes.
        dropout_p: dropout on the attention probabilities.
        output_attentions: also return each sequence's probabilities.

    Returns:
        (total_tokens, heads, head_dim) context, and with output_attentions a list of (heads, L_b, L_b) tensors in
        batch order (else None).
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    starts = cu_seqlens[:-1].tolist()
    if max(lengths) == 0:
        return query.new_zeros(query.shape), [None] * len(lengths) if output_attentions else None
    full_bias = alibi_bias(slopes, max(lengths), query.dtype)[None]  # (1, heads, max_len, max_len)
    outputs = [None] * len(lengths)  # per sequence, (length, heads, head_dim)
    probabilities = [None] * len(lengths) if output_attentions else None
    for length in sorted(set(lengths) - {0}):
        seq_ids = [b for b, seq_len in enumerate(lengths) if seq_len == length]

        def rows_of_this_length(t: torch.Tensor) -> torch.Tensor:
            """(total_tokens, heads, head_dim) -> (n, heads, length, head_dim), a view where the rows allow."""
            if len(seq_ids) == len(lengths):
                return t.view(len(seq_ids), length, *t.shape[1:]).transpose(1, 2)
            return torch.stack([t[starts[b] : starts[b] + length] for b in seq_ids]).transpose(1, 2)

        q, k, v = rows_of_this_length(query), rows_of_this_length(key), rows_of_this_length(value)
        bias = full_bias[..., :length, :length]
        if output_attentions:
            probs = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias).softmax(dim=-1)
            out = F.dropout(probs, p=dropout_p) @ v
            for i, b in enumerate(seq_ids):
                probabilities[b] = probs[i]
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
        for i, b in enumerate(seq_ids):
            outputs[b] = out[i].transpose(0, 1)
    if len(set(lengths)) == 1:  # one length: the sequences' rows are already in order
        return out.transpose(1, 2).flatten(0, 1), probabilities
    return torch.cat([o for o in outputs if o is not None]), probabilities


class MosaicBertSelfAttention(nn.Module):
    """Multi-head self-attention with ALiBi over an unpadded batch. Owns the fused QKV projection and picks the
    attention implementation (Triton kernel or PyTorch) for each call."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.backend = config.attention_backend
        self.dropout_p = config.attention_probs_dropout_prob
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)

    def kernel_unsupported_reason(self, query, key, value, cu_seqlens, slopes, output_attentions) -> str | None:
        """Why the Triton kernel cannot run this call, or None when it can."""
        if output_attentions:
            return "the fused kernel does not return attention probabilities (output_attentions=True)"
        if self.training and self.dropout_p > 0:
            return "attention dropout is active"
        return kernel_policy_reason(self.backend, query) or unsupported_reason(query, key, value, cu_seqlens, slopes)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        slopes: torch.Tensor,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """(total_tokens, hidden) -> (total_tokens, hidden) context, and per-sequence probabilities when asked."""
        qkv = self.Wqkv(hidden_states).view(-1, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.unbind(dim=1)  # each (total_tokens, heads, head_dim)
        reason = self.kernel_unsupported_reason(query, key, value, cu_seqlens, slopes, output_attentions)
        if reason is None:
            context = flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, alibi_slopes=slopes)
            probabilities = None
        elif self.backend == "triton":
            raise ValueError(f"attention_backend='triton' cannot run this call: {reason}")
        else:
            dropout_p = self.dropout_p if self.training else 0.0
            context, probabilities = torch_varlen_attention(
                query, key, value, cu_seqlens, slopes, dropout_p, output_attentions
            )
        return context.reshape(hidden_states.shape), probabilities


class MosaicBertSelfOutput(nn.Module):
    """Attention output projection, dropout and residual LayerNorm."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = MosaicBertResidualLayerNorm(
            config.hidden_size, config.layer_norm_eps, config.hidden_dropout_prob, config.attention_backend
        )

    def forward(self, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """(total_tokens, hidden) twice -> (total_tokens, hidden)."""
        return self.LayerNorm(self.dense(context), residual)


class MosaicBertAttention(nn.Module):
    """Self-attention and its output block (`attention.self`, `attention.output` in checkpoints)."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.self = MosaicBertSelfAttention(config)
        self.output = MosaicBertSelfOutput(config)

    def forward(self, hidden_states, cu_seqlens, max_seqlen, slopes, output_attentions=False):
        context, probabilities = self.self(hidden_states, cu_seqlens, max_seqlen, slopes, output_attentions)
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
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        slopes: torch.Tensor,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """(total_tokens, hidden) -> (total_tokens, hidden), and per-sequence attention probabilities when asked."""
        hidden_states, probabilities = self.attention(hidden_states, cu_seqlens, max_seqlen, slopes, output_attentions)
        return self.mlp(hidden_states), probabilities


class MosaicBertEncoder(nn.Module):
    """The stack of layers over one unpadded batch."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.layer = nn.ModuleList([MosaicBertLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None, list[list[torch.Tensor]] | None]:
        """(total_tokens, hidden) -> (total_tokens, hidden); with the flags, also the input and every layer's
        output (each (total_tokens, hidden)) and every layer's per-sequence attention probabilities."""
        # Computed here, so nothing about ALiBi lives in the state dict or on the meta device.
        slopes = alibi_slopes(self.num_heads, hidden_states.device, upcast_dtype(hidden_states.dtype))
        all_hidden_states = [hidden_states] if output_hidden_states else None
        all_probabilities = [] if output_attentions else None
        for layer in self.layer:
            hidden_states, probabilities = layer(
                hidden_states, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, slopes=slopes,
                output_attentions=output_attentions,
            )
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            if output_attentions:
                all_probabilities.append(probabilities)
        return hidden_states, all_hidden_states, all_probabilities


class MosaicBertPooler(nn.Module):
    """dense + tanh on the first real token of each sequence."""

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
class UnpaddedEncoding:
    """The encoder's result in the unpadded layout, with what is needed to pad it back.

    hidden_states: (total_tokens, hidden) last layer. all_hidden_states: embeddings and every layer, each
    (total_tokens, hidden), when asked. attentions: per layer, (batch, heads, seqlen, seqlen), when asked.
    indices: (total_tokens,) flat positions in (batch * seqlen); cu_seqlens: (batch + 1,) int32.
    """

    hidden_states: torch.Tensor
    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    batch_size: int
    seqlen: int
    all_hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None

    def pad(self, unpadded: torch.Tensor) -> torch.Tensor:
        """(total_tokens, ...) -> (batch, seqlen, ...), zeros at padded positions."""
        return pad_input(unpadded, self.indices, self.batch_size, self.seqlen)

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """(batch, seqlen, ...) -> (total_tokens, ...)."""
        return index_first_axis(padded, self.indices)

    def first_token_states(self) -> torch.Tensor:
        """(batch, hidden): each sequence's first real token; zeros for a sequence with no real token."""
        total_tokens = self.hidden_states.shape[0]
        if total_tokens == 0:
            return self.hidden_states.new_zeros(self.batch_size, self.hidden_states.shape[1])
        rows = self.cu_seqlens[:-1].clamp(max=total_tokens - 1).long()
        has_tokens = (self.cu_seqlens[1:] > self.cu_seqlens[:-1]).unsqueeze(-1)
        return self.hidden_states[rows] * has_tokens.to(self.hidden_states.dtype)

    def padded_hidden_states(self) -> tuple[torch.Tensor, ...] | None:
        if self.all_hidden_states is None:
            return None
        return tuple(self.pad(states) for states in self.all_hidden_states)


# Index dtypes nn.Embedding accepts.
_INDEX_DTYPES = (torch.int64, torch.int32)


def check_inputs(config, input_ids, attention_mask, token_type_ids, inputs_embeds) -> tuple[int, int] | None:
    """Raises ValueError for inputs the model cannot take, before anything indexes with them.

    input_ids (batch, seqlen) integer ids in [0, vocab_size), or inputs_embeds (batch, seqlen, hidden);
    attention_mask (batch, seqlen) of 0/1; token_type_ids (batch, seqlen) in [0, type_vocab_size).
    Returns (total real tokens, longest sequence) of a valid attention_mask, read in the same host synchronisation as
    the value checks (None without a mask), so that unpadding needs no other.
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
    # One host sync for every value check.
    checks = {}
    if input_ids is not None:
        checks["input_ids_min"], checks["input_ids_max"] = input_ids.min(), input_ids.max()
    if attention_mask is not None:
        checks["mask_bad"] = ((attention_mask != 0) & (attention_mask != 1)).any()
        lengths = (attention_mask != 0).sum(dim=-1)
        checks["total_tokens"], checks["max_seqlen"] = lengths.sum(), lengths.max()
    if token_type_ids is not None:
        checks["types_min"], checks["types_max"] = token_type_ids.min(), token_type_ids.max()
    if not checks:  # inputs_embeds without attention_mask or token_type_ids: nothing to look at
        return None
    values = dict(zip(checks, torch.stack([v.to(torch.int64) for v in checks.values()]).tolist()))
    if "input_ids_min" in values and (values["input_ids_min"] < 0 or values["input_ids_max"] >= config.vocab_size):
        bad = values["input_ids_min"] if values["input_ids_min"] < 0 else values["input_ids_max"]
        raise ValueError(f"input_ids holds {int(bad)}, outside the vocabulary [0, {config.vocab_size})")
    if values.get("mask_bad"):
        bad = attention_mask[(attention_mask != 0) & (attention_mask != 1)].flatten()[0].item()
        raise ValueError(f"attention_mask must hold only 0 (padding) and 1 (real token), got {bad}")
    if "types_min" in values and (values["types_min"] < 0 or values["types_max"] >= config.type_vocab_size):
        bad = values["types_min"] if values["types_min"] < 0 else values["types_max"]
        raise ValueError(f"token_type_ids holds {int(bad)}, outside [0, {config.type_vocab_size})")
    return (values["total_tokens"], values["max_seqlen"]) if "total_tokens" in values else None


def labels_of_real_tokens(
    labels: torch.Tensor, encoding: UnpaddedEncoding, num_classes: int
) -> tuple[torch.Tensor, int]:
    """(batch, seqlen) token labels -> (total_tokens,) labels of the real tokens, and how many of them are not -100.

    Raises ValueError for a label other than -100 on a padded position and for labels outside [0, num_classes) and
    not -100; every value check shares one host synchronisation.
    """
    if tuple(labels.shape) != (encoding.batch_size, encoding.seqlen):
        raise ValueError(
            f"labels must have shape {(encoding.batch_size, encoding.seqlen)} (one per token), "
            f"got {tuple(labels.shape)}"
        )
    check_label_dtype(labels)
    real = encoding.unpad(labels)
    labelled = real != -100
    out_of_range = labelled & ((real < 0) | (real >= num_classes))
    n_everywhere, n_real, n_bad = torch.stack([(labels != -100).sum(), labelled.sum(), out_of_range.sum()]).tolist()
    if n_everywhere != n_real:
        raise ValueError("labels set a target on a padded position (attention_mask 0); use -100 there")
    if n_bad:
        check_class_labels(real, num_classes)  # raises, naming the bad values
    return real, n_real


def check_label_dtype(labels: torch.Tensor) -> None:
    if labels.dtype != torch.int64:  # what cross_entropy takes
        raise ValueError(f"class labels must be int64 (torch.long) ids, got dtype {labels.dtype}")


def check_class_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Class labels must be integer ids in [0, num_classes) or -100 (ignored)."""
    check_label_dtype(labels)
    valid = (labels == -100) | ((labels >= 0) & (labels < num_classes))
    if not bool(valid.all()):
        bad = labels[~valid].unique()[:5].tolist()
        raise ValueError(f"labels must lie in [0, {num_classes}) or be -100, got values {bad}")


def _output_flags(config, output_attentions, output_hidden_states) -> dict:
    return {
        "output_attentions": bool(output_attentions if output_attentions is not None else config.output_attentions),
        "output_hidden_states": bool(
            output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        ),
    }


class MosaicBertPreTrainedModel(PreTrainedModel):
    config_class = MosaicBertConfig
    config: MosaicBertConfig
    base_model_prefix = "bert"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MosaicBertLayer"]

    def _init_weights(self, module: nn.Module):
        """BERT's init: normal(0, initializer_range) weights, zero biases and padding row, unit LayerNorms."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
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
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> UnpaddedEncoding:
        """Runs the encoder on the real tokens only and returns the unpadded result (what the heads build on).

        input_ids, attention_mask, token_type_ids: (batch, seqlen); inputs_embeds: (batch, seqlen, hidden).
        Padding may sit anywhere in a row; ALiBi positions count real tokens only.
        """
        lengths = check_inputs(self.config, input_ids, attention_mask, token_type_ids, inputs_embeds)
        padded = input_ids if input_ids is not None else inputs_embeds
        batch_size, seqlen = padded.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, seqlen, dtype=torch.int32, device=padded.device)
            lengths = (batch_size * seqlen, seqlen)
        if token_type_ids is None:
            token_type_ids = torch.zeros(batch_size, seqlen, dtype=torch.long, device=padded.device)
        padded, indices, cu_seqlens, max_seqlen = unpad_input(padded, attention_mask.to(torch.int32), lengths)
        token_type_ids = index_first_axis(token_type_ids, indices)
        if input_ids is not None:
            hidden_states = self.embeddings(padded, token_type_ids, None)
        else:
            hidden_states = self.embeddings(None, token_type_ids, padded)

        hidden_states, all_hidden_states, all_probabilities = self.encoder(
            hidden_states, cu_seqlens, max_seqlen, output_attentions, output_hidden_states
        )
        return UnpaddedEncoding(
            hidden_states=hidden_states,
            indices=indices,
            cu_seqlens=cu_seqlens,
            batch_size=batch_size,
            seqlen=seqlen,
            all_hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            attentions=(
                tuple(self._pad_attentions(p, indices, cu_seqlens, batch_size, seqlen) for p in all_probabilities)
                if output_attentions
                else None
            ),
        )

    @staticmethod
    def _pad_attentions(probabilities, indices, cu_seqlens, batch_size, seqlen) -> torch.Tensor:
        """Per-sequence (heads, L, L) probabilities -> (batch, heads, seqlen, seqlen), zeros on padded rows/cols."""
        heads = next(p.shape[0] for p in probabilities if p is not None)
        reference = next(p for p in probabilities if p is not None)
        padded = reference.new_zeros(batch_size, heads, seqlen, seqlen)
        for b, probs in enumerate(probabilities):
            if probs is None:
                continue
            positions = indices[cu_seqlens[b] : cu_seqlens[b + 1]] - b * seqlen
            padded[b, :, positions[:, None], positions[None, :]] = probs
        return padded

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
        (batch, heads, seqlen, seqlen) probabilities; PyTorch attention path only)."""
        encoding = self.encode(
            input_ids, attention_mask, token_type_ids, inputs_embeds,
            **_output_flags(self.config, output_attentions, output_hidden_states),
        )
        pooled = self.pooler(encoding.first_token_states()) if self.pooler is not None else None
        return BaseModelOutputWithPooling(
            last_hidden_state=encoding.pad(encoding.hidden_states),
            pooler_output=pooled,
            hidden_states=encoding.padded_hidden_states(),
            attentions=encoding.attentions,
        )


def masked_lm_loss(logits: torch.Tensor, targets: torch.Tensor, backend: str) -> torch.Tensor:
    """Mean cross-entropy of the labelled tokens' (n_labelled, vocab) logits against their (n_labelled,) targets,
    in float32 (float64 stays float64). Runs on the fused kernel where `kernel_policy_reason` allows (it reads the
    half-precision logits once each way, where F.cross_entropy first copies them to float32), else on
    F.cross_entropy. A batch with nothing labelled gives a zero loss (not NaN) that still reaches every head weight."""
    if not targets.numel():
        return upcast(logits).sum()
    if kernel_policy_reason(backend, logits) is None and cross_entropy_unsupported_reason(logits, targets) is None:
        return cross_entropy(logits, targets).mean()
    return F.cross_entropy(upcast(logits), targets)


class MosaicBertForMaskedLM(MosaicBertPreTrainedModel):
    """MosaicBERT with the masked-language-modelling head. With labels, the head runs only on labelled tokens."""

    _tied_weights_keys = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"}

    def __init__(self, config: MosaicBertConfig):
        super().__init__(config)
        self.bert = MosaicBertModel(config, add_pooling_layer=False)
        self.cls = MosaicBertOnlyMLMHead(config)
        self.backend = config.attention_backend  # for the loss kernel
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings

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
    ) -> MaskedLMOutput:
        """labels: (batch, seqlen) target ids, -100 where no prediction is wanted (and on every padded position).

        Returns logits of shape (batch, seqlen, vocab) without labels. With labels, the MLM transform and decoder
        run only on the labelled tokens, and logits has shape (num_labelled, vocab): one row per label other than
        -100, in (batch, position) order, so `logits.argmax(-1)` compares with `labels[labels != -100]`.
        loss: mean cross-entropy over the labelled tokens.
        """
        encoding = self.bert.encode(
            input_ids, attention_mask, token_type_ids, inputs_embeds,
            **_output_flags(self.config, output_attentions, output_hidden_states),
        )
        loss = None
        if labels is None:
            logits = encoding.pad(self.cls(encoding.hidden_states))
        else:
            labels, n_labelled = labels_of_real_tokens(labels, encoding, self.config.vocab_size)
            labelled = true_positions(labels != -100, n_labelled)
            targets = labels[labelled]
            logits = self.cls(encoding.hidden_states[labelled])
            loss = masked_lm_loss(logits, targets, self.backend)
        return MaskedLMOutput(
            loss=loss, logits=logits, hidden_states=encoding.padded_hidden_states(), attentions=encoding.attentions
        )


class MosaicBertForSequenceClassification(MosaicBertPreTrainedModel):
    """Pooled first token -> dropout -> classifier. Regression, single- or multi-label by `config.problem_type`."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = MosaicBertModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
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
        encoding = self.bert.encode(
            input_ids, attention_mask, token_type_ids, inputs_embeds,
            **_output_flags(self.config, output_attentions, output_hidden_states),
        )
        pooled = self.bert.pooler(encoding.first_token_states())
        logits = self.classifier(self.dropout(pooled))
        loss = None if labels is None else self._loss(logits, labels)
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=encoding.padded_hidden_states(), attentions=encoding.attentions
        )

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.config.problem_type is None:
            if self.num_labels == 1:
                self.config.problem_type = "regression"
            elif self.num_labels > 1 and not labels.dtype.is_floating_point:
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        if self.config.problem_type in ("regression", "single_label_classification"):
            if tuple(labels.shape) not in ((logits.shape[0],), (logits.shape[0], 1)):
                raise ValueError(
                    f"{self.config.problem_type} labels must have shape ({logits.shape[0]},), got {tuple(labels.shape)}"
                )
        if self.config.problem_type == "regression":
            return MSELoss()(upcast(logits).squeeze(-1), labels.view(-1).to(upcast_dtype(logits.dtype)))
        if self.config.problem_type == "single_label_classification":
            labels = labels.view(-1)
            check_class_labels(labels, self.num_labels)
            return CrossEntropyLoss()(upcast(logits), labels)
        if tuple(labels.shape) != tuple(logits.shape):
            raise ValueError(f"multi-label labels must have shape {tuple(logits.shape)}, got {tuple(labels.shape)}")
        return BCEWithLogitsLoss()(upcast(logits), labels.to(upcast_dtype(logits.dtype)))


class MosaicBertForMultipleChoice(MosaicBertPreTrainedModel):
    """Each (batch, choice) pair is encoded, pooled and scored; logits (batch, num_choices)."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__(config)
        self.bert = MosaicBertModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
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
        num_choices = inputs.shape[1]

        def flat(t):
            return None if t is None else t.flatten(0, 1)

        encoding = self.bert.encode(
            flat(input_ids), flat(attention_mask), flat(token_type_ids), flat(inputs_embeds),
            **_output_flags(self.config, output_attentions, output_hidden_states),
        )
        pooled = self.bert.pooler(encoding.first_token_states())
        logits = self.classifier(self.dropout(pooled)).view(-1, num_choices)
        loss = None
        if labels is not None:
            if tuple(labels.shape) != (logits.shape[0],):
                raise ValueError(f"labels must have shape ({logits.shape[0]},), one choice index per example")
            check_class_labels(labels, num_choices)
            loss = CrossEntropyLoss()(upcast(logits), labels)
        return MultipleChoiceModelOutput(
            loss=loss, logits=logits, hidden_states=encoding.padded_hidden_states(), attentions=encoding.attentions
        )


class MosaicBertForTokenClassification(MosaicBertPreTrainedModel):
    """A classifier on every real token; logits (batch, seqlen, num_labels), zeros at padded positions."""

    def __init__(self, config: MosaicBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = MosaicBertModel(config, add_pooling_layer=False)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
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
            **_output_flags(self.config, output_attentions, output_hidden_states),
        )
        token_logits = self.classifier(self.dropout(encoding.hidden_states))  # (total_tokens, num_labels)
        loss = None
        if labels is not None:
            labels, _ = labels_of_real_tokens(labels, encoding, self.num_labels)
            loss = CrossEntropyLoss()(upcast(token_logits), labels)
        return TokenClassifierOutput(
            loss=loss,
            logits=encoding.pad(token_logits),
            hidden_states=encoding.padded_hidden_states(),
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
            hidden_states=encoding.padded_hidden_states(),
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
