"""Memory accounting for loading a second model beside the running one (service.lifecycle).

Read from /proc and the cgroup files, so the serving image needs no psutil:
- `tree_rss_bytes()`: resident memory of this process and its children (the engine processes);
- `available_bytes()`: what the kernel can still give us: MemAvailable, capped by the cgroup's
  limit minus its usage where a container limit is set (cgroup v2, then v1);
- `RssPeak`: samples the tree's RSS on a thread while a reload runs, for its peak;
- `check_room(needed, headroom)`: the refusal a reload gives when two models would not fit.
Not a profiler: RSS is what the OOM killer counts, so RSS is what is measured.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class InsufficientMemory(RuntimeError):
    """Loading another model would not fit in the memory left (the message says how much)."""


def _rss_of(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(c) for c in task.read_text().split()]
        except (OSError, ValueError):
            pass
    return out


def tree_rss_bytes(pid: int | None = None) -> int:
    """RSS of `pid` (default: this process) and all its descendants, in bytes."""
    todo, seen, total = [pid or os.getpid()], set(), 0
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        total += _rss_of(p)
        todo += _children(p)
    return total


def _read_int(path: str) -> int | None:
    try:
        raw = Path(path).read_text().strip()
    except OSError:
        return None
    return None if raw in ("max", "") else int(raw)


def available_bytes() -> int:
    """Memory this process tree may still take: MemAvailable, capped by the cgroup's headroom."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    avail = avail if avail is not None else 1 << 62
    for limit_f, usage_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                             ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                              "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_f), _read_int(usage_f)
        if limit is not None and usage is not None and limit < (1 << 60):
            return max(0, min(avail, limit - usage))
    return avail


def check_room(needed: int, headroom: int) -> None:
    """Raise InsufficientMemory unless `needed` bytes plus `headroom` fit in what is available."""
    avail = available_bytes()
    if needed + headroom > avail:
        mb = lambda b: f"{b / 2**20:,.0f} MB"  # noqa: E731
        raise InsufficientMemory(
            f"loading the new model beside the running one needs about {mb(needed)} plus {mb(headroom)} of "
            f"headroom (SIDREC_RELOAD_HEADROOM_MB), but only {mb(avail)} is available: free memory, raise the "
            "container's limit, or restart the replica on the new version instead of reloading")


class RssPeak:
    """`with RssPeak() as peak: ...` then `peak.bytes`: the highest tree RSS seen, every interval_s."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.bytes = max(self.bytes, tree_rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "RssPeak":
        self.bytes = tree_rss_bytes()
        self._thread = threading.Thread(target=self._run, name="sidrec-rss-peak", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.bytes = max(self.bytes, tree_rss_bytes())
