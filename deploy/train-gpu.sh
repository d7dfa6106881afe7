#!/usr/bin/env bash
# One-command Beauty training on a CUDA machine: recipe training/recipes/beauty-gpu.json (no time budget).
# Usage: bash deploy/train-gpu.sh [DATA_DIR] [RUN_DIR] [extra --set overrides...]
# Needs a CUDA build of torch in .venv (pip install torch with the CUDA wheel instead of the CPU pin).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/amazon-beauty}
OUT=${2:-runs/beauty-gpu}
shift $(( $# > 2 ? 2 : $# ))
NPROC=${NPROC:-1}
exec .venv/bin/torchrun --standalone --nproc_per_node="$NPROC" -m sidrec.training.cli train \
  --data "$DATA" --out "$OUT" --config beauty-gpu "$@"
