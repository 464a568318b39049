"""Converting an original MosaicBERT checkpoint folder into a folder of this package.

An original folder holds a config.json with `model_type: "bert"`, `alibi_starting_size` and an `auto_map` pointing at
`bert_layers`, and its weights as `pytorch_model.bin` (or safetensors). Composer saves the weights with every key
prefixed `model.`, sometimes inside its checkpoint dict `{"state": {"model": {...}}}`. The parameter names are
otherwise the ones this package uses, so conversion is: read the weights safely, strip the wrappers, detect the head,
check every key, load, write `model.safetensors` + this package's config + code (+ tokenizer files), reload the
written folder through the Auto classes with trust_remote_code and check that it gives the same outputs.

    from recipes.conversion import convert_checkpoint
    report = convert_checkpoint("original/", "converted/")
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .common import REPO_ROOT, import_model_code, model_code_files

logger = logging.getLogger(__name__)

# Files copied from the source folder when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "added_tokens.json",
)

# Weight files looked for in the source folder, safetensors first.
WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)

# Keys of an original (transformers BertConfig) config.json that mean nothing to MosaicBertConfig.
ORIGINAL_ONLY_CONFIG_KEYS = (
    "model_type",
    "auto_map",
    "architectures",
    "max_position_embeddings",
    "position_embedding_type",
    "use_cache",
    "gradient_checkpointing",
    "transformers_version",
    "_name_or_path",
    "_commit_hash",
    "torch_dtype",
    "dtype",
)

# Head name -> (our class, Auto class, original architecture names that select it).
HEADS = {
    "masked_lm": ("MosaicBertForMaskedLM", "AutoModelForMaskedLM", ("BertForMaskedLM", "BertForPreTraining")),
    "sequence_classification": (
        "MosaicBertForSequenceClassification",
        "AutoModelForSequenceClassification",
        ("BertForSequenceClassification",),
    ),
    "multiple_choice": ("MosaicBertForMultipleChoice", "AutoModelForMultipleChoice", ("BertForMultipleChoice",)),
    "token_classification": (
        "MosaicBertForTokenClassification",
        "AutoModelForTokenClassification",
        ("BertForTokenClassification",),
    ),
    "question_answering": (
        "MosaicBertForQuestionAnswering",
        "AutoModelForQuestionAnswering",
        ("BertForQuestionAnswering",),
    ),
    "base": ("MosaicBertModel", "AutoModel", ("BertModel",)),
}

# Buffers some original versions kept in the state dict; ALiBi is recomputed, so they are dropped.
IGNORED_KEY_SUFFIXES = (".alibi",)

DECODER_WEIGHT = "cls.predictions.decoder.weight"
WORD_EMBEDDINGS = "bert.embeddings.word_embeddings.weight"


class ConversionError(ValueError):
    """The source folder cannot be converted; the message says why."""


@dataclass
class ConversionOptions:
    """The options of scripts/convert_original_checkpoint.py besides its SRC and DST folders."""

    overwrite: bool = field(default=False, metadata={"help": "replace the contents of an existing DST"})
    atol: float = field(default=1e-5, metadata={"help": "largest output difference accepted"})
    verify: bool = field(default=True, metadata={
        "help": "reload DST through its Auto class and compare its outputs with the original weights' (default: "
                "on)"})


@dataclass
class ConversionReport:
    head: str
    model_class: str
    weights_file: str
    stripped_prefix: str
    dropped_keys: list[str] = field(default_factory=list)
    max_abs_diff: float = 0.0
    copied_files: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------
# Reading weights
# --------------------------------------------------------------------------


def load_weights_file(path: str | Path) -> dict:
    """Reads one weights file: safetensors, or a PyTorch pickle through `torch.load(weights_only=True)` (never full
    unpickling). A truncated, corrupted or unsafe file raises ConversionError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises SafetensorError / OSError with no file name
            raise ConversionError(f"cannot read weights file {path}: it is truncated or corrupted ({e})") from e
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConversionError(
            f"refusing to load {path}: it holds objects other than tensors and plain containers, which only unsafe "
            f"unpickling could rebuild (torch.load weights_only=True said: {str(e).splitlines()[0]}). Save its "
            f"state dict alone (torch.save(model.state_dict(), ...)) from a trusted environment and convert that."
        ) from e
    except Exception as e:  # truncated zip / pickle: RuntimeError, EOFError, OSError, ...
        raise ConversionError(
            f"cannot read weights file {path}: it is truncated or corrupted ({type(e).__name__}: {e})"
        ) from e


