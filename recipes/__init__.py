"""Training recipes for MosaicBERT: MLM pretraining (`recipes.pretraining`) and GLUE fine-tuning (`recipes.glue`).

Both run on CPU, one GPU, or many GPUs (torchrun / accelerate launch, DDP or FSDP) through the Hugging Face Trainer.
They need torch, transformers, accelerate, numpy and scikit-learn; `datasets` and `scipy` are optional.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = REPO_ROOT / "configs"

__all__ = ["REPO_ROOT", "CONFIGS_DIR"]
