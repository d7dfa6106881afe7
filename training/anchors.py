"""Published results to print beside ours, only for the dataset they were measured on.

A benchmark that ran on dataset X must not print a paper's row for dataset Y as if it were the
bar. `identify_dataset` recognises the datasets whose published rows we hold and `anchor_rows`
returns those rows (none for an unknown dataset). Two ways of recognising, weakest last:

- by content: sha256 of the user sequences in P5 form (`user item_1 ... item_n`, one line each,
  `\\n` endings). For a P5 copy with `\\n` endings that is sha256(sequential_data.txt); the Beauty
  copy in ../shared/data/amazon-beauty has `\\r\\n` endings, so its file hash is listed too. Only
  Beauty is known this way: we cannot hash data we do not have.
- by shape: the user and item counts of the P5 leave-one-out splits (TIGER's Table 1). Sports and
  Toys are recognised only this way; a dataset with the same counts would pass for them, which is
  why a match says how it was made, and the label printed with the row carries it.

This module holds no model code and computes no metrics (see `training.evaluate`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from sidrec.training.data import P5_SEQUENCES, InteractionData


@dataclass(frozen=True)
class KnownDataset:
    name: str
    users: int
    items: int
    sequences_sha256: tuple[str, ...] = ()  # content hashes (see the module docstring)
    file_sha256: tuple[str, ...] = ()  # sha256 of sequential_data.txt copies we have seen


@dataclass(frozen=True)
class Anchor:
    source: str  # who published it
    dataset: str
    metrics: dict[str, float]  # recall@5, ndcg@5, recall@10, ndcg@10 (a subset where unpublished)


@dataclass(frozen=True)
class DatasetMatch:
    name: str
    how: str  # "content" (sha256) or "shape" (user/item counts)
    detail: str


KNOWN = (
    # Hashes computed here on 2026-12-06 from ../shared/data/amazon-beauty (22,363 users).
    KnownDataset("Amazon Beauty", 22363, 12101,
                 sequences_sha256=("226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8",),
                 file_sha256=("f85a84ab47d70e82bf0e7301804270af10fb51e127ab8f0885697d593f6f6d43",)),
    # Not available here: recognised by the P5 split's counts only.
    KnownDataset("Amazon Sports", 35598, 18357),
    KnownDataset("Amazon Toys", 19412, 11924),
)

# TIGER (Rajput et al., NeurIPS 2023), Table 2: Recall@5, NDCG@5, Recall@10, NDCG@10 on test.
ANCHORS = (
    Anchor("TIGER (paper)", "Amazon Beauty", {"recall@5": 0.0454, "ndcg@5": 0.0321, "recall@10": 0.0648,
                                              "ndcg@10": 0.0384}),
    Anchor("GRID (paper, RK-Means, Flan-T5-XL)", "Amazon Beauty", {"recall@5": 0.0422}),
    Anchor("TIGER (paper)", "Amazon Sports", {"recall@5": 0.0264, "ndcg@5": 0.0181, "recall@10": 0.0400,
                                              "ndcg@10": 0.0225}),
    Anchor("TIGER (paper)", "Amazon Toys", {"recall@5": 0.0521, "ndcg@5": 0.0371, "recall@10": 0.0712,
                                            "ndcg@10": 0.0432}),
)


def sequences_sha256(data: InteractionData) -> str:
    """sha256 of the user sequences written as P5 lines with external ids and `\\n` endings."""
    h = hashlib.sha256()
    ids = data.item_ids
    for user, seq in zip(data.user_ids, data.sequences):
        h.update((" ".join([user, *(ids[i] for i in seq)]) + "\n").encode())
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def identify_dataset(data: InteractionData, path: str | Path | None = None,
                     known: tuple[KnownDataset, ...] = KNOWN) -> DatasetMatch | None:
    """The known dataset `data` is (by content first, then by shape), or None."""
    content = sequences_sha256(data)
    seq_file = Path(path) / P5_SEQUENCES if path is not None and Path(path).is_dir() else None
    fhash = file_sha256(seq_file) if seq_file is not None and seq_file.is_file() else None
    for k in known:
        if content in k.sequences_sha256 or (fhash is not None and fhash in k.file_sha256):
            return DatasetMatch(k.name, "content", f"sha256 of the sequences {content[:12]}")
    for k in known:
        if (data.num_users, data.num_items) == (k.users, k.items):
            return DatasetMatch(k.name, "shape", f"{k.users:,} users and {k.items:,} items, as its P5 split "
                                                 "(contents not verified)")
    return None


def anchor_rows(match: DatasetMatch | None) -> list[Anchor]:
    """The published rows for the matched dataset; none for an unknown one."""
    if match is None:
        return []
    return [a for a in ANCHORS if a.dataset == match.name]
