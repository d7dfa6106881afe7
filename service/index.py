"""The inverse index: SID -> external item id, in process (default) or in Redis.

`InverseIndex` is the interface the service uses: `lookup(sids)` maps every beam of a request in
ONE round trip. `InProcessIndex` is the embedded default (a dict built from the bundle).
`RedisInverseIndex` reads the layout written by `service.index_store`:

    {ns}:current                      string  -> the active version (switched atomically)
    {ns}:previous                     string  -> the version it replaced (for a rollback)
    {ns}:versions                     set of loaded versions
    {ns}:{version}:meta               hash: num_items, cardinalities, span, fingerprint, complete
    {ns}:{version}:sid:{bucket}       hash: field = SID offset inside the bucket, value = item id
    {ns}:masked                       set of masked item ids, shared by every worker
    {ns}:{version}:cat:*              the living catalogue's changes since the bundle (`service.catalogue_store`)

A SID (c_0, ..., c_{L-1}) is packed as the mixed-radix integer s = ((c_0 C_1 + c_1) C_2 + ...);
its bucket is s // span, i.e. a SID prefix. `span` is chosen per catalogue so each bucket holds
at most ~128 entries: Redis then keeps the hash as a compact listpack (a few bytes per entry)
instead of one top-level key per item (~60+ bytes of overhead each).
When Redis stops answering, `RedisInverseIndex` answers reads from its fallback (the bundle's own
map, given by the runtime) minus the items it last knew to be masked, and says so through the
`sidrec_index_degraded` gauge and `sidrec_index_fallback_lookups_total`; after a failure it
serves from the fallback for `retry_after_s` before one request tries Redis again, so recovery
after Redis returns takes about that long, and one request at a time, not all, waits on a dead server.
The lookup is the final gate of the living catalogue: a SID the catalogue gave to an added (or
moved) item maps to it through `cat:owner` before the bundle's bucket is read, a bundle SID its
item left maps to nothing, and an id in `cat:deleted` maps to nothing, whatever a replica's engine
still holds. `SidCodec` is the one owner of SID packing outside `kernels/` (the trie keeps its own
sort key, kernels being a leaf that imports nothing of ours).
This module does not load or drop versions (see `service.index_store`).
"""
from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from typing import Callable, Sequence

import torch

from sidrec.service.metrics import ServiceMetrics

log = logging.getLogger("sidrec.service")


class IndexUnavailable(RuntimeError):
    """The inverse index is unreachable or lacks the version being served."""


