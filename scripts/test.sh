#!/usr/bin/env bash
# The test suite: the model, recipes and loading tests on PyTorch, then the Triton kernels in Triton's CPU
# interpreter (fp32/fp16 at small sizes). On a CUDA machine, the GPU tests of the kernels run with
#   python3 -m pytest -q tests/test_*triton.py   (no TRITON_INTERPRET)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pytest -q tests --ignore=tests/test_flash_attn_triton.py --ignore=tests/test_geglu_triton.py \
    --ignore=tests/test_layernorm_triton.py --ignore=tests/test_cross_entropy_triton.py "$@"
TRITON_INTERPRET=1 python3 -m pytest -q tests/test_flash_attn_triton.py tests/test_geglu_triton.py \
    tests/test_layernorm_triton.py tests/test_cross_entropy_triton.py "$@"
