"""ServiceRuntime: what the routes call — engine + batcher + inverse index + catalogue + masks, no HTTP.

It owns startup (load the bundle, open the index, warm up), shutdown, and the request logic that
sits between the schemas and the engine: id mapping, exclusion lists, calling the batcher, one
inverse-index round trip per request, building responses. The living catalogue (store, follower,
item writes) is built here at startup (`_open_catalogue`) and lives in `service.catalogue_*` and
`service.items`. Route handlers stay one-liners.
It imports no web framework; errors are `service.errors.APIError` (status, code, message).
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from sidrec.model.bundle import BundleError
from sidrec.model.engine import EngineOptions, RecommendEngine
from sidrec.model.sid_assign import codebooks_of
from sidrec.model.text_embed import TextEmbedder
from sidrec.service import schemas as S
from sidrec.service.batcher import (BatcherClosed, DeadlineExceeded, DynamicBatcher, QueueFull, RecommendEntry,
                             RecommendOutput, ScoreEntry)
from sidrec.service.engine_proc import EngineProcess, EngineUnavailable, HangPolicy
from sidrec.service.errors import APIError
from sidrec.service.catalogue_follow import CatalogueFollower
from sidrec.service.catalogue_store import CatalogueStore, InProcessCatalogueStore, RedisCatalogueStore
from sidrec.service.index import InProcessIndex, IndexUnavailable, InverseIndex, RedisInverseIndex, SidCodec
from sidrec.service.items import ItemCatalogue, base_items_of
from sidrec.service.metrics import ServiceMetrics
from sidrec.service.settings import Settings
from sidrec.service.watchdog import EngineWatchdog

log = logging.getLogger("sidrec.service")


class StartupError(RuntimeError):
    """The service refuses to start (broken bundle, unreachable index): the message says why."""


class ServiceRuntime:
    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine: RecommendEngine | EngineProcess | None = None
        self.batcher: DynamicBatcher | None = None
        self.index: InverseIndex | None = None
        self.watchdog: EngineWatchdog | None = None  # engine_process only: finds hangs, restarts
        self.masked: set[str] = set()
        self.warmed = False
        self.ready = False
        self._mask_task: asyncio.Task | None = None
        self._registry_task: asyncio.Task | None = None  # this replica's record in Redis (service.replicas)
        self.store: CatalogueStore | None = None
        self.follower: CatalogueFollower | None = None
        self.items: ItemCatalogue | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        opts = EngineOptions(device=s.device, beam_step=s.beam_step, dtype=s.dtype,
                             max_beam_width=max(s.max_beam_width, 1), num_threads=s.num_threads)
        try:
            if s.engine_process:
                policy = HangPolicy(s.engine_hang_timeout_s, s.engine_hang_slack)
                self.engine = await asyncio.to_thread(EngineProcess.start, s.bundle_path, opts, 600.0, policy)
            else:
                self.engine = await asyncio.to_thread(RecommendEngine.from_path, s.bundle_path, opts)
        except BundleError as e:
            raise StartupError(f"refusing to start: bundle {s.bundle_path!r} is unusable: {e}") from None
        except (OSError, ValueError, RuntimeError) as e:
            raise StartupError(f"refusing to start: cannot load bundle {s.bundle_path!r}: {e}") from None
        self.index = await self._open_index(self.engine)
        self.metrics.set_model(self.engine.version, self.engine.num_items, s.device, self.index.backend)
        self.batcher = DynamicBatcher.from_settings(self.engine, s, self.metrics)
        self.batcher.start()
        await self._open_catalogue(self.engine, self.index)
        if self.index.shares_masks:
            await self.sync_masks()
            self._mask_task = asyncio.create_task(self._mask_loop(), name="sidrec-mask-sync")
        if s.warmup:
            await self.batcher.run_exclusive(self._warm)
        if isinstance(self.engine, EngineProcess):
            self.watchdog = EngineWatchdog(self.engine, self.metrics, interval_s=s.engine_ping_interval_s,
                                           max_restart_failures=s.engine_max_restart_failures)
            # A restarted child gets the warm-up and the live masks before it takes traffic.
            self.watchdog.prepare_hooks += [self._warm] if s.warmup else []
            self.watchdog.prepare_hooks.append(self._remask)
            if self.follower is not None:  # and the living catalogue, before the masks
                self.watchdog.prepare_hooks.insert(len(self.watchdog.prepare_hooks) - 1, self.follower.reapply)
            self.watchdog.start()
        self.warmed = True
        self.ready = True
        if isinstance(self.index, RedisInverseIndex):
            from sidrec.service.replicas import announce_forever

            self._registry_task = asyncio.create_task(
                announce_forever(self.index.client, s.redis_namespace, lambda: self.engine.version),
                name="sidrec-replica-registry")
        log.info("sidrec ready: bundle %s version %s, %d items, index %s, batching %s",
                 s.bundle_path, self.engine.version, self.engine.num_items, self.index.backend, s.batching)

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
            raise StartupError(f"refusing to start: {e}") from None
        except Exception as e:  # connection refused, auth, timeout
            await index.close()
            raise StartupError(f"refusing to start: Redis at {_redact(s.redis_url)} is unreachable "
                               f"({type(e).__name__}); unset SIDREC_REDIS_URL to use the in-process index") from None
        # reads survive a Redis outage, answered from the bundle's map (degraded; see service.index)
        index.set_fallback(InProcessIndex(engine.version, engine.bundle.sid_map, engine.item_ids, cards))
        return index

    async def _open_catalogue(self, engine: RecommendEngine, index: InverseIndex) -> None:
        """The catalogue store (Redis beside the index, or in process), caught up into the engine."""
        s = self.settings
        cards = engine.cfg.layout.cardinalities
        codec = SidCodec(cards)
        base_ids = list(engine.bundle.item_ids)[: engine.bundle.sid_map.shape[1]]
        packed = codec.pack_tensor(engine.bundle.sid_map.t().cpu()).tolist()
        base_sid = dict(zip(base_ids, packed))
        if isinstance(index, RedisInverseIndex):
            import redis.asyncio as aioredis

            assert index.codec is not None
            follow = aioredis.Redis.from_url(s.redis_url, socket_timeout=s.catalogue_block_s + s.redis_timeout_s,
                                             socket_connect_timeout=s.redis_timeout_s, decode_responses=True)
            self.store = RedisCatalogueStore(index.client, s.redis_namespace, engine.version, index.codec,
                                             s.catalogue_log_maxlen, follow_client=follow)
        else:
            assert isinstance(index, InProcessIndex)
            store = InProcessCatalogueStore(index.base, s.catalogue_log_maxlen)
            index.resolve = store.resolve  # the final gate: deletions and added SIDs, in process
            self.store = store
        assert self.batcher is not None
        self.follower = CatalogueFollower(self.store, engine, self.batcher.run_exclusive, codec, base_sid,
                                          admin_masked=self.masked.__contains__, block_s=s.catalogue_block_s)
        self.metrics.watch_catalogue(self.follower)
        try:
            await self.follower.start()
        except Exception as e:
            raise StartupError(f"refusing to start: cannot catch up with the catalogue store "
                               f"({type(e).__name__}: {e})") from None
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
        if not books:  # the engine process's BundleInfo does not carry them: read the file
            f = Path(self.settings.bundle_path) / "codebooks.safetensors"
            books = load_file(str(f)) if f.is_file() else {}
        return codebooks_of({k: np.asarray(v) for k, v in books.items() if k != "empty"})

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

    def _remask(self, engine: EngineProcess) -> None:
        masked = sorted(self.masked)
        if masked:
            engine.set_masked(masked, True)

    async def stop(self) -> None:
        self.ready = False
        if self.watchdog is not None:
            await self.watchdog.stop()
        for task in (self._mask_task, self._registry_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
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

    # --- helpers --------------------------------------------------------------------------------

    def alive(self) -> bool:
        """Liveness: true while the engine serves or is being restarted by the watchdog; false once
        its restarts keep failing (then replacing the pod is the cure)."""
        if self.watchdog is not None:
            return self.watchdog.alive()
        return not (isinstance(self.engine, EngineProcess) and not self.engine.alive())

    def engine_healthy(self) -> bool:
        """False from a detected engine fault until its restart (EngineProcess.check is cheap)."""
        return not isinstance(self.engine, EngineProcess) or self.engine.check()

    def _engine_unavailable(self) -> APIError:
        self.metrics.engine_failed_requests.inc()
        wait = str(self.watchdog.retry_after_s() if self.watchdog is not None else 1)
        return APIError(503, "engine_unavailable", "the model engine stopped answering and is being restarted; "
                        "retry after the delay in Retry-After, or on another replica", headers={"Retry-After": wait})

    def require_ready(self) -> RecommendEngine:
        if not self.ready or self.engine is None:
            raise APIError(503, "not_ready", "the model is not loaded or the service is shutting down; retry shortly",
                           headers={"Retry-After": "1"})
        if not self.engine_healthy():
            raise self._engine_unavailable()
        return self.engine

    async def _run(self, coro) -> Any:
        try:
            return await coro
        except QueueFull as e:
            raise APIError(429, "queue_full", f"the server is at capacity: {e.reason}; retry after the delay in "
                           "Retry-After", {"retry_after_s": e.retry_after_s}, {"Retry-After": str(e.retry_after_s)}
                           ) from None
        except DeadlineExceeded:
            raise APIError(504, "timeout", f"the request did not finish within {self.settings.request_timeout_s:g} s "
                           "(SIDREC_REQUEST_TIMEOUT_S); try a smaller beam_width or retry") from None
        except EngineUnavailable:
            raise self._engine_unavailable() from None
        except ValueError:  # the engine refused this request's input (logged by the batcher)
            raise APIError(422, "invalid_request", "the engine could not serve this request's input; check "
                           "history, exclude and beam_width against GET /v1/model's limits") from None
        except BatcherClosed:
            raise APIError(503, "not_ready", "the service is shutting down; retry on another replica",
                           headers={"Retry-After": "1"}) from None

    async def _lookup(self, sids: list[list[int]]) -> list[str | None]:
        assert self.index is not None
        try:
            return await self.index.lookup(sids)
        except Exception:
            log.exception("inverse index lookup failed")
            raise APIError(503, "index_unavailable", "the item index is unreachable; retry shortly",
                           headers={"Retry-After": "1"}) from None

    def _entry(self, engine: RecommendEngine, req: S.RecommendRequest, prefix: str
               ) -> tuple[RecommendEntry, list[str], int]:
        top_n, beam = S.resolve_recommend(req, self.settings, prefix)
        known, unknown = engine.to_internal(req.history)
        if not known:
            raise S.no_known_history(prefix + "history", unknown)
        exclude = list(known) if req.exclude_history else []
        if req.exclude_items or req.exclude:
            exclude += engine.to_internal(req.exclude_items + req.exclude)[0]
        entry = RecommendEntry(known, beam, top_n, exclude, filters=dict(req.filter) if req.filter else None)
        return entry, unknown, min(len(known), engine.cfg.max_history)

    @property
    def catalogue_version(self) -> int:
        return self.follower.applied if self.follower is not None else 0

    def _response(self, engine: RecommendEngine, req: S.RecommendRequest, entry: RecommendEntry, out: RecommendOutput,
                  ids: list[str | None], unknown: list[str], used: int) -> S.RecommendResponse:
        items = [S.RecommendedItem(item_id=i, score=sc, sid=sid if req.return_sids else None)
                 for i, sc, sid in zip(ids, out.scores, out.sids) if i is not None]
        return S.RecommendResponse(items=items, model_version=engine.version, catalogue_version=self.catalogue_version,
                                   unknown_history_ids=unknown,
                                   history_used=used, beam_width=entry.beam_width, top_n=entry.top_n)

    # --- endpoints ------------------------------------------------------------------------------

    async def recommend(self, req: S.RecommendRequest) -> S.RecommendResponse:
        engine = self.require_ready()
        entry, unknown, used = self._entry(engine, req, "")
        assert self.batcher is not None
        [out] = await self._run(self.batcher.recommend([entry]))
        ids = await self._lookup(out.sids)
        return self._response(engine, req, entry, out, ids, unknown, used)

    async def recommend_batch(self, req: S.BatchRecommendRequest) -> S.BatchRecommendResponse:
        engine = self.require_ready()
        S.check_batch(req, self.settings)
        results: list[Any] = [None] * len(req.requests)
        todo = []
        for n, r in enumerate(req.requests):
            try:
                todo.append((n, r, *self._entry(engine, r, f"requests.{n}.")))
            except APIError as e:
                results[n] = S.ErrorItem(error=S.ErrorInfo(code=e.code, message=e.message, details=e.details))
        if todo:
            assert self.batcher is not None
            outs = await self._run(self.batcher.recommend([t[2] for t in todo]))
            flat = [sid for o in outs for sid in o.sids]
            ids = await self._lookup(flat)  # one round trip for every user's beams
            pos = 0
            for (n, r, entry, unknown, used), out in zip(todo, outs):
                results[n] = self._response(engine, r, entry, out, ids[pos:pos + len(out.sids)], unknown, used)
                pos += len(out.sids)
        return S.BatchRecommendResponse(results=results, model_version=engine.version,
                                        catalogue_version=self.catalogue_version)

    async def score(self, req: S.ScoreRequest) -> S.ScoreResponse:
        engine = self.require_ready()
        S.check_score(req, self.settings)
        known, unknown = engine.to_internal(req.history)
        if not known:
            raise S.no_known_history("history", unknown)
        cand, unknown_c = engine.to_internal(req.candidates)
        missing = set(unknown_c)
        cand_ids = [c for c in req.candidates if c not in missing]
        scores: list[float] = []
        if cand:
            assert self.batcher is not None
            [scores] = await self._run(self.batcher.score([ScoreEntry(known, cand)]))
        return S.ScoreResponse(scores=[S.CandidateScore(item_id=i, log_likelihood=v) for i, v in zip(cand_ids, scores)],
                               unknown_candidate_ids=unknown_c, unknown_history_ids=unknown,
                               model_version=engine.version)

    def model_info(self) -> S.ModelInfo:
        engine = self.require_ready()
        cfg = engine.bundle.config
        mc = cfg.get("model", {})
        s = self.settings
        return S.ModelInfo(
            version=engine.version, num_items=engine.num_items, created_at=cfg.get("created_at"),
            format_version=cfg.get("format_version"),
            architecture={k: v for k, v in mc.items() if k != "layout"},
            sid_layout=mc.get("layout", {}), metrics=engine.bundle.metrics,
            evaluation=cfg.get("evaluation") or cfg.get("eval"), dataset=cfg.get("dataset") or cfg.get("dataset_fingerprint"),
            index=self.index.describe() if self.index else {},
            limits={"max_top_n": s.max_top_n, "max_beam_width": s.max_beam_width, "max_history_len": s.max_history_len,
                    "max_batch_requests": s.max_batch_requests, "max_candidates": s.max_candidates,
                    "max_body_bytes": s.max_body_bytes, "default_top_n": s.default_top_n,
                    "default_beam_width": s.default_beam_width},
            num_masked=len(self.masked), catalogue_version=self.catalogue_version,
            catalogue={**(self.follower.describe() if self.follower else {}),
                       "embedding": self.items.embedder.describe() if self.items and self.items.embedder else None})

    async def readiness(self) -> dict[str, Any]:
        reachable = bool(self.index is not None and await self.index.ping())
        engine_ok = self.engine is not None and self.engine_healthy()
        caught_up = bool(self.follower is not None and self.follower.caught_up)
        # Redis away: reads go on from this replica's mirror (degraded), so the replica stays in
        # rotation (it caught up at startup, before `ready`); once Redis answers again it must
        # catch up again before it counts as ready (reachable, follower behind -> not ready).
        degraded = bool(getattr(self.index, "degraded", False)) and not reachable
        serving = (reachable and caught_up) or degraded
        return {"status": "ready" if (self.ready and engine_ok and serving) else "not_ready",
                "model_loaded": self.engine is not None, "warmed": self.warmed, "index_reachable": reachable,
                "engine_healthy": engine_ok, "catalogue_caught_up": caught_up, "degraded": degraded,
                "model_version": self.engine.version if self.engine else None,
                "catalogue_version": self.catalogue_version}

    # --- the living catalogue -------------------------------------------------------------------

    def require_items(self) -> ItemCatalogue:
        self.require_ready()
        assert self.items is not None
        return self.items

    # --- masks ----------------------------------------------------------------------------------

    async def set_masked(self, req: S.MaskRequest) -> S.MaskResponse:
        engine = self.require_ready()
        S.check_mask(req, self.settings)
        _, unknown = engine.to_internal(req.item_ids)
        missing = set(unknown)
        known = list(dict.fromkeys(i for i in req.item_ids if i not in missing))
        await self._apply_masks(known, req.masked)
        shared = bool(self.index is not None and self.index.shares_masks)
        if shared and known:
            assert self.index is not None
            try:
                await self.index.set_masked(known, req.masked)
            except Exception:
                log.exception("could not share masks through Redis")
                raise APIError(503, "index_unavailable", "masked locally but Redis is unreachable, so other "
                               "workers did not get it; retry the call") from None
        return S.MaskResponse(updated=len(known), unknown_item_ids=unknown, num_masked=len(self.masked), shared=shared)

    async def _apply_masks(self, ids: list[str], masked: bool) -> None:
        if not ids:
            return
        assert self.batcher is not None and self.engine is not None
        engine = self.engine
        # an item deleted in the catalogue stays masked in the engine whatever the admin mask says
        live = ids if masked or self.follower is None else [i for i in ids if i not in self.follower.deleted]
        await self.batcher.run_exclusive(lambda: engine.set_masked(live, masked) if live else None)
        (self.masked.update if masked else self.masked.difference_update)(ids)
        self.metrics.masked_items.set(len(self.masked))

    async def sync_masks(self) -> None:
        """Make the local mask equal the shared one (masks set through other workers)."""
        assert self.index is not None and self.engine is not None
        shared = await self.index.masked_ids()
        if shared is None:
            return
        shared = {i for i in shared if i in self.engine.index_of}
        await self._apply_masks(sorted(shared - self.masked), True)
        await self._apply_masks(sorted(self.masked - shared), False)

    async def _mask_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.mask_sync_interval_s)
            try:
                await self.sync_masks()
            except Exception:
                log.warning("mask sync with Redis failed; will retry", exc_info=True)


def _redact(url: str) -> str:
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
