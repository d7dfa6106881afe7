"""Engine drill: hang the engine process (SIGSTOP), then crash it (SIGKILL), under client load.

    .venv/bin/python loadtests/drill_engine.py [--bundle DIR] [--clients 12] [--stop-s 15] [--out PATH]

Starts the real service (`python -m sidrec serve`, default watchdog settings) on a free loopback
port, drives it with --clients httpx clients (single recommendations, beam --beam-width; a client
that gets 503/429 honours Retry-After, capped at 1 s), and while they run:
  1. SIGSTOP the engine child for --stop-s seconds, then SIGCONT it (the watchdog should have
     killed and replaced it long before);
  2. once ready again, SIGKILL the (new) engine child.
A monitor polls /readyz and /healthz every 0.1 s. Reported per fault: detection time (signal ->
/readyz 503), restart time (-> /readyz 200 again), failed requests by status and code; and that
nothing else failed: no error outside the two fault windows, no 5xx other than 503
engine_unavailable, /healthz 200 throughout, the server never died. Writes everything it saw to
--out (default runs/drill_engine.json) and prints one JSON line last. Without --bundle it builds
a random-weight bundle under runs/ (drill_common.build_bundle).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from drill_common import ROOT, Server, build_bundle, metric_values, percentile, write_json  # noqa: E402

import httpx  # noqa: E402


async def client(c: httpx.AsyncClient, n_items: int, beam: int, stop: asyncio.Event, log: list, seed: int) -> None:
    rnd = random.Random(seed)
    # c: one AsyncClient shared by every task (drill_overload.phase says why)
    while not stop.is_set():
        body = {"history": [f"item{rnd.randrange(n_items)}" for _ in range(rnd.randint(1, 15))], "top_n": 10,
                "beam_width": beam}
        t0 = time.monotonic()
        try:
            r = await c.post("/v1/recommend", json=body)
            status = r.status_code
            code = r.json().get("error", {}).get("code") if status != 200 else None
            retry = r.headers.get("retry-after")
        except httpx.HTTPError as e:
            status, code, retry = 0, type(e).__name__, None
        log.append((t0, time.monotonic(), status, code, retry))
        if status != 200:
            await asyncio.sleep(min(float(retry or 1), 1.0))


async def monitor(url: str, stop: asyncio.Event, log: list) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=5) as c:
        while not stop.is_set():
            t = time.monotonic()
            row = [t]
            for path in ("/readyz", "/healthz"):
                try:
                    row.append((await c.get(path)).status_code)
                except httpx.HTTPError:
                    row.append(0)
            log.append(tuple(row))
            await asyncio.sleep(0.1)


async def wait_for(pred, limit_s: float) -> bool:
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if pred():
            return True
        await asyncio.sleep(0.05)
    return False


def fault_window(health: list, t_signal: float) -> dict:
    """Detection (signal -> first /readyz 503) and restart (detection -> first /readyz 200 after)."""
    after = [h for h in health if h[0] >= t_signal]
    down = next((h[0] for h in after if h[1] != 200), None)
    up = next((h[0] for h in after if down is not None and h[0] > down and h[1] == 200), None)
    return {"t_signal": t_signal, "t_down": down, "t_up": up,
            "detect_s": None if down is None else round(down - t_signal, 2),
            "restart_s": None if up is None or down is None else round(up - down, 2)}


async def drill(a: argparse.Namespace, srv: Server) -> dict:
    stop = asyncio.Event()
    reqs: list = []
    health: list = []
    limits = httpx.Limits(max_connections=a.clients, max_keepalive_connections=a.clients)
    shared = httpx.AsyncClient(base_url=srv.url, timeout=60, limits=limits)
    tasks = [asyncio.ensure_future(client(shared, a.items, a.beam_width, stop, reqs, s)) for s in range(a.clients)]
    tasks.append(asyncio.ensure_future(monitor(srv.url, stop, health)))
    events = {}
    try:
        await asyncio.sleep(a.warm_s)
        # 1. hang
        hung_pid = srv.engine_pid()
        events["sigstop"] = {"pid": hung_pid, "t": time.monotonic()}
        os.kill(hung_pid, signal.SIGSTOP)
        await asyncio.sleep(a.stop_s)
        try:
            os.kill(hung_pid, signal.SIGCONT)
            events["sigcont"] = "delivered: the stopped process was still there"
        except ProcessLookupError:
            events["sigcont"] = "process gone: the watchdog had killed it"
        await wait_for(lambda: health and health[-1][1] == 200 and srv.engine_pid() not in (None, hung_pid), 120)
        await asyncio.sleep(a.settle_s)
        # 2. crash
        crash_pid = srv.engine_pid()
        events["sigkill"] = {"pid": crash_pid, "t": time.monotonic()}
        os.kill(crash_pid, signal.SIGKILL)
        await asyncio.sleep(1.0)
        await wait_for(lambda: health and health[-1][1] == 200, 120)
        await asyncio.sleep(a.settle_s)
        events["final_engine_pid"] = srv.engine_pid()
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await shared.aclose()
    hang = fault_window(health, events["sigstop"]["t"])
    crash = fault_window(health, events["sigkill"]["t"])
    return {"events": events, "hang": hang, "crash": crash, "requests": reqs, "health": health}


def analyse(seen: dict, metrics: dict, srv: Server, a: argparse.Namespace) -> dict:
    reqs, health = seen["requests"], seen["health"]
    out = {}
    windows = []
    for name in ("hang", "crash"):
        w = seen[name]
        lo, hi = w["t_signal"], (w["t_up"] or float("inf")) + 0.5
        windows.append((lo, hi))
        inside = [r for r in reqs if r[1] >= lo and r[0] <= hi]  # overlapping the window
        failed = [r for r in inside if r[2] != 200]
        out[name] = {"detect_s": w["detect_s"], "restart_s": w["restart_s"],
                     "failed_by_status": dict(Counter(f"{r[2]} {r[3]}" for r in failed)),
                     "failed_with_retry_after": sum(r[4] is not None for r in failed),
                     "max_wait_for_failure_s": round(max((r[1] - r[0] for r in failed), default=0.0), 2),
                     "ok_in_window": sum(r[2] == 200 for r in inside)}
    outside = [r for r in reqs if not any(r[1] >= lo and r[0] <= hi for lo, hi in windows)]
    bad_outside = [r for r in outside if r[2] != 200]
    all_failed = [r for r in reqs if r[2] != 200]
    other_kinds = [r for r in all_failed if (r[2], r[3]) != (503, "engine_unavailable")]
    ok = [r[1] - r[0] for r in reqs if r[2] == 200]
    return {
        "drill": "engine", "clients": a.clients, "beam_width": a.beam_width, "stop_s": a.stop_s,
        "requests": len(reqs), "ok": len(ok), "failed": len(all_failed),
        "hang": out["hang"], "crash": out["crash"], "sigcont": seen["events"]["sigcont"],
        "failed_outside_fault_windows": len(bad_outside),
        "failed_other_than_503_engine_unavailable": len(other_kinds),
        "healthz_non_200": sum(h[2] != 200 for h in health),
        "server_alive": srv.alive(),
        "p50_ok_ms": round(1000 * percentile(ok, 50), 1) if ok else None,
        "p99_ok_ms": round(1000 * percentile(ok, 99), 1) if ok else None,
        "metrics": metrics,
        "peak_rss_mb": srv.peak_rss_mb,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", help="bundle directory (default: a random-weight bundle under runs/)")
    ap.add_argument("--items", type=int, default=3000, help="items of the built bundle / ids the clients draw from")
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("--beam-width", type=int, default=64)
    ap.add_argument("--stop-s", type=float, default=15.0, help="how long the engine stays SIGSTOPped")
    ap.add_argument("--warm-s", type=float, default=5.0)
    ap.add_argument("--settle-s", type=float, default=5.0)
    ap.add_argument("--out", default=str(ROOT / "runs" / "drill_engine.json"))
    a = ap.parse_args(argv)
    if not 1 <= a.clients <= 64:
        ap.error("--clients must be within 1..64")
    if not 1 <= a.stop_s <= 60:
        ap.error("--stop-s must be within 1..60")
    bundle = Path(a.bundle) if a.bundle else build_bundle(ROOT / "runs" / "drill_bundle", a.items)
    out = Path(a.out)
    with Server(bundle, out.with_suffix(".server.log")) as srv:
        seen = asyncio.run(drill(a, srv))
        metrics = metric_values(srv.url, ("sidrec_engine", "sidrec_rejected"))
        report = analyse(seen, metrics, srv, a)
    write_json(out, {**report, "timeline": {k: seen[k] for k in ("events", "requests", "health")}})
    h, c = report["hang"], report["crash"]
    print(f"{'fault':8s} {'detect s':>9s} {'restart s':>10s} {'failed':>7s}  by status")
    for name, r in (("hang", h), ("crash", c)):
        print(f"{name:8s} {r['detect_s']!s:>9s} {r['restart_s']!s:>10s} {sum(r['failed_by_status'].values()):7d}  "
              f"{r['failed_by_status']}")
    print(f"requests {report['requests']}, ok {report['ok']}, failed outside the fault windows "
          f"{report['failed_outside_fault_windows']}, /healthz non-200 {report['healthz_non_200']}; wrote {out}")
    print(json.dumps(report))
    return 0 if report["server_alive"] and not report["failed_outside_fault_windows"] else 1


if __name__ == "__main__":
    sys.exit(main())
