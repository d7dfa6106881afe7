"""Redis inverse-index memory per item, load time and lookup latency, at 12,101 and 1M items.

    .venv/bin/python benchmarks/redis_memory.py [--redis-url redis://127.0.0.1:6379/15] [--sizes 12101,1000000]

For each catalogue size it loads a synthetic catalogue (RQ-like SIDs over 256x256x256 + dedup
digit, ASIN-like 10-character item ids) with `service.index_store.load_version` into a fresh
namespace, then reports bytes per item two ways: the sum of MEMORY USAGE over the namespace's
keys (exact for our keys) and the used_memory delta from INFO (includes allocator slack, noisy
on a shared server). At the Beauty size it also loads the naive layout (one string key per item)
for comparison. It times one lookup (one round trip) of 10 random SIDs (a top-10 response) and of
256 (a whole beam-256 frontier, the worst case: random SIDs touch the most buckets) through
`RedisInverseIndex`. Every namespace it writes is deleted before it exits.
Prints a table, then one JSON line last.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import string
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
import torch  # noqa: E402

from sidrec.service.index import RedisInverseIndex  # noqa: E402
from sidrec.service.index_store import drop_namespace, load_version  # noqa: E402

CARDS = (256, 256, 256, 8)


def catalogue(n: int, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the Dirichlet below draws from the global generator
    # first level skewed like RQ-KMeans codes (popular clusters), deeper levels spread
    probs = torch.distributions.Dirichlet(torch.full((256,), 0.5)).sample()
    c0 = torch.multinomial(probs, n * 2, replacement=True, generator=g)
    codes = torch.stack([c0, torch.randint(0, 256, (n * 2,), generator=g), torch.randint(0, 256, (n * 2,), generator=g)], 1)
    codes = codes[:n]
    # dedup digit: 0 for the first item of a tuple, 1.. for collisions (as TIGER/GRID)
    _, inverse = torch.unique(codes, dim=0, return_inverse=True)
    dedup = torch.zeros(n, dtype=torch.int64)
    seen: dict[int, int] = {}
    for i, k in enumerate(inverse.tolist()):
        dedup[i] = seen.get(k, 0)
        seen[k] = int(dedup[i]) + 1
    keep = dedup < CARDS[3]
    sid_map = torch.cat([codes[keep], dedup[keep, None]], 1).t().contiguous()
    rnd = random.Random(seed)
    alphabet = string.ascii_uppercase + string.digits
    ids = list(dict.fromkeys("B0" + "".join(rnd.choices(alphabet, k=8)) for _ in range(int(keep.sum()) + 100)))
    return sid_map, ids[: sid_map.shape[1]]


def namespace_bytes(client: redis.Redis, ns: str) -> tuple[int, int]:
    total = n = 0
    pipe = client.pipeline(transaction=False)
    batch = []
    for key in client.scan_iter(match=f"{ns}:*", count=2000):
        batch.append(key)
        pipe.memory_usage(key, samples=0)
        if len(batch) >= 2000:
            total += sum(v or 0 for v in pipe.execute())
            n += len(batch)
            batch = []
    if batch:
        total += sum(v or 0 for v in pipe.execute())
        n += len(batch)
    return total, n


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


async def lookup_latency(url: str, ns: str, version: str, sids: list[list[int]], k: int, reps: int = 50) -> float:
    idx = await RedisInverseIndex.open(url, ns, version)
    try:
        await idx.attach()
        rnd = random.Random(1)
        lat = []
        for _ in range(reps):
            q = rnd.sample(sids, min(k, len(sids)))
            t0 = time.perf_counter()
            await idx.lookup(q)
            lat.append(time.perf_counter() - t0)
        return statistics.median(lat) * 1000
    finally:
        await idx.close()


def measure(client: redis.Redis, url: str, n: int, max_per_bucket: int) -> dict:
    sid_map, ids = catalogue(n)
    n = len(ids)
    ns = f"sidrec-bench-{uuid.uuid4().hex[:8]}"
    try:
        before = used_memory(client)
        rep = load_version(client, ns, "v1", sid_map, ids, CARDS, activate=True, max_per_bucket=max_per_bucket)
        after = used_memory(client)
        keys_bytes, n_keys = namespace_bytes(client, ns)
        all_sids = sid_map.t().tolist()
        lookup10 = asyncio.run(lookup_latency(url, ns, "v1", all_sids, 10))
        lookup256 = asyncio.run(lookup_latency(url, ns, "v1", all_sids, 256))
        row = {"items": n, "max_per_bucket": max_per_bucket, "buckets": rep.num_buckets, "span": rep.span, "keys": n_keys,
               "load_s": rep.seconds, "bytes_per_item_memory_usage": round(keys_bytes / n, 2),
               "bytes_per_item_used_memory": round((after - before) / n, 2),
               "lookup10_p50_ms": round(lookup10, 3), "lookup256_p50_ms": round(lookup256, 3)}
        if n <= 50_000:  # naive layout, for comparison: one string key per item
            naive = f"{ns}-naive"
            b0 = used_memory(client)
            pipe = client.pipeline(transaction=False)
            for sid, iid in zip(sid_map.t().tolist(), ids):
                pipe.set(f"{naive}:sid:{'-'.join(map(str, sid))}", iid)
            pipe.execute()
            row["naive_bytes_per_item_used_memory"] = round((used_memory(client) - b0) / n, 2)
            row["naive_bytes_per_item_memory_usage"] = round(namespace_bytes(client, naive)[0] / n, 2)
            drop_namespace(client, naive)
        return row
    finally:
        drop_namespace(client, ns)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    ap.add_argument("--sizes", default="12101,1000000")
    ap.add_argument("--max-per-bucket", default="512,128", help="bucket capacities to compare (capped by the server)")
    a = ap.parse_args()
    client = redis.Redis.from_url(a.redis_url, socket_timeout=120)
    client.ping()
    cfg = client.config_get("hash-max-listpack-entries")
    rows = []
    for n, m in ((int(x), int(y)) for x in a.sizes.split(",") for y in a.max_per_bucket.split(",")):
        r = measure(client, a.redis_url, n, m)
        rows.append(r)
        print(f"{r['items']:>9,} items  <={m:3d}/bucket {r['buckets']:>6} buckets (span {r['span']})  "
              f"{r['bytes_per_item_memory_usage']:6.1f} B/item (MEMORY USAGE)  "
              f"{r['bytes_per_item_used_memory']:6.1f} B/item (INFO delta)  load {r['load_s']:.2f} s  "
              f"lookup of 10 / 256 SIDs {r['lookup10_p50_ms']:.2f} / {r['lookup256_p50_ms']:.2f} ms"
              + (f"  | naive {r['naive_bytes_per_item_memory_usage']:.1f} B/item" if "naive_bytes_per_item_memory_usage" in r else ""),
              flush=True)
    print(json.dumps({"bench": "redis_memory", "redis_version": client.info("server")["redis_version"],
                      "hash_max_listpack_entries": int(next(iter(cfg.values()))) if cfg else None,
                      "results": rows}))


if __name__ == "__main__":
    main()
