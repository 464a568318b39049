#!/usr/bin/env bash
# The first H100 session of 2026-11-27 (commit 62beb63; results/*_2026-11-27.* without "_fused"): GPU tests, the model
# benchmark, then the pretraining run of the then-shipped small checkpoint and its GLUE fine-tuning. The current figures
# come from benchmarks/speed_session.sh, pretrain_sizes_session.sh and glue_ddp_session.sh. Run from the repo root with the corpus and GLUE copies in
# $DATA (default .data: enwiki-*.txt.xz and glue/). Everything lands under $OUT.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=true
OUT=${OUT:-./gpu_out}; DATA=${DATA:-.data}; RUN=/tmp/wiki-small
mkdir -p "$OUT/logs"
start=$(date +%s); elapsed() { echo $(( $(date +%s) - start )); }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  date -u; nproc; } > "$OUT/logs/env.txt" 2>&1
cat "$OUT/logs/env.txt"

# 1. The model benchmark, alone on the GPU.
timeout ${BENCH_SECONDS:-180} python3 benchmarks/model.py --budget $(( ${BENCH_SECONDS:-180} - 40 )) \
    --models ours,bert,modernbert,ours-compiled,bert-compiled --workloads pretrain,train,infer,long \
    --out "$OUT" > "$OUT/logs/model_bench.log" 2>&1
echo "benchmark done at $(elapsed) s"; tail -25 "$OUT/logs/model_bench.log"

# 2. Pretraining (GPU tests run beside it: they only check numbers, so they may share the card).
python3 -m pytest -q tests/test_model_gpu.py tests/test_robustness.py \
    > "$OUT/logs/gpu_tests.log" 2>&1 &
tests_pid=$!
python3 scripts/pretrain.py --config configs/mosaic-bert-wiki-small.json --train-files "$DATA"/enwiki-*.txt.xz \
    --cache-dir /tmp/tokcache --learning-rate 1e-3 --per-device-batch-size 256 --max-seq-length 128 \
    --max-steps ${PRETRAIN_STEPS:-10000} --max-time-minutes ${PRETRAIN_MINUTES:-3.3} --eval-steps 2000 --logging-steps 100 \
    --save-steps 100000 --dataloader-num-workers 6 --no-progress-bar --output-dir "$RUN" > "$OUT/logs/pretrain.log" 2>&1
echo "pretraining done at $(elapsed) s"; tail -5 "$OUT/logs/pretrain.log"
wait $tests_pid; tail -3 "$OUT/logs/gpu_tests.log"

# 3. GLUE on the tasks we have offline, tasks in parallel (the small model leaves the card mostly idle).
for task in rte mrpc stsb cola wnli sst2; do
  extra="--seeds 1 2 3"; [ $task = sst2 ] && extra="--seeds 1 --num-train-epochs 1"
  timeout ${GLUE_SECONDS:-100} python3 scripts/glue.py --model "$RUN" --tasks $task $extra --lr 1e-4 \
      --glue-dir "$DATA/glue" --no-progress-bar --output-dir "/tmp/glue/$task" > "$OUT/logs/glue_$task.log" 2>&1 &
done
wait
echo "glue done at $(elapsed) s"

# 4. Ship: the checkpoint in fp16, sharded under 16 MB per file, and everything else in one archive.
python3 - "$RUN" /tmp/ship <<'PY'
import sys, torch
sys.path.insert(0, ".")
from modeling_mosaic_bert import MosaicBertForMaskedLM
model = MosaicBertForMaskedLM.from_pretrained(sys.argv[1], dtype=torch.float32)
model.half().save_pretrained(sys.argv[2], max_shard_size="13MB")
PY
cp /tmp/ship/*.safetensors "$OUT/" 2>/dev/null
cp /tmp/ship/model.safetensors.index.json "$OUT/logs/" 2>/dev/null
mkdir -p "$OUT/logs/run" "$OUT/logs/glue"
cp "$RUN"/*.json "$RUN"/*.md "$RUN"/*.png "$OUT/logs/run/" 2>/dev/null
for t in /tmp/glue/*; do cp -r "$t" "$OUT/logs/glue/" 2>/dev/null; done
find "$OUT/logs/glue" -name "*.safetensors" -delete
tar -C "$OUT" -czf "$OUT/logs.tgz" logs && rm -rf "$OUT/logs"
ls -la "$OUT"; echo "all done at $(elapsed) s"
