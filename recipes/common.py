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

# Dense bf16 peaks from NVIDIA's datasheets (TFLOP/s per GPU, without sparsity), for MFU when --peak-tflops is not
# given. First match on the device name wins; NVL variants run at other clocks and get none.
DATASHEET_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0))


def model_code_files() -> tuple[str, ...]:
    """The root code files a saved model folder needs, as `save_pretrained` writes them for remote code: the
    configuration and modeling modules and every module they import relatively."""
    from transformers.dynamic_module_utils import get_relative_import_files

    names = {"configuration_mosaic_bert.py", "modeling_mosaic_bert.py"}
    names.update(Path(f).name for f in get_relative_import_files(str(REPO_ROOT / "modeling_mosaic_bert.py")))
    return tuple(sorted(names))


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
    if "NVL" in name:
        return None
    return next((peak for key, peak in DATASHEET_PEAK_TFLOPS if key in name), None)


def register_code_for_save(model, auto_class: str) -> None:
    """Make `model.save_pretrained` (and so every Trainer checkpoint) write the code files and an auto_map entry
    for `auto_class`, as models loaded with trust_remote_code do, so that the folder loads on its own."""
    type(model).register_for_auto_class(auto_class)
    type(model.config).register_for_auto_class()


def enable_activation_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward. transformers >= 5.2x names it
    `activation_checkpointing_enable` (`gradient_checkpointing_enable` is its deprecated alias); earlier 5.x releases
    have only `gradient_checkpointing_enable`."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def activation_checkpointing_active(model) -> bool:
    """Whether activation checkpointing is on (either transformers spelling, no deprecation warning)."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def finalize_hub_folder(out: str | os.PathLike, tokenizer=None, auto_class: str | None = None):
    """Make a saved model folder loadable with trust_remote_code: code files present, auto_map in config.json,
    tokenizer files present."""
    out = Path(out)
    for f in model_code_files():
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
