#!/usr/bin/env bash
# Figure 1 of BENCHMARKS.md (embedding throughput, naive vs ours) on CUDA with bf16, for the H200 machine that the
# `device` tool lends to some tasks: one call, well under 8 minutes. Its image has torch, torchvision,
# transformers, numpy, pillow and tqdm, which is all this figure needs (synthetic JPEGs: ../shared does not travel).
# Not yet run: the task that wrote it was not lent a machine. Figure 4 (training on CUDA) still needs a script
# that does not import `datasets` (absent there) or carried wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 benchmarks/embed_throughput.py --device cuda --images 2048 --naive-images 128 --batch-size 256 \
  | tee "${OUT:-/tmp}/embed_cuda.md"
