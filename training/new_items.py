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
from sidrec.model.sid_assign import candidate_sids, claim_first_free, codebooks_of, quantize


@dataclass(frozen=True)
class NewItemSIDs:
    sids: np.ndarray  # (M, L) int64
    fits: np.ndarray  # (M,) bool: the dedup digit is inside the bundle's vocabulary
    nearest_existing: list[str | None]  # an existing item holding the codes the quantiser gave, if any
    embeddings: np.ndarray | None = None  # (M, D) the texts' embeddings (engine.add_items takes them)


def assign_new_items(bundle_path: str | Path, texts: list[str], embed_model: str | None = None) -> NewItemSIDs:
    from sidrec.training.embeddings import embed_items

    config = read_config(bundle_path)
    sid_cfg = config.get("sid", {})
    if sid_cfg.get("method", "rq_kmeans") != "rq_kmeans":
        raise BundleError(f"bundle {bundle_path} was quantised with {sid_cfg.get('method')!r}; new items can be "
                          "assigned only against RQ-KMeans codebooks (input space)")
    bundle = load_bundle(bundle_path)
    codebooks = codebooks_of(bundle.codebooks)
    if not codebooks:
        raise BundleError(f"bundle {bundle_path} holds no codebooks: it cannot assign SIDs to new items")
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
        return NewItemSIDs(sids[:, :-1], sids[:, -1] == 0, near, X)
    return NewItemSIDs(sids, sids[:, -1] < bundle.model_config.layout.cardinalities[-1], near, X)


def new_item_sids(X: np.ndarray, codebooks: list[np.ndarray], existing: np.ndarray,
                  spread: bool) -> tuple[np.ndarray, np.ndarray]:
    """SIDs for new items' embeddings X (M, D) beside a catalogue's (L, N) PID->SID table, whose
    last row is the dedup digit, or which has no such row (L = levels) when every tuple is unique.

    -> (sids (M, levels + 1) int64, digit last, unique among the catalogue's and each other's;
    (M,) index of an existing item holding the codes the quantiser gave each new item, or -1).
    With `spread`, an item whose codes are taken takes the nearest last-level code its prefix
    has free (as `training.quantize.spread_last_level` placed the catalogue); otherwise, or when
    the prefix has none free, it takes the lowest free dedup digit of its codes. The assignment
    itself is `model.sid_assign`'s (the same code the service runs for items added live); here
    the digit is unbounded and `assign_new_items` reports which ones fit the bundle's layout.
    """
    codes, residual = quantize(X, codebooks)  # (M, levels)
    k = codes.shape[1]
    digits = existing[k] if len(existing) > k else np.zeros(existing.shape[1], dtype=np.int64)
    taken = {tuple(int(c) for c in col) for col in np.concatenate([existing[:k], digits[None]]).T.tolist()}
    first_item: dict[tuple[int, ...], int] = {}
    for p, col in enumerate(existing[:k].T.tolist()):
        first_item.setdefault(tuple(col), p)
    unbounded = existing.shape[1] + len(codes) + 1  # enough digits that every item finds one
    cards = [int(cb.shape[0]) for cb in codebooks] + [unbounded]
    chosen = claim_first_free(candidate_sids(codes, residual, codebooks, cards, spread), taken)
    nearest = [first_item.get(tuple(int(c) for c in row), -1) for row in codes]
    return np.asarray(chosen, dtype=np.int64).reshape(len(codes), k + 1), np.asarray(nearest, dtype=np.int64)
