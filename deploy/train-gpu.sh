#!/usr/bin/env bash
# One-command Beauty training on a CUDA machine: the full recipe without the CPU time budget.
# Usage: bash deploy/train-gpu.sh [DATA_DIR] [RUN_DIR] [extra --set overrides...]
# Needs a CUDA build of torch in .venv (pip install torch with the CUDA wheel instead of the CPU pin).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/amazon-beauty}
OUT=${2:-runs/beauty-gpu}
shift $(( $# > 2 ? 2 : $# ))
NPROC=${NPROC:-1}
exec .venv/bin/torchrun --standalone --nproc_per_node="$NPROC" -m training.cli train \
  --data "$DATA" --out "$OUT" --device cuda \
  --set sid.balanced=true --set train.epochs=60 --set train.patience=8 \
  --set train.batch_size=256 --set train.dtype=bfloat16 --set train.eval_users=22363 \
  "$@"
