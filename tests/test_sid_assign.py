"""model.sid_assign: the one home of quantize, de-duplication codes and candidate SIDs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sidrec.model.sid_assign import (SidSpaceFull, add_dedup_digit, append_dedup_digit, candidate_sids,
                                     claim_first_free, codebooks_of, quantize)


def test_tensor_and_array_dedup_digits_agree():
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 3, size=(500, 2))  # many collisions
    sid_map, card = add_dedup_digit(codes)
    t, tcard = append_dedup_digit(torch.as_tensor(codes.T))
    assert card == tcard and np.array_equal(sid_map, t.numpy())
    assert len({tuple(c) for c in sid_map.T.tolist()}) == 500


def test_quantize_is_residual_nearest_centroid():
    rng = np.random.default_rng(0)
    books = [rng.standard_normal((5, 8)).astype(np.float32), rng.standard_normal((7, 8)).astype(np.float32)]
    X = rng.standard_normal((33, 8)).astype(np.float32)
    codes, residual = quantize(X, books)
    c0 = ((X[:, None] - books[0][None]) ** 2).sum(-1).argmin(1)
    R = X - books[0][c0]
    c1 = ((R[:, None] - books[1][None]) ** 2).sum(-1).argmin(1)
    assert np.array_equal(codes, np.stack([c0, c1], 1)) and np.allclose(residual, R, atol=1e-5)
    assert [b.shape for b in codebooks_of({"codebook_1": books[1], "codebook_0": books[0], "x": 0})] == [(5, 8), (7, 8)]
    with pytest.raises(ValueError, match="codebook 0"):
        quantize(X[:, :4], books)


def test_candidates_and_claims_never_share_a_sid():
    books = [np.zeros((1, 2), np.float32), np.array([[0, 0], [10, 0], [0, 3]], np.float32)]
    codes, residual = quantize(np.array([[0.1, 0.0]] * 6, np.float32), books)
    plain = candidate_sids(codes, residual, books, (1, 3, 4))
    assert plain[0] == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 3)]
    spread = candidate_sids(codes, residual, books, (1, 3, 4), spread=True)
    assert spread[0][:3] == [(0, 0, 0), (0, 2, 0), (0, 1, 0)]
    taken = {(0, 0, 0)}
    got = claim_first_free(plain[:3], taken)
    assert got == [(0, 0, 1), (0, 0, 2), (0, 0, 3)] and len(taken) == 4
    with pytest.raises(SidSpaceFull, match="item a: every SID"):
        claim_first_free(plain[:2], taken, names=["a", "b"])
    assert candidate_sids(codes, residual, books, (1, 3))[0] == [(0, 0)]  # no digit: the tuple alone
