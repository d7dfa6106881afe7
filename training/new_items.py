"""SIDs for new items without retraining: embed their text with the bundle's embedding model,
assign residual codes against the bundle's RQ-KMeans codebooks, and give each a de-duplication
digit that no existing or other new item with the same codes holds. In a bundle built with
`sid.spread_collisions`, an item whose code tuple is taken first moves to the nearest last-level
code its prefix has free, as the catalogue's own items did.

A new item whose digit would exceed the bundle's dedup cardinality, or that needs a digit where
the bundle's SIDs have none, cannot be represented by the trained model's vocabulary; it is
reported (`fits=False`) rather than silently clipped. This module does not change the bundle:
adding items to a catalogue is a new bundle version.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sidrec.model.bundle import BundleError, load_bundle, read_config


@dataclass(frozen=True)
class NewItemSIDs:
    sids: np.ndarray  # (M, L) int64
    fits: np.ndarray  # (M,) bool: the dedup digit is inside the bundle's vocabulary
    nearest_existing: list[str | None]  # an existing item holding the codes the quantiser gave, if any


def assign_new_items(bundle_path: str | Path, texts: list[str], embed_model: str | None = None) -> NewItemSIDs:
    from sidrec.training.embeddings import embed_items

    config = read_config(bundle_path)
    sid_cfg = config.get("sid", {})
    if sid_cfg.get("method", "rq_kmeans") != "rq_kmeans":
        raise BundleError(f"bundle {bundle_path} was quantised with {sid_cfg.get('method')!r}; new items can be "
                          "assigned only against RQ-KMeans codebooks (input space)")
    bundle = load_bundle(bundle_path)
    levels = sorted(k for k in bundle.codebooks if k.startswith("codebook_"))
    if not levels:
        raise BundleError(f"bundle {bundle_path} holds no codebooks: it cannot assign SIDs to new items")
    codebooks = [bundle.codebooks[k].numpy() for k in sorted(levels, key=lambda k: int(k.split("_")[1]))]
    if not texts:
        raise ValueError("assign_new_items needs at least one text")
    model = embed_model or config.get("pipeline", {}).get("embed", {}).get("model")
    X = embed_items(list(texts), model, show_progress=False)
    if X.shape[1] != codebooks[0].shape[1]:
        raise BundleError(f"embeddings have {X.shape[1]} dims but the bundle's codebooks have "
                          f"{codebooks[0].shape[1]}: use the embedding model the bundle was built with")
    sids, nearest = new_item_sids(X, codebooks, bundle.sid_map.numpy(), bool(sid_cfg.get("spread_collisions")))
    near = [None if p < 0 else bundle.item_ids[p] for p in nearest]
    if bundle.sid_map.shape[0] == len(codebooks):  # SIDs without a dedup digit: only digit 0 fits
        return NewItemSIDs(sids[:, :-1], sids[:, -1] == 0, near)
    return NewItemSIDs(sids, sids[:, -1] < bundle.model_config.layout.cardinalities[-1], near)


def new_item_sids(X: np.ndarray, codebooks: list[np.ndarray], existing: np.ndarray,
                  spread: bool) -> tuple[np.ndarray, np.ndarray]:
    """SIDs for new items' embeddings X (M, D) beside a catalogue's (L, N) PID->SID table, whose
    last row is the dedup digit, or which has no such row (L = levels) when every tuple is unique.

    -> (sids (M, levels + 1) int64, digit last, unique among the catalogue's and each other's;
    (M,) index of an existing item holding the codes the quantiser gave each new item, or -1).
    With `spread`, an item whose codes are taken takes the nearest last-level code its prefix
    has free (as `training.quantize.spread_last_level` placed the catalogue); otherwise, or when
    the prefix has none free, it takes the next dedup digit of its codes.
    """
    from sidrec.training.quantize import assign_codes, last_level_residual, sq_dists

    codes = assign_codes(X, codebooks)  # (M, levels)
    k = codes.shape[1]
    taken: dict[tuple[int, ...], int] = {}  # codes -> largest dedup digit held
    first_item: dict[tuple[int, ...], int] = {}
    for p in range(existing.shape[1]):
        key = tuple(int(c) for c in existing[:k, p])
        taken[key] = max(taken.get(key, -1), int(existing[k, p]) if len(existing) > k else 0)
        first_item.setdefault(key, p)
    by_distance = None
    if spread:
        R = last_level_residual(X, codes, codebooks)  # (M, D)
        by_distance = sq_dists(R, np.asarray(codebooks[-1], dtype=np.float64)).argsort(1)  # (M, K) nearest first
    digits, nearest = [], []
    for i, row in enumerate(codes):
        key = given = tuple(int(c) for c in row)
        if by_distance is not None and key in taken:
            free = (c for c in by_distance[i].tolist() if key[:-1] + (c,) not in taken)
            row[-1] = next(free, row[-1])
            key = tuple(int(c) for c in row)
        d = taken.get(key, -1) + 1
        taken[key] = d
        digits.append(d)
        nearest.append(first_item.get(given, -1))
    sids = np.concatenate([codes, np.asarray(digits, dtype=np.int64)[:, None]], axis=1)
    return sids, np.asarray(nearest, dtype=np.int64)
