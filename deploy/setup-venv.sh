#!/usr/bin/env bash
# Create .venv and install sidrec with everything its jobs and tests need.
# torch is pinned by constraints-dev.txt to the CPU build, so a fresh machine does not pull CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -c constraints-dev.txt -e ".[dev]"
