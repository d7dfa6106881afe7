"""ServiceRuntime: what the routes call — the serving model slot, masks and request logic, no HTTP.

It owns startup (open the bundle's `ModelSlot`: engine, index, batcher, catalogue, watchdog),
shutdown, and the request logic that sits between the schemas and the engine: id mapping,
exclusion lists, calling the batcher, one inverse-index round trip per request, building
responses. Each request takes the current slot once and finishes on it, so a model switch
(`service.lifecycle`: load beside, warm, switch, roll back) never mixes two models in one answer.
The living catalogue lives in `service.catalogue_*` and `service.items`. Route handlers stay
one-liners. It imports no web framework; errors are `service.errors.APIError`.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from sidrec.model.engine import RecommendEngine
from sidrec.service import schemas as S
from sidrec.service.jobs import (BatcherClosed, DeadlineExceeded, QueueFull, RecommendEntry, RecommendOutput,
                                 ScoreEntry, user_work)
from sidrec.service.engine_proc import EngineUnavailable
from sidrec.service.errors import APIError
from sidrec.service.index import RedisInverseIndex
from sidrec.service.items import ItemCatalogue
from sidrec.service.metrics import ServiceMetrics
from sidrec.service.model_slot import ModelSlot, StartupError
from sidrec.service.settings import Settings

log = logging.getLogger("sidrec.service")

__all__ = ["ServiceRuntime", "StartupError"]


class ServiceRuntime:
    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.slot: ModelSlot | None = None  # what new requests are served from
        self.previous: ModelSlot | None = None  # kept loaded for an instant rollback (service.lifecycle)
        self.masked: set[str] = set()
        self.warmed = False
        self.ready = False
        self.lifecycle: Any = None  # service.lifecycle.ModelLifecycle, set in start()
        self._mask_task: asyncio.Task | None = None
        self._registry_task: asyncio.Task | None = None  # this replica's record in Redis (service.replicas)

    # The serving slot's parts (None before start): tests and the admin paths read them here.
    engine = property(lambda self: self.slot.engine if self.slot else None)
    batcher = property(lambda self: self.slot.batcher if self.slot else None)
    index = property(lambda self: self.slot.index if self.slot else None)
    store = property(lambda self: self.slot.store if self.slot else None)
    follower = property(lambda self: self.slot.follower if self.slot else None)
    items = property(lambda self: self.slot.items if self.slot else None)
    watchdog = property(lambda self: self.slot.watchdog if self.slot else None)

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        from sidrec.service.lifecycle import ModelLifecycle

        s = self.settings
        try:
            slot = await ModelSlot.open(s, self.metrics, s.bundle_path, self.masked, warm=s.warmup)
        except StartupError as e:
            raise StartupError(f"refusing to start: {e}") from None
        self.lifecycle = ModelLifecycle(self)
        self.install(slot)
        if slot.index is not None and slot.index.shares_masks:
            await self.sync_masks()
            self._mask_task = asyncio.create_task(self._mask_loop(), name="sidrec-mask-sync")
        self.warmed = True
        self.ready = True
        if isinstance(slot.index, RedisInverseIndex):
            from sidrec.service.replicas import announce_forever

            self._registry_task = asyncio.create_task(
                announce_forever(slot.index.client, s.redis_namespace, lambda: self.slot.version if self.slot else "",
                                 lambda: {"catalogue_version": self.catalogue_version}),
                name="sidrec-replica-registry")
        log.info("sidrec ready: bundle %s version %s, %d items, index %s, batching %s", s.bundle_path,
                 slot.version, slot.engine.num_items, slot.index.backend, s.batching)

    def install(self, slot: ModelSlot) -> None:
        """Serve new requests from `slot` (one assignment: requests already running keep theirs)."""
        self.slot = slot
        self.metrics.set_model(slot.version, slot.engine.num_items, self.settings.device, slot.index.backend)
        if slot.follower is not None:
            self.metrics.watch_catalogue(slot.follower)

    async def stop(self) -> None:
        self.ready = False
        for task in (self._mask_task, self._registry_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.lifecycle is not None:
            await self.lifecycle.stop()
        for slot in (self.slot, self.previous):
            if slot is not None:
                await slot.close()

    # --- helpers --------------------------------------------------------------------------------

    def alive(self) -> bool:
        """Liveness: the serving slot's engine serves, or is being restarted by its watchdog."""
        return self.slot is None or self.slot.alive()

    def engine_healthy(self) -> bool:
        return self.slot is not None and self.slot.engine_healthy()

    def _engine_unavailable(self, slot: ModelSlot | None = None) -> APIError:
        self.metrics.engine_failed_requests.inc()
        slot = slot or self.slot
        wait = str(slot.watchdog.retry_after_s() if slot is not None and slot.watchdog is not None else 1)
        return APIError(503, "engine_unavailable", "the model engine stopped answering and is being restarted; "
                        "retry after the delay in Retry-After, or on another replica", headers={"Retry-After": wait})

    def take_slot(self) -> ModelSlot:
        """The slot this request runs on from start to finish (503 when none serves)."""
        slot = self.slot
        if not self.ready or slot is None or slot.engine is None:
            raise APIError(503, "not_ready", "the model is not loaded or the service is shutting down; retry shortly",
                           headers={"Retry-After": "1"})
        if not slot.engine_healthy():
            raise self._engine_unavailable(slot)
        return slot

    def require_ready(self) -> RecommendEngine:
        return self.take_slot().engine

    @staticmethod
    def _at_capacity(e: QueueFull) -> APIError:
        return APIError(429, "queue_full", f"the server is at capacity: {e.reason}; retry after the delay in "
                        "Retry-After", {"retry_after_s": e.retry_after_s}, {"Retry-After": str(e.retry_after_s)})

    async def _run(self, coro, slot: ModelSlot | None = None) -> Any:
        try:
            return await coro
        except QueueFull as e:
            raise self._at_capacity(e) from None
        except DeadlineExceeded:
            raise APIError(504, "timeout", f"the request did not finish within {self.settings.request_timeout_s:g} s "
                           "(SIDREC_REQUEST_TIMEOUT_S); try a smaller beam_width or retry") from None
        except EngineUnavailable:
            raise self._engine_unavailable(slot) from None
        except ValueError:  # the engine refused this request's input (logged by the batcher)
            raise APIError(422, "invalid_request", "the engine could not serve this request's input; check "
                           "history, exclude and beam_width against GET /v1/model's limits") from None
        except BatcherClosed:
            raise APIError(503, "not_ready", "the service is shutting down; retry on another replica",
                           headers={"Retry-After": "1"}) from None

    async def _lookup(self, slot: ModelSlot, sids: list[list[int]]) -> list[str | None]:
        assert slot.index is not None
        try:
            return await slot.index.lookup(sids)
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
        return self.slot.catalogue_version if self.slot is not None else 0

    def _response(self, slot: ModelSlot, req: S.RecommendRequest, entry: RecommendEntry, out: RecommendOutput,
                  ids: list[str | None], unknown: list[str], used: int) -> S.RecommendResponse:
        items = [S.RecommendedItem(item_id=i, score=sc, sid=sid if req.return_sids else None)
                 for i, sc, sid in zip(ids, out.scores, out.sids) if i is not None]
        return S.RecommendResponse(items=items, model_version=slot.version, catalogue_version=slot.catalogue_version,
                                   unknown_history_ids=unknown,
                                   history_used=used, beam_width=entry.beam_width, top_n=entry.top_n)

    # --- endpoints ------------------------------------------------------------------------------

    async def recommend(self, req: S.RecommendRequest) -> S.RecommendResponse:
        with self.take_slot().use() as slot:
            entry, unknown, used = self._entry(slot.engine, req, "")
            [out] = await self._run(slot.batcher.recommend([entry]), slot)
            ids = await self._lookup(slot, out.sids)
            return self._response(slot, req, entry, out, ids, unknown, used)

    async def recommend_batch(self, req: S.BatchRecommendRequest) -> S.BatchRecommendResponse:
        with self.take_slot().use() as slot:
            S.check_batch(req, self.settings)
            try:  # refused by weight before its histories are mapped (the batcher decides again)
                slot.batcher.check_admission(self._batch_work(req))
            except QueueFull as e:
                raise self._at_capacity(e) from None
            results: list[Any] = [None] * len(req.requests)
            todo = []
            for n, r in enumerate(req.requests):
                try:
                    todo.append((n, r, *self._entry(slot.engine, r, f"requests.{n}.")))
                except APIError as e:
                    results[n] = S.ErrorItem(error=S.ErrorInfo(code=e.code, message=e.message, details=e.details))
            if todo:
                outs = await self._run(slot.batcher.recommend([t[2] for t in todo]), slot)
                flat = [sid for o in outs for sid in o.sids]
                ids = await self._lookup(slot, flat)  # one round trip for every user's beams
                pos = 0
                for (n, r, entry, unknown, used), out in zip(todo, outs):
                    results[n] = self._response(slot, r, entry, out, ids[pos:pos + len(out.sids)], unknown, used)
                    pos += len(out.sids)
            return S.BatchRecommendResponse(results=results, model_version=slot.version,
                                            catalogue_version=slot.catalogue_version)

    def _batch_work(self, req: S.BatchRecommendRequest) -> int:
        """The batch's weight in the admission budget, from its beams alone (as `resolve_recommend`
        picks them, capped at the limit; an entry over it fails validation later and runs nothing)."""
        cap = self.settings.max_beam_width
        return sum(user_work(min(S.requested_size(r, self.settings)[1], cap)) for r in req.requests)

    async def score(self, req: S.ScoreRequest) -> S.ScoreResponse:
        with self.take_slot().use() as slot:
            engine = slot.engine
            S.check_score(req, self.settings)
            known, unknown = engine.to_internal(req.history)
            if not known:
                raise S.no_known_history("history", unknown)
            cand, unknown_c = engine.to_internal(req.candidates)
            missing = set(unknown_c)
            cand_ids = [c for c in req.candidates if c not in missing]
            scores: list[float] = []
            if cand:
                [scores] = await self._run(slot.batcher.score([ScoreEntry(known, cand)]), slot)
            return S.ScoreResponse(
                scores=[S.CandidateScore(item_id=i, log_likelihood=v) for i, v in zip(cand_ids, scores)],
                unknown_candidate_ids=unknown_c, unknown_history_ids=unknown, model_version=slot.version)

    def model_info(self) -> S.ModelInfo:
        slot = self.take_slot()
        engine = slot.engine
        cfg = engine.bundle.config
        mc = cfg.get("model", {})
        s = self.settings
        return S.ModelInfo(
            version=engine.version, num_items=engine.num_items, created_at=cfg.get("created_at"),
            format_version=cfg.get("format_version"),
            architecture={k: v for k, v in mc.items() if k != "layout"},
            sid_layout=mc.get("layout", {}), metrics=engine.bundle.metrics,
            evaluation=cfg.get("evaluation") or cfg.get("eval"), dataset=cfg.get("dataset") or cfg.get("dataset_fingerprint"),
            index=slot.index.describe() if slot.index else {},
            limits={"max_top_n": s.max_top_n, "max_beam_width": s.max_beam_width, "max_history_len": s.max_history_len,
                    "max_batch_requests": s.max_batch_requests, "max_candidates": s.max_candidates,
                    "max_body_bytes": s.max_body_bytes, "default_top_n": s.default_top_n,
                    "default_beam_width": s.default_beam_width},
            num_masked=len(self.masked), catalogue_version=slot.catalogue_version,
            catalogue={**(slot.follower.describe() if slot.follower else {}),
                       "embedding": slot.items.embedder.describe() if slot.items and slot.items.embedder else None},
            ranking=getattr(engine, "ranking", {}))

    async def readiness(self) -> dict[str, Any]:
        slot = self.slot
        index, follower = (slot.index, slot.follower) if slot else (None, None)
        reachable = bool(index is not None and await index.ping())
        engine_ok = self.engine_healthy()
        caught_up = bool(follower is not None and follower.caught_up)
        # Redis away: reads go on from this replica's mirror (degraded), so the replica stays in
        # rotation (it caught up at startup, before `ready`); once Redis answers again it must
        # catch up again before it counts as ready (reachable, follower behind -> not ready).
        degraded = bool(getattr(index, "degraded", False)) and not reachable
        serving = (reachable and caught_up) or degraded
        return {"status": "ready" if (self.ready and engine_ok and serving) else "not_ready",
                "model_loaded": slot is not None, "warmed": self.warmed, "index_reachable": reachable,
                "engine_healthy": engine_ok, "catalogue_caught_up": caught_up, "degraded": degraded,
                "model_version": slot.version if slot else None,
                "catalogue_version": self.catalogue_version}

    # --- the living catalogue -------------------------------------------------------------------

    def require_items(self) -> ItemCatalogue:
        slot = self.take_slot()
        assert slot.items is not None
        return slot.items

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

    async def _apply_masks(self, ids: list[str], masked: bool, slot: ModelSlot | None = None) -> None:
        if not ids:
            return
        slot = slot or self.slot
        assert slot is not None and slot.batcher is not None and slot.engine is not None
        engine, follower = slot.engine, slot.follower
        # an item deleted in the catalogue stays masked in the engine whatever the admin mask says
        live = ids if masked or follower is None else [i for i in ids if i not in follower.deleted]
        await slot.batcher.run_exclusive(lambda: engine.set_masked(live, masked) if live else None)
        (slot.masks_applied.update if masked else slot.masks_applied.difference_update)(ids)
        if slot is self.slot:
            (self.masked.update if masked else self.masked.difference_update)(ids)
            self.metrics.masked_items.set(len(self.masked))

    async def align_masks(self, slot: ModelSlot) -> None:
        """Bring a slot's engine to the service's masks (a slot kept for rollback missed changes)."""
        known = {i for i in self.masked if i in slot.engine.index_of}
        await self._apply_masks(sorted(known - slot.masks_applied), True, slot)
        await self._apply_masks(sorted(slot.masks_applied - known), False, slot)

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
