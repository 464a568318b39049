#!/usr/bin/env bash
# Issue 6's size choice: two candidate shapes of the shipped checkpoint, pretrained side by side for the same wall time
# on a 2-GPU machine (one run per GPU, nvidia-h100-x2 kind), same data, batch and schedule. Both fit 25 MB in fp16:
#   wiki-small: hidden 256, 4 layers, 4 heads (12.1M parameters)
#   wiki-deep:  hidden 192, 8 layers, 3 heads (10.7M parameters)
# Needs the corpus in $DATA (default .data: enwiki-*.txt.xz); writes fp16 shards (<16 MB each) and logs.tgz to $OUT.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=true
OUT=${OUT:-./sizes_out}; DATA=${DATA:-.data}; MINUTES=${MINUTES:-7.8}; mkdir -p "$OUT/logs"
nvidia-smi --query-gpu=name --format=csv,noheader > "$OUT/logs/env.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
    >> "$OUT/logs/env.txt"
# Tokenize once, so both runs start from the same cache.
python3 scripts/pretrain.py --config configs/mosaic-bert-wiki-small.json --train-files "$DATA"/enwiki-*.txt.xz \
    --cache-dir /tmp/tokcache --max-steps 1 --output-dir /tmp/warm > "$OUT/logs/tokenize.log" 2>&1
gpu=0
for name in small deep; do
  CUDA_VISIBLE_DEVICES=$gpu python3 scripts/pretrain.py --config configs/mosaic-bert-wiki-$name.json \
      --train-files "$DATA"/enwiki-*.txt.xz --cache-dir /tmp/tokcache --learning-rate 1e-3 \
      --per-device-batch-size 256 --max-seq-length 128 --max-steps 100000 --max-time-minutes "$MINUTES" \
      --eval-steps 2000 --logging-steps 100 --save-steps 1000000 --dataloader-num-workers 6 --no-progress-bar \
      --output-dir /tmp/wiki-$name > "$OUT/logs/pretrain_$name.log" 2>&1 &
  gpu=$((gpu + 1))
done
wait
for name in small deep; do
  python3 - /tmp/wiki-$name /tmp/ship-$name <<'PY'
import sys, torch
sys.path.insert(0, ".")
from modeling_mosaic_bert import MosaicBertForMaskedLM
MosaicBertForMaskedLM.from_pretrained(sys.argv[1], dtype=torch.float32).half().save_pretrained(
    sys.argv[2], max_shard_size="13MB")
PY
  mkdir -p "$OUT/$name" "$OUT/logs/$name"
  cp /tmp/ship-$name/*.safetensors "$OUT/$name/"
  cp /tmp/ship-$name/model.safetensors.index.json /tmp/wiki-$name/*.json /tmp/wiki-$name/*.md \
     /tmp/wiki-$name/*.png "$OUT/logs/$name/" 2>/dev/null
  tail -2 "$OUT/logs/pretrain_$name.log"
done
tar -C "$OUT" -czf "$OUT/logs.tgz" logs && rm -rf "$OUT/logs"
find "$OUT" -type f | xargs ls -la
