#!/usr/bin/env bash
# One-command Beauty training on a CUDA machine: recipe training/recipes/beauty-gpu.json (no time budget).
# Usage: bash deploy/train-gpu.sh [DATA_DIR] [RUN_DIR] [extra --set overrides...]
# Needs a CUDA build of torch in .venv (pip install torch with the CUDA wheel instead of the CPU pin).
# The recipe fits on train only (early stopping reads validation), so the hybrid ranking's knobs (the
# transition mixture and the text re-rank) are then chosen on the same validation users
# (benchmarks/rerank_tune.py) and the run is scored and exported again with them: only the evaluate
# and export stages rerun, the training is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/amazon-beauty}
OUT=${2:-runs/beauty-gpu}
shift $(( $# > 2 ? 2 : $# ))
NPROC=${NPROC:-1}
.venv/bin/torchrun --standalone --nproc_per_node="$NPROC" -m sidrec.training.cli train \
  --data "$DATA" --out "$OUT" --config beauty-gpu "$@"
.venv/bin/python benchmarks/rerank_tune.py "$OUT" --data "$DATA"
read -r W D MW MD ME < <(.venv/bin/python -c 'import json, sys; b = json.load(open(sys.argv[1]))["best"]
print(b["weight"], b["decay"], b["mix_weight"], b["mix_decay"], b["extra"])' "$OUT/rerank_tune-valid.json")
exec .venv/bin/python -m sidrec.training.cli train --data "$DATA" --out "$OUT" --config beauty-gpu "$@" \
  --set "eval.rerank_weight=$W" --set "eval.rerank_decay=$D" --set "eval.transitions_weight=$MW" \
  --set "eval.transitions_decay=$MD" --set "eval.transitions_extra=$ME"
