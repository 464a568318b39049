"""Helpers shared by the recipes: importing the model code from the repo root, presets, devices, Hub folders."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

from . import CONFIGS_DIR, REPO_ROOT

logger = logging.getLogger(__name__)

MODEL_CODE_FILES = (
    "configuration_mosaic_bert.py",
    "modeling_mosaic_bert.py",
    "bert_padding.py",
    "flash_attn_triton.py",
    "geglu_triton.py",
    "layernorm_triton.py",
    "cross_entropy_triton.py",
)

# Dense BF16 peak used for MFU when --peak-tflops is not given. 784 TFLOP/s is the bf16 matmul throughput measured on
# the project's H100 (the datasheet says 989.4 for H100 SXM dense bf16; pass --peak-tflops 989.4 to use that).
DEFAULT_PEAK_TFLOPS = {"H100": 784.0, "H200": 784.0, "A100": 312.0}


def import_model_code():
    """Make the flat model files at the repo root importable and return the module pair."""
    root = str(REPO_ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)
    import configuration_mosaic_bert
    import modeling_mosaic_bert

    return configuration_mosaic_bert, modeling_mosaic_bert


def resolve_config_path(name_or_path: str | None) -> Path:
    """`None`/"base" -> configs/mosaic-bert-base.json; "tiny" / "mosaic-bert-small" -> configs/...; else a path
    to a json file or to a folder holding config.json."""
    if not name_or_path:
        name_or_path = "base"
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    if p.is_dir() and (p / "config.json").exists():
        return p / "config.json"
    for cand in (f"{name_or_path}.json", f"mosaic-bert-{name_or_path}.json"):
        if (CONFIGS_DIR / cand).exists():
            return CONFIGS_DIR / cand
    presets = sorted(f.stem for f in CONFIGS_DIR.glob("*.json"))
    raise FileNotFoundError(f"config {name_or_path!r} is neither a file nor a preset ({', '.join(presets)})")


def load_config(name_or_path: str | None, overrides: dict | None = None):
    cfg_mod, _ = import_model_code()
    path = resolve_config_path(name_or_path)
    data = json.loads(path.read_text())
    for k in ("auto_map", "architectures", "transformers_version", "_name_or_path"):
        data.pop(k, None)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return cfg_mod.MosaicBertConfig(**data), path


def load_tokenizer(name_or_path: str | os.PathLike | None = None):
    from transformers import AutoTokenizer

    # trust_remote_code: the folder's config.json maps AutoConfig to our code; without it transformers asks
    # interactively whether to run that code just to find the tokenizer class.
    return AutoTokenizer.from_pretrained(str(name_or_path or REPO_ROOT), trust_remote_code=True)


def setup_logging() -> None:
    """INFO messages of the recipes on the main process (not the whole root logger)."""
    log = logging.getLogger("recipes")
    if not log.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(h)
        log.propagate = False
    log.setLevel(logging.INFO if is_main_process() else logging.WARNING)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_one_gpu_per_process(args) -> None:
    """Refuses a single process that sees several GPUs: Trainer would wrap the model in nn.DataParallel, multiplying
    the per-device batch by the GPU count behind the recipe's back (and running slower than DDP)."""
    if args.n_gpu > 1:
        raise ValueError(
            f"this process sees {args.n_gpu} GPUs: launch one process per GPU, e.g. `torchrun --nproc_per_node "
            f"{args.n_gpu} scripts/...` (DDP), or pick one GPU with CUDA_VISIBLE_DEVICES=0"
        )


def bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def hardware_description() -> str:
    if torch.cuda.is_available():
        n = world_size()
        name = torch.cuda.get_device_name(0)
        return f"{n} x {name}" if n > 1 else name
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads), {world_size()} process(es)"


def default_peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    for key, val in DEFAULT_PEAK_TFLOPS.items():
        if key in name:
            return val
    return None


def finalize_hub_folder(out: str | os.PathLike, tokenizer=None, auto_class: str | None = None):
    """Make a saved model folder loadable with trust_remote_code: code files present, auto_map in config.json,
    tokenizer files present."""
    out = Path(out)
    for f in MODEL_CODE_FILES:
        if not (out / f).exists() and (REPO_ROOT / f).exists():
            shutil.copy2(REPO_ROOT / f, out / f)
    cfg_file = out / "config.json"
    if cfg_file.exists():
        cfg = json.loads(cfg_file.read_text())
        if "auto_map" not in cfg:
            cfg_mod, _ = import_model_code()
            cfg["auto_map"] = dict(getattr(cfg_mod, "AUTO_MAP", {}))
            cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None and not (out / "tokenizer_config.json").exists():
        tokenizer.save_pretrained(str(out))


def nonembedding_params(model) -> int:
    emb = 0
    for name, p in model.named_parameters():
        if "embeddings" in name:
            emb += p.numel()
    return sum(p.numel() for p in model.parameters()) - emb


def write_json(path: str | os.PathLike, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, default=str) + "\n")
