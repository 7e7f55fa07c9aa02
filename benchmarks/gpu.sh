#!/usr/bin/env bash
# The GPU figures (BENCHMARKS.md, section 9) on a machine with an NVIDIA GPU, each beside its CPU or eager baseline
# from the same run, in one call of under 8 minutes on a data-centre GPU:
#   1. the catalog build, JPEG bytes in and unit vectors out, for ViT-B/32 and ResNet-50 at 224 px, stage by stage
#      (decode on 1 and on N threads, the copy to the GPU, the model alone, the build end to end), on the GPU and on
#      the machine's CPU cores: benchmarks/embed_pipeline.py says which stage is the limit;
#   2. the training step in img/s for both (benchmarks/train_step.py: fused AdamW against the default foreach one);
#   3. the app's JSON route (POST /api/search_image) p50 and requests/s at 8 clients, app.py --no-page over a
#      synthetic catalog of 4,096 products with a full-size ViT-B/32, on the GPU and on the CPU;
#   4. a one-node torchrun run of resnet.py on every GPU present, against one GPU.
# Synthetic photos and data throughout (../shared does not travel). Parts 1, 3 and 4 need the project's requirements
# (datasets; 3 also faiss-cpu, uvicorn, starlette, httpx): where there is no package index, carry their wheels (the
# device README) and install them first. A part whose packages are missing says so in one line and is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu.sh: no NVIDIA GPU here (nvidia-smi finds none): nothing to measure" >&2
  exit 2
fi
OUT=${OUT:-/tmp/gpu-bench}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=${PYTHON:-python3}
have() { for m in "$@"; do $PY -c "import $m" 2>/dev/null || { echo "skipped: needs the Python package $m"; return 1; }; done; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
echo "$(nproc) CPU cores"

echo "## 1. catalog build, stage by stage"
if have datasets; then
  $PY benchmarks/embed_pipeline.py --device cuda --photos 16384 | tee "$OUT/embed_cuda.md"
  $PY benchmarks/embed_pipeline.py --device cpu --photos 512 | tee "$OUT/embed_cpu.md"
fi

echo "## 2. training step"
for arch in resnet50 vit_b_32; do
  $PY benchmarks/train_step.py --device cuda --arch "$arch" --image-size 224 --batch-size 256 --rounds 2
done | tee "$OUT/train_cuda.md"

echo "## 3. the app's JSON route at 8 clients"
if have datasets faiss uvicorn starlette httpx; then
  $PY benchmarks/synthetic_catalog.py /tmp/gpu-catalog --photos 4096
  $PY benchmarks/make_clip_b32.py /tmp/clip-b32 >/dev/null
  for device in cuda cpu; do
    rm -rf runs/zero-shot-clip/index  # each device builds its own
    $PY app.py --run /tmp/no-run --model /tmp/clip-b32 --dataset /tmp/gpu-catalog --device "$device" --no-page \
      --no-compile --cache-dir "/tmp/gpu-cache-$device" --port 7870 >"$OUT/app_$device.log" 2>&1 &
    app=$!
    echo "app on $device:"
    $PY benchmarks/app_latency.py --url http://127.0.0.1:7870/ --wait 240 --clients 1 8 --requests 400 --routes json \
      || tail -5 "$OUT/app_$device.log"
    kill "$app"; wait "$app" 2>/dev/null || true
  done | tee "$OUT/app.md"
fi

echo "## 4. data-parallel training: torchrun on every GPU, then one"
if have datasets pandas faiss; then
  $PY benchmarks/synthetic_catalog.py /tmp/gpu-train --photos 8192 >/dev/null
  $PY data_preparation.py --dataset /tmp/gpu-train --output-dir /tmp/gpu-processed >/dev/null
  gpus=$(nvidia-smi -L | wc -l)
  for n in $(printf "%s\n" "$gpus" 1 | sort -rnu); do
    torchrun --standalone --nproc_per_node="$n" resnet.py --from-scratch --device cuda --data /tmp/gpu-processed \
      --batch-size 256 --lr 3e-3 --max-steps 100 --epochs 1 --cache-dir /tmp/gpu-cache-train \
      --output-dir "runs/gpu-ddp-$n" | tail -2
    tail -1 "runs/gpu-ddp-$n/log.jsonl"
  done | tee "$OUT/ddp_cuda.md"
fi
