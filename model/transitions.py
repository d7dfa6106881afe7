"""Transitions: which items follow which in the training sequences, mixed into the beam's ranking.

Why: a generative model over semantic IDs names an item only through its codes, so it learns
what kind of item comes next (the codes' semantics) better than which exact item does (the
memorisation an item-id model gets from its embedding table). On Amazon Beauty a first-order
transition table alone, fit on the same training sequences, ranks the held-out item higher than
the SID model does (validation NDCG@10 0.061 against 0.042; README: Quality on Amazon Beauty).
The two are complementary, so the served score is their mixture:

    p(item | history) = (1 - weight) * p_beam(item) + weight * p_next(item | history)

p_beam is the constrained beam's SID log-probability, exponentiated; p_next the recency-weighted
mean over the last items of the history of the transition rows
`row(a)[b] = sum over co-occurrences of a then b within `window` steps of decay**(gap - 1)`,
normalised per row and cut to the `top_k` largest entries (the bundle stays O(items * top_k)).
The mixture re-ranks the items the beam returned and adds, per request, the `extra` most likely
next items the beam missed (with p_beam = 0), each checked against the request's exclusions,
filters and the catalogue's deletions as the beam's own are. Items added at run time have no row
and no column until a new bundle is trained: the cold-start blend (model/cold_start.py) is what
serves them. weight 0 serves the beam's order unchanged.

The table travels in the bundle as `transitions.safetensors` (CSR: indptr, indices, values over
the bundle's internal indices); its knobs in the pipeline config (`eval.transitions_*`), chosen
on validation users by benchmarks/rerank_tune.py. Fitting it reads the sequences the model was
fit on and nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from sidrec.model.beam_search import BeamResult

TRANSITIONS_FILE = "transitions.safetensors"


@dataclass(frozen=True)
class TransitionOptions:
    """The mixture's knobs: `weight` of p_next in [0, 1), the recency `decay` of the history's
    items (the most recent weighs 1, the one before `decay`, ...), and how many `extra` next
    items the beam missed each request may receive."""

    weight: float = 0.0
    decay: float = 0.1
    extra: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight < 1.0:
            raise ValueError(f"transitions weight must be in [0, 1), got {self.weight!r}")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"transitions decay must be in (0, 1], got {self.decay!r}")
        if not 0 <= int(self.extra) == self.extra:
            raise ValueError(f"transitions extra must be an integer >= 0, got {self.extra!r}")


def mix_scores(scores: Tensor, p_next: Tensor, weight: float) -> Tensor:
    """log((1 - weight) * exp(scores) + weight * p_next), elementwise; -inf stays -inf where
    p_next is 0. weight 0 returns `scores` unchanged."""
    if weight <= 0:
        return scores
    a = scores.float() + float(np.log1p(-weight))
    b = torch.log(p_next.float().clamp(min=0) * weight)  # -inf where p_next is 0
    return torch.logaddexp(a, b)


class Transitions:
    """A row-normalised item -> next-item table in CSR form over internal indices."""

    def __init__(self, indptr: Tensor, indices: Tensor, values: Tensor, num_items: int | None = None) -> None:
        indptr = torch.as_tensor(indptr).to(torch.int64).cpu()
        indices = torch.as_tensor(indices).to(torch.int64).cpu()
        values = torch.as_tensor(values).to(torch.float32).cpu()
        n = indptr.numel() - 1
        if indptr.dim() != 1 or n < 0 or (num_items is not None and n != num_items):
            raise ValueError(f"transitions indptr must have num_items + 1 = "
                             f"{'?' if num_items is None else num_items + 1} entries, got {tuple(indptr.shape)}")
        if int(indptr[0]) != 0 or bool((indptr[1:] < indptr[:-1]).any()) or int(indptr[-1]) != indices.numel():
            raise ValueError("transitions indptr must start at 0, never decrease and end at len(indices)")
        if indices.shape != values.shape or indices.dim() != 1:
            raise ValueError(f"transitions indices {tuple(indices.shape)} and values {tuple(values.shape)} "
                             "must be 1-D and of one length")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
            raise ValueError(f"transitions indices must lie in [0, {n})")
        if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
            raise ValueError("transitions values must be finite and >= 0")
        self.indptr, self.indices, self.values, self.num_items = indptr, indices, values, n
        self._np = (indptr.numpy(), indices.numpy(), values.numpy())  # views: the request path reads these

    # ---- building and storing -------------------------------------------------------------------
    @classmethod
    def fit(cls, sequences: Sequence[Sequence[int]], num_items: int, window: int = 5, decay: float = 0.7,
            top_k: int = 100) -> "Transitions":
        """The table of `sequences` (internal indices, oldest first): a then b within `window`
        steps adds decay**(gap - 1) to row a, column b; rows normalised, cut to `top_k`."""
        if window < 1 or top_k < 1 or not 0.0 < decay <= 1.0:
            raise ValueError(f"transitions need window >= 1, top_k >= 1 and decay in (0, 1], got "
                             f"window={window}, top_k={top_k}, decay={decay}")
        rows, cols, vals = [], [], []
        for s in sequences:
            s = np.asarray(s, dtype=np.int64)
            for gap in range(1, min(window, len(s) - 1) + 1):
                rows.append(s[:-gap])
                cols.append(s[gap:])
                vals.append(np.full(len(s) - gap, decay ** (gap - 1), dtype=np.float64))
        if not rows:
            return cls(torch.zeros(num_items + 1, dtype=torch.int64), torch.zeros(0), torch.zeros(0), num_items)
        r, c, v = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
        if r.size and (min(r.min(), c.min()) < 0 or max(r.max(), c.max()) >= num_items):
            raise ValueError(f"sequences hold item indices outside [0, {num_items})")
        key, inv = np.unique(r * num_items + c, return_inverse=True)
        w = np.bincount(inv, weights=v)
        r, c = key // num_items, key % num_items
        w = w / np.bincount(r, weights=w, minlength=num_items)[r]  # row-normalised
        order = np.lexsort((c, -w, r))  # by row, heaviest first, then by column
        r, c, w = r[order], c[order], w[order]
        start = np.searchsorted(r, r, side="left")
        keep = (np.arange(r.size) - start) < top_k
        r, c, w = r[keep], c[keep], w[keep]
        indptr = np.zeros(num_items + 1, dtype=np.int64)
        np.cumsum(np.bincount(r, minlength=num_items), out=indptr[1:])
        return cls(torch.from_numpy(indptr), torch.from_numpy(c), torch.from_numpy(w.astype(np.float32)), num_items)

    def tensors(self) -> dict[str, Tensor]:
        return {"indptr": self.indptr, "indices": self.indices.to(torch.int32 if self.num_items < 2**31 else
                                                                  torch.int64), "values": self.values}

    @classmethod
    def from_tensors(cls, d: dict[str, Tensor], num_items: int) -> "Transitions":
        missing = {"indptr", "indices", "values"} - set(d)
        if missing:
            raise ValueError(f"transitions need indptr, indices and values; missing {', '.join(sorted(missing))}")
        return cls(d["indptr"], d["indices"], d["values"], num_items)

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    # ---- scoring --------------------------------------------------------------------------------
    def next_items(self, history: Sequence[int], decay: float, max_history: int) -> tuple[Tensor, Tensor]:
        """(items, p) sorted by item: p_next over the items any of the history's last
        `max_history` items leads to (the recency-weighted mean of their rows). Empty for an
        empty history or one of items the table does not know (added after training)."""
        h = np.asarray(list(history)[-max_history:] if max_history > 0 else [], dtype=np.int64)
        ages = np.arange(len(h) - 1, -1, -1, dtype=np.float64)
        known = (h >= 0) & (h < self.num_items)
        h, ages = h[known], ages[known]
        ip = self._np[0]
        starts, ends = ip[h], ip[h + 1]
        lens = ends - starts
        total = int(lens.sum())
        if total == 0:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0)
        w = decay ** ages
        w /= w.sum()
        offsets = np.cumsum(lens) - lens
        pos = np.repeat(starts - offsets, lens) + np.arange(total)
        items, inv = np.unique(self._np[1][pos], return_inverse=True)
        p = np.bincount(inv, weights=self._np[2][pos] * np.repeat(w, lens), minlength=len(items))
        return torch.from_numpy(items), torch.from_numpy(p.astype(np.float32))

    def dists(self, histories: Sequence[Sequence[int]], decay: float, max_history: int) -> list[tuple[Tensor, Tensor]]:
        """`next_items` of each history."""
        return [self.next_items(h, decay, max_history) for h in histories]

    def top(self, history: Sequence[int], k: int, decay: float, max_history: int) -> tuple[Tensor, Tensor]:
        """The `k` most likely next items of one history (items, p), best first; ties by index."""
        return top(self.next_items(history, decay, max_history), k)


def top(dist: tuple[Tensor, Tensor], k: int) -> tuple[Tensor, Tensor]:
    """The `k` most likely items of a `next_items` result, best first; ties by index."""
    items, p = dist
    order = torch.argsort(p, descending=True, stable=True)[:k]
    return items[order], p[order]


def lookup(dists: Sequence[tuple[Tensor, Tensor]], items: Tensor) -> Tensor:
    """(B, N) p_next of `items` (B, N) under each request's `next_items` result (0 where absent,
    negative items included)."""
    items = items.cpu().to(torch.int64)
    out = torch.zeros(items.shape)
    for b, (known, p) in enumerate(dists):
        if known.numel() == 0:
            continue
        pos = torch.searchsorted(known, items[b]).clamp(max=known.numel() - 1)
        out[b] = torch.where(known[pos] == items[b], p[pos], torch.zeros(()))
    return out


def add_next_items(res: BeamResult, dists: Sequence[tuple[Tensor, Tensor]], opts: TransitionOptions,
                   sid_map: Tensor, allowed=None) -> BeamResult:
    """`res` with up to `opts.extra` more items per request after its valid ones: the most likely
    next items (p_next > 0, from each request's `Transitions.next_items` in `dists`) the beam did
    not return, score -inf (p_beam = 0: the mixture gives them weight * p_next).
    `allowed(items (B, K)) -> (B, K) bool` drops the ones a request may not receive (its
    exclusions, filters, the catalogue's deletions); None allows all."""
    items, scores, n_valid = res.items.cpu(), res.scores.cpu().float(), res.n_valid.cpu()
    B, N = items.shape
    if opts.extra <= 0 or B == 0 or N == 0:
        return res
    K = opts.extra
    pool = 2 * K + N  # enough once the beam's own and the disallowed are dropped, in nearly all cases
    cand = torch.full((B, pool), -1, dtype=torch.int64)
    for b, d in enumerate(dists):
        best, _ = top(d, pool)
        cand[b, : best.numel()] = best
    beam_ok = torch.arange(N)[None, :] < n_valid[:, None]  # (B, N) the beam's valid slots
    beam_sorted = torch.where(beam_ok, items, torch.full_like(items, -2)).sort(1).values  # -2: no item
    pos = torch.searchsorted(beam_sorted, cand).clamp(max=N - 1)
    in_beam = torch.gather(beam_sorted, 1, pos) == cand
    ok = (cand >= 0) & ~in_beam
    if allowed is not None:
        ok &= allowed(cand)
    rank = torch.cumsum(ok.to(torch.int64), 1) - 1  # among a request's admissible candidates
    keep = ok & (rank < K)
    new_items = torch.full((B, N + K), -1, dtype=torch.int64)
    new_scores = torch.full((B, N + K), float("-inf"))
    new_items[:, :N] = torch.where(beam_ok, items, new_items[:, :N])
    new_scores[:, :N] = torch.where(beam_ok, scores, new_scores[:, :N])
    rows, cols = keep.nonzero(as_tuple=True)  # each after its request's valid beam items
    new_items[rows, n_valid[rows] + rank[rows, cols]] = cand[rows, cols]
    new_n = n_valid + keep.sum(1)
    L = sid_map.shape[0]
    sids = sid_map.to("cpu", torch.int64)[:, new_items.clamp(min=0).reshape(-1)].T.reshape(B, N + K, L)
    dev = res.items.device
    return BeamResult(new_items.to(dev), sids.to(dev), new_scores.to(dev), new_n.to(dev))
