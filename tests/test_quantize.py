"""Quantisers and SIDs (training/quantize.py, training/sids.py)."""
from __future__ import annotations

import numpy as np
import pytest

from sidrec.training.quantize import RQResult, assign_codes, rq_kmeans, rq_vae, spread_last_level
from sidrec.training.sids import add_dedup_digit, plot_codebook_usage, sid_report


@pytest.fixture(autouse=True)
def _one_thread():
    import faiss

    faiss.omp_set_num_threads(1)


def _blobs(seed: int, k: int = 8, n: int = 640, d: int = 16, spread: float = 0.3):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 5
    labels = rng.integers(k, size=n)
    X = centers[labels] + rng.normal(size=(n, d)) * spread
    return X.astype(np.float32), labels


def _purity(labels: np.ndarray, codes: np.ndarray) -> float:
    return sum(np.bincount(labels[codes == c]).max() for c in np.unique(codes)) / len(labels)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_rq_kmeans_recovers_planted_clusters(seed):
    X, labels = _blobs(seed)
    res = rq_kmeans(X, levels=3, codebook_size=8, seed=seed)
    assert isinstance(res, RQResult) and res.method == "rq_kmeans"
    assert res.codes.shape == (len(X), 3) and res.codes.dtype == np.int64
    assert res.cardinalities == (8, 8, 8)
    assert all(cb.shape == (8, 16) and cb.dtype == np.float32 for cb in res.codebooks)
    assert _purity(labels, res.codes[:, 0]) == 1.0  # level 0 codes are the blobs, up to permutation
    assert _purity(res.codes[:, 0], labels) == 1.0


def test_residual_levels_reduce_reconstruction_error():
    rng = np.random.default_rng(11)
    X = rng.normal(size=(500, 24)).astype(np.float32)
    res = rq_kmeans(X, levels=3, codebook_size=16, seed=11)
    rep = sid_report(res.codes, res.codebooks, X, res.cardinalities)
    mse = rep["reconstruction_mse"]
    assert len(mse) == 3 and rep["total_energy"] > mse[0] > mse[1] > mse[2]


def test_assign_codes_reproduces_training_codes():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(400, 12)).astype(np.float32)
    res = rq_kmeans(X, levels=3, codebook_size=32, seed=5)
    np.testing.assert_array_equal(assign_codes(X, res.codebooks), res.codes)
    np.testing.assert_array_equal(res.assign(X[:17]), res.codes[:17])
    with pytest.raises(ValueError, match=r"codebook 0 has shape"):
        assign_codes(X[:, :5], res.codebooks)


def test_balanced_rq_kmeans_respects_its_cap():
    X, _ = _blobs(7, k=3, n=301, d=8)  # three uneven blobs, 10 codes -> cap ceil(301 / 10) = 31
    res = rq_kmeans(X, levels=2, codebook_size=10, balanced=True, seed=7)
    assert res.method == "rq_kmeans_balanced"
    for level in range(2):
        counts = np.bincount(res.codes[:, level], minlength=10)
        assert counts.max() <= 31 and counts.sum() == 301
    plain = rq_kmeans(X, levels=1, codebook_size=10, seed=7)
    assert np.bincount(plain.codes[:, 0]).max() >= np.bincount(res.codes[:, 0]).max()


def test_fewer_items_than_codewords_clamps_cardinality():
    rng = np.random.default_rng(9)
    X = rng.normal(size=(5, 4)).astype(np.float32)
    res = rq_kmeans(X, levels=2, codebook_size=256, seed=9)
    assert res.cardinalities == (5, 5)
    assert sorted(res.codes[:, 0].tolist()) == [0, 1, 2, 3, 4]  # every item is its own centroid
    with pytest.raises(ValueError, match="row 2 holds NaN"):
        rq_kmeans(np.where(np.arange(5)[:, None] == 2, np.nan, X), levels=1, codebook_size=2)


