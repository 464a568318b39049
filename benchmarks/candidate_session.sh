#!/usr/bin/env bash
# A/B session on one GPU: the committed code against candidate patches, in one run on one card.
#   CANDIDATES="benchmarks/candidates/x.patch ..." bash benchmarks/candidate_session.sh
# 1. the GPU tests of the committed code (TESTS, TEST_SECONDS); 2. the model benchmark of the committed code
# (BENCH_MODELS x BENCH_WORKLOADS) and a profile of its eager pretraining step; 3. per candidate: apply it, run the
# kernels' GPU tests and the model test (CANDIDATE_TESTS), benchmark our rows again and profile, then revert it.
# Results land in $OUT: one folder per variant (benchmark JSON + log, profile, test log), archived as one .tgz.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-./candidate_out}; mkdir -p "$OUT/runs"
start=$(date +%s); elapsed() { echo $(( $(date +%s) - start )); }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  git log -1 --format=%H 2>/dev/null; date -u; } > "$OUT/runs/env.txt" 2>&1
cat "$OUT/runs/env.txt"

measure() {  # $1 = variant name, $2 = models, $3 = test files
  local dir="$OUT/runs/$1"; mkdir -p "$dir"
  timeout ${TEST_SECONDS:-200} python3 -m pytest -q $3 > "$dir/gpu_tests.log" 2>&1
  echo "[$1] tests at $(elapsed) s: $(tail -1 "$dir/gpu_tests.log")"
  timeout ${BENCH_SECONDS:-150} python3 benchmarks/model.py --budget $(( ${BENCH_SECONDS:-150} - 20 )) --models "$2" \
      --workloads ${BENCH_WORKLOADS:-pretrain,train,infer} --out "$dir" > "$dir/model_bench.log" 2>&1
  echo "[$1] benchmark at $(elapsed) s"; grep "^| [a-z]" "$dir/model_bench.log" | tail -12
  timeout 90 python3 benchmarks/profile_step.py --by-op --out "$dir" > "$dir/profile_step.txt" 2>&1
  echo "[$1] profile at $(elapsed) s"; sed -n 2p "$dir/profile_step.txt"; tail -9 "$dir/profile_step.txt"
}

measure committed "${BENCH_MODELS:-ours,bert,ours-compiled,bert-compiled}" \
    "${TESTS:-tests/test_cross_entropy_triton.py tests/test_geglu_triton.py tests/test_layernorm_triton.py tests/test_model_gpu.py tests/test_flash_attn_triton.py}"
for patch in ${CANDIDATES:-}; do
  name=$(basename "$patch" .patch)
  git apply "$patch" || { echo "[$name] does not apply"; continue; }
  TEST_SECONDS=${CANDIDATE_TEST_SECONDS:-90} measure "$name" "${CANDIDATE_MODELS:-ours,ours-compiled}" \
      "${CANDIDATE_TESTS:-tests/test_geglu_triton.py tests/test_layernorm_triton.py tests/test_model_gpu.py}"
  git apply -R "$patch"
done
tar -C "$OUT" -czf "$OUT/candidate_runs.tgz" runs && rm -rf "$OUT/runs"
echo "all done at $(elapsed) s"
