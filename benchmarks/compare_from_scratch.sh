#!/usr/bin/env bash
# The four models trained from scratch (no pretrained weights) on the real data in ../shared, 64 px, CPU only,
# each under a fixed budget of at most 15 minutes wall time on 2 cores (epochs chosen from measured img/s),
# then compared by evaluation.py with the raw-pixel baseline. Run alone: two torch jobs at once on 2 cores
# are 10-40x slower.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DATA=${DATA:-../shared/data/fashion-product-images-small}
OUT=${OUT:-runs/from-scratch}
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
$PY data_preparation.py --dataset "$DATA" --output-dir data/processed | tee "$OUT/data_preparation.log"
common=(--from-scratch --image-size 64 --data data/processed --device cpu --seed 0)
train() {  # name, then its arguments; wall time goes to the log
  local name=$1; shift
  local start=$SECONDS
  $PY "$name.py" "${common[@]}" --output-dir "$OUT/$name" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "$name wall seconds: $((SECONDS - start))" | tee -a "$OUT/$name.log"
}
train resnet --epochs 8 --batch-size 128 --lr 2e-3
train siamese --epochs 8 --classes-per-batch 32 --per-class 4 --lr 1e-3
train clip --epochs 4 --batch-size 128 --lr 1e-3 --max-text-length 64
train vae --epochs 6 --batch-size 128 --lr 1e-3
$PY evaluation.py "$OUT/resnet" "$OUT/siamese" "$OUT/clip" "$OUT/vae" --baseline pixels \
  --output "$OUT/comparison.md" --plot "$OUT/precision_at_k.png"
