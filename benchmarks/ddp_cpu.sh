#!/usr/bin/env bash
# Data-parallel training on CPU: the same ResNet-18 steps (64 px, global batch 64, 40 steps) in one process with 2
# threads and under torchrun in 2 processes of 1 thread each (gloo), on the first 4,000 training rows of data/full.
# It shows that the data-parallel path runs and what it costs on one machine; it is not a way to train faster on CPUs.
# Run alone. Usage: benchmarks/ddp_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1
args=(--from-scratch --arch resnet18 --image-size 64 --data data/full --limit 4000 --device cpu --precision bf16
      --batch-size 64 --lr 1e-3 --epochs 1 --max-steps 40 --seed 0)
OMP_NUM_THREADS=2 $PY -m torch.distributed.run --standalone --nproc_per_node=1 resnet.py "${args[@]}" \
  --output-dir runs/ddp-cpu-1 > /tmp/ddp-cpu-1.log 2>&1
OMP_NUM_THREADS=1 $PY -m torch.distributed.run --standalone --nproc_per_node=2 resnet.py "${args[@]}" \
  --output-dir runs/ddp-cpu-2 > /tmp/ddp-cpu-2.log 2>&1
echo "| processes x threads | steps | train loss | images/s |"
echo "|---|---:|---:|---:|"
for n in 1 2; do
  $PY -c "import json,sys; r=json.loads(open('runs/ddp-cpu-$n/log.jsonl').readline()); \
print(f\"| $n x $((2 / n)) | {r['step']} | {r['train_loss']:.4f} | {r['images_per_second']:.0f} |\")"
done
