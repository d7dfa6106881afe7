"""Catalogue drill: two replicas (service processes on loopback ports) against one Redis, 16
clients of mixed recommend traffic, while another client adds 1,000 items and deletes 1,000.

    .venv/bin/python loadtests/catalogue_drill.py [--clients 16] [--quiet-s 15] [--items 1000]

Phases, in one run: (1) quiet: mixed traffic alone; (2) writes: the same traffic while the writer
adds `--items` items (batches of 50, alternating replicas) and deletes as many (base items and
some of the new ones); (3) filter: beam 256 with and without a `filter`, one client, same replica.
Every response is checked against the deletions acknowledged before the request was sent
(`deleted_seen_after_ack` must be 0); `added_visible` is the time from an add's acknowledgement
until the *other* replica reports a catalogue version that includes it. The bundle is synthetic
(text topics embedded with `hashed:64`, tests/catalogue_fixtures.py) in db 15 under a fresh
namespace, dropped at the end; the servers are stopped by pid. Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
TOKEN = "drill-token"
REDIS_URL = os.environ.get("SIDREC_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")

_LAUNCH = """
import sys, uvicorn
sys.path[:0] = [{root!r}, {tests!r}]
from sidrec.service.app import create_app
uvicorn.run(create_app(), host="127.0.0.1", port={port}, log_level="warning")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 1)


async def wait_ready(client, url: str, proc, timeout_s: float = 120.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"replica at {url} exited with code {proc.returncode}")
        try:
            if (await client.get(url + "/readyz")).status_code == 200:
                return
        except Exception:
            pass
        await asyncio.sleep(0.5)
    raise RuntimeError(f"replica at {url} not ready within {timeout_s:g} s")


