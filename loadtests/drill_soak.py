"""Drill: a long soak of mixed traffic with catalogue writes; nothing may fail, nothing may leak.

Starts the real service (`python -m sidrec serve`, engine in its own process, in-process
catalogue) on a text bundle (tests/catalogue_fixtures.py: 8 topics, SIDs from hashed text
embeddings, so items added from text get SIDs), then runs for `--minutes`:
- `--clients` closed-loop clients: /v1/recommend (a fifth with a `filter`, a fifth with
  `exclude_items`), /v1/recommend/batch of 4 users, /v1/score;
- one writer: every `--write-every-s`, adds a few items from text, updates some attributes,
  deletes and restores others (admin token).
Every `--sample-s` it records the server's and the engine's RSS, open file descriptors and
threads. Targets: zero failed requests (a 5xx, a connection error, or a 4xx to a well-formed
request), RSS growth after the warm-up of at most 10%, no growth in file descriptors (the mean of the
last minute against the minute after the warm-up: both move with the connections in flight).
Writes the samples and counts to --out and prints one JSON line last.

    .venv/bin/python loadtests/drill_soak.py                 # 10 minutes
    .venv/bin/python loadtests/drill_soak.py --minutes 2     # a shorter look
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

from drill_common import ROOT, Server, percentile, write_json

import httpx
import psutil

sys.path.insert(0, str(ROOT / "tests"))
from catalogue_fixtures import TOPICS, text_bundle  # noqa: E402

TOKEN = "drill-soak-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PER_TOPIC = 64


def rec_body(rng: random.Random, deleted: set[str]) -> dict:
    t = rng.randrange(len(TOPICS))
    body = {"history": [f"t{t}-{rng.randrange(PER_TOPIC)}" for _ in range(rng.randint(1, 10))], "top_n": 10,
            "beam_width": rng.choice([32, 64, 100])}
    roll = rng.random()
    if roll < 0.2:
        body["filter"] = {"brand": [f"b{rng.randrange(4)}"]}
    elif roll < 0.4:
        body["exclude_items"] = [f"t{rng.randrange(8)}-{rng.randrange(PER_TOPIC)}" for _ in range(20)]
    return body


async def client(c: httpx.AsyncClient, k: int, stop: asyncio.Event, log: dict, deleted: set[str]) -> None:
    rng = random.Random(k)
    while not stop.is_set():
        kind = rng.choices(["recommend", "batch", "score"], [6, 2, 2])[0]
        if kind == "recommend":
            call = c.post("/v1/recommend", json=rec_body(rng, deleted))
        elif kind == "batch":
            call = c.post("/v1/recommend/batch", json={"requests": [rec_body(rng, deleted) for _ in range(4)]})
        else:
            t = rng.randrange(len(TOPICS))
            call = c.post("/v1/score", json={"history": [f"t{t}-{i}" for i in range(3)],
                                             "candidates": [f"t{rng.randrange(8)}-{i}" for i in range(20)]})
        t0 = time.monotonic()
        try:
            r = await call
            status = r.status_code
        except httpx.HTTPError as e:
            status = type(e).__name__
        log["requests"].append((t0, 1e3 * (time.monotonic() - t0), kind, status))


async def writer(c: httpx.AsyncClient, every_s: float, stop: asyncio.Event, log: dict, deleted: set[str]) -> None:
    rng, n = random.Random(99), 0
    while not stop.is_set():
        t = rng.randrange(len(TOPICS))
        items = [{"item_id": f"soak-{n + i}", "text": f"{TOPICS[t]} soak{n + i} batch{n}",
                  "attributes": {"brand": [f"b{rng.randrange(4)}"]}} for i in range(3)]
        items.append({"item_id": f"t{t}-{rng.randrange(PER_TOPIC)}", "attributes": {"brand": [f"b{rng.randrange(4)}"]}})
        n += 3
        victim = f"t{rng.randrange(8)}-{rng.randrange(PER_TOPIC)}"
        calls = [("add", c.post("/v1/items", headers=AUTH, json={"items": items})),
                 ("delete", c.delete(f"/v1/items/{victim}", headers=AUTH))]
        if deleted and rng.random() < 0.5:
            back = rng.choice(sorted(deleted))
            calls.append(("restore", c.post("/v1/items/restore", headers=AUTH, json={"item_ids": [back]})))
            deleted.discard(back)
        deleted.add(victim)
        for kind, call in calls:
            t0 = time.monotonic()
            try:
                status = (await call).status_code
            except httpx.HTTPError as e:
                status = type(e).__name__
            log["writes"].append((t0, 1e3 * (time.monotonic() - t0), kind, status))
        await asyncio.sleep(every_s)


def process_stats(srv: Server) -> dict:
    out = {}
    for name, pid in (("server", srv.pid), ("engine", srv.engine_pid())):
        try:
            p = psutil.Process(pid)
            out[name] = {"rss_mb": round(p.memory_info().rss / 2**20, 1), "fds": p.num_fds(),
                         "threads": p.num_threads()}
        except (psutil.Error, TypeError):
            out[name] = None
    return out


async def drill(a: argparse.Namespace, srv: Server) -> dict:
    log: dict = {"requests": [], "writes": [], "samples": []}
    stop, deleted = asyncio.Event(), set()
    t_start = time.monotonic()
    async with httpx.AsyncClient(base_url=srv.url, timeout=60,
                                 limits=httpx.Limits(max_connections=a.clients + 2)) as c:
        tasks = [asyncio.create_task(client(c, k, stop, log, deleted)) for k in range(a.clients)]
        tasks.append(asyncio.create_task(writer(c, a.write_every_s, stop, log, deleted)))
        end = t_start + 60 * a.minutes
        while time.monotonic() < end:
            log["samples"].append({"t": round(time.monotonic() - t_start, 1), **process_stats(srv)})
            await asyncio.sleep(a.sample_s)
        stop.set()
        await asyncio.gather(*tasks)
    log["samples"].append({"t": round(time.monotonic() - t_start, 1), **process_stats(srv)})
    return log


def growth(samples: list[dict], warm_s: float, proc: str, key: str) -> dict:
    """The mean over the minute after the warm-up against the mean over the last minute (fds and
    RSS move with connections and batches in flight; a leak is a trend between the two)."""
    pts = [(s["t"], s[proc][key]) for s in samples if s.get(proc)]
    if not pts or pts[-1][0] < warm_s:
        return {"warm": None, "end": None, "max": None, "growth": None}
    last_t = pts[-1][0]
    first = [v for t, v in pts if warm_s <= t <= min(warm_s + 60, last_t)]
    tail = [v for t, v in pts if t >= max(warm_s, last_t - 60)]
    warm, end = sum(first) / len(first), sum(tail) / len(tail)
    return {"warm": round(warm, 1), "end": round(end, 1), "max": max(v for t, v in pts if t >= warm_s),
            "growth": round((end - warm) / warm, 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--warm-s", type=float, default=60.0, help="growth is measured from the end of this")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--write-every-s", type=float, default=0.5)
    ap.add_argument("--sample-s", type=float, default=5.0)
    ap.add_argument("--out", default=str(ROOT / "runs" / "drill_soak.json"))
    a = ap.parse_args(argv)
    if not 0.5 <= a.minutes <= 120 or not 1 <= a.clients <= 64:
        ap.error("--minutes must be within 0.5..120 and --clients within 1..64")
    warm_s = min(a.warm_s, 30 * a.minutes)
    bundle = text_bundle(ROOT / "runs" / "drill_soak_bundle", per_topic=PER_TOPIC, width=32)
    out = Path(a.out)
    env = {"SIDREC_ADMIN_TOKEN": TOKEN, "SIDREC_MAX_BEAM_WIDTH": "256"}
    with Server(bundle, out.with_suffix(".server.log"), env=env) as srv:
        log = asyncio.run(drill(a, srv))
        alive = srv.alive()
    reqs, writes = log["requests"], log["writes"]
    failed = [r for r in reqs if r[3] != 200]
    failed_writes = [w for w in writes if not (isinstance(w[3], int) and (w[3] == 200 or w[3] == 409))]
    after = [r[1] for r in reqs if r[3] == 200 and r[0] - reqs[0][0] >= warm_s] if reqs else []
    rss = {p: growth(log["samples"], warm_s, p, "rss_mb") for p in ("server", "engine")}
    fds = {p: growth(log["samples"], warm_s, p, "fds") for p in ("server", "engine")}
    report = {
        "drill": "soak", "minutes": a.minutes, "clients": a.clients, "requests": len(reqs), "failed": len(failed),
        "failed_by_status": {str(k): sum(1 for r in failed if r[3] == k) for k in {r[3] for r in failed}},
        "writes": len(writes), "writes_failed": len(failed_writes),
        "writes_409_sid_space_full": sum(1 for w in writes if w[3] == 409),
        "p50_ms": percentile(after, 50), "p99_ms": percentile(after, 99),
        "rss_mb": rss, "fds": fds,
        "rss_growth_ok": all(v["growth"] is not None and v["growth"] <= 0.10 for v in rss.values()),
        # no trend: the last minute's mean within 2 descriptors of the first minute's after warm-up
        "fds_growth_ok": all(v["end"] is not None and v["end"] <= v["warm"] + 2 for v in fds.values()),
        "server_alive": alive,
    }
    write_json(out, {**report, "samples": log["samples"]})
    print(f"{'t s':>6s} {'server MB':>10s} {'engine MB':>10s} {'server fds':>11s} {'engine fds':>11s}")
    for s in log["samples"][:: max(1, len(log["samples"]) // 20)]:
        sv, en = s.get("server") or {}, s.get("engine") or {}
        print(f"{s['t']:6.0f} {sv.get('rss_mb')!s:>10s} {en.get('rss_mb')!s:>10s} {sv.get('fds')!s:>11s} "
              f"{en.get('fds')!s:>11s}")
    print(f"requests {len(reqs)}, failed {len(failed)}, writes {len(writes)} (failed {len(failed_writes)}); wrote {out}")
    print(json.dumps(report))
    ok = not failed and not failed_writes and report["rss_growth_ok"] and report["fds_growth_ok"] and alive
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
