#!/usr/bin/env bash
# The speed session on one H100 (issue 5): every GPU test (model, robustness and both Triton kernels), then the model
# benchmark (ours eager / compiled / PyTorch-only, HF BERT eager / compiled, ModernBERT; pretraining step, training,
# inference, 8 x 8192), then a torch.profiler breakdown of our eager pretraining step. Run from the repo root; results
# land in $OUT (benchmark json/png, profile, and one logs archive).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-./speed_out}; mkdir -p "$OUT/logs"
start=$(date +%s); elapsed() { echo $(( $(date +%s) - start )); }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  git log -1 --format=%H 2>/dev/null; date -u; nproc; } > "$OUT/logs/env.txt" 2>&1
cat "$OUT/logs/env.txt"

# 1. GPU tests (kernel files without TRITON_INTERPRET run their GPU cases).
# The kernels' own GPU cases first (they are the newest code), then the model and robustness tests.
timeout ${TEST_SECONDS:-200} python3 -m pytest -q tests/test_cross_entropy_triton.py tests/test_geglu_triton.py \
    tests/test_layernorm_triton.py \
    tests/test_model_gpu.py tests/test_flash_attn_triton.py tests/test_robustness.py \
    > "$OUT/logs/gpu_tests.log" 2>&1
echo "tests done at $(elapsed) s: $(tail -1 "$OUT/logs/gpu_tests.log")"

# 2. The model benchmark, alone on the GPU.
timeout ${BENCH_SECONDS:-300} python3 benchmarks/model.py --budget $(( ${BENCH_SECONDS:-300} - 30 )) \
    --models ${BENCH_MODELS:-ours,ours-torch,bert,modernbert,ours-compiled,bert-compiled} \
    --workloads pretrain,train,infer,long --out "$OUT" > "$OUT/logs/model_bench.log" 2>&1
echo "benchmark done at $(elapsed) s"; grep "^ *|" "$OUT/logs/model_bench.log" | tail -30

# 3. Where the time of our eager pretraining step goes.
timeout ${PROFILE_SECONDS:-60} python3 benchmarks/profile_step.py --by-op --out "$OUT/logs" > "$OUT/logs/profile_step.txt" 2>&1
echo "profile done at $(elapsed) s"; head -40 "$OUT/logs/profile_step.txt"
tar -C "$OUT" -czf "$OUT/logs.tgz" logs && rm -rf "$OUT/logs"
ls -la "$OUT"; echo "all done at $(elapsed) s"
