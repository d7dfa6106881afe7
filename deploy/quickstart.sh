#!/usr/bin/env bash
# sidrec quickstart: set up .venv, build the demo bundle if absent, serve it on 127.0.0.1:8000.
#
#   bash deploy/quickstart.sh            # embedded in-process index, no Redis needed
#   SIDREC_REDIS_URL=redis://127.0.0.1:6379/0 bash deploy/quickstart.sh   # Redis inverse index
#   bash deploy/quickstart.sh --check    # start, answer one request, stop (for CI / smoke tests)
#
# Any SIDREC_* setting applies (SIDREC_PORT, SIDREC_BUNDLE_PATH, SIDREC_ADMIN_TOKEN, ...).
# SIDREC_SKIP_SETUP=1 skips the venv step when .venv is already set up.
set -euo pipefail
cd "$(dirname "$0")/.."

CHECK=0
[ "${1:-}" = "--check" ] && CHECK=1

if [ "${SIDREC_SKIP_SETUP:-0}" != "1" ] || [ ! -x .venv/bin/python ]; then
  echo "==> setting up .venv (deploy/setup-venv.sh)"
  bash deploy/setup-venv.sh
fi
PY=.venv/bin/python

export SIDREC_BUNDLE_PATH="${SIDREC_BUNDLE_PATH:-bundles/demo}"
export SIDREC_HOST="${SIDREC_HOST:-127.0.0.1}"
export SIDREC_PORT="${SIDREC_PORT:-8000}"
BUNDLE="$SIDREC_BUNDLE_PATH"

if [ ! -f "$BUNDLE/config.json" ]; then
  echo "==> no bundle at $BUNDLE: training the demo bundle on built-in synthetic data (1-2 minutes)"
  .venv/bin/sidrec demo-bundle "$BUNDLE"
fi

if [ -n "${SIDREC_REDIS_URL:-}" ]; then
  echo "==> loading the inverse index into Redis (idempotent)"
  "$PY" -m sidrec index load "$BUNDLE"
else
  echo "==> using the embedded in-process index (set SIDREC_REDIS_URL to use Redis)"
fi

URL="http://$SIDREC_HOST:$SIDREC_PORT"
echo "==> starting sidrec on $URL"
"$PY" -m sidrec serve &
PID=$!
trap 'kill -TERM "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true' INT TERM EXIT

ready() { "$PY" - "$URL/readyz" <<'PYEOF'
import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=2).status == 200 else 1)
except Exception:
    sys.exit(1)
PYEOF
}
for _ in $(seq 1 240); do
  ready && break
  if ! kill -0 "$PID" 2>/dev/null; then
    echo "sidrec failed to start (see the messages above)" >&2
    trap - EXIT; wait "$PID"; exit 1
  fi
  sleep 0.5
done
ready || { echo "sidrec did not become ready in 120 s" >&2; exit 1; }

HISTORY=$("$PY" -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1] + "/item_ids.json"))[:3]))' "$BUNDLE")
BODY="{\"history\": $HISTORY, \"top_n\": 5}"
echo
echo "sidrec is ready. Try:"
echo
echo "  curl -s -X POST $URL/v1/recommend -H 'content-type: application/json' -d '$BODY'"
echo
echo "  (also: $URL/docs  $URL/v1/model  $URL/metrics)"
echo

if [ "$CHECK" = "1" ]; then
  "$PY" - "$URL/v1/recommend" "$BODY" <<'PYEOF'
import sys, urllib.request
req = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(), headers={"content-type": "application/json"})
print(urllib.request.urlopen(req, timeout=30).read().decode())
PYEOF
  exit 0
fi
wait "$PID"
