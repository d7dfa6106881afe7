"""Drill: switch model versions and roll back, 5 times each, under 16 clients; nothing may fail.

Builds two random-weight bundle versions (same item ids, other weights) under one bundle root,
starts the real service (`python -m sidrec serve`, engine in its own process) on the first, and
drives 16 closed-loop clients of /v1/recommend while an admin client loads the second version
(POST /v1/admin/model/load) and rolls back (POST /v1/admin/model/rollback), `--cycles` times.
Reports every request's status and serving version, the switch and load times the server gave,
the peak RSS the server measured during each load and the drill's own sampling of server +
engines. Writes what it saw to --out and prints one JSON line last.

    .venv/bin/python loadtests/drill_reload.py            # about a minute on 2 cores
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

from drill_common import ROOT, Server, build_bundle, percentile, write_json

import httpx

TOKEN = "drill-reload-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def client(c: httpx.AsyncClient, n_items: int, stop: asyncio.Event, log: list, seed: int) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        body = {"history": [f"item{rng.randrange(n_items)}" for _ in range(rng.randint(1, 20))], "top_n": 10,
                "beam_width": 64}
        t0 = time.monotonic()
        try:
            r = await c.post("/v1/recommend", json=body)
            version = r.json().get("model_version") if r.status_code == 200 else None
            log.append((t0, time.monotonic() - t0, r.status_code, version))
        except httpx.HTTPError as e:
            log.append((t0, time.monotonic() - t0, type(e).__name__, None))


async def drill(a: argparse.Namespace, srv: Server, first: str, second: str) -> dict:
    log: list = []
    switches: list = []
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=a.clients + 4)
    async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=limits) as c:
        tasks = [asyncio.create_task(client(c, a.items, stop, log, s)) for s in range(a.clients)]
        await asyncio.sleep(a.warm_s)
        # default: load, then roll back to the slot kept loaded; --fresh: every switch loads a bundle
        # from disk beside the serving one (the replaced model is drained and closed)
        steps = ((second, "load"), (first, "load")) if a.fresh else ((second, "load"), (None, "rollback"))
        for _ in range(a.cycles):
            for path, call in steps:
                t0 = time.monotonic()
                r = await (c.post("/v1/admin/model/load", headers=AUTH, json={"bundle_path": path}) if path
                           else c.post("/v1/admin/model/rollback", headers=AUTH))
                switches.append({"call": call, "status": r.status_code, "wall_s": round(time.monotonic() - t0, 3),
                                 **(r.json() if r.status_code == 200 else {"error": r.json().get("error")})})
                await asyncio.sleep(a.between_s)
        stop.set()
        await asyncio.gather(*tasks)
    return {"log": log, "switches": switches}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=3000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--cycles", type=int, default=5, help="load + rollback pairs")
    ap.add_argument("--warm-s", type=float, default=3.0)
    ap.add_argument("--between-s", type=float, default=1.0, help="traffic between two switches")
    ap.add_argument("--fresh", action="store_true", help="load both ways instead of rolling back (no model kept)")
    ap.add_argument("--out", default=None, help="report path (default runs/drill_reload[-fresh].json)")
    a = ap.parse_args(argv)
    if not 1 <= a.clients <= 64 or not 1 <= a.cycles <= 50:
        ap.error("--clients must be within 1..64 and --cycles within 1..50")
    root = ROOT / "runs" / "drill_reload_bundles"
    first, second = build_bundle(root / "v1", a.items, seed=0), build_bundle(root / "v2", a.items, seed=1)
    out = Path(a.out or ROOT / "runs" / f"drill_reload{'-fresh' if a.fresh else ''}.json")
    env = {"SIDREC_ADMIN_TOKEN": TOKEN, "SIDREC_BUNDLE_ROOT": str(root), "SIDREC_MAX_TOP_N": "64",
           "SIDREC_KEEP_PREVIOUS_MODEL": "false" if a.fresh else "true"}
    with Server(first, out.with_suffix(".server.log"), env=env) as srv:
        seen = asyncio.run(drill(a, srv, str(first), str(second)))
        alive = srv.alive()
        peak = srv.peak_rss_mb
    log, switches = seen["log"], seen["switches"]
    failed = [e for e in log if e[2] != 200]
    versions: dict[str, int] = {}
    for e in log:
        if e[3]:
            versions[e[3]] = versions.get(e[3], 0) + 1
    lat = [1e3 * e[1] for e in log if e[2] == 200]
    ok_switches = [s for s in switches if s["status"] == 200]
    report = {
        "drill": "reload", "mode": "fresh" if a.fresh else "rollback", "clients": a.clients, "cycles": a.cycles, "requests": len(log), "failed": len(failed),
        "failed_by_status": {str(k): sum(1 for e in failed if e[2] == k) for k in {e[2] for e in failed}},
        "versions_seen": versions, "switches": len(switches), "switches_ok": len(ok_switches),
        "switch_ms": [s.get("switch_ms") for s in ok_switches],
        "load_s": [s.get("load_s") for s in ok_switches if s["call"] == "load"],
        "rollback_s": [s.get("load_s") for s in ok_switches if s["call"] == "rollback"],
        "peak_rss_mb_server_reported": max((s.get("peak_rss_mb", 0) for s in ok_switches), default=None),
        "peak_rss_mb_sampled": peak, "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
        "server_alive": alive,
    }
    write_json(out, {**report, "switch_log": switches, "requests_log": log})
    print(f"{'call':9s} {'status':>6s} {'version':>22s} {'load s':>7s} {'switch ms':>10s} {'peak RSS MB':>12s}")
    for s in switches:
        print(f"{s['call']:9s} {s['status']:>6} {str(s.get('model_version'))[:22]:>22s} {s.get('load_s')!s:>7s} "
              f"{s.get('switch_ms')!s:>10s} {s.get('peak_rss_mb')!s:>12s}")
    print(f"requests {len(log)}, failed {len(failed)}, versions seen {versions}; wrote {out}")
    print(json.dumps(report))
    return 0 if not failed and len(ok_switches) == len(switches) and alive else 1


if __name__ == "__main__":
    sys.exit(main())
