"""Synthetic data generator (training/synthetic.py): determinism, P5 round trip, learnable structure."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from sidrec.training.data import DataError, leave_one_out, popularity, read_p5
from sidrec.training.embeddings import hashed_text_embeddings, render_text
from sidrec.training.synthetic import make_synthetic, write_p5


def _same(a, b) -> bool:
    return (a.item_ids == b.item_ids and a.item_fields == b.item_fields and a.user_ids == b.user_ids
            and len(a.sequences) == len(b.sequences)
            and all(np.array_equal(x, y) for x, y in zip(a.sequences, b.sequences)))


def test_deterministic_given_seed():
    a = make_synthetic(120, 200, seed=3)
    b = make_synthetic(120, 200, seed=3)
    c = make_synthetic(120, 200, seed=4)
    assert _same(a, b) and a.fingerprint == b.fingerprint
    assert not _same(a, c) and a.fingerprint != c.fingerprint
    assert a.num_items == 120 and a.num_users == 200
    lens = np.array([len(s) for s in a.sequences])
    assert lens.min() >= 5 and lens.max() <= 20
    assert all(s.dtype == np.int64 and s.min() >= 0 and s.max() < 120 for s in a.sequences)
    assert set(a.item_fields[0]) == {"title", "categories", "brand", "price"}
    assert a.item_fields[0]["categories"].startswith("Beauty > ")


def test_write_p5_round_trip(tmp_path):
    data = make_synthetic(80, 150, seed=1)
    out = write_p5(data, tmp_path / "syn")
    assert sorted(p.name for p in out.iterdir()) == ["item_text.tsv", "sequential_data.txt"]
    back = read_p5(out)
    assert _same(data, back)
    assert back.fingerprint == data.fingerprint


def test_write_p5_rejects_what_p5_cannot_hold(tmp_path):
    data = make_synthetic(40, 20, seed=0)
    data.item_fields[0]["title"] = "tab\there"
    with pytest.raises(DataError, match=r"item '1'.*'title'"):
        write_p5(data, tmp_path)
    data.item_ids[0] = "sku-1"
    with pytest.raises(DataError, match="'sku-1'"):
        write_p5(data, tmp_path)


def test_successor_oracle_beats_popularity_by_a_wide_margin():
    data = make_synthetic(300, 800, seed=5)
    split = leave_one_out(data)
    successors = [Counter() for _ in range(data.num_items)]
    for seq in split.test_history:
        for a, b in zip(seq[:-1], seq[1:]):
            successors[a][b] += 1
    top_pop = set(np.argsort(-popularity(split.train, data.num_items))[:10].tolist())
    hit_pop = np.mean([t in top_pop for t in split.test_target])
    hit_oracle = np.mean([t in {i for i, _ in successors[h[-1]].most_common(10)}
                          for h, t in zip(split.test_history, split.test_target)])
    assert hit_oracle > 0.5
    assert hit_oracle > 4 * hit_pop


def test_text_reflects_category_structure():
    data = make_synthetic(200, 10, seed=2)
    X = hashed_text_embeddings([render_text(f) for f in data.item_fields], dim=128)
    cats = np.array([f["categories"] for f in data.item_fields])
    sim = X @ X.T  # (N, N)
    same = cats[:, None] == cats[None, :]
    np.fill_diagonal(same, False)
    off = ~same
    np.fill_diagonal(off, False)
    assert sim[same].mean() > sim[off].mean() + 0.2
