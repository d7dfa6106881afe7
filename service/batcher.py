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

Admission counts work, not jobs: each job weighs the beams (or scored candidates) of its users,
with a floor per user (`service.jobs`). The queue admits a job while the work waiting stays
within `max_queue_work` (and the jobs within `max_queue_size`); a job heavier than the whole
budget (64 users at beam 1,024 = 65,536 against the default 25,600) is admitted only into an
empty queue, and only while no other such job is in progress.

Two lanes share the engine. Each round (one trip of the worker thread) runs at most
`max_group_work` units. A job that fits in one round is foreground: it runs in the next round,
whole, in arrival order. A job with more work than a round holds is background: it runs in slices
over successive rounds, and a slice takes only what the round's foreground jobs leave, or a round
of its own when no foreground job waits. So interactive requests never share a round with a heavy
job's slice; one that arrives while a slice runs waits for that slice at most. Under sustained
overload a background job waits for a lull (its deadline still holds: 504), and new ones are
refused while it does. A refused job raises `QueueFull` (-> 429) with Retry-After = (work queued +
the round in flight) / the engine's measured rate in work units per second.

A request past its deadline raises `DeadlineExceeded` (-> 504) and is skipped if not yet started.
When an engine call raises, only the request that caused it fails: the call's jobs are split in
halves and retried until the offending job stands alone (log2(jobs) extra calls), and the others
get their answers. An unavailable engine (`EngineUnavailable`: hung, dead, restarting) is nobody's
fault and fails the whole call at once, without retries. This module imports no web framework;
`service.runtime` maps its exceptions to HTTP.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from sidrec.service.engine_proc import EngineUnavailable
from sidrec.service.jobs import (BatcherClosed, DeadlineExceeded, Job, QueueFull, RecommendEntry, RecommendOutput,
                                 ScoreEntry)
from sidrec.service.metrics import ServiceMetrics

log = logging.getLogger("sidrec.batcher")

