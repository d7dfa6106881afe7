"""ModelSlot: everything that belongs to one loaded bundle version, opened and closed as a unit.

A slot holds the engine (in this process or a child), its inverse index, its dynamic batcher, its
catalogue store and follower, its item writer and, for an engine process, its watchdog. The
service serves from one slot; a reload opens a second beside it, warms it up and switches
(`service.lifecycle`). A request takes the slot once when it starts and finishes on it, so a
switch never mixes two models' internal ids in one answer.

What it is not: the request logic (`service.runtime`) or the switch itself (`service.lifecycle`).
Masks set by an operator belong to the service, not to a slot: a slot is handed the shared set
and applies it to its engine when it opens (and after an engine restart).
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from safetensors import safe_open

from sidrec.model.bundle import BundleError
from sidrec.model.cold_start import ColdStartOptions
from sidrec.model.engine import EngineOptions, RecommendEngine
from sidrec.model.sid_assign import codebooks_of
from sidrec.model.text_embed import TextEmbedder
from sidrec.service.batcher import DynamicBatcher
from sidrec.service.catalogue_follow import CatalogueFollower
from sidrec.service.catalogue_store import CatalogueStore, InProcessCatalogueStore, RedisCatalogueStore
from sidrec.service.engine_proc import EngineProcess, HangPolicy
from sidrec.service.index import InProcessIndex, IndexUnavailable, InverseIndex, RedisInverseIndex, SidCodec
from sidrec.service.items import ItemCatalogue, base_items_of
from sidrec.service.metrics import ServiceMetrics
from sidrec.service.settings import Settings
from sidrec.service.watchdog import EngineWatchdog

log = logging.getLogger("sidrec.service")


class StartupError(RuntimeError):
    """A bundle cannot be served (broken bundle, unreachable index): the message says why."""


@dataclass
class ModelSlot:
    settings: Settings
    metrics: ServiceMetrics
    bundle_path: str
    masked: set[str]  # the service's operator masks (shared, not copied)
    engine: RecommendEngine | EngineProcess | None = None
    index: InverseIndex | None = None
    batcher: DynamicBatcher | None = None
    store: CatalogueStore | None = None
    follower: CatalogueFollower | None = None
    items: ItemCatalogue | None = None
    watchdog: EngineWatchdog | None = None
    opened_at: float = field(default_factory=time.time)
    open_seconds: float = 0.0
    inflight: int = 0  # requests that took this slot and have not answered yet
    masks_applied: set[str] = field(default_factory=set)  # operator masks its engine holds

    @property
    def version(self) -> str:
        assert self.engine is not None
        return self.engine.version

    @property
    def catalogue_version(self) -> int:
        return self.follower.applied if self.follower is not None else 0

    # --- opening and closing --------------------------------------------------------------------

    @classmethod
    async def open(cls, settings: Settings, metrics: ServiceMetrics, bundle_path: str, masked: set[str],
                   warm: bool = True) -> "ModelSlot":
        """Load `bundle_path`, open its index and catalogue, apply the masks, warm it up. Raises
        StartupError naming the fault; whatever was opened is closed again."""
        slot = cls(settings, metrics, str(bundle_path), masked)
        t0 = time.monotonic()
        try:
            await slot._open(warm)
        except BaseException:
            await slot.close()
            raise
        slot.open_seconds = time.monotonic() - t0
        return slot

    async def _open(self, warm: bool) -> None:
        s = self.settings
        opts = EngineOptions(device=s.device, beam_step=s.beam_step, dtype=s.dtype,
                             max_beam_width=max(s.max_beam_width, 1), num_threads=s.num_threads,
                             cold_start=ColdStartOptions(mode=s.cold_start),
                             rerank_weight=s.rerank_weight, transitions_weight=s.transitions_weight)
        try:
            if s.engine_process:
                policy = HangPolicy(s.engine_hang_timeout_s, s.engine_hang_slack)
                self.engine = await asyncio.to_thread(EngineProcess.start, self.bundle_path, opts, 600.0, policy)
            else:
                self.engine = await asyncio.to_thread(RecommendEngine.from_path, self.bundle_path, opts)
        except BundleError as e:
            raise StartupError(f"bundle {self.bundle_path!r} is unusable: {e}") from None
        except (OSError, ValueError, RuntimeError) as e:
            raise StartupError(f"cannot load bundle {self.bundle_path!r}: {e}") from None
        self.index = await self._open_index(self.engine)
        self.batcher = DynamicBatcher.from_settings(self.engine, s, self.metrics)
        self.batcher.start()
        await self._open_catalogue(self.engine, self.index)
        if self.masked:
            engine, masked = self.engine, sorted(i for i in self.masked if i in self.engine.index_of)
            await self.batcher.run_exclusive(lambda: self._remask(engine, masked))
            self.masks_applied = set(masked)
        if warm:
            await self.batcher.run_exclusive(self._warm)
        if isinstance(self.engine, EngineProcess):
            self.watchdog = EngineWatchdog(self.engine, self.metrics, interval_s=s.engine_ping_interval_s,
                                           max_restart_failures=s.engine_max_restart_failures)
            # A restarted child gets the warm-up, the living catalogue (in its original order) and
            # the operator masks before it takes traffic.
            self.watchdog.prepare_hooks += [self._warm] if warm else []
            if self.follower is not None:
                self.watchdog.prepare_hooks.append(self.follower.reapply)
            self.watchdog.prepare_hooks.append(self._remask)
            self.watchdog.start()

    async def close(self) -> None:
        if self.watchdog is not None:
            await self.watchdog.stop()
        if self.follower is not None:
            await self.follower.stop()
        if self.store is not None:
            await self.store.close()
        if self.batcher is not None:
            await self.batcher.stop()
        if self.index is not None:
            await self.index.close()
        if isinstance(self.engine, EngineProcess):
            await asyncio.to_thread(self.engine.close)
        elif self.engine is not None and hasattr(self.engine, "close"):
            await asyncio.to_thread(self.engine.close)  # joins the engine's background trie builder

    @contextmanager
    def use(self) -> Iterator["ModelSlot"]:
        """Hold the slot for one request (engine call and index lookup): `drain` waits for it."""
        self.inflight += 1
        try:
            yield self
        finally:
            self.inflight -= 1

    async def drain(self, timeout_s: float) -> bool:
        """Wait until no request holds this slot; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self.inflight > 0:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    # --- the parts ------------------------------------------------------------------------------

    async def _open_index(self, engine: RecommendEngine) -> InverseIndex:
        s = self.settings
        cards = engine.cfg.layout.cardinalities
        if not s.redis_url:
            return InProcessIndex(engine.version, engine.bundle.sid_map, engine.item_ids, cards, self.metrics)
        index = await RedisInverseIndex.open(s.redis_url, s.redis_namespace, engine.version, s.redis_timeout_s,
                                             self.metrics)
        try:
            try:
                await index.attach()
            except IndexUnavailable:
                if not s.redis_autoload:
                    raise
                await asyncio.to_thread(self._autoload, engine)
                await index.attach()
        except IndexUnavailable as e:
            await index.close()
            raise StartupError(str(e)) from None
        except Exception as e:  # connection refused, auth, timeout
            await index.close()
            raise StartupError(f"Redis at {redact(s.redis_url)} is unreachable ({type(e).__name__}); unset "
                               "SIDREC_REDIS_URL to use the in-process index") from None
        # reads survive a Redis outage, answered from the bundle's map (degraded; see service.index)
        index.set_fallback(InProcessIndex(engine.version, engine.bundle.sid_map, engine.item_ids, cards))
        return index

    async def _open_catalogue(self, engine: RecommendEngine, index: InverseIndex) -> None:
        """The catalogue store (Redis beside the index, or in process), caught up into the engine."""
        s = self.settings
        codec = SidCodec(engine.cfg.layout.cardinalities)
        base_ids = list(engine.bundle.item_ids)[: engine.bundle.sid_map.shape[1]]
        base_sid = dict(zip(base_ids, codec.pack_tensor(engine.bundle.sid_map.t().cpu()).tolist()))
        if isinstance(index, RedisInverseIndex):
            import redis.asyncio as aioredis

            assert index.codec is not None
            follow = aioredis.Redis.from_url(s.redis_url, socket_timeout=s.catalogue_block_s + s.redis_timeout_s,
                                             socket_connect_timeout=s.redis_timeout_s, decode_responses=True)
            write = aioredis.Redis.from_url(s.redis_url, socket_timeout=s.catalogue_write_timeout_s,
                                            socket_connect_timeout=s.redis_timeout_s, decode_responses=True)
            self.store = RedisCatalogueStore(index.client, s.redis_namespace, engine.version, index.codec,
                                             s.catalogue_log_maxlen, follow_client=follow, write_client=write)
        else:
            assert isinstance(index, InProcessIndex)
            store = InProcessCatalogueStore(index.base, s.catalogue_log_maxlen)
            index.resolve = store.resolve  # the final gate: deletions and added SIDs, in process
            self.store = store
        assert self.batcher is not None
        self.follower = CatalogueFollower(self.store, engine, self.batcher.run_exclusive, codec, base_sid,
                                          admin_masked=self.masked.__contains__, block_s=s.catalogue_block_s)
        try:
            await self.follower.start()
        except Exception as e:
            raise StartupError(f"cannot catch up with the catalogue store ({type(e).__name__}: {e})") from None
        fallback = getattr(index, "fallback", None)
        if isinstance(fallback, InProcessIndex):  # Redis away: the mirror stays the final gate
            fallback.resolve = self.follower.mirror_resolver(fallback.base)
        cfg = engine.bundle.config
        codebooks = self._codebooks(engine)
        method = (cfg.get("sid") or {}).get("method", "rq_kmeans")
        embedder = TextEmbedder.from_config(cfg, "cpu") if codebooks and method == "rq_kmeans" else None
        self.items = ItemCatalogue(s, self.store, self.follower, codec, base_sid, base_items_of(engine.bundle),
                                   codebooks, embedder, bool((cfg.get("sid") or {}).get("spread_collisions")),
                                   engine.version)

    def _codebooks(self, engine: RecommendEngine) -> list[np.ndarray]:
        """The bundle's quantizer codebooks in level order ([] when it has none)."""
        books = getattr(engine.bundle, "codebooks", None) or {}
        if not books:  # the engine process's BundleInfo does not carry them: read them from the file
            f = Path(self.bundle_path) / "codebooks.safetensors"
            if f.is_file():  # the centroids only, not the items' embeddings beside them
                with safe_open(str(f), framework="numpy") as sf:
                    books = {k: sf.get_tensor(k) for k in sf.keys() if k.startswith("codebook_")}
        return codebooks_of({k: np.asarray(v) for k, v in books.items() if k.startswith("codebook_")})

    def _autoload(self, engine: RecommendEngine) -> None:
        import redis

        from sidrec.service.index_store import load_version

        s = self.settings
        client = redis.Redis.from_url(s.redis_url, socket_timeout=max(s.redis_timeout_s, 30.0))
        try:
            rep = load_version(client, s.redis_namespace, engine.version, engine.bundle.sid_map, engine.item_ids,
                               engine.cfg.layout.cardinalities, activate=False, activate_if_none=True)
            log.info("inverse index autoloaded into Redis: %s", rep.to_dict())
        finally:
            client.close()

    def _warm(self, engine: Any = None) -> None:
        engine = engine or self.engine
        assert engine is not None
        s = self.settings
        hist = [[0], list(range(min(engine.num_items, engine.cfg.max_history)))]
        top = min(s.default_top_n, s.default_beam_width)
        engine.recommend(hist, s.default_beam_width, top, exclude=[[0], []])
        engine.score(hist, [[0, 1 % engine.num_items], [0]])

    def _remask(self, engine: Any, masked: list[str] | None = None) -> None:
        masked = sorted(self.masked) if masked is None else masked
        if masked:
            engine.set_masked(masked, True)

    # --- health ---------------------------------------------------------------------------------

    def alive(self) -> bool:
        """True while the engine serves or is being restarted by the watchdog; false once its
        restarts keep failing (then replacing the pod is the cure)."""
        if self.watchdog is not None:
            return self.watchdog.alive()
        return not (isinstance(self.engine, EngineProcess) and not self.engine.alive())

    def engine_healthy(self) -> bool:
        """False from a detected engine fault until its restart (EngineProcess.check is cheap)."""
        return self.engine is not None and (not isinstance(self.engine, EngineProcess) or self.engine.check())


def redact(url: str) -> str:
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
