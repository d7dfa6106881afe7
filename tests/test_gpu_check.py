"""The prepared GPU script must not rot: its --dry-run (CPU, tiny, Triton interpreter) runs clean."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"gpu_check --dry-run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == json.loads(out.read_text())
    assert report["dry_run"] and report["kernel"]["ok"]
    assert {c["dense"] for c in report["kernel"]["cases"]} == {True, False}  # both level types checked
    assert all(c["picks_differing"] == 0 for c in report["kernel"]["cases"])
    engine = report["engine"]
    assert {(r["batch"], r["beam"]) for r in engine} == {(1, 8), (1, 16), (2, 8), (2, 16)}
    assert all(r["eager_p50_ms"] > 0 and r["eager_p99_ms"] >= r["eager_p50_ms"] for r in engine)
