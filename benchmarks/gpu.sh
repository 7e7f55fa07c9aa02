#!/usr/bin/env bash
# Figures 1 and 4 of BENCHMARKS.md on CUDA with bf16, for the H200 machine that the `device` tool lends to some
# tasks: one call, well under 8 minutes. Its image has torch, torchvision, transformers, numpy, pillow and tqdm, which
# is all these need (synthetic JPEGs and batches: ../shared does not travel). Figure 1: embedding throughput, naive
# vs ours. Figure 4: training steps per second (benchmarks/train_step.py: ResNet-50 and a ViT-B/32 at 224 px, fused
# vs foreach AdamW), synthetic batches in memory, so without the data loading that the training loop also times.
# Last, where the project is installed with its data: a one-node multi-GPU torchrun run against one GPU.
# Not yet run: no session that wrote it was lent a machine.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu.sh: no NVIDIA GPU here (nvidia-smi finds none): nothing to measure" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 benchmarks/embed_throughput.py --device cuda --images 2048 --naive-images 128 --batch-size 256 \
  | tee "${OUT:-/tmp}/embed_cuda.md"
for arch in resnet50 vit_b_32; do
  python3 benchmarks/train_step.py --device cuda --arch "$arch" --image-size 224 --batch-size 128 --rounds 2
done | tee "${OUT:-/tmp}/train_cuda.md"
# Data-parallel training on every GPU of this machine (torchrun, NCCL): a ResNet-50 from scratch for 200 steps at the
# global batch 256, then the same on one GPU, so that the log's images/s compare. Needs the project's requirements
# (datasets, pandas, ...) and data/processed (python data_preparation.py); skipped without them.
if python3 -c "import datasets, pandas, faiss" 2>/dev/null && [[ -f data/processed/label_map.json ]]; then
  gpus=$(nvidia-smi -L | wc -l)
  for n in "$gpus" 1; do
    torchrun --standalone --nproc_per_node="$n" resnet.py --from-scratch --device cuda --batch-size 256 \
      --lr 3e-3 --max-steps 200 --epochs 1 --output-dir "runs/gpu-ddp-$n" | tail -3
    tail -1 "runs/gpu-ddp-$n/log.jsonl"
  done | tee "${OUT:-/tmp}/ddp_cuda.md"
else
  echo "torchrun figure skipped: needs the project's requirements and data/processed"
fi
