"""EngineWatchdog: finds a hung or dead engine process within seconds and restarts it.

What it is: one asyncio task beside the batcher. Every `interval_s` (and at once when a call
reports a fault through `EngineProcess.on_broken`) it checks that the child is running and that
the pending call is within its bound, and pings the child when no call is in flight. A fault
makes the engine *broken*: readiness drops that instant (the runtime reads `engine.healthy`), the
child is killed, calls fail fast with `EngineUnavailable` (-> 503 engine_unavailable), and this
task restarts the child on the same bundle, runs the `prepare` hooks on it (warm-up, masks) and
swaps it in; readiness returns. A failed restart is retried with exponential backoff (1, 2, 4 ..
30 s); after `max_restart_failures` failures in a row liveness fails too, so the orchestrator
replaces the pod: restarting the whole pod for one engine hiccup would cost more than this.

What it is not: the hang detection itself (bounds, call ids, killing the child live in
`service.engine_proc`), and not a supervisor for the in-thread engine (`engine_process=False`),
which cannot hang apart from the service. Counts go to Prometheus (`service.metrics`).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from sidrec.service.engine_proc import EngineProcess
from sidrec.service.metrics import ServiceMetrics

log = logging.getLogger("sidrec.watchdog")


class EngineWatchdog:
    def __init__(self, engine: EngineProcess, metrics: ServiceMetrics | None = None, *, interval_s: float = 1.0,
                 max_restart_failures: int = 3, restart_timeout_s: float = 600.0) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.engine = engine
        self.metrics = metrics
        self.interval_s = interval_s
        self.max_restart_failures = max_restart_failures
        self.restart_timeout_s = restart_timeout_s
        # Run, in order, on a fresh child before it takes traffic (in a worker thread).
        self.prepare_hooks: list[Callable[[EngineProcess], None]] = []
        self.consecutive_failures = 0
        self.restarts = 0
        self.restarting = False
        self.last_fault_at: float | None = None  # monotonic time the last fault was found
        self.last_restart_s: float | None = None  # fault found -> fresh child serving
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self.engine.on_broken = self._from_any_thread
        if self.metrics is not None:
            self.metrics.engine_up.set(1 if self.engine.healthy else 0)
        self._task = asyncio.create_task(self._run(), name="sidrec-engine-watchdog")

    async def stop(self) -> None:
        self.engine.on_broken = None
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    # --- state ----------------------------------------------------------------------------------

    def alive(self) -> bool:
        """Liveness: false only once restarts have failed `max_restart_failures` times in a row."""
        return self.consecutive_failures < self.max_restart_failures

    def retry_after_s(self) -> int:
        """What a 503 tells the client: about one restart (the last one measured, else 5 s)."""
        return max(1, round(self.last_restart_s if self.last_restart_s is not None else 5.0))

    def describe(self) -> dict:
        return {"engine_healthy": self.engine.healthy, "engine_restarting": self.restarting,
                "engine_restarts": self.restarts, "engine_restart_failures": self.consecutive_failures,
                "engine_fault": self.engine.fault}

    # --- the task -------------------------------------------------------------------------------

    def _from_any_thread(self, kind: str) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._fault_found, kind)
        except RuntimeError:  # the loop closed between the check and the call
            pass

    def _fault_found(self, kind: str) -> None:
        self.last_fault_at = time.monotonic()
        if self.metrics is not None and kind != "closed":
            self.metrics.engine_faults.labels(kind).inc()
            self.metrics.engine_up.set(0)
        assert self._wake is not None
        self._wake.set()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                if self.engine.check():
                    await asyncio.to_thread(self.engine.ping_if_idle)
                if not self.engine.healthy and not self.engine.closed:
                    await self._restart()
            except asyncio.CancelledError:
                raise
            except Exception:  # the watchdog itself must never die
                log.exception("engine watchdog tick failed")

    def _prepare(self, new: EngineProcess) -> None:
        for hook in self.prepare_hooks:
            hook(new)

    async def _restart(self) -> None:
        self.restarting = True
        found = self.last_fault_at or time.monotonic()
        t0 = time.monotonic()
        try:
            await asyncio.to_thread(self.engine.restart, self._prepare, self.restart_timeout_s)
        except Exception as e:
            self.consecutive_failures += 1
            if self.metrics is not None:
                self.metrics.engine_restarts.labels("failed").inc()
            backoff = min(30.0, 2.0 ** (self.consecutive_failures - 1))
            log.error("engine restart %d failed (%s: %s); next try in %.0f s%s", self.consecutive_failures,
                      type(e).__name__, e, backoff,
                      "" if self.alive() else "; liveness now fails")
            await asyncio.sleep(backoff)
            self._wake.set()  # type: ignore[union-attr]
            return
        finally:
            self.restarting = False
        self.consecutive_failures = 0
        self.restarts += 1
        self.last_restart_s = time.monotonic() - found
        if self.metrics is not None:
            self.metrics.engine_restarts.labels("ok").inc()
            self.metrics.engine_restart_time.observe(time.monotonic() - t0)
            self.metrics.engine_up.set(1)
