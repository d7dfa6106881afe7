"""The engine's living catalogue: filters and exclusions inside the beam (exact against brute
force, top_n full when prefixes empty out), inserts, SID moves, collisions, attribute updates,
deletions, and the bundle's items.jsonl. Small random models on CPU; no Redis, no service."""
from __future__ import annotations

import json

import pytest
import torch

from sidrec.model.beam_search import encode_histories
from sidrec.model.bundle import BundleError, load_bundle, save_bundle
from sidrec.model.engine import EngineOptions, RecommendEngine
from test_decoding import CARDS, make_catalogue, make_model, teacher_forced_logp

N = 40
COLOURS = ("red", "green", "blue")


def _attrs(i: int, sm: torch.Tensor) -> dict:
    # colour by the first code (whole first-level prefixes pass or fail together); size by parity
    return {"colour": [COLOURS[int(sm[0, i]) % 3]], "size": ["even" if i % 2 == 0 else "odd", "any"]}


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory):
    torch.set_num_threads(1)
    model = make_model("encoder_decoder", seed=11)
    sm = make_catalogue(N, seed=11)
    items = [{"item_id": f"i{i}", "text": f"item number {i}", "attributes": _attrs(i, sm)} for i in range(N)]
    items[9]["text"] = "Crème \u2028 line\nbreak ✓"  # non-ASCII and line separators inside a text
    return save_bundle(tmp_path_factory.mktemp("cat") / "b", model, sm, [f"i{i}" for i in range(N)], items=items)


@pytest.fixture
def engine(bundle_path):
    eng = RecommendEngine(load_bundle(bundle_path), EngineOptions(dtype="float32", tune_malloc=False))
    yield eng
    eng.close()


HIST = [[1, 2, 3], [], [7]]


def _passes(engine, i, flt):
    a = engine.attributes_of(engine.item_ids[i])
    return all(any(v in a.get(k, []) for v in vals) for k, vals in flt.items())


def test_filter_with_full_beam_equals_exact_restricted_ranking(engine):
    flts = [{"colour": ["red", "blue"]}, {"size": ["odd"], "colour": ["green", "red"]}, None]
    n_pass = [sum(_passes(engine, i, f) for i in range(N)) if f else N for f in flts]
    top = min(n_pass + [10])
    res = engine.recommend(HIST, N, top, filters=flts)
    src, mask = encode_histories(HIST, engine.sid_map, engine.model.offsets, engine.cfg.max_history)
    logp = teacher_forced_logp(engine.model, src, mask, engine.sid_map)  # (B, N) exact
    for b, f in enumerate(flts):
        keep = torch.tensor([f is None or _passes(engine, i, f) for i in range(N)])
        want = torch.sort(torch.where(keep, logp[b], torch.tensor(float("-inf"))), descending=True)
        assert res.items[b].tolist() == want.indices[:top].tolist(), f"request {b}"
        torch.testing.assert_close(res.scores[b], want.values[:top], rtol=1e-4, atol=1e-4)


def test_top_n_stays_full_when_masks_empty_whole_prefixes(engine):
    sm = engine.sid_map
    colour = COLOURS[int(sm[0, 0]) % 3]  # whole first-level prefixes fail the filter
    allowed = [i for i in range(N) if COLOURS[int(sm[0, i]) % 3] == colour]
    top = min(4, len(allowed))
    # narrow beams (top_n wide): with a last-level mask only they would wander into empty prefixes
    res = engine.recommend(HIST, top, top, filters=[{"colour": [colour]}] * 3)
    assert (res.n_valid == top).all()
    assert all(i in allowed for i in res.items.flatten().tolist())
    # exclusions + deletions emptying prefixes: ban everything outside `allowed`'s first half
    keep = allowed[: top + 1]
    engine.set_masked([f"i{i}" for i in range(N) if i not in keep and i % 2 == 0])
    excl = [[i for i in range(N) if i not in keep and i % 2 == 1]] * 3
    res = engine.recommend(HIST, top, top, exclude=excl)
    assert (res.n_valid == top).all() and set(res.items.flatten().tolist()) <= set(keep)
    engine.set_masked([f"i{i}" for i in range(N)], masked=False)  # restore: the full list again
    assert engine.recommend(HIST, N, N).n_valid.tolist() == [N] * 3


