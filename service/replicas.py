"""Which model version each replica serves, recorded in Redis, so a deployment's versions are known.

Each replica of a deployment that uses Redis announces itself under `{ns}:replica:{id}`: a JSON
value (`version`, `host`, `pid`, `started_at`, `seen_at`) written with a time-to-live and renewed
well inside it while the replica runs. A replica that dies or is partitioned simply expires, so the
registry never needs cleaning. It answers two questions:
- which versions are in use (`serving_versions`): `sidrec index drop` refuses a version some live
  replica still serves unless `--force` (index_store.drop_version);
- whether a roll-out has finished (`sidrec index replicas` lists replica -> version).
It is a record, not a lock: the deployment's pinned version decides what a replica loads.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from typing import Any, Callable

log = logging.getLogger("sidrec.service")

TTL_S = 15  # a replica silent this long is gone; renewed every TTL_S / 3


def replica_id() -> str:
    """SIDREC_REPLICA_ID, else the pod's host name (Kubernetes sets it) and the process id."""
    return os.environ.get("SIDREC_REPLICA_ID") or f"{socket.gethostname()}-{os.getpid()}"


def replica_key(namespace: str, rid: str) -> str:
    return f"{namespace}:replica:{rid}"


def _record(version: str, started_at: float, extra: dict[str, Any] | None = None) -> str:
    return json.dumps({"version": version, "host": socket.gethostname(), "pid": os.getpid(),
                       "started_at": round(started_at, 3), "seen_at": round(time.time(), 3), **(extra or {})})


async def announce_forever(client, namespace: str, version_of: Callable[[], str],
                           extra_of: Callable[[], dict[str, Any]] | None = None, ttl_s: int = TTL_S,
                           rid: str | None = None) -> None:
    """Renew this replica's record every ttl_s / 3 until cancelled (then delete it). `client` is an
    async redis client; a failed write is logged and retried on the next beat, never raised."""
    rid, started, key = rid or replica_id(), time.time(), replica_key(namespace, rid or replica_id())
    try:
        while True:
            try:
                await client.set(key, _record(version_of(), started, extra_of() if extra_of else None), ex=ttl_s)
            except Exception as e:  # Redis away: the record expires, reads go on
                log.warning("replica registry: cannot renew %s (%s)", key, type(e).__name__)
            await asyncio.sleep(ttl_s / 3)
    finally:
        try:
            await asyncio.wait_for(client.delete(key), timeout=1.0)
        except Exception:
            pass  # it expires by itself


def list_replicas(client, namespace: str) -> dict[str, dict[str, Any]]:
    """replica id -> its record, for every live replica (sync client; SCAN, never KEYS)."""
    prefix = replica_key(namespace, "")
    keys = [k.decode() if isinstance(k, bytes) else k for k in client.scan_iter(match=prefix + "*", count=500)]
    out = {}
    for key, raw in zip(keys, client.mget(keys) if keys else []):
        if raw is None:
            continue  # expired between SCAN and MGET
        try:
            out[key[len(prefix):]] = json.loads(raw)
        except (TypeError, ValueError):
            out[key[len(prefix):]] = {"version": None, "error": "unreadable record"}
    return out


def serving_versions(client, namespace: str) -> dict[str, list[str]]:
    """version -> the live replicas serving it."""
    versions: dict[str, list[str]] = {}
    for rid, rec in sorted(list_replicas(client, namespace).items()):
        if rec.get("version"):
            versions.setdefault(str(rec["version"]), []).append(rid)
    return versions
