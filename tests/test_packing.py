"""Packed decoder-only samples: same targets as sliding windows, and the same loss."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sidrec.model.config import ModelConfig, SIDLayout
from sidrec.model.transformer import SIDTransformer
from sidrec.training.config import TrainConfig
from sidrec.training.data import sliding_windows
from sidrec.training.packing import PackedSet
from sidrec.training.train import WindowSet, batch_logits, token_table


def _seqs(rng: np.random.Generator, n_items: int) -> list[np.ndarray]:
    lens = [1, 2, 3, 5, 7, 9, 12]  # some longer than max_history=4 below, one with no target
    return [rng.integers(0, n_items, size=n) for n in lens]


def test_packed_targets_match_sliding_windows():
    rng = np.random.default_rng(0)
    seqs = _seqs(rng, 30)
    ps = PackedSet.from_sequences(seqs, max_history=4)
    hist, length, target = sliding_windows(seqs, 4)
    assert len(ps) == len(target)
    assert sorted(ps.tgt_item.tolist()) == sorted(target.tolist())
    # Every target's history (the items before it in its sample) is exactly its window.
    packed = set()
    for s in range(ps.num_samples):
        h = ps.hist[ps.h_off[s]: ps.h_off[s + 1]]
        for p, t in zip(ps.tgt_pos[ps.t_off[s]: ps.t_off[s + 1]], ps.tgt_item[ps.t_off[s]: ps.t_off[s + 1]]):
            packed.add((tuple(h[:p].tolist()), int(t)))
    windows = {(tuple(x for x in row if x >= 0), int(t)) for row, t in zip(hist.tolist(), target)}
    assert packed == windows


def test_batches_cover_every_sample_once_with_a_fixed_count():
    rng = np.random.default_rng(1)
    ps = PackedSet.from_sequences([rng.integers(0, 50, size=n) for n in rng.integers(2, 30, 200)], 10)
    counts = set()
    for seed in range(3):
        b = ps.batches(64, np.random.default_rng(seed))
        counts.add(len(b))
        assert sorted(np.concatenate(b).tolist()) == list(range(ps.num_samples))
    assert counts == {-(-len(ps) // 64)}


@pytest.mark.parametrize("max_history", [4, 20])
def test_packed_loss_equals_window_loss(max_history):
    """The packed pass computes, target by target, the logits of the window pass."""
    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    n_items = 40
    layout = SIDLayout((8, 8, 4))
    sid = torch.as_tensor(np.stack([rng.integers(0, c, n_items) for c in layout.cardinalities]))
    cfg = TrainConfig(arch="decoder_only", objective="packed", d_model=32, n_heads=2, d_head=16, d_ff=64,
                      n_dec_layers=2, max_history=max_history)
    model = SIDTransformer(ModelConfig(layout=layout, **cfg.model_kwargs())).eval()
    seqs = _seqs(rng, n_items)
    table = token_table(sid, model.offsets)
    ps = PackedSet.from_sequences(seqs, max_history)
    ws = WindowSet(*sliding_windows(seqs, max_history))
    dev = torch.device("cpu")

    def losses(data, idx):
        logits, tgt = batch_logits(model, data, idx, table, sid, dev)
        per = torch.stack([F.cross_entropy(lg, tgt[:, l], reduction="none") for l, lg in enumerate(logits)], 1)
        return per.sum(1), tgt

    with torch.no_grad():
        lp, tp = losses(ps, np.arange(ps.num_samples))
        lw, tw = losses(ws, np.arange(len(ws)))
    # Order both by (target codes, loss) is ambiguous; pair them through the window identity instead.
    key_p = sorted(zip(tp.tolist(), lp.tolist()))
    key_w = sorted(zip(tw.tolist(), lw.tolist()))
    assert len(key_p) == len(key_w)
    for (cp, a), (cw, b) in zip(key_p, key_w):
        assert cp == cw
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4)


def test_packed_objective_is_refused_for_the_encoder_decoder():
    with pytest.raises(ValueError, match="decoder_only"):
        TrainConfig(arch="encoder_decoder", objective="packed")
    with pytest.raises(ValueError, match="objective"):
        TrainConfig(objective="bogus")
