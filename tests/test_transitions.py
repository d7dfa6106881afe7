"""The transition mixture (model/transitions.py through the bundle and RecommendEngine): the
table's counts, decays, row cut and normalisation on hand-checked sequences; the mixture's
formula; the bundle round trip and a broken table refused; the engine's ranking equal to the
mixture computed by hand over the beam's items and the extra next items, which obey the
request's exclusions and filters and the catalogue's deletions; weight 0 the beam's exact order.
CPU, no Redis, no service."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from service_fixtures import random_model

from sidrec.model.bundle import BundleError, load_bundle, save_bundle
from sidrec.model.engine import EngineOptions, RecommendEngine
from sidrec.model.transitions import TRANSITIONS_FILE, TransitionOptions, Transitions, lookup, mix_scores

LAYOUT = (4, 8, 8)
N = 120


def test_fit_counts_gaps_normalises_rows_and_keeps_the_heaviest():
    seqs = [[0, 1, 2], [0, 1], [3]]
    t = Transitions.fit(seqs, 5, window=2, decay=0.5, top_k=10)
    # row 0: 1 twice at gap 1 (2.0), 2 once at gap 2 (0.5) -> 0.8 / 0.2; row 1: 2 -> 1.0
    assert t.indptr.tolist() == [0, 2, 3, 3, 3, 3]
    assert t.indices.tolist() == [1, 2, 2]
    assert torch.allclose(t.values, torch.tensor([0.8, 0.2, 1.0]))
    cut = Transitions.fit(seqs, 5, window=2, decay=0.5, top_k=1)
    assert cut.indptr.tolist() == [0, 1, 2, 2, 2, 2] and cut.indices.tolist() == [1, 2]
    assert torch.allclose(cut.values, torch.tensor([0.8, 1.0]))  # probabilities of the full row
    one = Transitions.fit(seqs, 5, window=1, decay=0.5, top_k=10)
    assert one.indices.tolist() == [1, 2] and torch.allclose(one.values, torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        Transitions.fit([[0, 5]], 3)
    with pytest.raises(ValueError, match="window"):
        Transitions.fit(seqs, 5, window=0)


def test_next_items_weighs_the_history_by_recency_and_ignores_unknown_items():
    t = Transitions.fit([[0, 1, 2], [0, 1]], 5, window=2, decay=0.5)
    items, p = t.next_items([0, 1], decay=0.5, max_history=10)
    # weights: item 1 (latest) 1, item 0 0.5 -> 2/3, 1/3
    assert items.tolist() == [1, 2]
    assert torch.allclose(p, torch.tensor([0.8 / 3, 0.2 / 3 + 2 / 3]))
    # max_history 1 keeps the latest item only; items beyond the table (added later) are skipped
    items, p = t.next_items([0, 1, 7], decay=0.5, max_history=2)
    assert items.tolist() == [2] and torch.allclose(p, torch.tensor([1.0]))
    assert t.next_items([], 0.5, 10)[0].numel() == 0 and t.next_items([9], 0.5, 10)[0].numel() == 0
    got = lookup(t.dists([[0, 1], [4]], 0.5, 10), torch.tensor([[2, 1, -1, 3], [2, 1, 0, 0]]))
    assert torch.allclose(got, torch.tensor([[0.2 / 3 + 2 / 3, 0.8 / 3, 0, 0], [0, 0, 0, 0]]))
    top, ptop = t.top([0, 1], 1, 0.5, 10)
    assert top.tolist() == [2]


def test_mix_scores_is_the_log_of_the_mixture():
    s = torch.tensor([[math.log(0.5), math.log(0.1), float("-inf"), float("-inf")]])
    p = torch.tensor([[0.0, 0.4, 0.2, 0.0]])
    got = mix_scores(s, p, 0.25)
    want = torch.log(torch.tensor([[0.75 * 0.5, 0.75 * 0.1 + 0.25 * 0.4, 0.25 * 0.2, 0.0]]))
    assert torch.allclose(got[:, :3], want[:, :3]) and got[0, 3] == float("-inf")
    assert mix_scores(s, p, 0.0) is s
    with pytest.raises(ValueError, match="weight must be in"):
        TransitionOptions(1.0)
    with pytest.raises(ValueError, match="extra"):
        TransitionOptions(0.5, 0.1, -1)


def _table(seed: int = 0) -> Transitions:
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, N, size=rng.integers(2, 9)).tolist() for _ in range(300)]
    return Transitions.fit(seqs, N, window=3, decay=0.7, top_k=20)


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory):
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(7)
    cells = torch.randperm(4 * 8 * 8, generator=g)[:N]
    sm = torch.stack([cells // 64, (cells // 8) % 8, cells % 8])
    items = [{"item_id": f"i{i}", "text": f"item {i}", "attributes": {"shop": ["a" if i % 2 else "b"]}}
             for i in range(N)]
    cfg = {"pipeline": {"eval": {"transitions_weight": 0.6, "transitions_decay": 0.5, "transitions_extra": 5}}}
    return save_bundle(tmp_path_factory.mktemp("tr") / "b", random_model(LAYOUT, g), sm, [f"i{i}" for i in range(N)],
                       items=items, extra_config=cfg, transitions=_table())


def _engine(path, **kw) -> RecommendEngine:
    return RecommendEngine(load_bundle(path), EngineOptions(dtype="float32", tune_malloc=False, **kw))


def test_bundle_round_trip_and_a_broken_table_is_refused(bundle_path, tmp_path):
    b = load_bundle(bundle_path)
    t = _table()
    assert torch.equal(b.transitions.indptr, t.indptr) and torch.equal(b.transitions.indices, t.indices)
    assert torch.equal(b.transitions.values, t.values)
    with pytest.raises(BundleError, match="covers 10 items"):
        save_bundle(tmp_path / "x", b.model, b.sid_map, b.item_ids, transitions=Transitions.fit([[0, 1]], 10))
    from safetensors.torch import save_file

    bad = t.tensors()
    bad["indices"] = bad["indices"].clone()
    bad["indices"][0] = N + 3  # an item the bundle does not have
    p = save_bundle(tmp_path / "bad", b.model, b.sid_map, b.item_ids, transitions=t)
    save_file(bad, str(p / TRANSITIONS_FILE))
    with pytest.raises(BundleError, match=rf"{TRANSITIONS_FILE}.*indices must lie in \[0, {N}\)"):
        load_bundle(p, verify=False)
    with pytest.raises(BundleError, match="corrupted"):
        load_bundle(p)


def test_engine_serves_the_mixture_over_the_beam_and_the_extra_next_items(bundle_path):
    on, off = _engine(bundle_path), _engine(bundle_path, transitions_weight=0.0)
    try:
        assert on.mix == TransitionOptions(0.6, 0.5, 5) and off.mix.weight == 0.0
        table = on.transitions
        hist = [[3, 17, 42, 8], [5], []]
        beam = off.recommend(hist, 16, 16)
        got = on.recommend(hist, 16, 10)
        plain = off.recommend(hist, 16, 10)
        assert torch.equal(plain.items, beam.items[:, :10])
        for r, h in enumerate(hist):
            n = int(beam.n_valid[r])
            items, scores = beam.items[r, :n].tolist(), beam.scores[r, :n].tolist()
            nxt, _ = table.top(h, 2 * 5 + 16, 0.5, on.cfg.max_history)
            extra = [i for i in nxt.tolist() if i not in items][:5]
            cand = items + extra
            p = lookup(table.dists([h], 0.5, on.cfg.max_history), torch.tensor([cand]))[0]
            expect = torch.logaddexp(torch.tensor(scores + [float("-inf")] * len(extra)) + math.log(0.4),
                                     torch.log(0.6 * p))
            order = torch.argsort(expect, descending=True, stable=True)[:10]
            assert got.items[r, :10].tolist() == [cand[i] for i in order.tolist()]
            assert torch.allclose(got.scores[r, :10], expect[order], atol=1e-5)
            for k, i in enumerate(got.items[r, :10].tolist()):
                assert got.sids[r, k].tolist() == on.sid_map[:, i].tolist()
        assert set(got.items[0].tolist()) - set(beam.items[0].tolist()), "no extra next item was served"
        assert torch.equal(got.items[2], plain.items[2]), "an empty history must keep the beam's order"
    finally:
        on.close()
        off.close()


def test_extra_next_items_obey_exclusions_filters_and_deletions(bundle_path):
    eng = _engine(bundle_path)
    try:
        h = [3, 17, 42, 8]
        nxt, _ = eng.transitions.top(h, 30, eng.mix.decay, eng.cfg.max_history)
        victims = nxt[:6].tolist()  # the likeliest next items: served unless forbidden
        assert set(eng.recommend([h], 16, 10).items[0].tolist()) & set(victims)
        res = eng.recommend([h], 16, 10, exclude=[victims])
        assert not set(res.items[0].tolist()) & set(victims)
        res = eng.recommend([h], 16, 10, filters=[{"shop": ["a"]}])
        assert all(i % 2 == 1 for i in res.items[0].tolist() if i >= 0), "a filtered-out item was served"
        eng.set_masked([f"i{i}" for i in victims], True)
        res = eng.recommend([h], 16, 10)
        assert not set(res.items[0].tolist()) & set(victims), "a deleted item was served"
    finally:
        eng.close()


def test_eval_config_names_a_bad_transitions_knob():
    from sidrec.training.config import EvalConfig

    with pytest.raises(ValueError, match="eval.transitions_weight"):
        EvalConfig(transitions_weight=1.0)
    with pytest.raises(ValueError, match="eval.transitions_window"):
        EvalConfig(transitions_window=0)
