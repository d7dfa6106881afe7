"""From quantiser codes to semantic IDs: the de-duplication digit, a quality report, and a plot.

`add_dedup_digit` (owned by `model.sid_assign`, re-exported here) appends the TIGER/GRID digit
that makes every SID unique (0 for the first item of a code tuple, 1..n for the items colliding
with it, in item-index order) and returns the PID->SID table in the bundle's layout, (L, N) int64
with L = levels + 1. `sid_report` measures
collisions, per-level codebook use and reconstruction error; `plot_codebook_usage` draws how
often each code is used at each level.

This module does not train quantisers (see `training.quantize`) nor build token ids (see
`model.config.SIDLayout`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from sidrec.figures import save_figure
from sidrec.model.sid_assign import add_dedup_digit

__all__ = ["add_dedup_digit", "sid_report", "plot_codebook_usage"]


def _codes(codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] < 1 or codes.shape[1] < 1:
        raise ValueError(f"codes must be a non-empty (N, levels) array, got shape {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer) or (codes < 0).any():
        raise ValueError("codes must be non-negative integers")
    return codes.astype(np.int64)


def _level_stats(col: np.ndarray, cardinality: int) -> dict[str, float | int]:
    counts = np.bincount(col, minlength=cardinality).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * np.log2(p)).sum())
    return {
        "cardinality": int(cardinality),
        "codes_used": int((counts > 0).sum()),
        "utilisation": float((counts > 0).sum() / cardinality),
        "entropy_bits": entropy,
        "perplexity": float(2.0 ** entropy),  # effective number of equally used codes
        "max_items_per_code": int(counts.max()),
    }


def sid_report(codes: np.ndarray, codebooks: Sequence[np.ndarray] | None, X: np.ndarray | None,
               cardinalities: Sequence[int]) -> dict:
    """Quality of a set of codes as SIDs.

    - collision_rate_before_dedup: fraction of items that share their code tuple with another;
    - unique_tuples, max_dedup_digit, dedup_cardinality, largest_collision_group;
    - unique_prefixes: distinct code prefixes of length 1..levels;
    - per_level: cardinality, codes used, utilisation, entropy (bits), perplexity;
    - reconstruction_mse (mean ||X - sum of chosen centroids||^2) after 1..levels levels, with
      `total_energy` (the same with no centroid) as baseline. Only when the codebooks live in X's
      space: for an RQ-VAE pass its latents as X (`RQResult.latent`), else it is None.
    `cardinalities` are the quantiser levels' sizes; a trailing dedup cardinality is ignored.
    """
    codes = _codes(codes)
    N, levels = codes.shape
    cards = [int(c) for c in cardinalities][:levels]
    if len(cards) != levels:
        raise ValueError(f"need {levels} cardinalities, got {list(cardinalities)}")
    for level, c in enumerate(cards):
        if codes[:, level].max() >= c:
            raise ValueError(f"level {level} has code {int(codes[:, level].max())} >= cardinality {c}")
    _, group, sizes = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    group = group.reshape(-1)
    shared = sizes[group] > 1
    report: dict = {
        "num_items": int(N),
        "levels": levels,
        "unique_tuples": int(len(sizes)),
        "collision_rate_before_dedup": float(shared.mean()),
        "largest_collision_group": int(sizes.max()),
        "max_dedup_digit": int(sizes.max()) - 1,
        "dedup_cardinality": int(sizes.max()),
        "unique_prefixes": [int(len(np.unique(codes[:, : d + 1], axis=0))) for d in range(levels)],
        "per_level": [_level_stats(codes[:, lv], cards[lv]) for lv in range(levels)],
        "reconstruction_mse": None,
        "total_energy": None,
    }
    if X is not None and codebooks is not None and len(codebooks) == levels:
        X = np.asarray(X, dtype=np.float64)
        if X.shape[0] == N and all(np.asarray(cb).shape[-1] == X.shape[1] for cb in codebooks):
            R = X.copy()
            mse = []
            for level, cb in enumerate(codebooks):
                R -= np.asarray(cb, dtype=np.float64)[codes[:, level]]
                mse.append(float((R * R).sum(1).mean()))
            report["reconstruction_mse"] = mse
            report["total_energy"] = float((X * X).sum(1).mean())
    return report


def plot_codebook_usage(codes: np.ndarray, cardinalities: Sequence[int], path: str | Path) -> Path:
    """PNG with one panel per level: items per code (codes sorted by use), with utilisation and
    perplexity in the title. Written atomically; uses the Agg canvas, not pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    codes = _codes(codes)
    levels = codes.shape[1]
    cards = [int(c) for c in cardinalities][:levels]
    if len(cards) < levels:
        cards += [int(codes[:, lv].max()) + 1 for lv in range(len(cards), levels)]
    fig = Figure(figsize=(4.2 * levels, 3.4), dpi=110)
    FigureCanvasAgg(fig)
    for lv in range(levels):
        ax = fig.add_subplot(1, levels, lv + 1)
        counts = np.bincount(codes[:, lv], minlength=cards[lv])
        st = _level_stats(codes[:, lv], cards[lv])
        ax.bar(np.arange(len(counts)), np.sort(counts)[::-1], width=1.0, color="tab:blue")
        ax.axhline(len(codes) / cards[lv], color="tab:red", lw=1, ls="--", label="uniform")
        ax.set_title(f"level {lv}: {st['codes_used']}/{cards[lv]} used, perplexity {st['perplexity']:.0f}",
                     fontsize=9)
        ax.set_xlabel("code (sorted by use)")
        ax.set_ylabel("items")
        ax.legend(fontsize=7)
    return save_figure(fig, path, dpi=110)
