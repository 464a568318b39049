#!/usr/bin/env bash
# The test suite: the model, recipes and loading tests on PyTorch, then the Triton kernel in Triton's CPU
# interpreter (fp32/fp16 at small sizes). On a CUDA machine the GPU tests run instead of being skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pytest -q tests --ignore=tests/test_flash_attn_triton.py "$@"
TRITON_INTERPRET=1 python3 -m pytest -q tests/test_flash_attn_triton.py "$@"