def _load_sharded(index_path: Path) -> dict:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise ConversionError(f"cannot read shard index {index_path}: {e}") from e
    state = {}
    for shard in sorted(set(weight_map.values())):
        state.update(load_weights_file(index_path.parent / shard))
    return state


def find_weights_file(src: Path) -> Path:
    for name in WEIGHT_FILES:
        if (src / name).is_file():
            return src / name
    raise ConversionError(f"{src} holds no weights file (looked for {', '.join(WEIGHT_FILES)})")


def unwrap_state_dict(obj) -> tuple[dict, str]:
    """Takes the model's state dict out of a Composer checkpoint ({"state": {"model": ...}}), a {"state_dict": ...} or
    {"model": ...} wrapper, and strips a `model.` (Composer HuggingFaceModel) and/or `module.` (DDP) prefix carried
    by every key. Returns the state dict and the prefix stripped."""
    if isinstance(obj, dict) and isinstance(obj.get("state"), dict) and isinstance(obj["state"].get("model"), dict):
        obj = obj["state"]["model"]
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict) and len(obj) <= 3:
            inner = obj[wrapper]
            if inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
    if not isinstance(obj, dict) or not obj:
        raise ConversionError("the weights file holds no state dict (expected a dict of parameter name -> tensor)")
    not_tensors = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ConversionError(f"the state dict holds entries that are not tensors: {not_tensors[:20]}")
    stripped = ""
    for prefix in ("model.", "module."):
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
            stripped += prefix
    return dict(obj), stripped


def load_original_state_dict(src: str | Path) -> tuple[dict, Path, str]:
    """(state dict, weights file read, prefix stripped) of an original checkpoint folder."""
    src = Path(src)
    path = find_weights_file(src)
    raw = _load_sharded(path) if path.name.endswith(".index.json") else load_weights_file(path)
    state, stripped = unwrap_state_dict(raw)
    return state, path, stripped


# --------------------------------------------------------------------------
# Head and config
# --------------------------------------------------------------------------


def detect_head(keys, architectures=None) -> str:
    """Head from the parameter names; the config's `architectures` only tells multiple choice from sequence
    classification (both are pooler + classifier)."""
    keys = list(keys)
    architectures = list(architectures or [])

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    if has("cls.predictions."):
        head = "masked_lm"
    elif has("qa_outputs."):
        head = "question_answering"
    elif has("classifier."):
        if not has("bert.pooler."):
            head = "token_classification"
        elif "BertForMultipleChoice" in architectures or "MosaicBertForMultipleChoice" in architectures:
            head = "multiple_choice"
        else:
            head = "sequence_classification"
    elif has("embeddings.") or has("encoder."):
        head = "base"
    elif has("bert."):
        head = "bert_prefixed_base"
    else:
        raise ConversionError(f"cannot tell the model from its keys (first keys: {sorted(keys)[:10]})")
    named = [h for h, (_, _, archs) in HEADS.items() if any(a in archs or a == HEADS[h][0] for a in architectures)]
    if named and head not in named and head != "bert_prefixed_base":
        logger.warning("config.json names %s but the weights hold a %s head; converting the weights' head",
                       architectures, head)
    return head


