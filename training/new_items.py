"""SIDs for new items without retraining: embed their text with the bundle's embedding model,
assign residual codes against the bundle's RQ-KMeans codebooks, and give each a de-duplication
digit that no existing or other new item with the same codes holds.

A new item whose digit would exceed the bundle's dedup cardinality cannot be represented by the
trained model's vocabulary; it is reported (`fits=False`) rather than silently clipped. This
module does not change the bundle: adding items to a catalogue is a new bundle version.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.bundle import BundleError, load_bundle, read_config


@dataclass(frozen=True)
class NewItemSIDs:
    sids: np.ndarray  # (M, L) int64
    fits: np.ndarray  # (M,) bool: the dedup digit is inside the bundle's vocabulary
    nearest_existing: list[str | None]  # an existing item with the same first L-1 codes, if any


def assign_new_items(bundle_path: str | Path, texts: list[str], embed_model: str | None = None) -> NewItemSIDs:
    from training.embeddings import embed_items
    from training.quantize import assign_codes

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
    codes = assign_codes(X, codebooks)  # (M, levels)
    existing = bundle.sid_map.numpy()  # (L, N)
    k = codes.shape[1]
    taken: dict[tuple[int, ...], int] = {}
    first_item: dict[tuple[int, ...], str] = {}
    for p in range(existing.shape[1]):
        key = tuple(int(c) for c in existing[:k, p])
        taken[key] = max(taken.get(key, -1), int(existing[k, p]))
        first_item.setdefault(key, bundle.item_ids[p])
    dedup_card = bundle.model_config.layout.cardinalities[-1]
    digits, near = [], []
    for row in codes:
        key = tuple(int(c) for c in row)
        d = taken.get(key, -1) + 1
        taken[key] = d
        digits.append(d)
        near.append(first_item.get(key))
    sids = np.concatenate([codes, np.asarray(digits, dtype=np.int64)[:, None]], axis=1)
    return NewItemSIDs(sids, sids[:, -1] < dedup_card, near)
