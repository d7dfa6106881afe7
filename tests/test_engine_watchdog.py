"""The engine cannot hang the service unseen; admission weighs work; an engine error fails one request.

- A real EngineProcess on the small test bundle is stopped (SIGSTOP) under concurrent requests,
  stopped while idle, or killed (SIGKILL): its requests get 503 engine_unavailable with
  Retry-After (not a 504 after the 30 s deadline), /readyz drops, /healthz stays up, the engine
  comes back on its own (a new pid) and later requests get the answers they got before.
- Call ids: a stale reply waiting on the pipe is never delivered to the next call; a call with no
  reply within its bound kills the child and later calls fail fast.
- Admission by work: a heavy batch is refused (429 + Retry-After) while light requests still get
  in, and runs alone once the queue is empty.
- One poisoned request in a batched engine call fails alone; an unavailable engine is not retried.
"""
from __future__ import annotations

import asyncio
import math
import os
import signal
import threading
import time

import pytest
import torch
from service_fixtures import bundle_dir, run, running_app, same_ranking, settings_for  # noqa: F401

from sidrec.model.beam_search import BeamResult
from sidrec.model.bundle import read_config
from sidrec.service.batcher import DynamicBatcher
from sidrec.service.jobs import QueueFull, RecommendEntry, job_work
from sidrec.service.engine_proc import (BundleInfo, EngineHung, EngineProcess, EngineUnavailable, HangPolicy,
                                        call_work)

HISTORIES = [["item3", "item8"], ["item21"], ["item40", "item41", "item42"], ["item77", "item5"],
             ["item100"], ["item150", "item151"]]


def _req(h: list[str]) -> dict:
    return {"history": h, "top_n": 5, "beam_width": 16}


