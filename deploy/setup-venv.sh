#!/usr/bin/env bash
# Create .venv and install exactly the locked environment (requirements/dev.lock, hashes checked),
# then sidrec itself, editable, without touching the locked set. The lock pins the CPU build of
# torch, so a fresh machine does not pull CUDA. To change a dependency: edit pyproject.toml, then
# `bash deploy/lock.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOCK=requirements/dev.lock
"$PY" deploy/check_lock.py >/dev/null || { "$PY" deploy/check_lock.py; exit 1; }
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
STAMP=.venv/.sidrec-lock.sha256
WANT=$(cat "$LOCK" pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "==> installing $LOCK into .venv (pip's log: .venv/pip-install.log)"
  if ! { .venv/bin/python -m pip install --disable-pip-version-check --require-hashes -r "$LOCK" &&
         .venv/bin/python -m pip install --disable-pip-version-check --no-deps --no-build-isolation -e .; } \
       > .venv/pip-install.log 2>&1; then
    grep -v "^WARNING: Location" .venv/pip-install.log | tail -40 >&2
    echo "setup-venv: installing $LOCK failed (full log: .venv/pip-install.log)" >&2
    exit 1
  fi
  echo "$WANT" > "$STAMP"
fi
