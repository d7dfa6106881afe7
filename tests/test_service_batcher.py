"""Dynamic batching: fewer engine calls than requests, and the same answers as one by one."""
from __future__ import annotations

import asyncio
import random

from service_fixtures import bundle_dir, run, running_app, same_ranking, settings_for  # noqa: F401

from sidrec.service.batcher import DynamicBatcher
from sidrec.service.jobs import RecommendEntry


class CountingEngine:
    """Wraps the real engine and records the batch size of every call."""

    def __init__(self, engine) -> None:
        self.engine, self.calls = engine, []

    def recommend(self, histories, beam_width, top_n, exclude=None):
        self.calls.append(("recommend", len(histories), list(beam_width) if not isinstance(beam_width, int)
                           else beam_width, top_n))
        return self.engine.recommend(histories, beam_width, top_n, exclude=exclude)

    def score(self, histories, candidates):
        self.calls.append(("score", len(histories), None, None))
        return self.engine.score(histories, candidates)


def _requests(n: int, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        top = rnd.choice([1, 3, 5])
        out.append({"history": [f"item{rnd.randrange(300)}" for _ in range(rnd.randint(1, 25))], "top_n": top,
                    "beam_width": rnd.choice([top, 8, 16, 40]), "exclude_history": rnd.random() < 0.7})
    return out


def test_concurrent_requests_are_batched_and_match_one_by_one(bundle_dir):
    reqs = _requests(24)

    async def scenario():
        s = settings_for(bundle_dir, max_queue_delay_ms=50.0, max_batch_size=16, warmup=False)
        async with running_app(s) as (app, c):
            rt = app.state.runtime
            counter = CountingEngine(rt.engine)
            rt.batcher.engine = counter
            together = await asyncio.gather(*[c.post("/v1/recommend", json=r) for r in reqs])
            calls_together = len(counter.calls)
            alone = [await c.post("/v1/recommend", json=r) for r in reqs]
            sizes = [n for _, n, _, _ in counter.calls[:calls_together]]
            metric_calls = app.state.metrics.value("sidrec_engine_calls_total", {"kind": "recommend"})
            return together, alone, calls_together, sizes, metric_calls

    together, alone, n_calls, sizes, metric_calls = run(scenario())
    assert all(r.status_code == 200 for r in together + alone)
    assert n_calls < len(reqs) and max(sizes) > 1 and sum(sizes) == len(reqs), sizes
    assert max(sizes) <= 16
    assert metric_calls == n_calls + len(reqs)
    for r, a, b in zip(reqs, together, alone):
        ja, jb = a.json(), b.json()
        assert 1 <= len(ja["items"]) <= r["top_n"]  # narrow beams can run out of non-excluded items
        assert same_ranking(ja["items"], jb["items"]), (r, ja["items"], jb["items"])


def test_batching_off_runs_each_request_alone(bundle_dir):
    reqs = _requests(6, seed=1)

    async def scenario():
        async with running_app(settings_for(bundle_dir, batching=False, warmup=False)) as (app, c):
            counter = CountingEngine(app.state.runtime.engine)
            app.state.runtime.batcher.engine = counter
            rs = await asyncio.gather(*[c.post("/v1/recommend", json=r) for r in reqs])
            return rs, counter.calls

    rs, calls = run(scenario())
    assert all(r.status_code == 200 for r in rs)
    assert len(calls) == len(reqs) and all(n == 1 for _, n, _, _ in calls)


def test_batch_endpoint_runs_as_engine_batches(bundle_dir):
    reqs = _requests(10, seed=2)

    async def scenario():
        async with running_app(settings_for(bundle_dir, batching=False, max_batch_size=4, warmup=False)) as (app, c):
            counter = CountingEngine(app.state.runtime.engine)
            app.state.runtime.batcher.engine = counter
            r = await c.post("/v1/recommend/batch", json={"requests": reqs})
            singles = [await c.post("/v1/recommend", json=q) for q in reqs]
            return r, singles, counter.calls

    r, singles, calls = run(scenario())
    assert r.status_code == 200, r.text
    batch_calls = calls[: len(calls) - len(reqs)]
    assert len(batch_calls) < len(reqs) and all(n <= 4 for _, n, _, _ in batch_calls)
    for got, single in zip(r.json()["results"], singles):
        assert same_ranking(got["items"], single.json()["items"])


def test_chunking_respects_width_topn_and_beam_budget():
    b = DynamicBatcher(engine=None, max_batch_size=3, max_batch_beams=100)
    entries = [RecommendEntry([1], w, t) for w, t in [(10, 10), (40, 2), (10, 1), (20, 5), (30, 3), (5, 5), (50, 1)]]
    items = [(None, i, e) for i, e in enumerate(entries)]
    chunks = b._chunks_recommend(items)
    assert sorted(i for ch in chunks for _, i, _ in ch) == list(range(len(entries)))
    for ch in chunks:
        ws = [e.beam_width for _, _, e in ch]
        assert len(ch) <= 3 and len(ch) * max(ws) <= 100 or len(ch) == 1
        assert max(e.top_n for _, _, e in ch) <= min(ws)


def test_score_requests_batch_together(bundle_dir):
    async def scenario():
        async with running_app(settings_for(bundle_dir, max_queue_delay_ms=50.0, warmup=False)) as (app, c):
            counter = CountingEngine(app.state.runtime.engine)
            app.state.runtime.batcher.engine = counter
            body = [{"history": [f"item{i}"], "candidates": [f"item{i + 1}", f"item{i + 2}"]} for i in range(8)]
            together = await asyncio.gather(*[c.post("/v1/score", json=b) for b in body])
            n = len(counter.calls)
            alone = [await c.post("/v1/score", json=b) for b in body]
            return together, alone, n

    together, alone, n = run(scenario())
    assert n < 8
    for a, b in zip(together, alone):
        for x, y in zip(a.json()["scores"], b.json()["scores"]):
            assert abs(x["log_likelihood"] - y["log_likelihood"]) < 1e-4


def test_abandoned_job_frees_its_queue_slot_at_once():
    """A queued job whose deadline passed stops counting against max_queue_size right away, so
    the next request is admitted (not 429) even before the collector reaches the dead job."""
    import threading

    from sidrec.service.jobs import DeadlineExceeded, QueueFull

    release = threading.Event()

    class BlockedEngine:
        def recommend(self, histories, beam_width, top_n, exclude=None):
            return [([], [], []) for _ in histories]

    async def scenario():
        b = DynamicBatcher(BlockedEngine(), max_queue_size=1, max_queue_delay_ms=0.0, request_timeout_s=0.2)
        b.start()
        blocker = asyncio.ensure_future(b.run_exclusive(release.wait))
        await asyncio.sleep(0.02)
        entry = RecommendEntry([1], 4, 2)
        first = asyncio.ensure_future(b.recommend([entry]))  # taken by the collector, waits on the engine
        await asyncio.sleep(0.02)
        second = asyncio.ensure_future(b.recommend([entry]))  # queued: the only slot
        await asyncio.sleep(0.02)
        try:
            await b.recommend([entry])
            full = False
        except QueueFull:
            full = True
        outcomes = await asyncio.gather(first, second, return_exceptions=True)  # both pass 0.2 s
        late = asyncio.ensure_future(b.recommend([entry]))  # the dead job still sits in the queue
        await asyncio.sleep(0.02)
        admitted = not late.done()
        release.set()
        await blocker
        try:
            await late
        except DeadlineExceeded:
            pass
        await b.stop()
        return full, outcomes, admitted

    full, outcomes, admitted = run(scenario())
    assert full, "the third request must find the queue full"
    assert all(isinstance(o, DeadlineExceeded) for o in outcomes)
    assert admitted, "a request after the timeouts must be queued, not turned away"


def test_queue_delay_runs_from_when_the_engine_is_free():
    """Requests that queued through a whole decode still wait up to max_queue_delay for company
    once the engine is free: a client answered a moment ago joins them in one call instead of
    starting a second, half-empty one."""
    import threading

    import torch

    from sidrec.model.beam_search import BeamResult

    release = threading.Event()

    class RecordingEngine:
        def __init__(self) -> None:
            self.sizes = []

        def recommend(self, histories, beam_width, top_n, exclude=None):
            n = len(histories)
            self.sizes.append(n)
            return BeamResult(torch.zeros(n, top_n, dtype=torch.long), torch.zeros(n, top_n, 3, dtype=torch.long),
                              torch.zeros(n, top_n), torch.full((n,), top_n))

    async def scenario():
        eng = RecordingEngine()
        b = DynamicBatcher(eng, max_queue_delay_ms=100.0, max_batch_size=32)
        b.start()
        blocker = asyncio.ensure_future(b.run_exclusive(release.wait))  # the engine is busy
        entry = RecommendEntry([1], 4, 2)
        first = [asyncio.ensure_future(b.recommend([entry])) for _ in range(4)]
        await asyncio.sleep(0.15)  # group 1 formed, waiting for the engine
        queued = [asyncio.ensure_future(b.recommend([entry])) for _ in range(4)]
        await asyncio.sleep(0.25)  # these have now waited longer than the delay
        release.set()
        await blocker
        await asyncio.gather(*first)
        await asyncio.sleep(0.02)  # a client answered just now sends its next request
        late = asyncio.ensure_future(b.recommend([entry]))
        await asyncio.gather(*queued, late)
        await b.stop()
        return eng.sizes

    assert run(scenario()) == [4, 5]
