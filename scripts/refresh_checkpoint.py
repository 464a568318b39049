#!/usr/bin/env python
"""Regenerate a shipped checkpoint folder from the root code, so that it never holds hand-copied files.

    python scripts/refresh_checkpoint.py                       # checkpoints/mosaic-bert-wiki-small
    python scripts/refresh_checkpoint.py --folder PATH --max_shard_size 13MB

Loads the folder's weights into the root package's MosaicBertForMaskedLM and writes them back with `save_pretrained`:
the code files (the modeling file and every sibling module it imports relatively), `config.json` (its `auto_map`)
and the weight shards are rewritten together, consistently. The weights are stored in `--storage_dtype` (float16:
exact, since they were float16 already) while the config keeps float32 as the dtype to load them in. Checks that
every stored tensor is unchanged, copies the root tokenizer files, and rewrites the card's generated file list.
Training records (README.md text, log_history.json, train_results.json, loss_curve.png) are left alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file
from transformers import HfArgumentParser

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from modeling_mosaic_bert import MosaicBertForMaskedLM  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
# What save_pretrained owns in the folder: replaced as a whole, so a code file the package dropped disappears too.
GENERATED = re.compile(r".*\.py$|.*\.safetensors$|model\.safetensors\.index\.json$|config\.json$")
CARD_BEGIN = "<!-- files: written by scripts/refresh_checkpoint.py -->"
CARD_END = "<!-- end of files -->"


@dataclass
class RefreshOptions:
    folder: str = field(
        default=os.path.join(REPO_ROOT, "checkpoints", "mosaic-bert-wiki-small"),
        metadata={"help": "the checkpoint folder to regenerate in place"},
    )
    max_shard_size: str = field(
        default="13MB", metadata={"help": "largest weight shard (13MB gives the shipped checkpoint's two shards)"}
    )
    storage_dtype: str = field(default="float16", metadata={"help": "dtype of the stored weights"})


def read_weights(folder: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(folder, name)))
    return tensors


def save_with_root_code(folder: str, out: str, options: RefreshOptions) -> None:
    """The folder's weights through the root code's save_pretrained into ``out`` (config dtype: float32)."""
    model = MosaicBertForMaskedLM.from_pretrained(folder, dtype=torch.float32)
    dtype = getattr(torch, options.storage_dtype)
    cast = {}  # one cast per storage, so that tied weights stay one tensor
    state_dict = {}
    for key, tensor in model.state_dict().items():
        view = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if view not in cast:
            cast[view] = tensor.to(dtype)
        state_dict[key] = cast[view]
    model.save_pretrained(out, state_dict=state_dict, max_shard_size=options.max_shard_size)


def check_weights_unchanged(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    if before.keys() != after.keys():
        raise RuntimeError(f"stored tensors changed: {sorted(before.keys() ^ after.keys())}")
    for key, tensor in before.items():
        if not torch.equal(tensor.to(after[key].dtype), after[key]):
            raise RuntimeError(f"{key} changed in the round trip")


def replace_generated_files(new: str, folder: str) -> list[str]:
    for name in os.listdir(folder):
        if GENERATED.fullmatch(name):
            os.remove(os.path.join(folder, name))
    written = sorted(os.listdir(new))
    for name in written:
        shutil.copy2(os.path.join(new, name), os.path.join(folder, name))
    for name in TOKENIZER_FILES:
        shutil.copy2(os.path.join(REPO_ROOT, name), os.path.join(folder, name))
    return written


def card_file_list(folder: str) -> str:
    """The card's generated block: what the folder holds, as save_pretrained wrote it."""
    config = json.load(open(os.path.join(folder, "config.json")))
    shards = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    size = sum(os.path.getsize(os.path.join(folder, n)) for n in shards)
    weights = read_weights(folder)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in weights.values()})
    code = sorted(n for n in os.listdir(folder) if n.endswith(".py"))
    return "\n".join([
        CARD_BEGIN,
        f"- weights: {len(shards)} safetensors shards, {size / 1e6:.1f} MB, stored in {', '.join(dtypes)} "
        f"({sum(t.numel() for t in weights.values()):,} stored values); they load as {config['dtype']}",
        f"- code (written by `save_pretrained` from the package, transformers {config['transformers_version']}): "
        + ", ".join(f"`{n}`" for n in code),
        "- `config.json` with `auto_map` for: " + ", ".join(f"`{k}`" for k in sorted(config["auto_map"])),
        "- tokenizer: bert-base-uncased (" + ", ".join(f"`{n}`" for n in TOKENIZER_FILES) + ")",
        CARD_END,
    ])


def refresh_card(folder: str) -> None:
    path = os.path.join(folder, "README.md")
    card = open(path, encoding="utf-8").read()
    if CARD_BEGIN not in card or CARD_END not in card:
        raise RuntimeError(f"{path} has no generated block ({CARD_BEGIN} ... {CARD_END}) to rewrite")
    head, rest = card.split(CARD_BEGIN, 1)
    tail = rest.split(CARD_END, 1)[1]
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + card_file_list(folder) + tail)


def refresh(options: RefreshOptions) -> list[str]:
    folder = os.path.abspath(options.folder)
    before = read_weights(folder)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(folder)) as out:
        save_with_root_code(folder, out, options)
        check_weights_unchanged(before, read_weights(out))
        written = replace_generated_files(out, folder)
    refresh_card(folder)
    return written


def main() -> None:
    (options,) = HfArgumentParser(RefreshOptions).parse_args_into_dataclasses()
    written = refresh(options)
    print(f"{options.folder}: wrote {', '.join(written)} and the tokenizer files; card file list refreshed")


if __name__ == "__main__":
    main()