def test_filters_fail_closed(engine):
    for flt in ({"colour": []}, {"no-such-attribute": ["x"]}, {"colour": ["purple"]}):
        res = engine.recommend([[1]], 8, 4, filters=[flt])
        assert int(res.n_valid[0]) == 0 and (res.items[0] == -1).all(), flt
    with pytest.raises(ValueError, match="filter of request 0: attribute 'colour' must be a list"):
        engine.recommend([[1]], 8, 4, filters=[{"colour": "red"}])


def test_deletion_is_immediate_and_restore_brings_back(engine):
    full = engine.recommend([[1, 2]], N, 5)
    gone = engine.item_ids[int(full.items[0, 0])]
    assert engine.set_masked([gone, "nope"]) == ["nope"]
    again = engine.recommend([[1, 2]], N, 5)
    assert gone not in [engine.item_ids[i] for i in again.items[0].tolist()] and int(again.n_valid[0]) == 5
    assert engine.sid_owner(engine.item_sid(gone)) == gone  # a masked item keeps its SID
    engine.set_masked([gone], masked=False)
    assert torch.equal(engine.recommend([[1, 2]], N, 5).items, full.items)


def _free_sid(engine):
    used = set(map(tuple, engine.sid_map.T.tolist()))
    for a in range(CARDS[0]):
        for b in range(CARDS[1]):
            for c in range(CARDS[2]):
                for d in range(CARDS[3]):
                    if (a, b, c, d) not in used:
                        return [a, b, c, d]
    raise AssertionError("catalogue full")


def test_insert_becomes_recommendable(engine):
    sid = _free_sid(engine)
    gen0 = engine.trie_generation
    gen = engine.add_items(["new1"], torch.tensor([sid]).T, [{"colour": ["new"]}], wait=True)
    assert gen > gen0 and engine.trie_generation >= gen
    i = engine.index_of["new1"]
    assert i == N and engine.item_sid("new1") == sid and engine.sid_owner(sid) == "new1"
    res = engine.recommend([[1, 2]], N + 1, N + 1)  # beam over the whole catalogue: every item
    assert i in res.items[0].tolist() and int(res.n_valid[0]) == N + 1
    pos = res.items[0].tolist().index(i)
    assert res.sids[0, pos].tolist() == sid
    want = engine.score([[1, 2]], [[i]])[0, 0]
    torch.testing.assert_close(res.scores[0, pos], want, rtol=1e-4, atol=1e-4)
    only = engine.recommend([[1, 2], [i]], 4, 1, filters=[{"colour": ["new"]}] * 2)  # its history works too
    assert only.items[:, 0].tolist() == [i, i]
    assert engine.attributes_of("new1") == {"colour": ["new"]} and engine.attributes_of("zzz") is None


def test_update_moves_sid_and_retires_old_leaf(engine, monkeypatch):
    import threading

    import sidrec.model.live_trie as live_trie

    release = threading.Event()
    real = live_trie.PrefixTrie

    class HeldTrie:  # the background build waits until released: the old trie stays live meanwhile
        @staticmethod
        def build(*a, **kw):
            release.wait(30)
            return real.build(*a, **kw)

    monkeypatch.setattr(live_trie, "PrefixTrie", HeldTrie)
    old = engine.item_sid("i3")
    new = _free_sid(engine)
    gen = engine.add_items(["i3"], torch.tensor([new]).T)  # no wait: the old SID is retired at once
    assert engine.trie_generation < gen
    res = engine.recommend([[1]], N, N)
    assert 3 not in res.items[0].tolist() and int(res.n_valid[0]) == N - 1
    assert not any(s == old for s in res.sids[0].tolist()), "the old SID still returns an item"
    release.set()
    assert engine.catalogue.wait_for(gen, 30)
    res = engine.recommend([[1]], N, N)
    got = {it: s for it, s in zip(res.items[0].tolist(), res.sids[0].tolist()) if it >= 0}
    assert got[3] == new and old not in got.values() and engine.sid_owner(old) is None
    assert engine.item_sid("i3") == new and engine.sid_owner(new) == "i3"
    assert engine.index_of["i3"] == 3  # a move keeps the internal index


