"""MosaicBERT configuration."""

from transformers import PretrainedConfig

# Every Auto class this package serves. Written into each saved config so that a folder saved from any head loads
# through all of them, and so that an original MosaicBERT config (whose auto_map points at `bert_layers`) is
# rewritten to this package's code when it is saved again.
AUTO_MAP = {
    "AutoConfig": "configuration_mosaic_bert.MosaicBertConfig",
    "AutoModel": "modeling_mosaic_bert.MosaicBertModel",
    "AutoModelForMaskedLM": "modeling_mosaic_bert.MosaicBertForMaskedLM",
    "AutoModelForSequenceClassification": "modeling_mosaic_bert.MosaicBertForSequenceClassification",
    "AutoModelForMultipleChoice": "modeling_mosaic_bert.MosaicBertForMultipleChoice",
    "AutoModelForTokenClassification": "modeling_mosaic_bert.MosaicBertForTokenClassification",
    "AutoModelForQuestionAnswering": "modeling_mosaic_bert.MosaicBertForQuestionAnswering",
}

# `attention_backend`, the switch before transformers' own `attn_implementation`, and what each value now is.
LEGACY_ATTENTION_BACKENDS = {"auto": "sdpa", "torch": "eager", "triton": "flash_attention_2"}


class MosaicBertConfig(PretrainedConfig):
    r"""
    Configuration of a MosaicBERT encoder: BERT with ALiBi instead of position embeddings, a GeGLU feed-forward and
    unpadded attention. The defaults describe MosaicBERT-base (137M parameters).

    Args:
        vocab_size (`int`, defaults to 30528): rows of the word embedding (bert-base-uncased's 30522 padded to a
            multiple of 8).
        hidden_size (`int`, defaults to 768): width of the encoder.
        num_hidden_layers (`int`, defaults to 12): encoder layers.
        num_attention_heads (`int`, defaults to 12): attention heads; `hidden_size` must be a multiple of it.
        intermediate_size (`int`, defaults to 3072): width of each half of the gated feed-forward.
        hidden_act (`str`, defaults to `"gelu"`): activation of the feed-forward gate and of the MLM transform.
        hidden_dropout_prob (`float`, defaults to 0.1): dropout on the embeddings, the attention output, the
            GeGLU activation and (unless `classifier_dropout` is set) before classification heads.
        attention_probs_dropout_prob (`float`, defaults to 0.0): dropout on attention probabilities. While it is
            active in training, attention runs on the PyTorch path.
        type_vocab_size (`int`, defaults to 2): token type (segment) ids.
        layer_norm_eps (`float`, defaults to 1e-12): LayerNorm epsilon.
        initializer_range (`float`, defaults to 0.02): standard deviation of the normal weight init.
        pad_token_id (`int`, defaults to 0): the padding row of the word embedding.
        classifier_dropout (`float`, *optional*): dropout before classification heads; `hidden_dropout_prob` if
            unset.
        alibi_starting_size (`int`, defaults to 512): the sequence length MosaicBERT was pretrained at. Kept for
            compatibility with original checkpoints; ALiBi is computed for any length, so nothing depends on it.
        cuda_graphs (`bool`, defaults to `False`): in masked-LM training on packed batches (every position a real
            token, one shape from batch to batch) on CUDA, capture the encoder layers' forward and backward as two
            CUDA graphs and replay them, which takes the launch of every one of their kernels off the host. The
            layers run eagerly wherever that does not hold (padding, evaluation, gradient checkpointing, modules or
            hooks that are not this package's: PEFT adapters, FSDP, offloading). The graphs keep one batch's
            activations in their own memory pool until the model leaves training mode; one backward per forward.

    Attention and kernels follow transformers' own switch, `attn_implementation` (pass it to `from_pretrained`, to
    this config, or change it with `model.set_attn_implementation`); it chooses for all four fused Triton kernels
    (attention, GeGLU, residual LayerNorm, masked-LM loss):
        - `"sdpa"` (default): the kernels on CUDA tensors in float16/bfloat16, PyTorch everywhere else (attention
          through scaled_dot_product_attention);
        - `"eager"`: PyTorch only, attention probabilities computed explicitly;
        - `"flash_attention_2"`: this package's Triton FlashAttention-2 kernel wherever it can run (a ValueError
          names the reason where it cannot); the flash_attn package is not needed.
    Migration: configs written before this switch carry `attention_backend`; it is still read, once, and mapped onto
    `attn_implementation`: `"auto"` -> `"sdpa"`, `"torch"` -> `"eager"`, `"triton"` -> `"flash_attention_2"`
    (an explicit `attn_implementation` wins). It is not saved again.
    """

    model_type = "mosaic_bert"

    def __init__(
        self,
        vocab_size=30528,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.0,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        initializer_range=0.02,
        pad_token_id=0,
        classifier_dropout=None,
        alibi_starting_size=512,
        cuda_graphs=False,
        tie_word_embeddings=True,
        **kwargs,
    ):
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be a multiple of num_attention_heads ({num_attention_heads})"
            )
        if "attention_backend" in kwargs:
            kwargs.setdefault("attn_implementation", legacy_attn_implementation(kwargs.pop("attention_backend")))
        # An original MosaicBERT config points auto_map at `bert_layers`; this package's code replaces it.
        kwargs.pop("auto_map", None)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.type_vocab_size = type_vocab_size
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.classifier_dropout = classifier_dropout
        self.alibi_starting_size = alibi_starting_size
        self.cuda_graphs = cuda_graphs
        super().__init__(
            pad_token_id=pad_token_id, tie_word_embeddings=tie_word_embeddings, auto_map=dict(AUTO_MAP), **kwargs
        )

    def __setattr__(self, key, value):
        # Code written for the former switch (`config.attention_backend = "torch"`) sets the current one.
        if key == "attention_backend":
            key, value = "_attn_implementation", legacy_attn_implementation(value)
        super().__setattr__(key, value)


def legacy_attn_implementation(attention_backend: str) -> str:
    """The attn_implementation that a former `attention_backend` value stands for."""
    if attention_backend not in LEGACY_ATTENTION_BACKENDS:
        raise ValueError(
            f"attention_backend must be one of {tuple(LEGACY_ATTENTION_BACKENDS)}, got {attention_backend!r} "
            "(it is now attn_implementation: 'sdpa', 'eager' or 'flash_attention_2')"
        )
    return LEGACY_ATTENTION_BACKENDS[attention_backend]


__all__ = ["MosaicBertConfig"]
