"""EngineProcess: the RecommendEngine in a child process, behind the engine's own call surface.

Why: the engine's beam loop is Python driving many small torch ops, so in one process it holds
the GIL most of the time and starves the event loop that parses requests and feeds the batcher
(measured: at 32 clients the engine thread was busy 80% of the time yet formed batches of ~4,
with most latency spent before requests reached the queue). In a child process the engine has
its own interpreter, as vLLM's EngineCore does, and the HTTP side keeps up.

The parent keeps what the routes need without the model (config, metrics, item ids, SID map:
`EngineProcess.bundle`, `to_internal`); `recommend`, `score` and `set_masked` are forwarded over
a pipe, one call at a time (the batcher's single worker thread is the only caller; the watchdog's
idle `ping` only takes the pipe when it is free). The child ignores SIGINT (the parent shuts it
down) and exits when the pipe closes.

A child that stops answering cannot stall the service: every call is tagged with an id and waits
at most a bound derived from its work (`hang_timeout_s + hang_slack x work x measured seconds per
unit of work`). A call past its bound, a reply on a closed pipe or a child found dead marks the
engine *broken*: the child is killed at once (its pipe goes with it, so a late reply can never
reach a later call; replies whose id is not the pending call's are dropped as a second guard),
every call then fails fast with `EngineUnavailable` (-> 503), and `restart()` brings up a fresh
child on the same bundle, warmed, and swaps it in. Who decides when to restart is
`service.watchdog`. No web framework in here.
"""
from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from sidrec.model.beam_search import BeamResult
from sidrec.model.config import ModelConfig
from sidrec.model.engine import CatalogueIds

log = logging.getLogger("sidrec.engine")

_METHODS = ("recommend", "score", "set_masked", "ping", "add_items", "set_attributes", "item_sid", "sid_owner",
            "attributes_of", "trie_generation")


class EngineUnavailable(RuntimeError):
    """The engine cannot take calls now (hung, dead, or restarting): the request gets a 503."""


class EngineDead(EngineUnavailable):
    """The engine process exited (crash, OOM kill, SIGKILL)."""


class EngineHung(EngineUnavailable):
    """The engine process stopped answering: a call outlasted its bound, or an idle ping did."""


class EngineCallError(RuntimeError):
    """The engine raised; the message is the child's exception type and text (logged, never sent to clients)."""


@dataclass
class BundleInfo:
    """The parts of a loaded bundle the service needs in the parent process."""

    config: dict[str, Any]
    metrics: dict[str, Any]
    sid_map: torch.Tensor  # (L, N)
    item_ids: list[str]
    codebooks: dict[str, torch.Tensor] = field(default_factory=dict)
    ranking: dict[str, Any] = field(default_factory=dict)  # RecommendEngine.ranking of the child

    @property
    def version(self) -> str:
        return str(self.config.get("version", "unknown"))


@dataclass(frozen=True)
class HangPolicy:
    """When a call counts as hung. A call of `work` units may take `timeout_s + slack x work x
    seconds_per_unit` (the rate measured on this engine's completed calls) before the child is
    declared hung. The floor covers fixed costs (pickling, a GC pause, a noisy neighbour); the
    slack keeps a wide-beam batch, legitimately seconds long, from tripping it."""

    timeout_s: float = 3.0
    slack: float = 10.0


def call_work(method: str, args: tuple, kwargs: dict) -> float:
    """Work units of one engine call: beams decoded (recommend: the sum of per-request beam
    widths) or candidates scored (score). Each unit is one SID's worth of decoder steps; the
    levels L are the same for every call of one model, so they drop out of the rate."""
    try:
        if method == "recommend":
            histories, width = args[0], args[1]
            return float(width * len(histories) if isinstance(width, int) else sum(width))
        if method == "score":
            return float(sum(max(len(c), 1) for c in args[1]))
    except (IndexError, TypeError):
        pass
    return 0.0


def _serve(conn, path: str, options) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from sidrec.model.engine import RecommendEngine

    try:
        engine = RecommendEngine.from_path(path, options)
    except Exception as e:  # BundleError and friends: the parent turns this into StartupError
        conn.send(("error", type(e).__name__, str(e)))
        return
    b = engine.bundle
    conn.send(("ready", {"config": b.config, "metrics": b.metrics, "sid_map": b.sid_map.cpu(), "item_ids": b.item_ids,
                         "ranking": engine.ranking}))
    while True:
        try:
            call_id, method, args, kwargs = conn.recv()
        except (EOFError, OSError):
            return
        if method == "close":
            return
        try:
            if method not in _METHODS:
                raise ValueError(f"unknown engine method {method!r}")
            if method == "ping":
                out = "pong"
            else:
                out = getattr(engine, method)
                out = out(*args, **kwargs) if callable(out) else out  # trie_generation is a property
            if isinstance(out, BeamResult):
                out = BeamResult(out.items.cpu(), out.sids.cpu(), out.scores.cpu(), out.n_valid.cpu())
            conn.send((call_id, "ok", out))
        except Exception as e:
            conn.send((call_id, "error", type(e).__name__, str(e)))