def test_rq_vae_runs_and_returns_valid_codes():
    import torch

    torch.set_num_threads(1)
    X, labels = _blobs(12, k=6, n=300, d=20)
    res = rq_vae(X, levels=3, codebook_size=16, epochs=15, latent_dim=8, hidden=(32,), batch_size=128, seed=12)
    assert res.method == "rq_vae" and res.codes.shape == (300, 3) and res.codes.dtype == np.int64
    assert res.cardinalities == (16, 16, 16)
    assert all(cb.shape == (16, 8) for cb in res.codebooks)
    assert ((res.codes >= 0) & (res.codes < 16)).all()
    assert len(np.unique(res.codes[:, 0])) >= 6
    np.testing.assert_array_equal(res.assign(X), res.codes)  # numpy encoder == trained quantiser
    assert _purity(labels, res.codes[:, 0]) > 0.9
    again = rq_vae(X, levels=3, codebook_size=16, epochs=15, latent_dim=8, hidden=(32,), batch_size=128, seed=12)
    np.testing.assert_array_equal(again.codes, res.codes)
    rep = sid_report(res.codes, res.codebooks, res.latent(X), res.cardinalities)
    assert rep["reconstruction_mse"] is not None
    assert sid_report(res.codes, res.codebooks, X, res.cardinalities)["reconstruction_mse"] is None


def test_dedup_digit_makes_every_sid_unique():
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 3, size=(200, 2))  # at most 9 tuples: heavy collisions
    sid_map, card = add_dedup_digit(codes)
    assert sid_map.shape == (3, 200) and sid_map.dtype == np.int64
    np.testing.assert_array_equal(sid_map[:2], codes.T)
    assert len({tuple(c) for c in sid_map.T.tolist()}) == 200
    for tup in {tuple(c) for c in codes.tolist()}:
        members = np.flatnonzero((codes == tup).all(1))
        assert sid_map[2, members].tolist() == list(range(len(members)))  # 0..n-1 by item index
    assert card == sid_map[2].max() + 1
    unique_codes = np.arange(10)[:, None] * np.array([[1, 2]])
    sid_map, card = add_dedup_digit(unique_codes)
    assert card == 1 and (sid_map[2] == 0).all()