class DynamicBatcher:
    def __init__(self, engine: Any, *, batching: bool = True, max_batch_size: int = 32,
                 max_queue_delay_ms: float = 2.0, max_batch_beams: int = 16_384, max_queue_size: int = 256,
                 max_queue_work: int | None = None, max_group_work: int | None = None,
                 request_timeout_s: float = 30.0, metrics: ServiceMetrics | None = None) -> None:
        self.engine = engine
        self.batching = batching
        self.max_batch_size = max_batch_size
        self.delay_s = max_queue_delay_ms / 1000.0
        self.max_batch_beams = max_batch_beams
        self.max_queue_size = max_queue_size
        # None: as much work as max_queue_size requests at the default beam width (100).
        self.max_queue_work = max_queue_work if max_queue_work is not None else max_queue_size * 100
        # None: a full batch at the default beam width; a round always runs >= 1 user per job.
        self.max_group_work = max_group_work if max_group_work is not None else max_batch_size * 100
        if min(self.max_queue_work, self.max_group_work) < 1:
            raise ValueError(f"max_queue_work and max_group_work must be >= 1, got {self.max_queue_work}, "
                             f"{self.max_group_work}")
        self.timeout_s = request_timeout_s
        self.metrics = metrics
        # Unbounded: admission is decided by `_waiting` / `_waiting_work`, the queued jobs still
        # wanted and their work. A job abandoned in the queue (deadline passed, client gone)
        # stops counting at once, so it cannot keep a slot and turn the next request away with a 429.
        self._queue: asyncio.Queue[Job] | None = None
        self._waiting = 0
        self._waiting_work = 0
        self._running_work = 0  # work left in the jobs taken from the queue (this round and carried)
        self._carry: list[Job] = []  # background jobs with entries left after a round
        self._oversize = 0  # jobs heavier than max_queue_work admitted and not yet finished
        self._unit_s = 1e-4  # EWMA of engine seconds per work unit, for Retry-After
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_arrival = 0.0
        self._gap_s = 1.0  # EWMA of the time between arrivals

    @classmethod
    def from_settings(cls, engine: Any, settings: Any, metrics: ServiceMetrics | None = None) -> "DynamicBatcher":
        return cls(engine, batching=settings.batching, max_batch_size=settings.max_batch_size,
                   max_queue_delay_ms=settings.max_queue_delay_ms, max_batch_beams=settings.max_batch_beams,
                   max_queue_size=settings.max_queue_size,
                   max_queue_work=settings.max_queue_work or settings.max_queue_size * settings.default_beam_width,
                   max_group_work=max(settings.max_batch_size * settings.default_beam_width, settings.max_beam_width),
                   request_timeout_s=settings.request_timeout_s, metrics=metrics)

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._waiting = self._waiting_work = self._running_work = self._oversize = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sidrec-engine")
        self._task = asyncio.create_task(self._collect(), name="sidrec-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        left, self._carry = self._carry, []
        while self._queue is not None and not self._queue.empty():
            left.append(self._queue.get_nowait())
        for job in left:
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
        """Seconds until the work queued now and the round running are done, at the measured rate
        (a background job's later slices do not hold new requests back: they yield to them)."""
        ahead = self._waiting_work + min(self._running_work, self.max_group_work)
        return max(1, math.ceil(ahead * self._unit_s))

    def _admit(self, work: int) -> str | None:
        """None if a job of this much work may queue, else why not."""
        if self._waiting >= self.max_queue_size:
            return f"the request queue is full ({self._waiting} requests waiting)"
        if self._waiting_work and self._waiting_work + work > self.max_queue_work:
            return (f"the queued work is at capacity ({self._waiting_work} of {self.max_queue_work} beam units "
                    f"waiting; this request weighs {work})")
        if work > self.max_queue_work and self._oversize:
            return (f"this request weighs {work} beam units, more than the queue's {self.max_queue_work}; "
                    f"such requests run one at a time, and one is in progress")
        return None

    def check_admission(self, work: int) -> None:
        """Raise `QueueFull` now if a job of `work` units would be refused, so a caller can refuse
        a heavy request before preparing it (mapping 64 histories of 512 ids costs CPU the engine
        needs under overload). `_submit` decides again: this is a fast path, not a reservation."""
        refused = self._admit(work)
        if refused is not None:
            if self.metrics is not None:
                self.metrics.rejected.labels("queue_full").inc()
            raise QueueFull(self.retry_after_s(), refused)

    async def _submit(self, kind: str, entries: list[Any]) -> list[Any]:
        if self._queue is None or self._task is None:
            raise BatcherClosed("the batcher is not running")
        now = time.monotonic()
        job = Job(kind, entries, asyncio.get_running_loop().create_future(), now, now + self.timeout_s)
        job.background = job.work > self.max_group_work
        self.check_admission(job.work)
        if job.work > self.max_queue_work:
            self._oversize += 1
            job.future.add_done_callback(self._oversize_done)
        self._queue.put_nowait(job)
        self._waiting += 1
        self._waiting_work += job.work
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

    def _oversize_done(self, _: asyncio.Future) -> None:
        self._oversize = max(0, self._oversize - 1)  # a restart (start) may have reset it already

    def _unqueue(self, job: Job) -> None:
        """The job no longer counts as queued (taken by the collector, or abandoned)."""
        if job.waiting:
            job.waiting = False
            self._waiting -= 1
            self._waiting_work -= job.work
            self._gauge()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._waiting)
            self.metrics.queue_work.set(self._waiting_work)

    # --- collector (event loop) ---------------------------------------------------------------

    async def _collect(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            group, self._carry = self._carry, []  # background jobs with slices left
            job: Job | None = None
            if not group:
                job = await self._queue.get()
            elif not self._queue.empty():
                job = self._queue.get_nowait()
            if job is not None:
                self._unqueue(job)
                group.append(job)
            # Background jobs take what foreground requests leave, so they do not fill the batch.
            n = sum(len(j.entries) for j in group if not j.background)
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
            self._running_work = sum(j.work_left for j in live)
            try:
                self._carry = await loop.run_in_executor(self._executor, self._run_group, live)
            except Exception:  # the worker reports per job; this guards the loop itself
                log.exception("batcher group failed")
            finally:
                self._running_work = sum(j.work_left for j in self._carry)

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

    def _slices(self, jobs: list[Job]) -> dict[int, tuple[int, int]]:
        """This round's entries [lo, hi) of each job, within max_group_work: foreground jobs whole,
        in arrival order (each fits a round); then background slices from what is left. A
        background job gets a slice of at least one entry only in a round without foreground work,
        so a heavy user never rides along with interactive requests."""
        budget, out = self.max_group_work, {}
        foreground = any(not j.background for j in jobs)
        for j in sorted(jobs, key=lambda j: j.background):  # stable: arrival order within each lane
            lo = hi = j.cursor
            while hi < len(j.entries) and (j.weights[hi] <= budget or (hi == lo and not foreground)):
                budget -= j.weights[hi]
                hi += 1
            out[id(j)] = (lo, hi)
            foreground = foreground or hi > lo  # one background job per empty round moves first
        return out

    def _run_group(self, jobs: list[Job]) -> list[Job]:
        """One round: each job's next slice. Returns the jobs with entries left, for the next round."""
        start = time.monotonic()
        now = start
        for j in jobs:
            if self.metrics is not None and j.cursor == 0:
                self.metrics.queue_time.observe(start - j.enqueued)
        slices = self._slices(jobs)
        units = [jobs] if self.batching else [[j] for j in jobs]
        for unit in units:
            for kind, run in (("recommend", self._run_recommend), ("score", self._run_score)):
                items = [(j, i, j.entries[i]) for j in unit if j.kind == kind and not j.future.done()
                         and j.deadline > now and not j.failed for i in range(*slices[id(j)])]
                if items:
                    run(items)
            now = time.monotonic()
        work, left = 0, []
        for j in jobs:
            lo, j.cursor = slices[id(j)]
            work += sum(j.weights[lo:j.cursor])
            if j.failed or j.future.done():
                continue
            if j.cursor < len(j.entries):
                left.append(j)
            elif all(r is not None for r in j.results):
                self._deliver(j)
        if work:
            self._unit_s = 0.8 * self._unit_s + 0.2 * (time.monotonic() - start) / work
        return left

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

    def _isolate(self, kind: str, chunk: list, call: Callable[[list], Any], store: Callable[[list, Any], None]) -> None:
        """Run one engine call on `chunk` ((job, index, entry) triples). If it raises, retry the
        chunk's jobs in halves until the offending job stands alone; only that job fails. An
        unavailable engine fails every job at once (retrying cannot help, and it is no job's fault)."""
        t0 = time.monotonic()
        try:
            out = call([e for _, _, e in chunk])
        except EngineUnavailable as exc:
            for j in {id(j): j for j, _, _ in chunk}.values():
                j.failed = True
                self._deliver(j, exc)
            return
        except Exception as exc:
            jobs = list({id(j): j for j, _, _ in chunk}.values())
            if len(jobs) == 1:
                log.warning("engine.%s failed on one request (%d users): %s: %s", kind, len(chunk),
                            type(exc).__name__, exc)
                jobs[0].failed = True
                self._deliver(jobs[0], exc)
                return
            log.warning("engine.%s failed on a call of %d requests; retrying in halves to find the cause",
                        kind, len(jobs))
            first = {id(j) for j in jobs[: len(jobs) // 2]}
            self._isolate(kind, [t for t in chunk if id(t[0]) in first], call, store)
            self._isolate(kind, [t for t in chunk if id(t[0]) not in first], call, store)
            return
        self._observe_call(kind, len(chunk), time.monotonic() - t0)
        store(chunk, out)

    def _run_recommend(self, items: list[tuple[Job, int, RecommendEntry]]) -> None:
        def call(entries: list[RecommendEntry]) -> Any:
            # filters ride along only when a request has one (the engine's cheap path otherwise)
            filt = {"filters": [e.filters for e in entries]} if any(e.filters for e in entries) else {}
            return self.engine.recommend([e.history for e in entries], [e.beam_width for e in entries],
                                         max(e.top_n for e in entries), exclude=[e.exclude for e in entries], **filt)

        def store(chunk: list, res: Any) -> None:
            items_l, sids_l, scores_l, n_valid = (res.items.tolist(), res.sids.tolist(), res.scores.tolist(),
                                                  res.n_valid.tolist())
            for b, (job, i, e) in enumerate(chunk):
                k = min(e.top_n, int(n_valid[b]))
                job.results[i] = RecommendOutput(items_l[b][:k], sids_l[b][:k], scores_l[b][:k])

        for chunk in self._chunks_recommend(items):
            self._isolate("recommend", chunk, call, store)

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

        def call(entries: list[ScoreEntry]) -> Any:
            return self.engine.score([e.history for e in entries], [e.candidates for e in entries])

        def store(chunk: list, out: Any) -> None:
            rows = out.tolist()
            for b, (job, i, e) in enumerate(chunk):
                job.results[i] = rows[b][: len(e.candidates)]

        for chunk in chunks:
            self._isolate("score", chunk, call, store)
