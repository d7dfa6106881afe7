"""Overload drill: 4x more clients than the queue admits, some sending the heaviest request allowed.

    .venv/bin/python loadtests/drill_overload.py [--bundle DIR] [--batch 8] [--queue 8] [--out PATH]

Starts the real service (`python -m sidrec serve`) with max_batch_size --batch and max_queue_size
--queue (max_queue_work then defaults to queue x default beam 100), so it admits batch + queue
requests at a time: one engine round and a full queue. Then:
  1. baseline: --batch light clients (one user, beam --beam-width) for --base-s seconds: the
     unloaded p99 at that batch size (the engine runs full batches of --batch);
  2. overload: 4 x (batch + queue) clients for --load-s seconds, --heavy of them sending the
     heaviest request the schema allows (max_batch_requests users, beam max_beam_width, top_n
     max_top_n, max_history_len-item histories). A client that gets a 429 waits 0.5-1x its
     Retry-After (capped at 10 s) before re-sending, or 0.1 s with --impatient.
Reported: 429s and how many carried Retry-After, any 5xx, the p99 of accepted light requests
against the baseline (target: within 2x) with the mean batch size of each phase, heavy requests
admitted and their latency, peak RSS of server and engine (psutil, every 0.2 s), and whether the
server stayed up. Writes --out (default runs/drill_overload.json), prints one JSON line last.
The clients speak raw keep-alive HTTP/1.1 (`RawConnection`) unless --client httpx: on a 2-core
machine shared with the server, the driver's own per-request CPU is part of what clients see.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from drill_common import (ROOT, Server, build_bundle, histogram_quantile, metric_values, percentile,  # noqa: E402
                          write_json)

import httpx  # noqa: E402

MAX_USERS, MAX_BEAM, MAX_TOP_N, MAX_HISTORY = 64, 1024, 256, 512  # the service's default limits


def light_body(rnd: random.Random, n_items: int, beam: int) -> dict:
    return {"history": [f"item{rnd.randrange(n_items)}" for _ in range(rnd.randint(1, 15))], "top_n": 10,
            "beam_width": beam}


def heavy_body(rnd: random.Random, n_items: int) -> dict:
    return {"requests": [{"history": [f"item{rnd.randrange(n_items)}" for _ in range(MAX_HISTORY)],
                          "top_n": MAX_TOP_N, "beam_width": MAX_BEAM} for _ in range(MAX_USERS)]}


class RawConnection:
    """One keep-alive HTTP/1.1 connection that spends as little client CPU per request as it can:
    the drill's 64 clients share the 2 cores with the server, and httpx's per-request work (about
    a millisecond) queued requests in the driver's own event loop, so the latency the clients saw
    was mostly the driver's. Requests are bytes, responses are read by Content-Length."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        try:
            self.writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                              b"Content-Length: %d\r\n\r\n%s" % (path.encode(), self.host.encode(), len(body), body))
            await self.writer.drain()
            status = int((await self.reader.readline()).split()[1])
            headers = {}
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                k, _, v = line.decode("latin-1").partition(":")
                headers[k.strip().lower()] = v.strip()
            data = await self.reader.readexactly(int(headers.get("content-length", 0)))
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
            await self.close()
            raise
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, headers, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def client(c: Any, kind: str, a: argparse.Namespace, stop: asyncio.Event, log: list, seed: int) -> None:
    rnd = random.Random(seed)
    path = "/v1/recommend" if kind == "light" else "/v1/recommend/batch"
    heavy = json.dumps(heavy_body(rnd, a.items)).encode() if kind == "heavy" else b""  # ~0.4 MB, built once
    headers = {"content-type": "application/json"}
    while not stop.is_set():
        body = json.dumps(light_body(rnd, a.items, a.beam_width)).encode() if kind == "light" else heavy
        t0 = time.monotonic()
        try:
            if isinstance(c, RawConnection):
                status, hdrs, data = await c.post(path, body)
                retry = hdrs.get("retry-after")
                code = None if status == 200 else json.loads(data).get("error", {}).get("code")
            else:
                r = await c.post(path, content=body, headers=headers)
                status, retry = r.status_code, r.headers.get("retry-after")
                code = None if status == 200 else r.json().get("error", {}).get("code")
        except (httpx.HTTPError, OSError, ValueError, IndexError, asyncio.IncompleteReadError) as e:
            status, code, retry = 0, type(e).__name__, None
        log.append((kind, t0, time.monotonic(), status, code, retry))
        if status != 200:  # a polite client waits about Retry-After (jittered); an impatient one 0.1 s
            await asyncio.sleep(0.1 if a.impatient else rnd.uniform(0.5, 1.0) * min(float(retry or 1), 10.0))