class Drill:
    def __init__(self, urls: list[str], base_ids: list[str], topics: int, per_topic: int) -> None:
        self.urls = urls
        self.base_ids = base_ids
        self.topics, self.per_topic = topics, per_topic
        self.deleted_at: dict[str, float] = {}  # id -> ack time
        self.lat: dict[str, list[float]] = {"quiet": [], "writes": []}
        self.requests = self.errors = self.deleted_seen = 0
        self.visible_ms: list[float] = []
        self.write_errors = self.conflicts = self.added = 0
        self.phase = "quiet"
        self.stop = False

    def body(self, rng: random.Random) -> dict:
        t = rng.randrange(self.topics)
        hist = [f"t{t}-{rng.randrange(self.per_topic)}" for _ in range(rng.randint(1, 8))]
        beam = rng.choice([32, 100, 100, 256])
        b = {"history": hist, "top_n": 10, "beam_width": beam}
        if rng.random() < 0.2:
            b["filter"] = {"topic": [str(rng.randrange(self.topics))]}
        return b

    async def client_loop(self, client, k: int) -> None:
        rng = random.Random(k)
        url = self.urls[k % len(self.urls)]
        while not self.stop:
            sent = time.monotonic()
            phase = self.phase
            try:
                r = await client.post(url + "/v1/recommend", json=self.body(rng))
            except Exception:
                self.errors += 1
                continue
            dt = 1e3 * (time.monotonic() - sent)
            self.requests += 1
            if r.status_code != 200:
                self.errors += 1
                continue
            self.lat[phase].append(dt)
            for it in r.json()["items"]:
                ack = self.deleted_at.get(it["item_id"])
                if ack is not None and ack < sent:
                    self.deleted_seen += 1

    async def wait_version(self, client, url: str, version: int, t_ack: float) -> None:
        while time.monotonic() - t_ack < 10.0:
            info = (await client.get(url + "/v1/model")).json()
            if info["catalogue_version"] >= version:
                self.visible_ms.append(1e3 * (time.monotonic() - t_ack))
                return
            await asyncio.sleep(0.005)

    async def writer(self, client, n_items: int, batch: int = 50) -> None:
        rng = random.Random(7)
        words = [f"w{i}" for i in range(400)]
        from catalogue_fixtures import TOPICS

        hdr = {"Authorization": f"Bearer {TOKEN}"}
        added: list[str] = []
        victims = rng.sample(self.base_ids, min(len(self.base_ids), n_items // 2))
        for b in range(0, n_items, batch):
            w, other = self.urls[(b // batch) % 2], self.urls[(b // batch + 1) % 2]
            items = []
            for j in range(b, min(n_items, b + batch)):
                t = rng.randrange(len(TOPICS))
                items.append({"item_id": f"new{j}", "text": f"{TOPICS[t]} {' '.join(rng.sample(words, 4))}",
                              "attributes": {"topic": [str(t)]}})
            r = await client.post(w + "/v1/items", headers=hdr, json={"items": items})
            while r.status_code == 409 and items:  # a full prefix: drop the item named, retry the rest
                self.conflicts += 1
                full = (r.json()["error"].get("details") or {}).get("item_id")
                items = [i for i in items if i["item_id"] != full]
                r = await client.post(w + "/v1/items", headers=hdr, json={"items": items})
            if r.status_code != 200:
                self.write_errors += 1
                continue
            t_ack = time.monotonic()
            added += [i["item_id"] for i in items]
            self.added += len(items)
            await self.wait_version(client, other, r.json()["catalogue_version"], t_ack)
            # deletions: half bundle items, half the items added so far (not yet deleted)
            live = [a for a in added if a not in self.deleted_at]
            dels = victims[: batch // 2] + rng.sample(live, min(len(live), batch - batch // 2))
            victims = victims[batch // 2:]
            r = await client.post(other + "/v1/items/delete", headers=hdr, json={"item_ids": dels})
            if r.status_code != 200:
                self.write_errors += 1
                continue
            t_ack = time.monotonic()
            for d in dels:
                self.deleted_at[d] = t_ack

    async def filter_cost(self, client, n: int = 30) -> dict:
        rng = random.Random(3)
        out = {}
        for name, filt in (("no_filter", None), ("filter", True)):
            lat = []
            for _ in range(n):
                b = self.body(rng)
                b.update(beam_width=256, top_n=10)
                b.pop("filter", None)
                if filt:
                    b["filter"] = {"topic": [str(rng.randrange(self.topics))]}
                t0 = time.monotonic()
                r = await client.post(self.urls[0] + "/v1/recommend", json=b)
                if r.status_code == 200:
                    lat.append(1e3 * (time.monotonic() - t0))
            out[name] = pct(lat, 0.5)
        return out


async def run(args) -> dict:
    import httpx
    import redis

    from catalogue_fixtures import TOPICS, text_bundle
    from sidrec.service.index_store import drop_namespace

    tmp = Path(tempfile.mkdtemp(prefix="sidrec-drill-"))
    bundle = text_bundle(tmp / "bundle", per_topic=args.per_topic, width=32)
    base_ids = json.loads((bundle / "item_ids.json").read_text())
    ns = f"sidrec-drill-{uuid.uuid4().hex[:8]}"
    procs, urls = [], []
    rclient = redis.Redis.from_url(REDIS_URL)
    try:
        for _ in range(2):
            port = free_port()
            env = dict(os.environ, SIDREC_BUNDLE_PATH=str(bundle), SIDREC_REDIS_URL=REDIS_URL,
                       SIDREC_REDIS_NAMESPACE=ns, SIDREC_ADMIN_TOKEN=TOKEN, SIDREC_NUM_THREADS="1",
                       SIDREC_ENGINE_PROCESS="true", SIDREC_MAX_BEAM_WIDTH="256",
                       SIDREC_CATALOGUE_BLOCK_S="1.0", SIDREC_LOG_LEVEL="warning")
            code = _LAUNCH.format(root=str(ROOT), tests=str(ROOT / "tests"), port=port)
            procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT))
            urls.append(f"http://127.0.0.1:{port}")
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=60.0, limits=limits) as client:
            for u, p in zip(urls, procs):
                await wait_ready(client, u, p)
            hdr = {"Authorization": f"Bearer {TOKEN}"}
            for b in range(0, len(base_ids), 1000):  # topic attributes on the bundle's items (for filters)
                chunk = base_ids[b:b + 1000]
                r = await client.post(urls[0] + "/v1/items", headers=hdr, json={"items": [
                    {"item_id": i, "attributes": {"topic": [i[1:].split("-")[0]]}} for i in chunk]})
                r.raise_for_status()
            d = Drill(urls, base_ids, len(TOPICS), args.per_topic)
            loops = [asyncio.create_task(d.client_loop(client, k)) for k in range(args.clients)]
            await asyncio.sleep(args.quiet_s)
            d.phase = "writes"
            t_w = time.monotonic()
            await d.writer(client, args.items)
            writes_s = time.monotonic() - t_w
            d.stop = True
            await asyncio.gather(*loops)
            fc = await d.filter_cost(client)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        drop_namespace(rclient, ns)
        rclient.close()
    return {"requests": d.requests, "errors": d.errors, "deleted_seen_after_ack": d.deleted_seen,
            "added_visible_p50_ms": pct(d.visible_ms, 0.5), "added_visible_p99_ms": pct(d.visible_ms, 0.99),
            "items_added": d.added, "items_deleted": len(d.deleted_at),
            "write_conflicts_409": d.conflicts, "write_errors": d.write_errors, "writes_s": round(writes_s, 1),
            "p50_ms_quiet": pct(d.lat["quiet"], 0.5), "p99_ms_quiet": pct(d.lat["quiet"], 0.99),
            "p50_ms_writes": pct(d.lat["writes"], 0.5), "p99_ms_writes": pct(d.lat["writes"], 0.99),
            "beam256_p50_ms_no_filter": fc["no_filter"], "beam256_p50_ms_filter": fc["filter"],
            "filter_cost_ratio": round(fc["filter"] / fc["no_filter"], 3) if fc["filter"] and fc["no_filter"] else None,
            "clients": args.clients}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--quiet-s", type=float, default=15.0, help="seconds of traffic without writes first")
    ap.add_argument("--items", type=int, default=1000, help="items added, and as many deleted")
    ap.add_argument("--per-topic", type=int, default=128, help="bundle items per text topic (8 topics)")
    args = ap.parse_args(argv)
    rep = asyncio.run(run(args))
    print(f"{'metric':<28} value")
    for k, v in rep.items():
        print(f"{k:<28} {v}")
    print(json.dumps(rep))
    return 0 if rep["deleted_seen_after_ack"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
