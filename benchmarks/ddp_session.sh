#!/usr/bin/env bash
# Multi-GPU check for the pretraining recipe (run on a machine with 2 GPUs, e.g. the nvidia-h100-x2 kind): the same
# global batch on 1 GPU (gradient accumulation 2) and on 2 GPUs (DDP through torchrun), then their loss curves and the
# scaling efficiency side by side. Needs the corpus in $DATA (default .data: enwiki-*.txt.xz); writes to $OUT.
set -eu
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=true NCCL_NVLS_ENABLE=0
OUT=${OUT:-./ddp_out}; DATA=${DATA:-.data}; STEPS=${STEPS:-300}; CONFIG=${CONFIG:-base}; ACCELERATE=${ACCELERATE:-1}
mkdir -p "$OUT"
common=(--config "$CONFIG" --train-files "$DATA"/enwiki-*.txt.xz --cache-dir /tmp/tokcache --max-steps "$STEPS"
        --per-device-batch-size 256 --logging-steps 10 --eval-steps 100000 --save-steps 100000 --no-progress-bar
        --dataloader-num-workers 4 --seed 17)
# The baseline sees one GPU only: a plain (non-torchrun) process that sees both is refused by the recipe (Trainer
# would wrap the model in DataParallel and double the batch per step).
CUDA_VISIBLE_DEVICES=0 python3 scripts/pretrain.py "${common[@]}" --grad-accum 2 --output-dir /tmp/base-1gpu \
    > "$OUT/pretrain_1gpu.log" 2>&1
torchrun --nproc_per_node 2 scripts/pretrain.py "${common[@]}" --grad-accum 1 --output-dir /tmp/base-2gpu \
    > "$OUT/pretrain_2gpu.log" 2>&1
# accelerate launch starts the same recipe too (a short run of the small preset: it must start, train and save).
[ "$ACCELERATE" = 1 ] && timeout 90 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
    scripts/pretrain.py --config small --train-files "$DATA"/enwiki-*.txt.xz --cache-dir /tmp/tokcache --max-steps 20 \
    --per-device-batch-size 64 --logging-steps 5 --eval-steps 100000 --save-steps 100000 --no-progress-bar \
    --output-dir /tmp/small-accelerate > "$OUT/pretrain_accelerate.log" 2>&1
[ "$ACCELERATE" = 1 ] && echo "accelerate launch rc=$?: $(grep -E 'global batch|done:' "$OUT/pretrain_accelerate.log" | tr '\n' ' ')"
python3 benchmarks/scaling.py /tmp/base-1gpu /tmp/base-2gpu --png "$OUT/scaling.png" | tee "$OUT/scaling.md"
for run in base-1gpu base-2gpu; do cp /tmp/$run/log_history.json "$OUT/${run}_log_history.json"; done
