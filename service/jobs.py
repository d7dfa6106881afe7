"""What the batcher queues: requests as jobs, their weight in work units, and its refusals.

A job weighs `job_work`: the sum over its users of max(beam_width, MIN_USER_WORK) for
recommendations, of max(candidates, MIN_USER_WORK) for scoring. Beams are the unit because the
decoder's cost is beams x L steps (L is the same for every request of a model, so it drops out)
and the trie, top-K and KV cache all scale with beams; a scored candidate is one teacher-forced
beam over the same L steps. MIN_USER_WORK (16) is the floor per user: the encoder pass, history
encoding and per-request bookkeeping cost about what 16 beams do, so a flood of beam-1 requests
is not admitted as if free. This is an estimate, not a calibrated model; its error only moves
where the 429s start. `service.batcher` decides admission and rounds from these weights.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Sequence

MIN_USER_WORK = 16  # work units one user costs at least (see the module docstring)


class QueueFull(RuntimeError):
    def __init__(self, retry_after_s: int, reason: str = "the request queue is full") -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s
        self.reason = reason


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
    waiting: bool = True  # counted against the queue bounds (queued, not yet taken or abandoned)
    weights: list[int] = field(default_factory=list)  # work of each entry
    work: int = 0
    cursor: int = 0  # entries [0, cursor) have been run (heavy jobs run in slices)
    failed: bool = False  # an engine call raised on it (worker thread); its other entries are skipped
    background: bool = False  # more work than one round holds: runs in slices, after foreground jobs

    def __post_init__(self) -> None:
        self.results = [None] * len(self.entries)
        self.weights = [entry_work(self.kind, e) for e in self.entries]
        self.work = sum(self.weights)

    @property
    def work_left(self) -> int:
        return sum(self.weights[self.cursor:])


def user_work(beams: int) -> int:
    """One user's weight for `beams` beams (or scored candidates): at least MIN_USER_WORK."""
    return max(beams, MIN_USER_WORK)


def entry_work(kind: str, entry: Any) -> int:
    """One user's weight (module docstring: beams or candidates, at least MIN_USER_WORK)."""
    return user_work(entry.beam_width if kind == "recommend" else len(entry.candidates))


def job_work(kind: str, entries: Sequence[Any]) -> int:
    """A job's weight in the admission budget."""
    return sum(entry_work(kind, e) for e in entries)
