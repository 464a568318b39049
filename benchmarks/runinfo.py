"""What every benchmark result records about its run: card, versions, commit, date."""

import datetime
import hashlib
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The files that decide the model's speed: their digest names the code measured when no git commit is at hand.
CODE_FILES = ("modeling_mosaic_bert.py", "bert_padding.py", "flash_attn_triton.py", "geglu_triton.py",
              "layernorm_triton.py", "cross_entropy_triton.py", "triton_utils.py", "recipes/pretraining.py",
              "recipes/data.py")


def git_commit():
    """$BENCH_COMMIT, else `git rev-parse HEAD` (+ '-dirty' when tracked files changed), else None."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def code_digest():
    h = hashlib.sha256()
    for name in CODE_FILES:
        path = REPO / name
        if path.exists():
            h.update(name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def device_name(device):
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores)"


def driver_version():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def run_meta(device):
    import torch
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device,
        "device_name": device_name(device),
        "driver": driver_version() if device == "cuda" else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
        "commit": git_commit(),
        "code_digest": code_digest(),
    }