def build_config(original: dict, head: str, state: dict):
    """This package's config from an original config.json dict."""
    configuration, _ = import_model_code()
    kwargs = {k: v for k, v in original.items() if k not in ORIGINAL_ONLY_CONFIG_KEYS}
    if head in ("sequence_classification", "token_classification") and "classifier.weight" in state:
        num_labels = state["classifier.weight"].shape[0]
        id2label = kwargs.get("id2label")
        if not id2label or len(id2label) != num_labels:
            kwargs.pop("id2label", None)
            kwargs.pop("label2id", None)
            kwargs["num_labels"] = num_labels
    if head == "masked_lm" and DECODER_WEIGHT in state and WORD_EMBEDDINGS in state:
        if not torch.equal(state[DECODER_WEIGHT], state[WORD_EMBEDDINGS]):
            kwargs["tie_word_embeddings"] = False
    try:
        config = configuration.MosaicBertConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"config.json cannot make a MosaicBertConfig: {e}") from e
    config.architectures = [HEADS[head][0]]
    return config


# --------------------------------------------------------------------------
# Checking the keys
# --------------------------------------------------------------------------


def match_state_dict(model, state: dict) -> tuple[dict, list[str]]:
    """The state dict to load into `model` and the keys dropped. Raises ConversionError listing every unknown key,
    missing key and shape mismatch."""
    expected = model.state_dict()
    dropped = sorted(k for k in state if k.endswith(IGNORED_KEY_SUFFIXES) and k not in expected)
    state = {k: v for k, v in state.items() if k not in dropped}
    tied = getattr(model.config, "tie_word_embeddings", False) and DECODER_WEIGHT in expected
    if tied and DECODER_WEIGHT in state:  # tied to the word embeddings (checked equal in build_config)
        dropped.append(DECODER_WEIGHT)
        state.pop(DECODER_WEIGHT)
    unknown = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state) - ({DECODER_WEIGHT} if tied else set()))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unknown key(s) (not parameters of {type(model).__name__}): {unknown}")
    if missing:
        problems.append(f"{len(missing)} missing key(s) ({type(model).__name__} needs them): {missing}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {mismatched}")
    if problems:
        raise ConversionError("refusing to convert: " + "; ".join(problems))
    return state, dropped


# --------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------


def verification_batch(config, head: str, seed: int = 0) -> dict:
    """A fixed ragged batch (right, left and middle padding, a length-1 row)."""
    g = torch.Generator().manual_seed(seed)
    batch, seqlen = 4, 13
    input_ids = torch.randint(1, config.vocab_size, (batch, seqlen), generator=g)
    token_type_ids = torch.randint(0, config.type_vocab_size, (batch, seqlen), generator=g)
    attention_mask = torch.ones(batch, seqlen, dtype=torch.long)
    attention_mask[1, 9:] = 0  # right
    attention_mask[2, :12] = 0  # left, one real token
    attention_mask[3, 4:7] = 0  # middle
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
    if head == "multiple_choice":
        inputs = {k: v.view(2, 2, seqlen) for k, v in inputs.items()}
    return inputs


def _output_tensors(out) -> dict:
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def compare_outputs(before: dict, after: dict) -> float:
    if before.keys() != after.keys():
        raise ConversionError(f"the converted model returns {sorted(after)} instead of {sorted(before)}")
    worst = 0.0
    for k in before:
        if before[k].shape != after[k].shape:
            raise ConversionError(
                f"{k}: shape {tuple(after[k].shape)} after conversion, {tuple(before[k].shape)} before")
        worst = max(worst, (before[k].double() - after[k].double()).abs().max().item())
    return worst


# --------------------------------------------------------------------------
# The conversion
# --------------------------------------------------------------------------