def assert_error(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    return body["error"]


# --- a real engine process, stopped or killed ------------------------------------------------------


async def _poll(c, seen: dict, stop: asyncio.Event) -> None:
    while not stop.is_set():
        for path in ("/readyz", "/healthz"):
            seen.setdefault(path, set()).add((await c.get(path)).status_code)
        await asyncio.sleep(0.1)


async def _wait_ready(c, limit_s: float = 60.0) -> None:
    end = time.monotonic() + limit_s
    while (await c.get("/readyz")).status_code != 200:
        assert time.monotonic() < end, "the engine did not come back"
        await asyncio.sleep(0.1)


PHASES = [(signal.SIGSTOP, True), (signal.SIGSTOP, False), (signal.SIGKILL, True)]


async def _fault_phase(app, c, before: list[dict], sig: int, under_load: bool) -> dict:
    """Stop or kill the engine child (with requests in flight, or idle), wait for its restart."""
    rt = app.state.runtime
    old_pid = rt.engine.pid
    seen: dict = {}
    stop = asyncio.Event()
    poller = asyncio.ensure_future(_poll(c, seen, stop))
    os.kill(old_pid, sig)
    if under_load:  # these are in the queue or on the engine when it stops answering
        failed = await asyncio.gather(*[c.post("/v1/recommend", json=_req(h)) for h in HISTORIES])
    else:  # nothing in flight: only the idle ping can notice
        end = time.monotonic() + 30
        while (await c.get("/readyz")).status_code == 200:
            assert time.monotonic() < end, "an idle stopped engine was never noticed"
            await asyncio.sleep(0.05)
        failed = [await c.post("/v1/recommend", json=_req(HISTORIES[0]))]
    await _wait_ready(c)
    stop.set()
    await poller
    after = await asyncio.gather(*[c.post("/v1/recommend", json=_req(h)) for h in HISTORIES])
    for r in failed:  # a clear 503 with Retry-After, never a 504 after the 30 s deadline
        assert_error(r, 503, "engine_unavailable")
        assert int(r.headers["retry-after"]) >= 1
    assert 503 in seen["/readyz"] and seen["/healthz"] == {200}, seen
    assert rt.engine.pid != old_pid
    with pytest.raises(ProcessLookupError):
        os.kill(old_pid, 0)
    # The restarted engine answers every history as before: no reply of a call that timed out
    # (other histories, other beams) reaches a later call.
    for a, b in zip(after, before):
        assert a.status_code == 200, a.text
        assert same_ranking(a.json()["items"], b["items"])
    return {"failed": len(failed)}


@pytest.mark.slow
def test_engine_faults_are_found_answered_503_and_restarted(bundle_dir):
    """SIGSTOP with requests in flight (the call's bound fires), SIGSTOP while idle (the ping
    fires), SIGKILL with requests in flight (the pipe closes): one app, three faults in a row."""
    s = settings_for(bundle_dir, engine_process=True, engine_hang_timeout_s=1.0, engine_ping_interval_s=0.2,
                     max_queue_delay_ms=20.0)

    async def scenario():
        async with running_app(s) as (app, c):
            metrics = app.state.metrics
            before = [(await c.post("/v1/recommend", json=_req(h))).json() for h in HISTORIES]
            n_failed = 0
            for n, (sig, under_load) in enumerate(PHASES, 1):
                n_failed += (await _fault_phase(app, c, before, sig, under_load))["failed"]
                assert metrics.value("sidrec_engine_restarts_total", {"outcome": "ok"}) == n
                assert metrics.value("sidrec_engine_up") == 1.0
                assert metrics.value("sidrec_engine_failed_requests_total") == n_failed
            return {k: metrics.value("sidrec_engine_faults_total", {"kind": k}) for k in ("hung", "dead")}

    assert run(scenario()) == {"hung": 2.0, "dead": 1.0}


@pytest.mark.slow
def test_liveness_fails_only_while_restarts_keep_failing(bundle_dir, tmp_path):
    """The bundle vanishes, then the engine dies: the restart fails, /healthz turns 503 (after
    engine_max_restart_failures=1 failure); the bundle comes back, the next try (1 s backoff)
    succeeds and both probes return to 200."""
    import shutil

    live = tmp_path / "bundle"
    shutil.copytree(bundle_dir, live)
    s = settings_for(live, engine_process=True, engine_ping_interval_s=0.2, engine_max_restart_failures=1,
                     warmup=False)

    async def until(c, path: str, status: int, limit_s: float = 60.0) -> None:
        end = time.monotonic() + limit_s
        while (await c.get(path)).status_code != status:
            assert time.monotonic() < end, f"{path} never answered {status}"
            await asyncio.sleep(0.1)

    async def scenario():
        async with running_app(s) as (app, c):
            metrics = app.state.metrics
            live.rename(tmp_path / "gone")
            os.kill(app.state.runtime.engine.pid, signal.SIGKILL)
            await until(c, "/healthz", 503)
            health = (await c.get("/healthz")).json()
            ready = await c.get("/readyz")
            failed = metrics.value("sidrec_engine_restarts_total", {"outcome": "failed"})
            (tmp_path / "gone").rename(live)
            await until(c, "/healthz", 200)
            await until(c, "/readyz", 200)
            r = await c.post("/v1/recommend", json=_req(HISTORIES[0]))
            return health, ready, failed, r, metrics.value("sidrec_engine_restarts_total", {"outcome": "ok"})

    health, ready, failed, r, ok = run(scenario())
    assert health["error"]["code"] == "engine_unavailable" and ready.status_code == 503
    assert failed >= 1 and ok == 1
    assert r.status_code == 200, r.text


# --- the pipe protocol ------------------------------------------------------------------------------


class _FakeProc:
    pid = 4242
    exitcode = None

    def __init__(self) -> None:
        self.killed = False

    def is_alive(self) -> bool:
        return not self.killed

    def kill(self) -> None:
        self.killed = True

    def join(self, timeout=None) -> None:
        pass


def _fake_engine(bundle_dir, policy: HangPolicy):
    import multiprocessing as mp

    parent, child = mp.Pipe()
    cfg = read_config(bundle_dir)
    info = BundleInfo(cfg, {}, torch.zeros(4, 3, dtype=torch.long), ["a", "b", "c"])
    proc = _FakeProc()
    return EngineProcess(proc, parent, info, str(bundle_dir), None, policy), child, proc


def test_stale_reply_is_never_delivered_to_another_call(bundle_dir):
    eng, child, proc = _fake_engine(bundle_dir, HangPolicy(timeout_s=5.0))

    def fake_child():
        call_id, method, args, _ = child.recv()
        child.send((call_id - 1, "ok", "reply to an older call"))  # a late reply to a timed-out call
        child.send((call_id, "ok", ("mine", args)))

    t = threading.Thread(target=fake_child)
    t.start()
    assert eng.score([[1]], [[2]]) == ("mine", ([[1]], [[2]]))
    t.join()
    assert eng.healthy and not proc.killed


def test_call_past_its_bound_kills_the_child_and_later_calls_fail_fast(bundle_dir):
    eng, child, proc = _fake_engine(bundle_dir, HangPolicy(timeout_s=0.2, slack=1.0))
    faults = []
    eng.on_broken = faults.append
    with pytest.raises(EngineHung):
        eng.recommend([[1], [2]], 4, 2)  # nobody answers
    assert child.recv()[1] == "recommend"
    assert not eng.healthy and proc.killed and faults == ["hung"]
    with pytest.raises(EngineUnavailable):
        eng.recommend([[1]], 4, 2)
    assert not child.poll(0.05), "a call on a broken engine must not reach the pipe"
    assert eng.ping_if_idle() is False


def test_call_bound_grows_with_work(bundle_dir):
    assert call_work("recommend", ([[1], [2], [3]], 100, 5), {}) == 300
    assert call_work("recommend", ([[1], [2]], [8, 1024], 5), {}) == 1032
    assert call_work("score", ([[1], [2]], [[1, 2, 3], []]), {}) == 4
    assert call_work("set_masked", (["a"], True), {}) == 0


# --- admission by work ------------------------------------------------------------------------------


def test_job_work_counts_beams_with_a_floor_per_user():
    assert job_work("recommend", [RecommendEntry([1], 1024, 10)] * 64) == 65_536
    assert job_work("recommend", [RecommendEntry([1], 1, 1)] * 3) == 48
    assert DynamicBatcher(None, max_queue_size=4).max_queue_work == 400


def test_heavy_batch_is_refused_by_weight_while_light_requests_pass(bundle_dir):
    release = threading.Event()
    light = {"history": ["item1"], "top_n": 2, "beam_width": 8}  # weighs 16
    heavy = {"requests": [{"history": [f"item{i}"], "top_n": 2, "beam_width": 64} for i in range(8)]}  # 512

    async def scenario():
        s = settings_for(bundle_dir, max_queue_work=100, max_queue_size=50, max_queue_delay_ms=0.0, warmup=False)
        async with running_app(s) as (app, c):
            b = app.state.runtime.batcher
            blocker = asyncio.ensure_future(b.run_exclusive(release.wait))
            await asyncio.sleep(0.02)
            first = asyncio.ensure_future(c.post("/v1/recommend", json=light))  # taken, waits on the engine
            await asyncio.sleep(0.05)
            queued = [asyncio.ensure_future(c.post("/v1/recommend", json=light)) for _ in range(3)]
            await asyncio.sleep(0.05)
            refused = await c.post("/v1/recommend/batch", json=heavy)
            queued.append(asyncio.ensure_future(c.post("/v1/recommend", json=light)))  # 64 of 100: still in
            await asyncio.sleep(0.05)
            work_waiting = app.state.metrics.value("sidrec_queue_work")
            release.set()
            await blocker
            rs = await asyncio.gather(first, *queued)
            alone = await c.post("/v1/recommend/batch", json=heavy)  # heavier than the budget: runs alone
            return refused, rs, alone, work_waiting

    refused, rs, alone, work_waiting = run(scenario())
    err = assert_error(refused, 429, "queue_full")
    assert int(refused.headers["retry-after"]) >= 1 and err["details"]["retry_after_s"] >= 1
    assert "this request weighs 512" in err["message"], err
    assert work_waiting == 64
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    assert alone.status_code == 200 and len(alone.json()["results"]) == 8


async def _refusal(submission) -> QueueFull | None:
    """The QueueFull a submission raised, or None when it was admitted (and answered)."""
    try:
        await submission
    except QueueFull as e:
        return e
    return None


def test_retry_after_follows_queued_work_and_measured_rate():
    class SlowEngine:
        def recommend(self, histories, beam_width, top_n, exclude=None):
            time.sleep(0.05)
            n = len(histories)
            return BeamResult(torch.zeros(n, top_n, dtype=torch.long), torch.zeros(n, top_n, 4, dtype=torch.long),
                              torch.zeros(n, top_n), torch.full((n,), top_n))

    release = threading.Event()

    async def scenario():
        # One job per engine call, so the collector holds one job and three wait in the queue.
        b = DynamicBatcher(SlowEngine(), max_queue_size=100, max_queue_work=8_000, max_queue_delay_ms=0.0,
                           max_batch_size=1, max_group_work=2_000)
        b.start()
        await b.recommend([RecommendEntry([1], 100, 2)])  # 0.05 s for 100 units: rate ~2,000 units/s
        await b.recommend([RecommendEntry([1], 100, 2)])
        blocker = asyncio.ensure_future(b.run_exclusive(release.wait))
        await asyncio.sleep(0.02)
        jobs = [asyncio.ensure_future(b.recommend([RecommendEntry([1], 1000, 2)] * 2)) for _ in range(4)]
        await asyncio.sleep(0.05)
        unit_s = b._unit_s
        refused = await _refusal(b.recommend([RecommendEntry([1], 1000, 2)] * 3))
        release.set()
        await blocker
        await asyncio.gather(*jobs)
        await b.stop()
        return refused, unit_s

    refused, unit_s = run(scenario())
    assert refused is not None, "6,000 queued + 3,000 > 8,000 must be refused"
    # ceil((6,000 queued + 2,000 taken) / measured rate)
    assert refused.retry_after_s == max(1, math.ceil(8000 * unit_s)), (refused.retry_after_s, unit_s)
    assert refused.retry_after_s >= 2  # 8,000 units at <= 2,000 units/s


def test_heavy_job_runs_in_slices_interleaved_with_light_requests():
    class RecordingEngine:
        def __init__(self) -> None:
            self.calls: list[list[int]] = []

        def recommend(self, histories, beam_width, top_n, exclude=None):
            self.calls.append([h[0] for h in histories])
            time.sleep(0.02)
            n = len(histories)
            return BeamResult(torch.zeros(n, top_n, dtype=torch.long), torch.zeros(n, top_n, 4, dtype=torch.long),
                              torch.zeros(n, top_n), torch.full((n,), top_n))

    async def scenario():
        eng = RecordingEngine()
        b = DynamicBatcher(eng, max_batch_size=4, max_group_work=200, max_queue_delay_ms=0.0)
        b.start()
        heavy = asyncio.ensure_future(b.recommend([RecommendEntry([100 + i], 100, 2) for i in range(10)]))
        await asyncio.sleep(0.03)  # the first slice is on the engine
        light = await b.recommend([RecommendEntry([1], 4, 2)])
        heavy_done_first = heavy.done()
        out = await heavy
        await b.stop()
        return eng.calls, light, out, heavy_done_first

    calls, light, out, heavy_done_first = run(scenario())
    assert not heavy_done_first, "the light request must not wait for the whole heavy job"
    assert len(light) == 1 and len(out) == 10 and all(o is not None for o in out)
    heavy_calls = [c for c in calls if c != [1]]
    assert [x for c in heavy_calls for x in c if x != 1] == list(range(100, 110))  # every user once, in order
    assert max(len([x for x in c if x != 1]) for c in calls) <= 2  # 200 units per round = 2 users
    first_light = next(n for n, c in enumerate(calls) if 1 in c)
    assert 0 < first_light < len(calls) - 1, calls


class _RecordingEngine:
    """Records each call's first history items; sleeps per call so rounds take time."""

    def __init__(self, sleep_s: float = 0.01) -> None:
        self.calls: list[list[int]] = []
        self.sleep_s = sleep_s

    def recommend(self, histories, beam_width, top_n, exclude=None):
        self.calls.append([h[0] for h in histories])
        time.sleep(self.sleep_s)
        n = len(histories)
        return BeamResult(torch.zeros(n, top_n, dtype=torch.long), torch.zeros(n, top_n, 4, dtype=torch.long),
                          torch.zeros(n, top_n), torch.full((n,), top_n))


def test_background_slices_yield_to_interactive_requests_and_finish_in_a_lull():
    """Light requests never share an engine call with a heavy job's slice (its users are wider
    than what a round's light work leaves), and while light requests keep the queue busy the heavy
    job waits; it finishes once they stop."""
    async def scenario():
        eng = _RecordingEngine()
        b = DynamicBatcher(eng, max_batch_size=4, max_group_work=200, max_queue_work=400, max_queue_delay_ms=0.0)
        b.start()
        heavy = asyncio.ensure_future(b.recommend([RecommendEntry([100 + i], 190, 2) for i in range(6)]))
        await asyncio.sleep(0.005)  # its first slice is on the engine (an empty round)
        stop = asyncio.Event()
        done_during_load: list[bool] = []

        async def light(k: int) -> None:  # closed-loop clients that keep the queue non-empty
            while not stop.is_set():
                await b.recommend([RecommendEntry([k], 8, 2)])

        clients = [asyncio.ensure_future(light(k)) for k in range(1, 9)]
        await asyncio.sleep(0.3)
        done_during_load.append(heavy.done())
        stop.set()
        await asyncio.gather(*clients)
        out = await heavy
        await b.stop()
        return eng.calls, out, done_during_load[0]

    calls, out, done_during_load = run(scenario())
    assert len(out) == 6 and all(o is not None for o in out)
    assert not done_during_load, "the heavy job must wait while interactive requests fill every round"
    mixed = [c for c in calls if any(x >= 100 for x in c) and any(x < 100 for x in c)]
    assert not mixed, f"a heavy user shared an engine call with interactive requests: {mixed}"
    assert [x for c in calls for x in c if x >= 100] == list(range(100, 106))  # every user once, in order


def test_one_oversize_job_at_a_time():
    release = threading.Event()

    async def scenario():
        b = DynamicBatcher(_RecordingEngine(0.0), max_batch_size=4, max_group_work=200, max_queue_work=300,
                           max_queue_delay_ms=0.0)
        b.start()
        blocker = asyncio.ensure_future(b.run_exclusive(release.wait))
        await asyncio.sleep(0.02)
        first = asyncio.ensure_future(b.recommend([RecommendEntry([1], 100, 2)] * 4))  # 400 > 300
        await asyncio.sleep(0.02)
        second = await _refusal(b.recommend([RecommendEntry([2], 100, 2)] * 4))
        release.set()
        await blocker
        await first
        third = await b.recommend([RecommendEntry([3], 100, 2)] * 4)  # the first is done: admitted
        await b.stop()
        return second, third

    second, third = run(scenario())
    assert second is not None and "one at a time" in second.reason and second.retry_after_s >= 1
    assert len(third) == 4


# --- an engine error fails only its own request -----------------------------------------------------


class PoisonEngine:
    """The real engine, but raising on any call that holds the poisoned history."""

    def __init__(self, engine, poison: list[int], exc: type[Exception]) -> None:
        self.engine, self.poison, self.exc, self.calls = engine, poison, exc, []

    def recommend(self, histories, beam_width, top_n, exclude=None):
        self.calls.append(len(histories))
        if self.poison in [list(h) for h in histories]:
            raise self.exc("poisoned history")
        return self.engine.recommend(histories, beam_width, top_n, exclude=exclude)


@pytest.mark.parametrize("exc, status, code", [(ValueError, 422, "invalid_request"),
                                               (RuntimeError, 500, "internal_error")])
def test_one_bad_request_in_a_batch_fails_alone(bundle_dir, exc, status, code):
    reqs = [_req(h) for h in HISTORIES]
    bad = 2

    async def scenario():
        s = settings_for(bundle_dir, max_queue_delay_ms=50.0, warmup=False)
        async with running_app(s) as (app, c):
            rt = app.state.runtime
            alone = [(await c.post("/v1/recommend", json=r)).json() for r in reqs]
            poison = rt.engine.to_internal(HISTORIES[bad])[0]
            eng = PoisonEngine(rt.engine, poison, exc)
            rt.batcher.engine = eng
            together = await asyncio.gather(*[c.post("/v1/recommend", json=r) for r in reqs])
            return alone, together, eng.calls

    alone, together, calls = run(scenario())
    assert max(calls) > 1, f"the requests must have shared an engine call: {calls}"
    for n, (a, r) in enumerate(zip(alone, together)):
        if n == bad:
            err = assert_error(r, status, code)
            assert "poisoned" not in r.text, err  # exception text never reaches the client
        else:
            assert r.status_code == 200, r.text
            assert same_ranking(r.json()["items"], a["items"])


def test_unavailable_engine_fails_the_call_without_retries():
    class DownEngine:
        calls = 0

        def recommend(self, histories, beam_width, top_n, exclude=None):
            DownEngine.calls += 1
            raise EngineHung("stopped")

    release = threading.Event()

    async def scenario():
        b = DynamicBatcher(DownEngine(), max_queue_delay_ms=0.0)
        b.start()
        blocker = asyncio.ensure_future(b.run_exclusive(release.wait))
        await asyncio.sleep(0.02)
        jobs = [asyncio.ensure_future(b.recommend([RecommendEntry([i], 4, 2)])) for i in range(6)]
        await asyncio.sleep(0.05)
        release.set()
        await blocker
        out = await asyncio.gather(*jobs, return_exceptions=True)
        await b.stop()
        return out

    out = run(scenario())
    assert all(isinstance(o, EngineHung) for o in out)
    assert DownEngine.calls == 1
