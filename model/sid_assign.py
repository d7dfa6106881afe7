"""SID assignment, the one home for training and serving: quantize embeddings against a bundle's
codebooks (residual nearest centroid), hand out de-duplication codes, and list the SIDs a new
item may take in order of preference.

Three callers share it: `training.sids` (the digit that makes a catalogue's SIDs unique),
`training.new_items` (SIDs for new items, offline) and `service` (items added at run time, where
the claim itself happens atomically in the catalogue store). It imports neither training nor
service. It does not pack SIDs into integers: outside `kernels/` (whose trie keeps its own sort
key, being a leaf module) that is `service.index.SidCodec`'s job, the only consumer of packed
SIDs; here a SID is a tuple of codes.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch


class SidSpaceFull(ValueError):
    """A code prefix has no free SID left in the bundle's layout (no free de-duplication code)."""


def codebooks_of(codebooks: Mapping[str, torch.Tensor | np.ndarray]) -> list[np.ndarray]:
    """A bundle's `codebook_0, codebook_1, ...` entries as float32 arrays in level order."""
    names = sorted((k for k in codebooks if k.startswith("codebook_")), key=lambda k: int(k.split("_")[1]))
    return [np.ascontiguousarray(np.asarray(codebooks[k], dtype=np.float32)) for k in names]


def sq_dists(R: np.ndarray, C: np.ndarray) -> np.ndarray:
    """(N, K) squared L2 distances, ||r||^2 - 2 r.c + ||c||^2 (clipped at 0)."""
    d = (R * R).sum(1)[:, None] - 2.0 * (R @ C.T) + (C * C).sum(1)[None, :]
    return np.maximum(d, 0.0, out=d)


def quantize(X: np.ndarray, codebooks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Residual nearest-centroid codes of X (N, D) against per-level codebooks (C_l, D).

    -> (codes (N, levels) int64, last-level residual (N, D) float64: what the last level
    quantised, used to rank the last level's alternatives by distance).
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {X.shape}")
    if not codebooks:
        raise ValueError("quantize needs at least one codebook")
    R = X.copy()
    codes = np.empty((len(X), len(codebooks)), dtype=np.int64)
    last = R
    for level, cb in enumerate(codebooks):
        cb = np.asarray(cb, dtype=np.float64)
        if cb.ndim != 2 or cb.shape[1] != X.shape[1]:
            raise ValueError(f"codebook {level} has shape {cb.shape}; expected (C, {X.shape[1]}) to match the "
                             "embeddings (use the embedding model the bundle was built with)")
        last = R
        codes[:, level] = sq_dists(R, cb).argmin(1) if len(R) else np.zeros(0, np.int64)
        R = R - cb[codes[:, level]]
    return codes, last


def add_dedup_digit(codes: np.ndarray) -> tuple[np.ndarray, int]:
    """codes (N, levels) -> (sid_map (levels + 1, N) int64, dedup cardinality = max digit + 1).

    The last row is 0 for the first item (lowest index) of each code tuple and 1..n-1 for the
    n-1 items that share it, so every column of sid_map is unique.
    """
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] < 1 or codes.shape[1] < 1:
        raise ValueError(f"codes must be a non-empty (N, levels) array, got shape {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer) or (codes < 0).any():
        raise ValueError("codes must be non-negative integers")
    codes = codes.astype(np.int64)
    N = len(codes)
    _, group = np.unique(codes, axis=0, return_inverse=True)  # (N,) tuple id per item
    group = group.reshape(-1)
    order = np.argsort(group, kind="stable")  # items grouped by tuple, by index inside a group
    g = group[order]
    digit = np.empty(N, dtype=np.int64)
    digit[order] = np.arange(N) - np.searchsorted(g, g, side="left")  # rank inside the group
    sid_map = np.concatenate([codes.T, digit[None, :]], axis=0)  # (L, N)
    return np.ascontiguousarray(sid_map), int(digit.max()) + 1


def append_dedup_digit(codes: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The same digit for codes laid out (levels, N) as a tensor -> ((levels + 1, N), cardinality).
    Vectorised through one mixed-radix key: makes unique catalogues of millions of items for
    benchmarks and device checks."""
    codes = torch.as_tensor(codes, dtype=torch.int64)
    k, n = codes.shape
    key = torch.zeros(n, dtype=torch.int64)
    for level in range(k):
        key = key * (int(codes[level].max()) + 1 if n else 1) + codes[level]
    order = torch.argsort(key, stable=True)
    sk = key[order]
    start = torch.ones(n, dtype=torch.bool)
    start[1:] = sk[1:] != sk[:-1]
    pos = torch.arange(n)
    first = torch.cummax(torch.where(start, pos, torch.zeros_like(pos)), 0).values  # run start per item
    dedup = torch.empty(n, dtype=torch.int64)
    dedup[order] = pos - first
    return torch.cat([codes, dedup[None]]), (int(dedup.max()) + 1 if n else 1)


def candidate_sids(codes: np.ndarray, residual: np.ndarray | None, codebooks: Sequence[np.ndarray],
                   cardinalities: Sequence[int], spread: bool = False) -> list[list[tuple[int, ...]]]:
    """Every SID each new item may take, best first: the claim takes the first one free.

    codes (M, levels) from `quantize`; `cardinalities` the bundle's layout, whose length is
    levels + 1 when the SIDs carry a de-duplication digit (then the quantised tuple with digits
    0, 1, ..., C_last - 1), or levels when they do not (then the tuple alone). With `spread`
    (a bundle built with `sid.spread_collisions`), the nearest free last-level code of the
    item's prefix is preferred to a higher digit, as the catalogue's own items were placed.
    """
    cards = [int(c) for c in cardinalities]
    levels = codes.shape[1]
    if len(cards) not in (levels, levels + 1):
        raise ValueError(f"codes have {levels} levels but the layout has {len(cards)} (expected {levels} or "
                         f"{levels + 1} with a de-duplication digit)")
    digits = cards[-1] if len(cards) == levels + 1 else 1
    order = None
    if spread and residual is not None:
        order = sq_dists(np.asarray(residual, np.float64), np.asarray(codebooks[-1], np.float64)).argsort(1)
    zero = (0,) if len(cards) == levels + 1 else ()  # digit 0, where the layout has a digit
    out = []
    for i, row in enumerate(np.asarray(codes, dtype=np.int64).tolist()):
        lasts = [row[-1]] + ([c for c in order[i].tolist() if c != row[-1]] if order is not None else [])
        cands = [tuple(row[:-1]) + (last,) + zero for last in lasts]
        # then the higher digits of the quantiser's own tuple (never of a spread alternative)
        cands += [tuple(row) + (d,) for d in range(1, digits)]
        out.append(cands)
    return out


def claim_first_free(candidates: Sequence[Sequence[tuple[int, ...]]], taken: set[tuple[int, ...]],
                     names: Sequence[str] | None = None) -> list[tuple[int, ...]]:
    """Give each item the first of its candidates not in `taken` (updated in place), in item order.

    Raises SidSpaceFull naming the first item with none free. The in-memory form of the claim the
    catalogue store runs atomically in Redis.
    """
    chosen = []
    for i, cands in enumerate(candidates):
        sid = next((c for c in cands if c not in taken), None)
        if sid is None:
            who = names[i] if names is not None else f"index {i}"
            raise SidSpaceFull(f"item {who}: every SID of its code prefix {tuple(cands[0][:-1])} is taken "
                               f"({len(cands)} de-duplication codes in the bundle's layout); retrain with a "
                               "larger de-duplication level or change the item's text")
        taken.add(sid)
        chosen.append(sid)
    return chosen
