"""Headless load run: locust against a running sidrec server, bounded, loopback only.

    .venv/bin/python loadtests/run_load.py --host http://127.0.0.1:8000 --bundle bundles/demo \\
        [--users 16] [--run-time 20] [--max-requests 2000] [--beam-width 100]

Runs `locust --headless` for at most --run-time seconds (<= 300) or --max-requests requests,
whichever comes first, reads its CSV stats and prints a table per endpoint, then one JSON line
with rps, p50 and p99 (ms). The host must be loopback: this tool never loads a remote machine.
It does not start the server (`bash deploy/quickstart.sh` or `python -m sidrec.service serve` does).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def plot_history(history: list[dict], path: Path) -> Path:
    """Throughput and p50/p95/p99 latency per second of the run (locust's aggregated history)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sidrec.figures import save_figure

    agg = [r for r in history if r.get("Name") == "Aggregated" and r.get("50%") not in ("", "N/A", None)]
    t0 = int(agg[0]["Timestamp"]) if agg else 0
    t = [int(r["Timestamp"]) - t0 for r in agg]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    a1.plot(t, [float(r["Requests/s"]) for r in agg])
    a1.set_ylabel("requests/s")
    for q in ("50%", "95%", "99%"):
        a2.plot(t, [float(r[q]) for r in agg], label=f"p{q[:-1]}")
    a2.set_ylabel("latency (ms)")
    a2.set_xlabel("seconds into the run")
    a2.legend()
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
    fig.suptitle("sidrec load run: latency over time")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="http://127.0.0.1:8000")
    ap.add_argument("--bundle", default="bundles/demo", help="bundle whose item ids make the histories")
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--spawn-rate", type=float, default=16.0)
    ap.add_argument("--run-time", type=int, default=20, help="seconds (max 300)")
    ap.add_argument("--max-requests", type=int, default=5000)
    ap.add_argument("--beam-width", type=int, default=100)
    ap.add_argument("--top-n", type=int, default=10)
    ap.add_argument("--plot", default="loadtests/latency_over_time.png",
                    help="PNG of throughput and latency percentiles over the run ('' to skip)")
    a = ap.parse_args(argv)
    if urlparse(a.host).hostname not in LOOPBACK:
        print(f"run_load: refusing non-loopback host {a.host!r}", file=sys.stderr)
        return 2
    if not (Path(a.bundle) / "item_ids.json").is_file():
        print(f"run_load: {a.bundle}/item_ids.json not found (pass --bundle)", file=sys.stderr)
        return 2
    run_time = max(1, min(a.run_time, 300))
    locust = Path(sys.executable).with_name("locust")
    with tempfile.TemporaryDirectory(prefix="sidrec-load-") as tmp:
        prefix = os.path.join(tmp, "run")
        env = dict(os.environ, SIDREC_LOAD_BUNDLE=str(Path(a.bundle).resolve()),
                   SIDREC_LOAD_BEAM_WIDTH=str(a.beam_width), SIDREC_LOAD_TOP_N=str(a.top_n),
                   SIDREC_LOAD_MAX_REQUESTS=str(a.max_requests))
        cmd = [str(locust) if locust.exists() else "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"),
               "--headless", "--host", a.host, "-u", str(a.users), "-r", str(a.spawn_rate), "-t", f"{run_time}s",
               "--csv", prefix, "--only-summary", "--stop-timeout", "5", "--loglevel", "WARNING"]
        proc = subprocess.run(cmd, env=env, timeout=run_time + 60)
        rows = list(csv.DictReader(open(f"{prefix}_stats.csv")))
        history = list(csv.DictReader(open(f"{prefix}_stats_history.csv"))) if a.plot else []
    if a.plot and history:
        print(f"latency plot: {plot_history(history, Path(a.plot))}")
    out = {}
    print(f"{'endpoint':28s} {'requests':>9s} {'fails':>6s} {'rps':>8s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for r in rows:
        name = r["Name"]
        stats = {"requests": int(r["Request Count"]), "failures": int(r["Failure Count"]),
                 "rps": round(float(r["Requests/s"]), 2), "p50_ms": float(r["50%"] or 0), "p99_ms": float(r["99%"] or 0)}
        out[name] = stats
        print(f"{name:28s} {stats['requests']:9d} {stats['failures']:6d} {stats['rps']:8.2f} "
              f"{stats['p50_ms']:8.1f} {stats['p99_ms']:8.1f}")
    print(json.dumps({"bench": "load", "host": a.host, "users": a.users, "run_time_s": run_time,
                      "beam_width": a.beam_width, "locust_exit": proc.returncode, "stats": out}))
    return 0 if proc.returncode in (0, 1) else proc.returncode


if __name__ == "__main__":
    sys.exit(main())
