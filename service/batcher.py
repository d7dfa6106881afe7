"""Dynamic batcher: many concurrent requests -> few engine calls, on one worker thread.

Requests become `Job`s on a bounded asyncio queue. A collector task takes the oldest job, then
keeps taking jobs until `max_batch_size` requests are gathered or `max_queue_delay_ms` has passed
since the engine became free for them (it only waits while requests arrive less than two delays
apart on average: a lone client is not made to wait for company that never comes), and hands the
group to a single worker thread (the engine is synchronous torch and not re-entrant). While that
thread decodes, new requests queue up, so under load the next group fills at once: batch size
grows with load and costs nothing when idle.

Inside a group, recommendations are sorted by beam width and cut into engine calls such that
(a) each call holds <= max_batch_size requests, (b) calls x widest beam <= max_batch_beams
(memory), (c) the largest top_n <= the smallest width (the engine decodes at one top_n and each
request's list is cut to its own top_n; each request keeps its own beam width). Scoring jobs are
grouped separately. With batching off each job runs alone, still through the same thread.

A full queue raises `QueueFull` (-> 429 + Retry-After); a request past its deadline raises
`DeadlineExceeded` (-> 504) and is skipped if not yet started. This module imports no web
framework; `service.app` maps its exceptions to HTTP.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from sidrec.service.metrics import ServiceMetrics

log = logging.getLogger("sidrec.batcher")


class QueueFull(RuntimeError):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__("the request queue is full")
        self.retry_after_s = retry_after_s


class DeadlineExceeded(RuntimeError):
    pass


class BatcherClosed(RuntimeError):
    pass


@dataclass
class RecommendEntry:
    history: list[int]  # internal item indices, oldest first
    beam_width: int
    top_n: int
    exclude: list[int] = field(default_factory=list)
    filters: dict[str, list[str]] | None = None  # attribute -> allowed values (a mask inside the beam)


@dataclass
class RecommendOutput:
    items: list[int]  # internal indices, best first, only valid ones
    sids: list[list[int]]
    scores: list[float]


@dataclass
class ScoreEntry:
    history: list[int]
    candidates: list[int]


@dataclass
class Job:
    kind: str  # 'recommend' | 'score'
    entries: list[Any]
    future: asyncio.Future
    enqueued: float
    deadline: float
    results: list[Any] = field(default_factory=list)
    waiting: bool = True  # counted against max_queue_size (queued, not yet taken or abandoned)

    def __post_init__(self) -> None:
        self.results = [None] * len(self.entries)


class DynamicBatcher:
    def __init__(self, engine: Any, *, batching: bool = True, max_batch_size: int = 32,
                 max_queue_delay_ms: float = 2.0, max_batch_beams: int = 16_384, max_queue_size: int = 256,
                 request_timeout_s: float = 30.0, metrics: ServiceMetrics | None = None) -> None:
        self.engine = engine
        self.batching = batching
        self.max_batch_size = max_batch_size
        self.delay_s = max_queue_delay_ms / 1000.0
        self.max_batch_beams = max_batch_beams
        self.max_queue_size = max_queue_size
        self.timeout_s = request_timeout_s
        self.metrics = metrics
        # Unbounded: admission is decided by `_waiting`, the number of queued jobs still wanted.
        # A job abandoned in the queue (deadline passed, client gone) stops counting at once, so
        # it cannot keep a slot and turn the next request away with a 429.
        self._queue: asyncio.Queue[Job] | None = None
        self._waiting = 0
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._entry_s = 0.01  # EWMA of engine seconds per request, for Retry-After
        self._last_arrival = 0.0
        self._gap_s = 1.0  # EWMA of the time between arrivals

    @classmethod
    def from_settings(cls, engine: Any, settings: Any, metrics: ServiceMetrics | None = None) -> "DynamicBatcher":
        return cls(engine, batching=settings.batching, max_batch_size=settings.max_batch_size,
                   max_queue_delay_ms=settings.max_queue_delay_ms, max_batch_beams=settings.max_batch_beams,
                   max_queue_size=settings.max_queue_size, request_timeout_s=settings.request_timeout_s,
                   metrics=metrics)

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._waiting = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sidrec-engine")
        self._task = asyncio.create_task(self._collect(), name="sidrec-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue is not None and not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(BatcherClosed("the service is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._task = self._executor = None

    async def run_exclusive(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine thread, between batches (warm-up, masking)."""
        if self._executor is None:
            raise BatcherClosed("the batcher is not running")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    # --- submission ---------------------------------------------------------------------------

    async def recommend(self, entries: Sequence[RecommendEntry]) -> list[RecommendOutput]:
        if self.metrics is not None:
            for e in entries:
                self.metrics.beams.observe(e.beam_width)
        return await self._submit("recommend", list(entries))

    async def score(self, entries: Sequence[ScoreEntry]) -> list[list[float]]:
        return await self._submit("score", list(entries))

    def retry_after_s(self) -> int:
        return max(1, math.ceil(self._waiting * self._entry_s))

    async def _submit(self, kind: str, entries: list[Any]) -> list[Any]:
        if self._queue is None or self._task is None:
            raise BatcherClosed("the batcher is not running")
        now = time.monotonic()
        job = Job(kind, entries, asyncio.get_running_loop().create_future(), now, now + self.timeout_s)
        if self._waiting >= self.max_queue_size:
            if self.metrics is not None:
                self.metrics.rejected.labels("queue_full").inc()
            raise QueueFull(self.retry_after_s())
        self._queue.put_nowait(job)
        self._waiting += 1
        self._gap_s = 0.5 * self._gap_s + 0.5 * min(now - self._last_arrival, 1.0)
        self._last_arrival = now
        self._gauge()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout=self.timeout_s)
        except asyncio.TimeoutError:
            job.future.cancel()  # the worker skips it if not started yet
            self._unqueue(job)
            if self.metrics is not None:
                self.metrics.rejected.labels("deadline").inc()
            raise DeadlineExceeded(f"no answer within {self.timeout_s:g} s") from None
        except asyncio.CancelledError:
            job.future.cancel()  # client went away
            self._unqueue(job)
            raise

    def _unqueue(self, job: Job) -> None:
        """The job no longer counts as queued (taken by the collector, or abandoned)."""
        if job.waiting:
            job.waiting = False
            self._waiting -= 1
            self._gauge()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._waiting)

    # --- collector (event loop) ---------------------------------------------------------------

    async def _collect(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            job = await self._queue.get()
            self._unqueue(job)
            group, n = [job], len(job.entries)
            if self.batching:
                # Waiting for company only pays when requests arrive closer together than the
                # delay; a lone client (gaps of a whole decode) would just lose the delay.
                patient = self._gap_s < 2 * self.delay_s
                # The delay runs from now, when the engine is free for this group, not from the
                # oldest request's arrival: under load the oldest has queued through a whole
                # decode, and the clients just answered come back within the delay. Waiting for
                # them makes one full batch instead of two half batches taking turns, which costs
                # every request a second decode (the engine's cost per request falls with size).
                until = time.monotonic() + self.delay_s
                while n < self.max_batch_size:
                    try:
                        nxt = self._queue.get_nowait()
                    except asyncio.QueueEmpty:
                        wait = until - time.monotonic()
                        if wait <= 0 or not patient:
                            break
                        try:
                            nxt = await asyncio.wait_for(self._queue.get(), wait)
                        except asyncio.TimeoutError:
                            break
                    self._unqueue(nxt)
                    if not nxt.future.done():  # abandoned jobs take no room in the batch
                        group.append(nxt)
                        n += len(nxt.entries)
            self._gauge()
            live = [j for j in group if not j.future.done()]
            if not live:
                continue
            try:
                await loop.run_in_executor(self._executor, self._run_group, live)
            except Exception:  # the worker reports per job; this guards the loop itself
                log.exception("batcher group failed")

    # --- worker thread ------------------------------------------------------------------------

    def _deliver(self, job: Job, exc: BaseException | None = None) -> None:
        def settle() -> None:
            if job.future.done():
                return
            if exc is not None:
                job.future.set_exception(exc)
            else:
                job.future.set_result(job.results)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(settle)

    def _run_group(self, jobs: list[Job]) -> None:
        start = time.monotonic()
        now = start
        for j in jobs:
            if self.metrics is not None:
                self.metrics.queue_time.observe(start - j.enqueued)
        units = [jobs] if self.batching else [[j] for j in jobs]
        for unit in units:
            for kind, run in (("recommend", self._run_recommend), ("score", self._run_score)):
                items = [(j, i, e) for j in unit if j.kind == kind and not j.future.done() and j.deadline > now
                         for i, e in enumerate(j.entries)]
                if items:
                    run(items)
            now = time.monotonic()
        for j in jobs:
            if all(r is not None for r in j.results):
                self._deliver(j)
        n = sum(len(j.entries) for j in jobs)
        if n:
            self._entry_s = 0.8 * self._entry_s + 0.2 * (time.monotonic() - start) / n

    def _chunks_recommend(self, items: list[tuple[Job, int, RecommendEntry]]) -> list[list]:
        items = sorted(items, key=lambda t: t[2].beam_width)
        chunks, cur = [], []
        for it in items:
            w, tn = it[2].beam_width, it[2].top_n
            if cur:
                min_w = cur[0][2].beam_width  # sorted: first is the narrowest
                max_tn = max(max(c[2].top_n for c in cur), tn)
                if (len(cur) + 1 > self.max_batch_size or (len(cur) + 1) * w > self.max_batch_beams
                        or max_tn > min_w):
                    chunks.append(cur)
                    cur = []
            cur.append(it)
        if cur:
            chunks.append(cur)
        return chunks

    def _observe_call(self, kind: str, size: int, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.engine_calls.labels(kind).inc()
            self.metrics.batch_size.labels(kind).observe(size)
            self.metrics.engine_time.labels(kind).observe(seconds)

    def _run_recommend(self, items: list[tuple[Job, int, RecommendEntry]]) -> None:
        for chunk in self._chunks_recommend(items):
            entries = [e for _, _, e in chunk]
            top = max(e.top_n for e in entries)
            t0 = time.monotonic()
            try:
                filt = ({"filters": [e.filters for e in entries]} if any(e.filters for e in entries) else {})
                res = self.engine.recommend([e.history for e in entries], [e.beam_width for e in entries], top,
                                            exclude=[e.exclude for e in entries], **filt)
            except Exception as exc:
                log.exception("engine.recommend failed on a batch of %d", len(entries))
                for j in {id(j): j for j, _, _ in chunk}.values():
                    self._deliver(j, exc)
                continue
            self._observe_call("recommend", len(entries), time.monotonic() - t0)
            items_l, sids_l, scores_l, n_valid = (res.items.tolist(), res.sids.tolist(), res.scores.tolist(),
                                                  res.n_valid.tolist())
            for b, (job, i, e) in enumerate(chunk):
                k = min(e.top_n, int(n_valid[b]))
                job.results[i] = RecommendOutput(items_l[b][:k], sids_l[b][:k], scores_l[b][:k])

    def _run_score(self, items: list[tuple[Job, int, ScoreEntry]]) -> None:
        chunks, cur = [], []
        for it in items:
            m = max(len(it[2].candidates), 1)
            if cur and (len(cur) + 1 > self.max_batch_size
                        or (len(cur) + 1) * max(m, *(len(c[2].candidates) for c in cur)) > self.max_batch_beams):
                chunks.append(cur)
                cur = []
            cur.append(it)
        if cur:
            chunks.append(cur)
        for chunk in chunks:
            t0 = time.monotonic()
            try:
                out = self.engine.score([e.history for _, _, e in chunk], [e.candidates for _, _, e in chunk])
            except Exception as exc:
                log.exception("engine.score failed on a batch of %d", len(chunk))
                for j in {id(j): j for j, _, _ in chunk}.values():
                    self._deliver(j, exc)
                continue
            self._observe_call("score", len(chunk), time.monotonic() - t0)
            rows = out.tolist()
            for b, (job, i, e) in enumerate(chunk):
                job.results[i] = rows[b][: len(e.candidates)]