class SidCodec:
    """Packs SIDs into mixed-radix integers and splits them into (bucket, field)."""

    def __init__(self, cardinalities: Sequence[int], span: int = 1) -> None:
        self.cardinalities = tuple(int(c) for c in cardinalities)
        self.span = int(span)
        w, weights = 1, []
        for c in reversed(self.cardinalities):
            weights.append(w)
            w *= c
        self.weights = tuple(reversed(weights))  # weight of level l = prod(C_{l+1:})
        self.space = w

    def pack(self, sid: Sequence[int]) -> int:
        return sum(int(c) * w for c, w in zip(sid, self.weights))

    def pack_tensor(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (..., L) -> (...) int64 packed SIDs."""
        return (codes.to(torch.int64) * torch.tensor(self.weights, dtype=torch.int64)).sum(-1)

    def unpack(self, packed: int) -> tuple[int, ...]:
        out = []
        for w, c in zip(self.weights, self.cardinalities):
            out.append((int(packed) // w) % c)
        return tuple(out)

    def split(self, packed: int) -> tuple[int, str]:
        return packed // self.span, str(packed % self.span)

    @staticmethod
    def choose_span(packed: torch.Tensor, space: int, max_per_bucket: int = 128) -> int:
        """Largest power-of-two span whose fullest bucket holds <= max_per_bucket items."""
        span = 1
        while span * 2 <= max(space, 1):
            _, counts = torch.unique(packed // (span * 2), return_counts=True)
            if int(counts.max()) > max_per_bucket:
                break
            span *= 2
        return span


class InverseIndex(ABC):
    backend: str = "abstract"
    shares_masks: bool = False  # True when masks set through one worker reach every worker

    def __init__(self, version: str, metrics: ServiceMetrics | None = None) -> None:
        self.version = version
        self.metrics = metrics

    @abstractmethod
    async def _lookup(self, sids: Sequence[Sequence[int]]) -> list[str | None]: ...

    async def lookup(self, sids: Sequence[Sequence[int]]) -> list[str | None]:
        """Item id (None if unmapped) for each SID; one round trip for the whole list."""
        if not sids:
            return []
        t0 = time.perf_counter()
        out = await self._lookup(sids)
        if self.metrics is not None:
            self.metrics.index_latency.labels(self.backend).observe(time.perf_counter() - t0)
            misses = sum(x is None for x in out)
            if misses:
                self.metrics.index_misses.inc(misses)
        return out

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None

    async def masked_ids(self) -> set[str] | None:
        """The shared mask (None when masks are per process)."""
        return None

    async def set_masked(self, item_ids: Sequence[str], masked: bool) -> None:
        return None

    def describe(self) -> dict:
        return {"backend": self.backend, "version": self.version, "shared_masks": self.shares_masks}


class InProcessIndex(InverseIndex):
    """A dict from packed SID to item id, built from the bundle: the embedded default."""

    backend = "in_process"

    def __init__(self, version: str, sid_map: torch.Tensor, item_ids: Sequence[str], cardinalities: Sequence[int],
                 metrics: ServiceMetrics | None = None) -> None:
        super().__init__(version, metrics)
        self.codec = SidCodec(cardinalities)
        packed = self.codec.pack_tensor(sid_map.t().cpu()).tolist()  # (N,)
        self.base = dict(zip(packed, item_ids))  # packed bundle SID -> item id
        self.resolve: Callable[[int], str | None] = self.base.get  # the catalogue store replaces it

    async def _lookup(self, sids: Sequence[Sequence[int]]) -> list[str | None]:
        return [self.resolve(self.codec.pack(s)) for s in sids]


def keys(namespace: str, version: str | None = None) -> dict[str, str]:
    """Key names of the Redis layout (see the module docstring)."""
    k = {"current": f"{namespace}:current", "previous": f"{namespace}:previous", "versions": f"{namespace}:versions", "masked": f"{namespace}:masked"}
    if version is not None:
        k.update(meta=f"{namespace}:{version}:meta", bucket_prefix=f"{namespace}:{version}:sid:",
                 pattern=f"{namespace}:{version}:*", cat_prefix=f"{namespace}:{version}:cat:")
    return k


# KEYS[1] the catalogue's owner hash, KEYS[2] its deleted set, KEYS[i + 2] the bundle bucket of
# SID i; ARGV[2i - 1] its packed value, ARGV[2i] its field. nil: no live item holds the SID.
_LOOKUP_LUA = """
local out = {}
for i = 1, #KEYS - 2 do
  local id = redis.call('HGET', KEYS[1], ARGV[2 * i - 1])
  if id == false then id = redis.call('HGET', KEYS[i + 2], ARGV[2 * i]) end
  if id == '' or (id and redis.call('SISMEMBER', KEYS[2], id) == 1) then id = false end
  out[i] = id
end
return out
"""


class RedisInverseIndex(InverseIndex):
    """Reads one version's buckets with one Lua EVALSHA (HGET per SID): one round trip per request.

    On Redis Cluster the buckets of one version would need a hash tag ({ns}:{{version}}) to share a
    slot; this targets a single primary (with replicas), which holds even 1M items in ~20 MB.
    """

    backend = "redis"
    shares_masks = True
    # After a failed round trip, serve from the fallback this long before Redis is tried again:
    # bounds both the recovery time after Redis returns and how often a request pays the timeout.
    retry_after_s = 0.5

    def __init__(self, client, namespace: str, version: str, metrics: ServiceMetrics | None = None) -> None:
        super().__init__(version, metrics)
        self.client = client  # redis.asyncio.Redis
        self.namespace = namespace
        self.keys = keys(namespace, version)
        self.codec: SidCodec | None = None
        self._script = client.register_script(_LOOKUP_LUA)
        self.fallback: InverseIndex | None = None
        self._known_masked: set[str] = set()  # the shared mask as last read or written: the gate while degraded
        self._down_until: float | None = None  # None while Redis answers

    def set_fallback(self, fallback: InverseIndex) -> None:
        """Answer reads from `fallback` (an in-process map) while Redis is unreachable."""
        self.fallback = fallback

    @property
    def degraded(self) -> bool:
        return self._down_until is not None

    async def lookup(self, sids: Sequence[Sequence[int]]) -> list[str | None]:
        if self.fallback is None:
            return await super().lookup(sids)
        now = time.monotonic()
        if self._down_until is not None:
            if now < self._down_until:
                return await self._degraded_lookup(sids)
            self._down_until = now + self.retry_after_s  # this request probes Redis; the others keep the fallback
        try:
            out = await super().lookup(sids)
        except Exception as e:
            if self._down_until is None:
                log.warning("Redis inverse index unreachable (%s): answering reads from the in-process fallback",
                            type(e).__name__)
            self._down_until = time.monotonic() + self.retry_after_s
            if self.metrics is not None:
                self.metrics.index_degraded.set(1)
            return await self._degraded_lookup(sids)
        if self._down_until is not None:
            self._down_until = None
            log.warning("Redis inverse index reachable again: reads go to Redis")
            if self.metrics is not None:
                self.metrics.index_degraded.set(0)
        return out

    async def _degraded_lookup(self, sids: Sequence[Sequence[int]]) -> list[str | None]:
        assert self.fallback is not None
        if self.metrics is not None:
            self.metrics.index_fallback.inc()
        masked = self._known_masked
        return [None if i in masked else i for i in await self.fallback.lookup(sids)]

    @classmethod
    async def open(cls, url: str, namespace: str, version: str, timeout_s: float = 2.0,
                   metrics: ServiceMetrics | None = None) -> "RedisInverseIndex":
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                         decode_responses=True, health_check_interval=30)
        return cls(client, namespace, version, metrics)

    async def meta(self) -> dict[str, str]:
        return await self.client.hgetall(self.keys["meta"])

    async def attach(self) -> None:
        """Read this version's meta; raise IndexUnavailable unless it is completely loaded."""
        meta = await self.meta()
        if meta.get("complete") != "1":
            state = "partly loaded" if meta else "not loaded"
            raise IndexUnavailable(f"Redis has version {self.version} {state} under namespace '{self.namespace}'; "
                              f"run `python -m sidrec.service index load <bundle>` or set SIDREC_REDIS_AUTOLOAD=true")
        import json

        self.codec = SidCodec(json.loads(meta["cardinalities"]), int(meta["span"]))
        self._script.sha = await self.client.script_load(_LOOKUP_LUA)  # requests then go straight to EVALSHA

    async def _lookup(self, sids: Sequence[Sequence[int]]) -> list[str | None]:
        if self.codec is None:
            await self.attach()
        codec = self.codec
        assert codec is not None
        prefix, cat = self.keys["bucket_prefix"], self.keys["cat_prefix"]
        bucket_keys, args = [cat + "owner", cat + "deleted"], []
        for s in sids:
            packed = codec.pack(s)
            b, f = codec.split(packed)
            bucket_keys.append(prefix + str(b))
            args += (str(packed), f)
        # One EVALSHA does every HGET server-side: one round trip and one command to encode,
        # where a pipeline of per-bucket HMGETs costs ~25 us of client CPU per bucket touched.
        return list(await self._script(keys=bucket_keys, args=args))

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except Exception:
            return False

    async def close(self) -> None:
        await self.client.aclose()

    async def current_version(self) -> str | None:
        return await self.client.get(self.keys["current"])

    async def masked_ids(self) -> set[str] | None:
        self._known_masked = set(await self.client.smembers(self.keys["masked"]))
        return set(self._known_masked)

    async def set_masked(self, item_ids: Sequence[str], masked: bool) -> None:
        if item_ids:
            if masked:
                await self.client.sadd(self.keys["masked"], *item_ids)
                self._known_masked = self._known_masked | set(item_ids)
            else:
                await self.client.srem(self.keys["masked"], *item_ids)
                self._known_masked = self._known_masked - set(item_ids)

    def describe(self) -> dict:
        d = super().describe()
        d.update(namespace=self.namespace, span=None if self.codec is None else self.codec.span,
                 fallback=self.fallback is not None, degraded=self.degraded)
        return d