def test_sid_report_and_plot(tmp_path):
    codes = np.array([[0, 1], [0, 1], [0, 1], [1, 0], [2, 2], [2, 0]])
    rep = sid_report(codes, None, None, (4, 3, 3))
    assert rep["unique_tuples"] == 4
    assert rep["collision_rate_before_dedup"] == pytest.approx(3 / 6)
    assert rep["max_dedup_digit"] == 2 and rep["dedup_cardinality"] == 3
    assert rep["unique_prefixes"] == [3, 4]
    lv0 = rep["per_level"][0]
    assert lv0["codes_used"] == 3 and lv0["utilisation"] == pytest.approx(0.75)
    assert 2.0 < lv0["perplexity"] < 3.0 and rep["reconstruction_mse"] is None
    with pytest.raises(ValueError, match="cardinality"):
        sid_report(codes, None, None, (2, 3))
    rng = np.random.default_rng(4)
    path = plot_codebook_usage(rng.integers(0, 16, size=(300, 3)), (16, 16, 16), tmp_path / "plots" / "usage.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["usage.png"]


def _tuples(codes: np.ndarray) -> int:
    return len(np.unique(codes, axis=0))


def test_spread_last_level_gives_colliding_items_free_codes_of_their_prefix():
    # Tight blobs with more items than level-1 codes: plain RQ codes collide a lot.
    X, _ = _blobs(3, k=6, n=300, d=8, spread=0.05)
    rq = rq_kmeans(X, levels=2, codebook_size=8, seed=3)
    assert _tuples(rq.codes) < 300
    spread, moved = spread_last_level(rq, X)
    assert spread.codebooks is rq.codebooks and spread.method == rq.method
    np.testing.assert_array_equal(spread.codes[:, 0], rq.codes[:, 0])  # only the last level changes
    assert moved == int((spread.codes[:, 1] != rq.codes[:, 1]).sum()) > 0
    for p in np.unique(rq.codes[:, 0]):
        items = np.flatnonzero(rq.codes[:, 0] == p)
        last = spread.codes[items, 1]
        # A prefix of m items holds min(m, 8) distinct last codes: all unique where 8 codes allow.
        assert len(np.unique(last)) == min(len(items), 8)
    # The dedup digit is needed only for prefixes with more than 8 items.
    over = sum(max(0, np.sum(rq.codes[:, 0] == p) - 8) for p in np.unique(rq.codes[:, 0]))
    sid_map, card = add_dedup_digit(spread.codes)
    assert int((sid_map[-1] > 0).sum()) == over


def test_spread_last_level_moves_nothing_without_collisions_and_keeps_the_closest_item():
    # Prefix 0 holds three items; two share last code 0. The one closer to code 0 keeps it, the
    # other takes its own next-nearest free code (2, as code 1 is held by the third item).
    C0 = np.zeros((1, 2), np.float32)
    C1 = np.array([[0, 0], [10, 0], [0, 3]], np.float32)
    X = np.array([[0.1, 0], [0.4, 0.8], [10, 0]], np.float32)
    rq = RQResult(np.array([[0, 0], [0, 0], [0, 1]]), [C0, C1], "rq_kmeans")
    spread, moved = spread_last_level(rq, X)
    assert spread.codes[:, 1].tolist() == [0, 2, 1] and moved == 1
    unique = RQResult(np.array([[0, 0], [0, 2], [0, 1]]), [C0, C1], "rq_kmeans")
    again, moved = spread_last_level(unique, X)
    assert moved == 0 and np.array_equal(again.codes, unique.codes)
    with pytest.raises(ValueError, match="3 items"):
        spread_last_level(rq, X[:2])


def test_new_items_take_a_free_last_code_in_a_spread_catalogue():
    from sidrec.training.new_items import new_item_sids

    C0 = np.zeros((1, 2), np.float32)
    C1 = np.array([[0, 0], [10, 0], [0, 3]], np.float32)
    existing = np.array([[0, 0], [0, 1], [0, 0]])  # (L=3, N=2): SIDs (0,0,0) and (0,1,0)
    X = np.array([[0.1, 0], [0.1, 0], [10, 0.2]], np.float32)  # codes (0,0), (0,0), (0,1): all taken
    sids, nearest = new_item_sids(X, [C0, C1], existing, spread=True)
    # First: nearest free last code is 2. Second: no code of prefix 0 is free -> dedup digit 1.
    # Third: code 1 is taken, 0 and 2 too by now -> dedup digit 1 of (0, 1).
    assert sids.tolist() == [[0, 2, 0], [0, 0, 1], [0, 1, 1]]
    assert nearest.tolist() == [0, 0, 1]
    plain, _ = new_item_sids(X, [C0, C1], existing, spread=False)
    assert plain.tolist() == [[0, 0, 1], [0, 0, 2], [0, 1, 1]]
    fresh, none = new_item_sids(np.array([[0, 2.9]], np.float32), [C0, C1], existing, spread=True)
    assert fresh.tolist() == [[0, 2, 0]] and none.tolist() == [-1]


def test_new_items_beside_sids_without_a_dedup_digit():
    from sidrec.training.new_items import new_item_sids

    C0 = np.zeros((1, 2), np.float32)
    C1 = np.array([[0, 0], [10, 0], [0, 3]], np.float32)
    existing = np.array([[0, 0], [0, 1]])  # (levels=2, N=2): every tuple unique, no digit row
    X = np.array([[0.1, 0], [0, 2.9], [10, 0.2]], np.float32)
    sids, nearest = new_item_sids(X, [C0, C1], existing, spread=True)
    # (0,0) is taken -> nearest free code 2; the second item wanted 2 too and finds no free code
    # left -> digit 1 (it does not fit a digit-less vocabulary); (0,1) is taken, nothing free.
    assert sids.tolist() == [[0, 2, 0], [0, 2, 1], [0, 1, 1]]
    assert nearest.tolist() == [0, -1, 1]