def test_collisions_and_bad_codes_are_refused(engine):
    held = engine.item_sid("i5")
    with pytest.raises(ValueError, match=r"item 'x'.*already held by item 'i5'"):
        engine.add_items(["x"], torch.tensor([held]).T)
    free = _free_sid(engine)
    with pytest.raises(ValueError, match=r"items 'a' and 'b' of one call share SID"):
        engine.add_items(["a", "b"], torch.tensor([free, free]).T)
    with pytest.raises(ValueError, match=r"item 'c'.*outside the layout"):
        engine.add_items(["c"], torch.tensor([[0, 0, 0, CARDS[3]]]).T)
    assert "x" not in engine.index_of and "a" not in engine.index_of and engine.num_items == N
    assert engine.sid_owner([0, 0, 0, CARDS[3]]) is None and engine.sid_owner([-1, 0, 0, 0]) is None
    with pytest.raises(ValueError, match="4 codes"):
        engine.sid_owner([0, 0])
    engine.add_items(["x"], torch.tensor([free]).T)  # pending (not yet built) SIDs are guarded too
    with pytest.raises(ValueError, match=r"item 'y'.*already held by item 'x'"):
        engine.add_items(["y"], torch.tensor([free]).T)


def test_replayed_add_changes_nothing_and_none_attributes_are_kept(engine):
    sid, gen = engine.item_sid("i4"), engine.trie_generation
    before = engine.attributes_of("i4")
    assert engine.add_items(["i4"], torch.tensor([sid]).T, [None], wait=True) == gen  # a log replay
    assert engine.trie_generation == gen and engine.attributes_of("i4") == before
    assert engine.add_items(["i4"], torch.tensor([sid]).T, [{"colour": ["x"]}]) == gen
    assert engine.attributes_of("i4") == {"colour": ["x"]}


def test_attribute_update_never_moves_sid(engine):
    sid, gen = engine.item_sid("i7"), engine.trie_generation
    assert engine.set_attributes(["i7", "ghost"], [{"colour": ["gold"]}, {}]) == ["ghost"]
    assert engine.item_sid("i7") == sid and engine.trie_generation == gen
    res = engine.recommend([[1]], 8, 1, filters=[{"colour": ["gold"]}])
    assert res.items[0].tolist() == [7]
    res = engine.recommend([[1]], N, N, filters=[{"colour": [COLOURS[int(sid[0]) % 3]]}])
    assert 7 not in res.items[0].tolist()  # its old value no longer matches


# ---- bundle items.jsonl ---------------------------------------------------------------------
def test_bundle_items_round_trip(bundle_path):
    b = load_bundle(bundle_path)
    assert b.item_texts[4] == "item number 4" and b.item_attributes[4]["size"] == ["even", "any"]
    assert b.item_texts[9] == "Crème \u2028 line\nbreak ✓"
    assert "items.jsonl" in b.config["files"]


def test_bundle_without_items_loads(tmp_path):
    save_bundle(tmp_path / "b", make_model("decoder_only", seed=1), make_catalogue(10, seed=1),
                [f"j{i}" for i in range(10)])
    b = load_bundle(tmp_path / "b")
    assert b.item_attributes is None and b.item_texts is None
    eng = RecommendEngine(b, EngineOptions(tune_malloc=False))
    assert eng.attributes_of("j1") == {}


