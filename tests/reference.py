"""Independent float64 reference implementation of MosaicBERT.

Written from the architecture specification only (not from the model code).
Everything is computed sequence by sequence on the REAL tokens of each
sequence (attention_mask == 1, in order), then scattered back into padded
(B, S, ...) tensors with zeros at padded positions.

All functions take a plain ``dict`` of tensors keyed exactly like the original
MosaicBERT checkpoint (``bert.embeddings.word_embeddings.weight``, ...), so the
same dict can be saved as an original ``pytorch_model.bin`` and loaded into the
model under test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# --------------------------------------------------------------------------
# Small dimension holder (kept independent of MosaicBertConfig)
# --------------------------------------------------------------------------


@dataclass
class Dims:
    vocab_size: int = 97
    hidden_size: int = 32
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 64
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    num_labels: int = 3
    extra: dict = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def config_kwargs(self) -> dict:
        return dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            type_vocab_size=self.type_vocab_size,
            layer_norm_eps=self.layer_norm_eps,
            pad_token_id=self.pad_token_id,
            num_labels=self.num_labels,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            **self.extra,
        )


# --------------------------------------------------------------------------
# ALiBi
# --------------------------------------------------------------------------


def alibi_slopes(n_heads: int) -> list[float]:
    """Slopes m_h as specified (power-of-two rule + interleaved extension)."""

    def pow2_slopes(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    if n_heads & (n_heads - 1) == 0:
        return pow2_slopes(n_heads)
    n2 = 2 ** int(math.floor(math.log2(n_heads)))
    extra = pow2_slopes(2 * n2)[0::2][: n_heads - n2]
    return pow2_slopes(n2) + extra


def alibi_bias(n_heads: int, length: int, dtype=torch.float64) -> torch.Tensor:
    m = torch.tensor(alibi_slopes(n_heads), dtype=dtype)
    pos = torch.arange(length, dtype=dtype)
    dist = (pos[:, None] - pos[None, :]).abs()
    return -m[:, None, None] * dist[None]  # (heads, L, L)


# --------------------------------------------------------------------------
# Primitive ops (written out explicitly)
# --------------------------------------------------------------------------


def gelu_exact(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def linear(x, w, b=None):
    y = x @ w.t()
    if b is not None:
        y = y + b
    return y


# --------------------------------------------------------------------------
# Random "original checkpoint" state dicts with exact key names
# --------------------------------------------------------------------------


def encoder_keys(d: Dims, prefix: str = "bert.") -> dict[str, tuple]:
    H, I, V, T = d.hidden_size, d.intermediate_size, d.vocab_size, d.type_vocab_size
    shapes = {
        f"{prefix}embeddings.word_embeddings.weight": (V, H),
        f"{prefix}embeddings.token_type_embeddings.weight": (T, H),
        f"{prefix}embeddings.LayerNorm.weight": (H,),
        f"{prefix}embeddings.LayerNorm.bias": (H,),
    }
    for i in range(d.num_hidden_layers):
        p = f"{prefix}encoder.layer.{i}."
        shapes.update(
            {
                p + "attention.self.Wqkv.weight": (3 * H, H),
                p + "attention.self.Wqkv.bias": (3 * H,),
                p + "attention.output.dense.weight": (H, H),
                p + "attention.output.dense.bias": (H,),
                p + "attention.output.LayerNorm.weight": (H,),
                p + "attention.output.LayerNorm.bias": (H,),
                p + "mlp.gated_layers.weight": (2 * I, H),
                p + "mlp.wo.weight": (H, I),
                p + "mlp.wo.bias": (H,),
                p + "mlp.layernorm.weight": (H,),
                p + "mlp.layernorm.bias": (H,),
            }
        )
    return shapes


def head_keys(d: Dims, kind: str) -> dict[str, tuple]:
    H, V, L = d.hidden_size, d.vocab_size, d.num_labels
    pooler = {"bert.pooler.dense.weight": (H, H), "bert.pooler.dense.bias": (H,)}
    if kind == "mlm":
        return {
            "cls.predictions.transform.dense.weight": (H, H),
            "cls.predictions.transform.dense.bias": (H,),
            "cls.predictions.transform.LayerNorm.weight": (H,),
            "cls.predictions.transform.LayerNorm.bias": (H,),
            "cls.predictions.decoder.weight": (V, H),  # tied; filled below
            "cls.predictions.decoder.bias": (V,),
        }
    if kind == "seq":
        return {**pooler, "classifier.weight": (L, H), "classifier.bias": (L,)}
    if kind == "mc":
        return {**pooler, "classifier.weight": (1, H), "classifier.bias": (1,)}
    if kind == "tok":
        return {"classifier.weight": (L, H), "classifier.bias": (L,)}
    if kind == "qa":
        return {"qa_outputs.weight": (2, H), "qa_outputs.bias": (2,)}
    if kind == "base":
        return {}
    if kind == "base_pooler":
        return {"pooler.dense.weight": (H, H), "pooler.dense.bias": (H,)}
    raise ValueError(kind)


def random_state_dict(d: Dims, kind: str, seed: int = 0, dtype=torch.float64) -> dict:
    """Random weights far from init (LayerNorm weights/biases, decoder bias...)."""
    g = torch.Generator().manual_seed(seed)
    prefix = "" if kind.startswith("base") else "bert."
    shapes = {**encoder_keys(d, prefix), **head_keys(d, kind)}
    sd = {}
    for k, shp in shapes.items():
        if k.endswith("decoder.weight"):
            continue
        if "LayerNorm.weight" in k or "layernorm.weight" in k:
            t = 1.0 + 0.3 * torch.randn(shp, generator=g, dtype=dtype)
        elif "embeddings" in k:
            t = 0.5 * torch.randn(shp, generator=g, dtype=dtype)
        elif k.endswith(".bias"):
            t = 0.2 * torch.randn(shp, generator=g, dtype=dtype)
        else:
            fan_in = shp[1]
            t = torch.randn(shp, generator=g, dtype=dtype) * (1.5 / math.sqrt(fan_in))
        sd[k] = t
    if kind == "mlm":
        sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"]
    return sd


# --------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------


def _get(sd, prefix, name):
    return sd[prefix + name]


def encode(
    sd: dict,
    d: Dims,
    input_ids=None,
    attention_mask=None,
    token_type_ids=None,
    inputs_embeds=None,
    prefix: str = "bert.",
    pooler_prefix: str | None = None,
):
    """Returns dict with last_hidden_state (B,S,H), hidden_states (list), attentions (list),
    pooled (B,H) or None, and per-sequence real-token indices."""
    if input_ids is not None:
        B, S = input_ids.shape
    else:
        B, S = inputs_embeds.shape[:2]
    H, nh, hd = d.hidden_size, d.num_attention_heads, d.head_dim
    if attention_mask is None:
        attention_mask = torch.ones(B, S, dtype=torch.long)
    if token_type_ids is None:
        token_type_ids = torch.zeros(B, S, dtype=torch.long)
    word = _get(sd, prefix, "embeddings.word_embeddings.weight")
    dtype = word.dtype
    n_states = d.num_hidden_layers + 1
    hs_rows = [[] for _ in range(n_states)]  # per state, list of (S,H) per sequence
    att_rows = [[] for _ in range(d.num_hidden_layers)]
    pooled_rows = []
    for b in range(B):
        idx = torch.nonzero(attention_mask[b] != 0).flatten()
        L = idx.numel()
        if inputs_embeds is not None:
            x = inputs_embeds[b, idx]
        else:
            x = word[input_ids[b, idx]]
        x = x + _get(sd, prefix, "embeddings.token_type_embeddings.weight")[token_type_ids[b, idx]]
        x = layer_norm(
            x,
            _get(sd, prefix, "embeddings.LayerNorm.weight"),
            _get(sd, prefix, "embeddings.LayerNorm.bias"),
            d.layer_norm_eps,
        )
        states = [x]
        bias = alibi_bias(nh, L, dtype)
        for i in range(d.num_hidden_layers):
            p = f"encoder.layer.{i}."
            qkv = linear(
                x, _get(sd, prefix, p + "attention.self.Wqkv.weight"), _get(sd, prefix, p + "attention.self.Wqkv.bias")
            )
            q = qkv[:, :H].reshape(L, nh, hd).transpose(0, 1)  # (nh, L, hd)
            k = qkv[:, H : 2 * H].reshape(L, nh, hd).transpose(0, 1)
            v = qkv[:, 2 * H :].reshape(L, nh, hd).transpose(0, 1)
            scores = q @ k.transpose(-1, -2) / math.sqrt(hd) + bias
            probs = torch.softmax(scores, dim=-1)
            ctx = (probs @ v).transpose(0, 1).reshape(L, H)
            full = torch.zeros(nh, S, S, dtype=dtype)
            full[:, idx[:, None], idx[None, :]] = probs
            att_rows[i].append(full)
            a = linear(
                ctx,
                _get(sd, prefix, p + "attention.output.dense.weight"),
                _get(sd, prefix, p + "attention.output.dense.bias"),
            )
            x = layer_norm(
                a + x,
                _get(sd, prefix, p + "attention.output.LayerNorm.weight"),
                _get(sd, prefix, p + "attention.output.LayerNorm.bias"),
                d.layer_norm_eps,
            )
            g = linear(x, _get(sd, prefix, p + "mlp.gated_layers.weight"))
            I = d.intermediate_size
            h = gelu_exact(g[:, :I]) * g[:, I:]
            h = linear(h, _get(sd, prefix, p + "mlp.wo.weight"), _get(sd, prefix, p + "mlp.wo.bias"))
            x = layer_norm(
                h + x,
                _get(sd, prefix, p + "mlp.layernorm.weight"),
                _get(sd, prefix, p + "mlp.layernorm.bias"),
                d.layer_norm_eps,
            )
            states.append(x)
        for j, st in enumerate(states):
            full = torch.zeros(S, H, dtype=dtype)
            full[idx] = st
            hs_rows[j].append(full)
        if pooler_prefix is not None:
            first = x[0] if L > 0 else torch.zeros(H, dtype=dtype)
            pooled_rows.append(
                torch.tanh(linear(first, sd[pooler_prefix + "dense.weight"], sd[pooler_prefix + "dense.bias"]))
            )
    hidden_states = [torch.stack(r) for r in hs_rows]
    return {
        "last_hidden_state": hidden_states[-1],
        "hidden_states": hidden_states,
        "attentions": [torch.stack(r) for r in att_rows],
        "pooled": torch.stack(pooled_rows) if pooler_prefix is not None else None,
        "mask": attention_mask != 0,
    }


def mlm_logits(sd: dict, d: Dims, seq_out: torch.Tensor, eps=None) -> torch.Tensor:
    eps = d.layer_norm_eps if eps is None else eps
    t = linear(seq_out, sd["cls.predictions.transform.dense.weight"], sd["cls.predictions.transform.dense.bias"])
    t = gelu_exact(t)
    t = layer_norm(
        t, sd["cls.predictions.transform.LayerNorm.weight"], sd["cls.predictions.transform.LayerNorm.bias"], eps
    )
    # decoder weight tied to the word embeddings
    return linear(t, sd["bert.embeddings.word_embeddings.weight"], sd["cls.predictions.decoder.bias"])


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over labels != -100 (written out explicitly)."""
    keep = labels != -100
    lg = logits[keep]
    lb = labels[keep]
    logz = torch.logsumexp(lg, dim=-1)
    return (logz - lg.gather(-1, lb[:, None]).squeeze(-1)).mean()