async def phase(url: str, a: argparse.Namespace, n_light: int, n_heavy: int, seconds: float) -> list:
    stop, log = asyncio.Event(), []
    # One client, one connection per task: 64 AsyncClients would each build an SSL context
    # (~50 ms of CPU apiece), stalling this process for seconds as the phase starts.
    if a.client == "raw":
        host, port = url.removeprefix("http://").rsplit(":", 1)
        conns = [RawConnection(host, int(port)) for _ in range(n_light + n_heavy)]
        tasks = [asyncio.ensure_future(client(conns[s], "light", a, stop, log, s)) for s in range(n_light)]
        tasks += [asyncio.ensure_future(client(conns[n_light + s], "heavy", a, stop, log, 1000 + s))
                  for s in range(n_heavy)]
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in conns))
        return log
    limits = httpx.Limits(max_connections=n_light + n_heavy, max_keepalive_connections=n_light + n_heavy)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        tasks = [asyncio.ensure_future(client(c, "light", a, stop, log, s)) for s in range(n_light)]
        tasks += [asyncio.ensure_future(client(c, "heavy", a, stop, log, 1000 + s)) for s in range(n_heavy)]
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return log


def mean_of(before: dict, after: dict, name: str, labels: str = "", scale: float = 1.0) -> float | None:
    """Mean of a Prometheus histogram over one phase (the difference of its _sum and _count)."""
    k_sum, k_n = f"{name}_sum{labels}", f"{name}_count{labels}"
    n = after.get(k_n, 0) - before.get(k_n, 0)
    return round(scale * (after.get(k_sum, 0) - before.get(k_sum, 0)) / n, 2) if n else None


def server_side(before: dict, after: dict) -> dict:
    """Where the time went, as the server saw it (the driver shares the CPU and adds its own)."""
    p99 = histogram_quantile(before, after, "sidrec_request_latency_seconds", {"endpoint": "/v1/recommend"}, 99)
    return {"mean_batch": mean_of(before, after, "sidrec_batch_size", "{kind=recommend}"),
            "server_p99_ms_bucket": None if p99 is None else 1000 * p99,
            "server_latency_mean_ms": mean_of(before, after, "sidrec_request_latency_seconds",
                                              "{endpoint=/v1/recommend}", 1000),
            "queue_time_mean_ms": mean_of(before, after, "sidrec_queue_time_seconds", "", 1000),
            "engine_call_mean_ms": mean_of(before, after, "sidrec_engine_call_seconds", "{kind=recommend}", 1000)}