@pytest.mark.parametrize("line,fault", [
    ('{"item_id": "i0", "text": "a"', "line 2: not valid JSON"),
    ('{"item_id": "nope", "text": "a", "attributes": {}}', "line 2: item_id 'nope' is not in item_ids.json"),
    ('{"item_id": "i1", "text": 5, "attributes": {}}', "line 2: text must be a string"),
    ('{"item_id": "i1", "text": "t", "attributes": {"colour": "red"}}', "line 2: attribute 'colour' must be a list"),
    ('{"item_id": "i0", "text": "t", "attributes": {}}', "line 2: item_id 'i0' appears twice"),
    ('[1, 2]', "line 2: must be a JSON object"),
])
def test_corrupted_items_jsonl_is_refused(tmp_path, line, fault):
    ids = [f"i{i}" for i in range(3)]
    p = save_bundle(tmp_path / "b", make_model("decoder_only", seed=2), make_catalogue(3, seed=2), ids,
                    items=[{"item_id": "i0", "text": "x", "attributes": {"k": ["v"]}}])
    f = p / "items.jsonl"
    f.write_text(f.read_text() + line + "\n")
    with pytest.raises(BundleError, match="items.jsonl is corrupted"):
        load_bundle(p)  # the checksum catches any edit
    cfg = json.loads((p / "config.json").read_text())
    import hashlib
    cfg["files"]["items.jsonl"] = hashlib.sha256(f.read_bytes()).hexdigest()
    (p / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match=fault):
        load_bundle(p)  # a well-checksummed but invalid file is refused by validation
    with pytest.raises(BundleError, match="item_id 'zz' is not in item_ids"):
        save_bundle(tmp_path / "c", make_model("decoder_only", seed=2), make_catalogue(3, seed=2), ids,
                    items=[{"item_id": "zz"}])


def test_pipeline_export_items_come_from_the_item_table():
    from types import SimpleNamespace

    from sidrec.training.cli import demo_config
    from sidrec.training.pipeline import bundle_items

    data = SimpleNamespace(item_ids=["1", "2"], item_fields=[
        {"asin": "B01", "title": "OPI Nail Lacquer", "categories": "Beauty > Makeup > Nails", "brand": "OPI"},
        {"title": "Plain soap"}])
    recs = bundle_items(SimpleNamespace(data=data, cfg=demo_config(epochs=1)))
    assert recs[0]["item_id"] == "1" and "OPI Nail Lacquer" in recs[0]["text"]
    assert recs[0]["attributes"] == {"categories": ["Beauty", "Makeup", "Nails"], "brand": ["OPI"]}
    assert recs[1]["attributes"] == {} and "Plain soap" in recs[1]["text"]


def test_inserts_arriving_during_builds_are_coalesced_and_all_served(engine):
    used = set(map(tuple, engine.sid_map.T.tolist()))
    free = [s for s in ((a, b, c, d) for a in range(CARDS[0]) for b in range(CARDS[1])
                        for c in range(CARDS[2]) for d in range(CARDS[3])) if s not in used][:12]
    gens = [engine.add_items([f"n{k}"], torch.tensor([s]).T) for k, s in enumerate(free)]  # no waits
    assert gens == sorted(gens) and len(set(gens)) == len(gens)
    assert engine.catalogue.wait_for(gens[-1], 30) and engine.trie_generation >= gens[-1]
    res = engine.recommend([[0]], N + 12, N + 12)
    assert int(res.n_valid[0]) == N + 12
    got = {engine.item_ids[i]: s for i, s in zip(res.items[0].tolist(), res.sids[0].tolist())}
    assert all(got[f"n{k}"] == list(s) for k, s in enumerate(free))


def test_filter_mask_cache_hits_and_invalidates(engine):
    flt = [{"size": ["odd"]}]
    first = engine.recommend([[1]], 8, 4, filters=flt)
    again = engine.recommend([[1]], 8, 4, filters=[{"size": ["odd", "odd"]}])  # the same filter, spelled twice
    assert torch.equal(first.items, again.items) and engine.filter_masks.hits >= 1
    top = engine.item_ids[int(first.items[0, 0])]
    engine.set_masked([top])  # a deletion: the cached rows belong to the old snapshot
    after = engine.recommend([[1]], 8, 4, filters=flt)
    assert top not in [engine.item_ids[i] for i in after.items[0].tolist()] and int(after.n_valid[0]) == 4
    second = engine.item_ids[int(after.items[0, 0])]
    engine.set_attributes([second], [{"size": ["even"]}])  # an attribute update: the version moves
    later = engine.recommend([[1]], 8, 4, filters=flt)
    assert second not in [engine.item_ids[i] for i in later.items[0].tolist()]
    excl = engine.recommend([[1]], 8, 4, exclude=[[int(later.items[0, 0])]], filters=flt)  # cached rows + exclusions
    assert excl.items[0, :3].tolist() == later.items[0, 1:].tolist()
    assert torch.equal(engine.recommend([[1]], 8, 4, filters=flt).items, later.items)  # the cached rows are intact