def mlm(sd, d, input_ids, attention_mask=None, token_type_ids=None, labels=None, inputs_embeds=None):
    enc = encode(sd, d, input_ids, attention_mask, token_type_ids, inputs_embeds)
    logits = mlm_logits(sd, d, enc["last_hidden_state"])  # (B,S,V)
    out = {"logits_full": logits, "enc": enc}
    if labels is not None:
        keep = labels != -100
        out["logits_labelled"] = logits[keep]  # row-major (batch, position) order
        out["loss"] = cross_entropy(logits, labels)
    return out


def seq_cls(
    sd, d, input_ids, attention_mask=None, token_type_ids=None, labels=None, problem_type=None, inputs_embeds=None
):
    enc = encode(sd, d, input_ids, attention_mask, token_type_ids, inputs_embeds, pooler_prefix="bert.pooler.")
    logits = linear(enc["pooled"], sd["classifier.weight"], sd["classifier.bias"])
    out = {"logits": logits, "enc": enc}
    if labels is not None:
        n = logits.shape[-1]
        if problem_type is None:
            if n == 1:
                problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem_type = "single_label_classification"
            else:
                problem_type = "multi_label_classification"
        if problem_type == "regression":
            if n == 1:
                out["loss"] = ((logits.squeeze(-1) - labels.to(logits.dtype).squeeze(-1)) ** 2).mean()
            else:
                out["loss"] = ((logits - labels) ** 2).mean()
        elif problem_type == "single_label_classification":
            out["loss"] = cross_entropy(logits, labels)
        else:
            y = labels.to(logits.dtype)
            # BCE with logits, numerically stable form
            out["loss"] = (torch.clamp(logits, min=0) - logits * y + torch.log1p(torch.exp(-logits.abs()))).mean()
    return out