def summary(log: list, kind: str, ramp_s: float = 0.0) -> dict:
    """Counts and latency of one kind of client; p99_steady_ms leaves out requests sent in the
    first ramp_s seconds (64 clients connecting at once on a 2-core machine stall both sides)."""
    rows = [r for r in log if r[0] == kind]
    ok = [r[2] - r[1] for r in rows if r[3] == 200]
    t0 = min((r[1] for r in log), default=0.0)
    steady = [r[2] - r[1] for r in rows if r[3] == 200 and r[1] >= t0 + ramp_s]
    ms = lambda v, q: round(1000 * percentile(v, q), 1) if v else None  # noqa: E731
    return {"sent": len(rows), "ok": len(ok), "by_status": dict(Counter(f"{r[3]} {r[4] or ''}".strip() for r in rows)),
            "p50_ms": ms(ok, 50), "p99_ms": ms(ok, 99), "p99_steady_ms": ms(steady, 99)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", help="bundle directory (default: a random-weight bundle under runs/)")
    ap.add_argument("--items", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=8, help="max_batch_size of the server")
    ap.add_argument("--queue", type=int, default=8, help="max_queue_size of the server")
    ap.add_argument("--beam-width", type=int, default=100, help="light requests' beam")
    ap.add_argument("--heavy", type=int, default=2, help="clients sending the heaviest request")
    ap.add_argument("--base-s", type=float, default=15.0)
    ap.add_argument("--load-s", type=float, default=40.0)
    ap.add_argument("--impatient", action="store_true", help="re-send 0.1 s after a 429 instead of ~Retry-After")
    ap.add_argument("--client", choices=("raw", "httpx"), default="raw",
                    help="raw: keep-alive HTTP/1.1 over asyncio streams, the least driver CPU (default); httpx")
    ap.add_argument("--ramp-s", type=float, default=5.0, help="left out of p99_steady_ms at each phase's start")
    ap.add_argument("--out", default=str(ROOT / "runs" / "drill_overload.json"))
    a = ap.parse_args(argv)
    if not (1 <= a.batch <= 32 and 1 <= a.queue <= 32 and a.base_s + a.load_s <= 150):
        ap.error("keep --batch and --queue within 1..32 and --base-s + --load-s <= 150")
    bundle = Path(a.bundle) if a.bundle else build_bundle(ROOT / "runs" / "drill_bundle", a.items)
    out = Path(a.out)
    admits = a.batch + a.queue
    n_clients = 4 * admits
    env = {"SIDREC_MAX_BATCH_SIZE": str(a.batch), "SIDREC_MAX_QUEUE_SIZE": str(a.queue),
           "SIDREC_REQUEST_TIMEOUT_S": "60"}
    names = ("sidrec_batch_size", "sidrec_rejected", "sidrec_queue", "sidrec_engine", "sidrec_requests_total",
             "sidrec_request_latency")
    with Server(bundle, out.with_suffix(".server.log"), env) as srv:
        lat = ("sidrec_request_latency",)
        m0 = metric_values(srv.url, names, lat)
        base = asyncio.run(phase(srv.url, a, a.batch, 0, a.base_s))
        m1 = metric_values(srv.url, names, lat)
        load = asyncio.run(phase(srv.url, a, n_clients - a.heavy, a.heavy, a.load_s))
        m2 = metric_values(srv.url, names, lat)
        alive = srv.alive() and httpx.get(srv.url + "/healthz", timeout=5).status_code == 200
        rss = dict(srv.peak_rss_mb)
    b, light, heavy = summary(base, "light", a.ramp_s), summary(load, "light", a.ramp_s), summary(load, "heavy")
    refused = [r for r in load if r[3] == 429]
    ratio = round(light["p99_ms"] / b["p99_ms"], 2) if light["p99_ms"] and b["p99_ms"] else None
    sb, sl = server_side(m0, m1)["server_p99_ms_bucket"], server_side(m1, m2)["server_p99_ms_bucket"]
    server_ratio = round(sl / sb, 2) if sb and sl else None
    steady = (round(light["p99_steady_ms"] / b["p99_steady_ms"], 2)
              if light["p99_steady_ms"] and b["p99_steady_ms"] else None)
    report = {
        "drill": "overload", "max_batch_size": a.batch, "max_queue_size": a.queue, "admits": admits,
        "clients": n_clients, "heavy_clients": a.heavy, "impatient": a.impatient, "client": a.client,
        "heaviest_request": {"users": MAX_USERS, "beam_width": MAX_BEAM, "top_n": MAX_TOP_N, "history": MAX_HISTORY},
        "baseline": {**b, **server_side(m0, m1)},
        "overload_light": {**light, **server_side(m1, m2)},
        "overload_heavy": heavy,
        "n_429": len(refused), "n_429_with_retry_after": sum(r[5] is not None for r in refused),
        "retry_after_s": sorted(Counter(r[5] for r in refused).items())[:10],
        "n_5xx": sum(r[3] >= 500 or r[3] == 0 for r in base + load),
        "p99_ratio_vs_unloaded": ratio, "p99_ratio_steady": steady,
        "p99_target_met": ratio is not None and ratio <= 2.0,
        "p99_target_met_steady": steady is not None and steady <= 2.0,
        "server_p99_bucket_ratio": server_ratio,
        "peak_rss_mb": rss, "server_alive": alive,
        "driver_cpu_s": round(sum(os.times()[:2]), 1), "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    write_json(out, {**report, "metrics": {"start": m0, "after_baseline": m1, "after_overload": m2},
                     "requests": base + load})
    print(f"{'phase':16s} {'sent':>6s} {'ok':>6s} {'p50 ms':>8s} {'p99 ms':>8s} {'batch':>6s}  statuses")
    for name, s, mb in (("baseline", b, report["baseline"]["mean_batch"]),
                        ("overload light", light, report["overload_light"]["mean_batch"]),
                        ("overload heavy", heavy, None)):
        print(f"{name:16s} {s['sent']:6d} {s['ok']:6d} {s['p50_ms']!s:>8s} {s['p99_ms']!s:>8s} {mb!s:>6s}  "
              f"{s['by_status']}")
    print(f"429: {report['n_429']} ({report['n_429_with_retry_after']} with Retry-After); 5xx: {report['n_5xx']}; "
          f"p99 ratio {ratio} (steady {steady}, server-side buckets {server_ratio}); peak RSS {rss}; alive {alive}; wrote {out}")
    print(json.dumps(report))
    return 0 if alive and report["n_5xx"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