class EngineProcess(CatalogueIds):
    def __init__(self, proc, conn, info: BundleInfo, path: str = "", options: Any = None,
                 policy: HangPolicy = HangPolicy()) -> None:
        self._proc, self._conn = proc, conn
        self._lock = threading.Lock()  # the pipe: one call at a time
        self._state_lock = threading.Lock()  # `_broken`: taken by whoever detects a fault, even mid-call
        self._ids = itertools.count(1)  # call ids, never reused across restarts
        self._path, self._options, self.policy = path, options, policy
        self._broken: tuple[str, str] | None = None  # (kind 'hung' | 'dead' | 'closed', reason)
        self._deadline: float | None = None  # when the pending call becomes overdue
        self._unit_s = 1e-4  # EWMA of seconds per work unit on calls of >= 64 units (see HangPolicy)
        self.on_broken: Callable[[str], None] | None = None  # told (with the kind) when a fault is found
        self.bundle = info
        self.cfg = ModelConfig.from_dict(info.config["model"])
        self.item_ids = info.item_ids
        self.index_of = {iid: i for i, iid in enumerate(self.item_ids)}

    @classmethod
    def start(cls, path: str, options, timeout_s: float = 600.0, policy: HangPolicy = HangPolicy()) -> "EngineProcess":
        """Spawn the child and wait until it has loaded the bundle. Raises RuntimeError subclasses."""
        ctx = mp.get_context("spawn")  # never fork a process that holds torch threads
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(child, path, options), name="sidrec-engine", daemon=True)
        proc.start()
        child.close()
        if not parent.poll(timeout_s):
            proc.kill()
            proc.join(5)
            raise EngineDead(f"the engine process did not load {path} within {timeout_s:g} s")
        try:
            msg = parent.recv()
        except EOFError:
            proc.join(5)
            raise EngineDead(f"the engine process died while loading {path} (exit code {proc.exitcode})") from None
        if msg[0] == "error":
            proc.join(5)
            from sidrec.model.bundle import BundleError

            raise (BundleError if msg[1] == "BundleError" else EngineCallError)(msg[2])
        info = BundleInfo(**msg[1])
        return cls(proc, parent, info, path, options, policy)

    # --- the RecommendEngine surface ------------------------------------------------------------

    @property
    def ranking(self) -> dict[str, Any]:
        return self.bundle.ranking

    def recommend(self, histories, beam_width, top_n, exclude=None, **kw) -> BeamResult:
        return self._call("recommend", histories, beam_width, top_n, exclude=exclude, **kw)

    def score(self, histories, candidates) -> torch.Tensor:
        return self._call("score", histories, candidates)

    def set_masked(self, external: Sequence[str], masked: bool = True) -> list[str]:
        return self._call("set_masked", list(external), masked)

    # --- health ---------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def healthy(self) -> bool:
        """False from the moment a fault is found until a restart has swapped in a fresh child."""
        return self._broken is None

    @property
    def fault(self) -> str | None:
        return None if self._broken is None else self._broken[1]

    @property
    def closed(self) -> bool:
        return self._broken is not None and self._broken[0] == "closed"
    def alive(self) -> bool:
        return self._proc.is_alive()

    def check(self) -> bool:
        """The watchdog's cheap tick: is the child running, and is the pending call within its bound?
        Marks the engine broken (and kills the child) when not. Returns `healthy`."""
        if self._broken is None:
            if not self._proc.is_alive():
                self.mark_broken("dead", f"the engine process exited (code {self._proc.exitcode})")
            else:
                deadline = self._deadline
                if deadline is not None and time.monotonic() > deadline + 0.5:
                    # The caller's own poll should have fired; it did not (a send blocked on a
                    # full pipe to a stopped child, say): killing the child unblocks it.
                    self.mark_broken("hung", "the pending engine call is overdue")
        return self._broken is None

    def ping_if_idle(self) -> bool | None:
        """Ping the child when no call is in flight (that call has its own bound): None when busy,
        else whether it answered within `policy.timeout_s` (a miss marks the engine broken)."""
        if self._broken is not None:
            return False
        if not self._lock.acquire(blocking=False):
            return None
        try:
            if self._broken is not None:
                return False
            self._exchange("ping", (), {}, self.policy.timeout_s)
            return True
        except EngineUnavailable:
            return False
        finally:
            self._lock.release()

    def mark_broken(self, kind: str, reason: str) -> bool:
        """Record a fault (first one wins), kill the child, tell `on_broken`. True if this call found it."""
        with self._state_lock:
            if self._broken is not None:
                return False
            self._broken = (kind, reason)
        log.error("engine %s: %s; killing pid %s", kind, reason, self._proc.pid)
        try:
            self._proc.kill()  # SIGKILL also ends a SIGSTOPped process; its pipe closes with it
        except Exception:  # already reaped
            pass
        if self.on_broken is not None:
            self.on_broken(kind)
        return True

    def restart(self, prepare: Callable[["EngineProcess"], None] | None = None, timeout_s: float = 600.0) -> None:
        """Replace the child with a fresh one on the same bundle. `prepare(new)` runs on the new
        engine before it takes any call (warm-up, re-applying masks). Raises on failure; the
        engine then stays broken and a later restart may try again."""
        if self._broken is None:
            self.mark_broken("hung", "restart requested")
        self._proc.join(5)
        new = type(self).start(self._path, self._options, timeout_s, self.policy)
        try:
            if new.version != self.version:
                raise EngineCallError(f"the bundle at {self._path} is now version {new.version}, not {self.version}; "
                                      "refusing to switch models by a restart")
            new._unit_s = self._unit_s
            if prepare is not None:
                prepare(new)
            if not new.healthy:
                raise EngineUnavailable(f"the new engine process failed while warming up: {new.fault}")
        except BaseException:
            new.close(1.0)
            raise
        with self._lock:
            if self.closed:  # shut down meanwhile
                new.close(1.0)
                return
            self._conn.close()
            self._proc, self._conn, self._unit_s = new._proc, new._conn, new._unit_s
            # Items added at run time were re-added by `prepare` in their original order, so their
            # internal indices are the ones this proxy already maps; take the new child's map anyway.
            self.item_ids, self.index_of = new.item_ids, new.index_of
            with self._state_lock:
                self._broken = None
        log.warning("engine restarted: pid %s serving %s", self._proc.pid, self.version)

    # --- the living catalogue (forwarded; service.catalogue_follow is the caller) ---------------------

    def add_items(self, item_ids, sids, attributes=None, wait=False, embeddings=None) -> int:
        out = self._call("add_items", list(item_ids), sids, attributes=attributes, wait=wait, embeddings=embeddings)
        new = [i for i in dict.fromkeys(item_ids) if i not in self.index_of]
        if new:  # the engine appends new items after the bundle's: mirror their internal indices here
            self.item_ids = self.item_ids + new  # a new list: the bundle's own stays as loaded
            self.index_of.update((iid, len(self.item_ids) - len(new) + k) for k, iid in enumerate(new))
        return out

    def set_attributes(self, item_ids, attributes) -> list[str]:
        return self._call("set_attributes", list(item_ids), attributes)

    def item_sid(self, item_id):
        return self._call("item_sid", item_id)

    def sid_owner(self, sid):
        return self._call("sid_owner", sid)

    def attributes_of(self, item_id):
        return self._call("attributes_of", item_id)

    @property
    def trie_generation(self) -> int:
        return self._call("trie_generation")

    # --- plumbing -------------------------------------------------------------------------------

    def _call(self, method: str, *args, **kwargs):
        with self._lock:
            if self._broken is not None:
                raise (EngineDead if self._broken[0] == "dead" else EngineUnavailable)(
                    f"the engine is unavailable ({self._broken[1]})")
            work = call_work(method, args, kwargs)
            bound = self.policy.timeout_s + self.policy.slack * work * self._unit_s
            t0 = time.monotonic()
            reply = self._exchange(method, args, kwargs, bound)
            if work >= 64:
                self._unit_s = 0.8 * self._unit_s + 0.2 * (time.monotonic() - t0) / work
        if reply[1] == "ok":
            return reply[2]
        if reply[2] == "ValueError":
            raise ValueError(reply[3])
        raise EngineCallError(f"{reply[2]}: {reply[3]}")

    def _exchange(self, method: str, args: tuple, kwargs: dict, bound: float) -> tuple:
        """Send one tagged call and wait at most `bound` s for its reply (lock held). A reply with
        another id (a call that timed out) is dropped; a miss or a closed pipe marks the engine broken."""
        call_id = next(self._ids)
        self._deadline = time.monotonic() + bound
        try:
            self._conn.send((call_id, method, args, kwargs))
            while True:
                left = self._deadline - time.monotonic()
                if left <= 0 or not self._conn.poll(left):
                    self.mark_broken("hung", f"{method} call {call_id} got no reply within {bound:.1f} s")
                    raise EngineHung(f"the engine did not answer within {bound:.1f} s")
                reply = self._conn.recv()
                if reply[0] == call_id:
                    return reply
                log.warning("dropped a stale engine reply (call %r) while waiting for call %d", reply[0], call_id)
        except (EOFError, OSError):
            kind = self._broken[0] if self._broken is not None else "dead"
            self.mark_broken("dead", f"the engine process exited (code {self._proc.exitcode})")
            raise (EngineHung if kind == "hung" else EngineDead)(
                f"the engine process is gone ({self.fault})") from None
        finally:
            self._deadline = None

    def close(self, timeout_s: float = 10.0) -> None:
        if not self._lock.acquire(timeout=self.policy.timeout_s):
            self.mark_broken("closed", "shutting down with a call in flight")  # unblocks that call
            self._lock.acquire()
        try:
            with self._state_lock:
                self._broken = self._broken or ("closed", "the engine is shut down")
            try:
                self._conn.send((0, "close", (), {}))
            except (OSError, BrokenPipeError):
                pass
            self._proc.join(timeout_s)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
            self._conn.close()
        finally:
            self._lock.release()