def multiple_choice(sd, d, input_ids, attention_mask=None, token_type_ids=None, labels=None):
    B, C, S = input_ids.shape
    flat = lambda t: None if t is None else t.reshape(B * C, S)
    enc = encode(sd, d, flat(input_ids), flat(attention_mask), flat(token_type_ids), pooler_prefix="bert.pooler.")
    logits = linear(enc["pooled"], sd["classifier.weight"], sd["classifier.bias"]).reshape(B, C)
    out = {"logits": logits}
    if labels is not None:
        out["loss"] = cross_entropy(logits, labels)
    return out


def token_cls(sd, d, input_ids, attention_mask=None, token_type_ids=None, labels=None):
    enc = encode(sd, d, input_ids, attention_mask, token_type_ids)
    logits = linear(enc["last_hidden_state"], sd["classifier.weight"], sd["classifier.bias"])
    logits = logits * enc["mask"][..., None].to(logits.dtype)  # zeros at pads
    out = {"logits": logits}
    if labels is not None:
        out["loss"] = cross_entropy(logits, labels)
    return out


def question_answering(
    sd, d, input_ids, attention_mask=None, token_type_ids=None, start_positions=None, end_positions=None
):
    enc = encode(sd, d, input_ids, attention_mask, token_type_ids)
    lg = linear(enc["last_hidden_state"], sd["qa_outputs.weight"], sd["qa_outputs.bias"])
    lg = lg * enc["mask"][..., None].to(lg.dtype)
    start, end = lg[..., 0], lg[..., 1]
    out = {"start_logits": start, "end_logits": end}
    if start_positions is not None:
        out["loss"] = (cross_entropy(start, start_positions) + cross_entropy(end, end_positions)) / 2
    return out