def _read_original_config(src: Path, dst: Path, overwrite: bool) -> dict:
    """The source folder's config.json, after checking the source and destination folders."""
    if not (src / "config.json").is_file():
        raise ConversionError(f"{src} has no config.json")
    if src.resolve() == dst.resolve():
        raise ConversionError("the destination must differ from the source folder")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ConversionError(f"{dst} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    try:
        original = json.loads((src / "config.json").read_text())
    except ValueError as e:
        raise ConversionError(f"{src / 'config.json'} is not valid JSON: {e}") from e
    model_type = original.get("model_type")
    if model_type not in ("bert", "mosaic_bert", None):
        raise ConversionError(f"{src / 'config.json'} has model_type {model_type!r}; expected 'bert' (MosaicBERT)")
    return original


def _build_converted_model(original: dict, state: dict) -> tuple:
    """(model with the weights loaded, head, dropped keys, dtype to save in) from the original config and weights."""
    head = detect_head(state, original.get("architectures"))
    if head == "bert_prefixed_base":  # a bare encoder saved under a `bert.` attribute
        state = {k[len("bert.") :]: v for k, v in state.items()}
        head = "base"
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    save_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    config = build_config(original, head, state)
    _, modeling = import_model_code()
    model = getattr(modeling, HEADS[head][0])(config).eval()
    to_load, dropped = match_state_dict(model, state)
    model.load_state_dict(to_load, strict=False)  # completeness was checked above; the tied decoder is not loaded
    if config.tie_word_embeddings and head == "masked_lm":
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return model, head, dropped, save_dtype


def _write_converted_folder(model, save_dtype, src: Path, dst: Path) -> list[str]:
    """Weights, config, the current code files and the source's tokenizer files into dst; returns the files copied
    from the source."""
    dst.mkdir(parents=True, exist_ok=True)
    model.to(save_dtype).save_pretrained(str(dst), safe_serialization=True)
    for name in model_code_files():  # the current code, whatever save_pretrained picked up
        shutil.copy2(REPO_ROOT / name, dst / name)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    for stale in ("pytorch_model.bin", "pytorch_model.bin.index.json"):
        if (dst / stale).exists():
            (dst / stale).unlink()
    return copied


def _verify_converted_folder(dst: Path, head: str, batch: dict, before: dict, atol: float) -> float:
    """Reload dst through its Auto class with trust_remote_code; the largest output difference from `before`."""
    import transformers

    auto = getattr(transformers, HEADS[head][1])
    reloaded = auto.from_pretrained(str(dst), trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        after = _output_tensors(reloaded(**batch))
    diff = compare_outputs(before, after)
    if diff > atol:
        raise ConversionError(
            f"the converted folder {dst} gives outputs {diff:.3g} away from the original weights (allowed {atol})"
        )
    return diff


def convert_checkpoint(
    src: str | Path, dst: str | Path, overwrite: bool = False, atol: float = 1e-5, verify: bool = True
) -> ConversionReport:
    """Converts the original MosaicBERT folder `src` into a folder `dst` of this package. See the module doc."""
    src, dst = Path(src), Path(dst)
    original = _read_original_config(src, dst, overwrite)
    state, weights_path, stripped = load_original_state_dict(src)
    model, head, dropped, save_dtype = _build_converted_model(original, state)
    batch = verification_batch(model.config, head)
    with torch.no_grad():
        before = _output_tensors(model(**batch))
    copied = _write_converted_folder(model, save_dtype, src, dst)
    report = ConversionReport(head=head, model_class=HEADS[head][0], weights_file=str(weights_path),
                              stripped_prefix=stripped, dropped_keys=dropped, copied_files=copied)
    if verify:
        report.max_abs_diff = _verify_converted_folder(dst, head, batch, before, atol)
    logger.info(
        "converted %s (%s head, prefix %r stripped, dropped %s) into %s; max |difference| %.3g",
        weights_path, head, stripped, dropped, dst, report.max_abs_diff,
    )
    return report


__all__ = [
    "ConversionError", "ConversionOptions", "ConversionReport", "convert_checkpoint", "load_weights_file",
    "detect_head",
]
