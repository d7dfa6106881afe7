#!/usr/bin/env bash
# Every GPU measurement the issues ask for, in one run for a session lent a CUDA machine
# (about 8 minutes on one H200; each part reports and the next one runs even if it fails):
#   1. benchmarks/gpu_check.py: the Triton beam step against the reference, the engine eager and as a
#      captured CUDA graph at beams 100/256/1000, batches 1/32/64;
#   2. benchmarks/engine_scaling.py on the GPU: batch 1..32 at beams 100 and 256, and the bound
#      that puts on the service's p99 target (p99 at 32 clients <= 4x p50 at 1 client);
#   3. benchmarks/service_bench.py on the GPU: the service sweep itself.
#
#   bash benchmarks/gpu_session.sh [BUNDLE]          # writes logs and JSON under $OUT (or ./gpu-out)
#   DEVICE=cpu bash benchmarks/gpu_session.sh        # a short rehearsal on the CPU (gpu_check --dry-run)
#
# BUNDLE defaults to the synthetic TIGER-size bundle. The service sweep needs the `serve` extra's
# packages; where the machine has no index to install from, carry them as wheels in .whl/ (they
# are installed from there into /tmp/site first): fastapi, starlette, pydantic, pydantic-core,
# pydantic-settings, python-dotenv, annotated-types, typing-inspection, uvicorn, httptools, redis.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
BUNDLE=${1:-}
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then  # rehearsal: tiny kernel check, fewer engine points, a short sweep
  CHECK=(--dry-run) SCALE=(--batches 1 32 --beams 100 --reps 2) SWEEP=(--seconds 1 --rounds 1 --max-requests 32)
else
  CHECK=(--beams 100 256 1000 --batches 1 32 64) SCALE=() SWEEP=(--max-requests 320 --rounds 2)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
fi

echo "== 1/3 benchmarks/gpu_check.py"
timeout 330 "$PY" benchmarks/gpu_check.py "${CHECK[@]}" --out "$OUT/gpu_check.json" > "$OUT/gpu_check.log" 2>&1
echo "rc $?"; tail -3 "$OUT/gpu_check.log" | cut -c1-400

echo "== 2/3 engine_scaling ($DEVICE, bf16)"
timeout 120 "$PY" benchmarks/engine_scaling.py $BUNDLE --device "$DEVICE" --dtype bfloat16 --threads 4 "${SCALE[@]}" \
  > "$OUT/engine_scaling.log" 2>&1
echo "rc $?"; grep -E "^beam [0-9]+:" "$OUT/engine_scaling.log"

echo "== 3/3 service_bench ($DEVICE, bf16)"
if "$PY" -c "import fastapi, uvicorn, pydantic_settings" 2>/dev/null; then
  timeout 300 "$PY" benchmarks/service_bench.py ${BUNDLE:---model tiger} --device "$DEVICE" --dtype bfloat16 --threads 4 \
    "${SWEEP[@]}" > "$OUT/service_bench.log" 2>&1
  echo "rc $?"; grep -E "^beam [0-9]+:" "$OUT/service_bench.log"
else
  echo "skipped: the serve extra is not importable (carry its wheels in .whl/, see the header)"
fi