def base(sd, d, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None, with_pooler=False):
    return encode(
        sd, d, input_ids, attention_mask, token_type_ids, inputs_embeds, prefix="",
        pooler_prefix="pooler." if with_pooler else None,
    )


def original_config(d: Dims, architectures=("BertForMaskedLM",), **extra) -> dict:
    """An original MosaicBERT config.json (transformers BertConfig fields, auto_map into bert_layers)."""
    cfg = {
        "_name_or_path": "bert-base-uncased",
        "alibi_starting_size": 512,
        "architectures": list(architectures),
        "auto_map": {
            "AutoConfig": "configuration_bert.BertConfig",
            "AutoModelForMaskedLM": "bert_layers.BertForMaskedLM",
            "AutoModelForSequenceClassification": "bert_layers.BertForSequenceClassification",
        },
        "attention_probs_dropout_prob": 0.0,
        "classifier_dropout": None,
        "gradient_checkpointing": False,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": d.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": d.intermediate_size,
        "layer_norm_eps": d.layer_norm_eps,
        "max_position_embeddings": 512,
        "model_type": "bert",
        "num_attention_heads": d.num_attention_heads,
        "num_hidden_layers": d.num_hidden_layers,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
        "transformers_version": "4.26.0",
        "type_vocab_size": d.type_vocab_size,
        "use_cache": True,
        "vocab_size": d.vocab_size,
    }
    cfg.update(extra)
    return cfg
