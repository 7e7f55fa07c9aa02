#!/usr/bin/env bash
# The four models trained from scratch on the full catalog (../shared/data/fashion-product-images-small-full:
# 37,384 products at 60x80, padded to a 64 px square), CPU only, each with a fixed number of epochs, so that the
# comparison is the same on any machine whatever its speed (the wall time of each run goes to its log), then
# compared by evaluation.py with the raw-pixel baseline. clip-text is the CLIP run with the image-text term, for text
# search and the app. Run alone: two torch jobs at once on 2 cores are 10-40x slower.
#
# Usage: benchmarks/compare_full.sh [MODEL...]   (default: resnet siamese clip clip-text vae; the comparison covers
#        every run folder present in $OUT, and its report with photos goes to $OUT/report.html)
#        EXTRA="--max-steps 30" OUT=runs/short benchmarks/compare_full.sh: short runs of the same shape (what the
#        report's cost is measured on: it depends on the catalog's size and the number of runs, not on their quality)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DATA=${DATA:-../shared/data/fashion-product-images-small-full}
OUT=${OUT:-runs/full}
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
[[ -f data/full/label_map.json ]] || $PY data_preparation.py --dataset "$DATA" --output-dir data/full | tee "$OUT/data_preparation.log"
common=(--from-scratch --image-size 64 --data data/full --device cpu --seed 0 ${EXTRA:-})
train() {  # run name, script, then its arguments; wall time goes to the log
  local name=$1 script=$2; shift 2
  local start=$SECONDS
  $PY "$script.py" "${common[@]}" --output-dir "$OUT/$name" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "$name wall seconds: $((SECONDS - start))" | tee -a "$OUT/$name.log"
}
models=("$@")
[[ ${#models[@]} -eq 0 ]] && models=(resnet siamese clip clip-text vae)
for model in "${models[@]}"; do
  case $model in
    resnet) train resnet resnet --arch resnet18 --epochs 16 --batch-size 128 --lr 3e-3 ;;
    siamese) train siamese siamese --arch resnet18 --epochs 12 --classes-per-batch 16 --per-class 4 --lr 1e-3 ;;
    clip) train clip clip --epochs 14 --batch-size 64 --lr 5e-4 --max-text-length 32 --head cosine --text-loss-weight 0 ;;
    clip-text) train clip-text clip --epochs 12 --batch-size 64 --lr 5e-4 --max-text-length 32 --head cosine --text-loss-weight 0.5 ;;
    vae) train vae vae --epochs 3 --batch-size 128 --lr 1e-3 ;;
    *) echo "unknown model $model (resnet, siamese, clip, clip-text, vae)" >&2; exit 2 ;;
  esac
done
runs=()
for name in resnet siamese clip clip-text vae; do [[ -f "$OUT/$name/metrics.json" ]] && runs+=("$OUT/$name"); done
$PY evaluation.py "${runs[@]}" --baseline pixels --output "$OUT/comparison.md" --plot "$OUT/precision_at_k.png" \
  --report "$OUT/report.html"
