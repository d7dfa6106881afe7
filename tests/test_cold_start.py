"""Cold start (model/cold_start.py through RecommendEngine): an item added at run time whose SID
sits in a cluster is returned for a history from that cluster with the blend on and not with it
off; deletions, filters and exclusions still apply to cold items; 'off' restores the exact
previous results; results are deterministic. A small random model over a synthetic catalogue
whose codebooks make four well-separated clusters; CPU, no Redis, no service."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from service_fixtures import random_model

from sidrec.model.bundle import load_bundle, save_bundle
from sidrec.model.cold_start import ColdStart, ColdStartOptions, reconstructions
from sidrec.model.engine import EngineOptions, RecommendEngine

LAYOUT = (4, 8, 8)  # 3 codes, no dedup digit
D = 16
N = 120


def _codebooks(g: torch.Generator) -> dict[str, torch.Tensor]:
    c0 = torch.eye(D)[:4] * 4.0  # four orthogonal, far-apart clusters
    return {"codebook_0": c0, "codebook_1": torch.randn(8, D, generator=g) * 0.3,
            "codebook_2": torch.randn(8, D, generator=g) * 0.1}


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory):
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model = random_model(LAYOUT, g)
    cells = torch.randperm(4 * 8 * 8, generator=g)[:N]
    sm = torch.stack([cells // 64, (cells // 8) % 8, cells % 8])  # (L, N), unique
    items = [{"item_id": f"i{i}", "text": f"item {i}", "attributes": {"shop": ["a" if i % 2 else "b"]}}
             for i in range(N)]
    return save_bundle(tmp_path_factory.mktemp("cold") / "b", model, sm, [f"i{i}" for i in range(N)],
                       codebooks=_codebooks(g), items=items)


def _engine(path, **cold) -> RecommendEngine:
    return RecommendEngine(load_bundle(path), EngineOptions(dtype="float32", tune_malloc=False,
                                                            cold_start=ColdStartOptions(**cold)))


def _cluster_history(eng: RecommendEngine, c: int, n: int = 6) -> list[int]:
    sm = eng.sid_map
    return [i for i in range(N) if int(sm[0, i]) == c][:n]


def _free_sid_in(eng: RecommendEngine, c: int) -> torch.Tensor:
    held = {tuple(eng.sid_map[:, i].tolist()) for i in range(eng.num_items)}
    for a in range(8):
        for b in range(8):
            if (c, a, b) not in held:
                return torch.tensor([[c], [a], [b]])
    raise AssertionError("no free SID in the cluster")


def _top(eng, hist, n=10, **kw):
    res = eng.recommend([hist], 20, n, **kw)
    return [eng.item_ids[i] for i in res.items[0, : int(res.n_valid[0])].tolist()]


def test_cold_item_in_the_histories_cluster_is_returned_only_with_the_blend(bundle_path):
    mode = "dense"
    on = _engine(bundle_path, mode=mode, weight=20.0, bias=0.0)
    off = _engine(bundle_path, mode="off")
    try:
        off_hits = 0
        for c in range(4):
            hist = _cluster_history(on, c)
            sid = _free_sid_in(on, c)
            for eng in (on, off):
                eng.add_items([f"new{c}"], sid, wait=True)
            assert f"new{c}" in _top(on, hist), f"cluster {c}: cold item missing with the blend on ({mode})"
            off_hits += f"new{c}" in _top(off, hist)  # a random model may find a path by chance
            assert on.item_sid(f"new{c}")[0] == c  # shares the cluster's prefix
        assert off_hits < 4
    finally:
        on.close()
        off.close()


def test_prefix_mode_inherits_the_mass_of_the_parent_prefix(bundle_path):
    on = _engine(bundle_path, mode="prefix", bias=0.0)
    off = _engine(bundle_path, mode="off")
    try:
        hist = _cluster_history(on, 0)
        res = off.recommend([hist], 20, 20)
        held = {tuple(on.sid_map[:, i].tolist()) for i in range(N)}
        # under the parent prefix of the beam's top item: its mass (>= that item's score) is inherited
        a, b = res.sids[0, 0, :2].tolist()
        sid = next(torch.tensor([[a], [b], [c]]) for c in range(8) if (a, b, c) not in held)
        for eng in (on, off):
            eng.add_items(["new"], sid, wait=True)
        top = _top(on, hist)
        assert "new" in top[:2]  # ties break by internal index: after the top item at worst
        other = next(c for c in range(4) if c != a)  # a prefix the beam never reached: nothing inherited
        far = _free_sid_in(on, other)
        if not any(tuple(s[:2]) == tuple(far[:2, 0].tolist()) for s in res.sids[0].tolist()):
            on.add_items(["far"], far, wait=True)
            assert "far" not in _top(on, hist, n=20)
    finally:
        on.close()
        off.close()


def test_masks_apply_to_cold_items(bundle_path):
    eng = _engine(bundle_path, mode="dense", weight=20.0, bias=0.0)
    try:
        hist = _cluster_history(eng, 1)
        eng.add_items(["new"], _free_sid_in(eng, 1), attributes=[{"shop": ["c"]}], wait=True)
        assert _top(eng, hist)[0] == "new"
        assert "new" not in _top(eng, hist, filters=[{"shop": ["a", "b"]}])
        assert _top(eng, hist, filters=[{"shop": ["c"]}]) == ["new"]  # the only item passing
        assert "new" not in _top(eng, hist, exclude=[[eng.index_of["new"]]])
        eng.set_masked(["new"])
        assert "new" not in _top(eng, hist)
        assert _top(eng, hist, filters=[{"shop": ["c"]}]) == []  # deleted: nothing passes
        eng.set_masked(["new"], masked=False)
        assert _top(eng, hist)[0] == "new"
        top = _top(eng, hist, filters=[{"shop": ["a"]}])
        assert len(top) == 10 and all(eng.attributes_of(i)["shop"] == ["a"] for i in top)
    finally:
        eng.close()


def test_off_restores_exact_results_and_warm_items_are_not_blended(bundle_path):
    base = _engine(bundle_path, mode="off")
    on = _engine(bundle_path, mode="dense", weight=20.0, bias=0.0)
    try:
        hists = [_cluster_history(base, c) for c in range(4)] + [[], [3, 7]]
        before = base.recommend(hists, 20, 10)
        same = on.recommend(hists, 20, 10)  # nothing cold yet: the beam's result untouched
        assert torch.equal(before.items, same.items) and torch.equal(before.scores, same.scores)
        on.add_items(["w"], _free_sid_in(on, 2), cold=False, wait=True)  # warm: not blended
        base.add_items(["w"], _free_sid_in(base, 2), wait=True)
        after_warm = on.recommend(hists, 20, 10)
        off_after = base.recommend(hists, 20, 10)
        assert torch.equal(after_warm.items, off_after.items) and torch.equal(after_warm.scores, off_after.scores)
        on.options = replace(on.options, cold_start=ColdStartOptions(mode="off"))
        on.add_items(["cold"], _free_sid_in(on, 3), wait=True)
        base.add_items(["cold"], _free_sid_in(base, 3), wait=True)
        a, b = on.recommend(hists, 20, 10), base.recommend(hists, 20, 10)
        assert torch.equal(a.items, b.items) and torch.equal(a.scores, b.scores)
    finally:
        base.close()
        on.close()


def test_blend_is_deterministic_and_scores_sorted(bundle_path):
    eng = _engine(bundle_path, mode="dense", weight=20.0, bias=-2.0)
    try:
        for c in range(4):
            eng.add_items([f"n{c}"], _free_sid_in(eng, c), wait=True)
        hists = [_cluster_history(eng, c) for c in range(4)] + [[0, 1, 2]]
        first = eng.recommend(hists, 16, 8)
        for _ in range(3):
            again = eng.recommend(hists, 16, 8)
            assert torch.equal(first.items, again.items) and torch.equal(first.scores, again.scores)
        assert (first.scores[:, 1:] <= first.scores[:, :-1]).all()
        for b in range(len(hists)):  # the returned SIDs are the items' SIDs
            n = int(first.n_valid[b])
            assert torch.equal(first.sids[b, :n], eng.sid_map[:, first.items[b, :n]].T)
    finally:
        eng.close()


def test_reconstruction_and_bad_options():
    cbs = [torch.randn(4, 3), torch.randn(5, 3)]
    sids = torch.tensor([[1, 2], [0, 4], [0, 1]])  # a trailing dedup row is ignored
    want = torch.nn.functional.normalize(torch.stack([cbs[0][1] + cbs[1][0], cbs[0][2] + cbs[1][4]]), dim=-1)
    assert torch.allclose(reconstructions(cbs, sids), want)
    with pytest.raises(ValueError, match="mode"):
        ColdStartOptions(mode="magic")
    with pytest.raises(ValueError, match="decay"):
        ColdStartOptions(decay=0.0)
    cs = ColdStart({}, 3)
    assert not cs.can_score_dense


def test_bundle_without_codebooks_serves_dense_as_off(tmp_path, bundle_path):
    b = load_bundle(bundle_path)
    b.codebooks = {}
    eng = RecommendEngine(b, EngineOptions(dtype="float32", tune_malloc=False))
    try:
        assert eng.options.cold_start.mode == "off"
        eng.add_items(["new"], _free_sid_in(eng, 1), wait=True)
        assert eng.recommend([_cluster_history(eng, 1)], 20, 10).n_valid.tolist() == [10]
    finally:
        eng.close()


def test_relative_scores_are_measured_from_the_best_beam(bundle_path):
    off = _engine(bundle_path, mode="off")
    rel = _engine(bundle_path, mode="dense", weight=0.0, bias=-0.5, relative=True)
    try:
        hist = _cluster_history(off, 2)
        best = float(off.recommend([hist], 20, 10).scores[0, 0])
        for eng in (off, rel):
            eng.add_items(["new"], _free_sid_in(eng, 2), wait=True)
        res = rel.recommend([hist], 20, 10)
        j = res.items[0].tolist().index(rel.index_of["new"])
        assert float(res.scores[0, j]) == pytest.approx(best - 0.5, abs=1e-5)  # weight 0: the bias alone
    finally:
        off.close()
        rel.close()


def test_text_embeddings_outrank_sid_reconstructions(bundle_path, tmp_path):
    """With the bundle's item embeddings, a cold item whose text embedding matches the history's is
    returned although its SID sits in another cluster; without its embedding (reconstruction
    only), it is not. A moved item added without an embedding falls back to its reconstruction."""
    b = load_bundle(bundle_path)
    books = {k: v for k, v in b.codebooks.items() if k.startswith("codebook_")}
    recs = reconstructions([books[f"codebook_{k}"] for k in range(3)], b.sid_map)  # (N, D)
    path = save_bundle(tmp_path / "emb", b.model, b.sid_map, b.item_ids,
                       codebooks={**books, "item_embeddings": recs})
    eng = _engine(path, mode="dense", weight=20.0, bias=0.0, decay=1.0)
    try:
        assert eng.cold._known[:N].all()
        hist = _cluster_history(eng, 0)
        profile = torch.nn.functional.normalize(recs[hist].mean(0), dim=0)
        sid = _free_sid_in(eng, 2)  # far from the history by its codes
        eng.add_items(["far-codes"], sid, wait=True)
        assert "far-codes" not in _top(eng, hist)
        eng.add_items(["far-codes"], sid, wait=True, embeddings=profile[None].numpy())  # same SID, new text
        assert "far-codes" in _top(eng, hist)[:3]
        eng.add_items(["far-codes"], _free_sid_in(eng, 2), wait=True)  # moved, no embedding: codes again
        assert "far-codes" not in _top(eng, hist)
        with pytest.raises(ValueError, match=r"embeddings must be \(1, 16\)"):
            eng.add_items(["bad"], _free_sid_in(eng, 3), embeddings=torch.zeros(1, 5).numpy())
        assert "bad" not in eng.index_of  # refused before anything was written
    finally:
        eng.close()


def test_bundle_refuses_item_embeddings_of_the_wrong_length(bundle_path, tmp_path):
    from sidrec.model.bundle import BundleError

    b = load_bundle(bundle_path)
    with pytest.raises(BundleError, match="one row per item"):
        save_bundle(tmp_path / "x", b.model, b.sid_map, b.item_ids,
                    codebooks={**b.codebooks, "item_embeddings": torch.zeros(N - 1, D)})


def test_rerank_resorts_the_beam_by_text_similarity_and_travels_in_the_bundle(bundle_path, tmp_path):
    """The hybrid re-rank: a bundle whose run chose `eval.rerank_weight` serves it; each returned
    item's score is its beam log-prob + weight * (cos - 1) against the history's profile, the
    items are the beam's own, sorted; weight 0 (an override) serves the beam's exact order."""
    from sidrec.model.cold_start import RerankOptions

    b = load_bundle(bundle_path)
    books = {k: v for k, v in b.codebooks.items() if k.startswith("codebook_")}
    emb = torch.nn.functional.normalize(torch.randn(N, D, generator=torch.Generator().manual_seed(1)), dim=-1)
    path = save_bundle(tmp_path / "rr", b.model, b.sid_map, b.item_ids, codebooks={**books, "item_embeddings": emb},
                       extra_config={"pipeline": {"eval": {"rerank_weight": 3.0, "rerank_decay": 0.5}}})
    on = RecommendEngine(load_bundle(path), EngineOptions(dtype="float32", tune_malloc=False))
    off = RecommendEngine(load_bundle(path), EngineOptions(dtype="float32", tune_malloc=False, rerank_weight=0.0))
    try:
        assert on.rerank == RerankOptions(3.0, 0.5) and off.rerank.weight == 0.0
        hist = [[3, 17, 42, 8], [5], []]
        beam = off.recommend(hist, 20, 20)
        got = on.recommend(hist, 20, 10)
        plain = off.recommend(hist, 20, 10)
        assert torch.equal(plain.items, beam.items[:, :10])
        for r, h in enumerate(hist):
            n = int(beam.n_valid[r])
            items, scores = beam.items[r, :n], beam.scores[r, :n]
            if h:
                w = 0.5 ** torch.arange(len(h) - 1, -1, -1, dtype=torch.float32)
                e16 = emb.half().float()  # the engine keeps item vectors in float16
                prof = torch.nn.functional.normalize((w[:, None] * e16[h]).sum(0), dim=0)
                expect = scores + 3.0 * (e16[items] @ prof - 1.0)
            else:  # no history, no profile: the beam's scores and order
                expect = scores
            order = torch.argsort(expect, descending=True, stable=True)[:10]
            assert got.items[r, :10].tolist() == items[order].tolist()
            assert torch.allclose(got.scores[r, :10], expect[order], atol=1e-4)
            assert torch.equal(got.sids[r, :10], beam.sids[r, :n][order])
        assert not torch.equal(got.items[0], plain.items[0]), "a weight of 3 reordered nothing"
        assert torch.equal(got.items[2], plain.items[2])
    finally:
        on.close()
        off.close()
    with pytest.raises(ValueError, match="re-rank decay"):
        RerankOptions(1.0, 0.0)
