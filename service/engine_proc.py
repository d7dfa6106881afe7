"""EngineProcess: the RecommendEngine in a child process, behind the engine's own call surface.

Why: the engine's beam loop is Python driving many small torch ops, so in one process it holds
the GIL most of the time and starves the event loop that parses requests and feeds the batcher
(measured: at 32 clients the engine thread was busy 80% of the time yet formed batches of ~4,
with most latency spent before requests reached the queue). In a child process the engine has
its own interpreter, as vLLM's EngineCore does, and the HTTP side keeps up.

The parent keeps what the routes need without the model (config, metrics, item ids, SID map:
`EngineProcess.bundle`, `to_internal`); `recommend`, `score` and `set_masked` are forwarded over
a pipe, one call at a time (the batcher's single worker thread is the only caller). The child
ignores SIGINT (the parent shuts it down), exits when the pipe closes, and a dead child turns
into `EngineDead` on the next call and into a failing /healthz. No web framework in here.
"""
from __future__ import annotations

import multiprocessing as mp
import signal
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from sidrec.model.beam_search import BeamResult
from sidrec.model.config import ModelConfig
from sidrec.model.engine import CatalogueIds

_METHODS = ("recommend", "score", "set_masked", "add_items", "set_attributes", "item_sid", "sid_owner",
            "attributes_of", "trie_generation")


class EngineDead(RuntimeError):
    """The engine process exited; the service must be restarted (liveness fails)."""


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

    @property
    def version(self) -> str:
        return str(self.config.get("version", "unknown"))


def _serve(conn, path: str, options) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from sidrec.model.engine import RecommendEngine

    try:
        engine = RecommendEngine.from_path(path, options)
    except Exception as e:  # BundleError and friends: the parent turns this into StartupError
        conn.send(("error", type(e).__name__, str(e)))
        return
    b = engine.bundle
    conn.send(("ready", {"config": b.config, "metrics": b.metrics, "sid_map": b.sid_map.cpu(), "item_ids": b.item_ids}))
    while True:
        try:
            method, args, kwargs = conn.recv()
        except (EOFError, OSError):
            return
        if method == "close":
            return
        try:
            if method not in _METHODS:
                raise ValueError(f"unknown engine method {method!r}")
            out = getattr(engine, method)
            out = out(*args, **kwargs) if callable(out) else out  # trie_generation is a property
            if isinstance(out, BeamResult):
                out = BeamResult(out.items.cpu(), out.sids.cpu(), out.scores.cpu(), out.n_valid.cpu())
            conn.send(("ok", out))
        except Exception as e:
            conn.send(("error", type(e).__name__, str(e)))


class EngineProcess(CatalogueIds):
    def __init__(self, proc, conn, info: BundleInfo) -> None:
        self._proc, self._conn = proc, conn
        self._lock = threading.Lock()
        self.bundle = info
        self.cfg = ModelConfig.from_dict(info.config["model"])
        self.item_ids = info.item_ids
        self.index_of = {iid: i for i, iid in enumerate(self.item_ids)}

    @classmethod
    def start(cls, path: str, options, timeout_s: float = 600.0) -> "EngineProcess":
        """Spawn the child and wait until it has loaded the bundle. Raises RuntimeError subclasses."""
        ctx = mp.get_context("spawn")  # never fork a process that holds torch threads
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(child, path, options), name="sidrec-engine", daemon=True)
        proc.start()
        child.close()
        if not parent.poll(timeout_s):
            proc.terminate()
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
        return cls(proc, parent, info)

    # --- the RecommendEngine surface ------------------------------------------------------------

    def recommend(self, histories, beam_width, top_n, exclude=None, **kw) -> BeamResult:
        return self._call("recommend", histories, beam_width, top_n, exclude=exclude, **kw)

    def score(self, histories, candidates) -> torch.Tensor:
        return self._call("score", histories, candidates)

    def set_masked(self, external: Sequence[str], masked: bool = True) -> list[str]:
        return self._call("set_masked", list(external), masked)

    # --- the living catalogue (forwarded; service.catalogue_follow is the caller) ---------------------

    def add_items(self, item_ids, sids, attributes=None, wait=False) -> int:
        out = self._call("add_items", list(item_ids), sids, attributes=attributes, wait=wait)
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

    def alive(self) -> bool:
        return self._proc.is_alive()

    def _call(self, method: str, *args, **kwargs):
        with self._lock:
            try:
                self._conn.send((method, args, kwargs))
                reply = self._conn.recv()
            except (EOFError, OSError, BrokenPipeError):
                raise EngineDead(f"the engine process exited (code {self._proc.exitcode})") from None
        if reply[0] == "ok":
            return reply[1]
        if reply[1] == "ValueError":
            raise ValueError(reply[2])
        raise EngineCallError(f"{reply[1]}: {reply[2]}")

    def close(self, timeout_s: float = 10.0) -> None:
        with self._lock:
            try:
                self._conn.send(("close", (), {}))
            except (OSError, BrokenPipeError):
                pass
            self._proc.join(timeout_s)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(5)
            self._conn.close()
