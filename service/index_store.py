"""Loading, listing, switching and dropping inverse-index versions in Redis (sync redis-py).

Used by `python -m sidrec.service index ...` and by the service's optional autoload at startup.
Layout: see `service.index`. Guarantees:
- Idempotent: a version is identified by the bundle version plus a fingerprint of its SID map
  and item ids; loading a complete, identical version again writes nothing. A crashed load
  (meta `complete` != 1) is simply redone: same version, same buckets, same fields.
- Pipelined: buckets are written with HSET in pipelines of `chunk` commands per round trip.
- Atomic switch: `{ns}:current` changes in one MULTI/EXEC guarded by WATCH on the target's meta,
  and only to a version whose load completed; readers pinned to a version never see a mix.
This module does not serve lookups (see `service.index.RedisInverseIndex`).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from sidrec.service.index import SidCodec, keys


class IndexStoreError(RuntimeError):
    """A load, switch or drop that cannot be done as asked (message says why and what to do)."""


@dataclass
class LoadReport:
    version: str
    namespace: str
    num_items: int
    num_buckets: int
    span: int
    skipped: bool  # True: the identical version was already loaded
    activated: bool
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def read_bundle_index(path: str | Path) -> tuple[str, torch.Tensor, list[str], tuple[int, ...]]:
    """(version, sid_map (L, N), item_ids, cardinalities) from a bundle, without loading the model."""
    from safetensors.torch import load_file

    from sidrec.model.bundle import BundleError, read_config

    path = Path(path)
    config = read_config(path)
    files = config.get("files", {})
    for name in ("sid_map.safetensors", "item_ids.json"):
        digest = files.get(name)
        if digest and hashlib.sha256((path / name).read_bytes()).hexdigest() != digest:
            raise BundleError(f"bundle file {path / name} is corrupted (sha256 differs from config.json)")
    sid_map = load_file(str(path / "sid_map.safetensors"))["sid_map"].to(torch.int64)
    item_ids = [str(x) for x in json.loads((path / "item_ids.json").read_text())]
    cards = tuple(int(c) for c in config["model"]["layout"]["cardinalities"])
    if sid_map.shape != (len(cards), len(item_ids)):
        raise BundleError(f"{path / 'sid_map.safetensors'} has shape {tuple(sid_map.shape)}, "
                          f"expected [{len(cards)}, {len(item_ids)}]")
    return str(config.get("version", "unknown")), sid_map, item_ids, cards


def fingerprint(sid_map: torch.Tensor, item_ids: Sequence[str]) -> str:
    h = hashlib.sha256(sid_map.to(torch.int64).contiguous().numpy().tobytes())
    h.update(json.dumps(list(item_ids)).encode())
    return h.hexdigest()[:32]


def _listpack_limit(client) -> int:
    try:
        cfg = client.config_get("hash-max-listpack-entries") or client.config_get("hash-max-ziplist-entries")
        return max(1, int(next(iter(cfg.values()))))
    except Exception:  # CONFIG may be disabled on managed Redis
        return 128


def load_version(client, namespace: str, version: str, sid_map: torch.Tensor, item_ids: Sequence[str],
                 cardinalities: Sequence[int], activate: bool = True, activate_if_none: bool = False,
                 force: bool = False, chunk: int = 2000, max_per_bucket: int | None = None) -> LoadReport:
    """Write one version's buckets; optionally switch `current` to it. See the module docstring.

    max_per_bucket: entries per bucket hash, always capped by the server's hash-max-listpack-entries
    so every bucket stays a compact listpack. Measured (benchmarks/redis_memory.py, 12k and 1M
    items): 512 per bucket costs ~20 B/item and 128 ~26-30 B/item; a top-10 lookup takes ~0.2 ms
    either way, a 256-SID lookup at 1M items ~4.4 vs ~2.5 ms (listpack lookups scan). The default
    is the server's own limit; pass 128 when responses carry hundreds of items.
    """
    t0 = time.perf_counter()
    k = keys(namespace, version)
    fp = fingerprint(sid_map, item_ids)
    meta = {m: v for m, v in _decode(client.hgetall(k["meta"])).items()}
    if meta and meta.get("fingerprint") != fp:
        if not force:
            raise IndexStoreError(f"namespace '{namespace}' already holds version {version} with different "
                                  "content; drop it first (`index drop`) or pass --force")
        drop_version(client, namespace, version, force=True)
        meta = {}
    codec = SidCodec(cardinalities)
    packed = codec.pack_tensor(sid_map.t().cpu())  # (N,)
    if len(set(packed.tolist())) != len(item_ids):
        raise IndexStoreError(f"version {version}: two items share a SID; the inverse index needs unique SIDs")
    skipped = meta.get("complete") == "1"
    span = int(meta["span"]) if skipped else SidCodec.choose_span(packed, codec.space,
                                                                     min(max_per_bucket or 1 << 30, _listpack_limit(client)))
    codec = SidCodec(cardinalities, span)
    buckets: dict[int, dict[str, str]] = {}
    for p, iid in zip(packed.tolist(), item_ids):
        b, f = codec.split(p)
        buckets.setdefault(b, {})[f] = iid
    if not skipped:
        client.hset(k["meta"], mapping={
            "version": version, "num_items": len(item_ids), "cardinalities": json.dumps(list(cardinalities)),
            "span": span, "fingerprint": fp, "num_buckets": len(buckets), "complete": "0"})
        pipe = client.pipeline(transaction=False)
        for n, (b, mapping) in enumerate(buckets.items(), 1):
            pipe.hset(k["bucket_prefix"] + str(b), mapping=mapping)
            if n % chunk == 0:
                pipe.execute()
        pipe.execute()
        client.hset(k["meta"], mapping={"complete": "1", "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    client.sadd(k["versions"], version)
    activated = False
    if activate:
        activate_version(client, namespace, version)
        activated = True
    elif activate_if_none:
        activated = bool(client.set(k["current"], version, nx=True))
    return LoadReport(version, namespace, len(item_ids), len(buckets), span, skipped, activated,
                      round(time.perf_counter() - t0, 3))


def activate_version(client, namespace: str, version: str) -> str | None:
    """Atomically point `{ns}:current` at a completely loaded version; returns the previous one."""
    import redis

    k = keys(namespace, version)
    with client.pipeline(transaction=True) as pipe:
        for _ in range(20):
            try:
                pipe.watch(k["meta"], k["current"])
                if _decode(pipe.hget(k["meta"], "complete")) != "1":
                    raise IndexStoreError(f"version {version} is not completely loaded in namespace "
                                          f"'{namespace}'; load it first (`index load <bundle>`)")
                previous = _decode(pipe.get(k["current"]))
                pipe.multi()
                pipe.set(k["current"], version)
                if previous and previous != version:
                    pipe.set(k["previous"], previous)
                pipe.execute()
                return previous
            except redis.WatchError:
                continue
    raise IndexStoreError("could not switch the current version: it kept changing concurrently")


def list_versions(client, namespace: str) -> list[dict]:
    k = keys(namespace)
    current = _decode(client.get(k["current"]))
    out = []
    for v in sorted(_decode(x) for x in client.smembers(k["versions"])):
        meta = _decode(client.hgetall(keys(namespace, v)["meta"]))
        out.append({"version": v, "current": v == current, "complete": meta.get("complete") == "1",
                    "num_items": int(meta.get("num_items", 0)), "num_buckets": int(meta.get("num_buckets", 0)),
                    "loaded_at": meta.get("loaded_at")})
    return out


def drop_version(client, namespace: str, version: str, force: bool = False, batch: int = 1000) -> int:
    """Delete one version's keys (UNLINK, in batches). Refuses, unless force, the current version
    and any version a live replica still serves (service.replicas)."""
    from sidrec.service.replicas import serving_versions

    k = keys(namespace, version)
    if _decode(client.get(k["current"])) == version and not force:
        raise IndexStoreError(f"version {version} is the current one in namespace '{namespace}'; "
                              "activate another first or pass --force")
    users = serving_versions(client, namespace).get(version)
    if users and not force:
        raise IndexStoreError(f"version {version} is still served by {len(users)} replica(s): "
                              f"{', '.join(users[:5])}{' ...' if len(users) > 5 else ''}; roll them to another "
                              "version first (sidrec index replicas lists them) or pass --force")
    n = _unlink_matching(client, k["pattern"], batch)
    client.srem(k["versions"], version)
    for pointer in ("current", "previous"):
        if _decode(client.get(k[pointer])) == version:
            client.delete(k[pointer])
    return n


def drop_namespace(client, namespace: str, batch: int = 1000) -> int:
    """Delete every key under `{namespace}:` (tests and benchmarks clean up with this)."""
    return _unlink_matching(client, f"{namespace}:*", batch)


def _unlink_matching(client, pattern: str, batch: int) -> int:
    """UNLINK every key matching `pattern`, `batch` keys per call (SCAN, never KEYS)."""
    n, pending = 0, []
    for key in client.scan_iter(match=pattern, count=batch):
        pending.append(key)
        if len(pending) >= batch:
            n += client.unlink(*pending)
            pending = []
    if pending:
        n += client.unlink(*pending)
    return n


def _decode(x):
    if isinstance(x, bytes):
        return x.decode()
    if isinstance(x, dict):
        return {_decode(a): _decode(b) for a, b in x.items()}
    return x
