"""Level-wise masks: propagation against brute force, the incremental clear, fail-closed trie and
beam step, the Triton kernel against the reference with masks, and memory bounded by N.

Triton runs in the interpreter (TRITON_INTERPRET=1, set before triton is imported): small shapes.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from sidrec.kernels.beam_step_ref import beam_step_reference  # noqa: E402
from sidrec.kernels.level_mask import clear_leaves, propagate  # noqa: E402
from sidrec.kernels.trie import PrefixTrie  # noqa: E402
from sidrec.model.sid_assign import append_dedup_digit  # noqa: E402
from sidrec.model.beam_search import beam_search, masks_from_exclusions  # noqa: E402
from test_beam_step import _MockDecoder, random_step, random_trie, run_both  # noqa: E402

triton = pytest.importorskip("triton")
from sidrec.kernels.beam_step_triton import beam_step_triton  # noqa: E402


def brute_levels(trie, sm, leaf_valid):
    """Per level l, (S_{l+1},) bool from the SIDs themselves: prefix has an allowed item."""
    L, N = sm.shape
    sids = [tuple(sm[:, p].tolist()) for p in range(N)]
    allowed = [sids[int(trie.leaf_item[leaf])] for leaf in range(N) if leaf_valid[leaf]]
    out = []
    for l in range(L):
        prefixes = sorted({s[: l + 1] for s in sids})
        ok = {a[: l + 1] for a in allowed}
        out.append(torch.tensor([p in ok for p in prefixes]))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_propagate_and_clear_match_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    cards = [(5, 4, 3), (7, 2), (3, 3, 2, 2), (11,), (4, 4, 4), (2, 9, 3)][seed]
    trie, sm = random_trie(cards, 40, g, dense_levels=seed % 3)
    N = trie.num_items
    leaf_valid = torch.rand(N, generator=g) < [0.9, 0.5, 0.1, 0.0, 1.0, 0.3][seed]
    got = propagate(trie, leaf_valid)
    want = brute_levels(trie, sm, leaf_valid)
    for l, (a, b) in enumerate(zip(got, want)):
        assert a.shape == (1, b.numel()) and torch.equal(a[0], b), f"level {l}"
    # clearing leaves incrementally equals propagating the smaller set from scratch
    leaves = torch.randint(0, N, (7,), generator=g)
    leaves[0] = -1  # padding is ignored
    inc = clear_leaves(trie, [t[0] for t in got], leaves)
    smaller = leaf_valid.clone()
    smaller[leaves[leaves >= 0]] = False
    for l, (a, b) in enumerate(zip(inc, propagate(trie, smaller))):
        assert torch.equal(a, b[0]), f"clear_leaves level {l}"
    assert torch.equal(got[-1][0], leaf_valid)  # the original row is untouched (a copy)
    many = torch.randperm(N, generator=g)[: N // 2]  # many parents: the whole-level fallback
    smaller = leaf_valid.clone()
    smaller[many] = False
    inc = clear_leaves(trie, [t[0].clone() for t in got], many, inplace=True)
    for l, (a, b) in enumerate(zip(inc, propagate(trie, smaller))):
        assert torch.equal(a, b[0]), f"clear_leaves (many) level {l}"


def test_propagate_refuses_wrong_shape():
    trie, _ = random_trie((3, 3), 6, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="N = 6 leaves"):
        propagate(trie, torch.ones(7, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be bool"):
        propagate(trie, torch.ones(6))


# ---- fail closed ------------------------------------------------------------------------------
def test_trie_lookup_fails_closed():
    g = torch.Generator().manual_seed(1)
    trie, sm = random_trie((6, 5, 4), 30, g, dense_levels=1)
    known = set(map(tuple, sm.T.tolist()))
    probes = torch.tensor([[6, 0, 0], [0, 5, 0], [0, 0, 4], [-1, 0, 0], [0, -1, 2], [10**6, 0, 0],
                           [2**40, 2**40, 2**40]])
    assert (trie.lookup(probes) == -1).all() and not trie.contains(probes).any()
    unknown = [s for s in ((a, b, c) for a in range(6) for b in range(5) for c in range(4)) if s not in known]
    assert (trie.lookup(torch.tensor(unknown[:20])) == -1).all()  # unknown prefixes of real codes too
    with pytest.raises(ValueError, match="3 codes"):
        trie.lookup(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer codes"):
        trie.lookup(sm[:, :1].T.float() + 0.5)  # would truncate onto a real SID


@pytest.mark.parametrize("level,dense", [(0, 1), (1, 1), (1, 0), (2, 0)])
def test_unknown_states_allow_nothing(level, dense):
    """A state outside [0, S_l) (or -1) yields no candidate in either backend, never 'everything'."""
    g = torch.Generator().manual_seed(2 + level)
    trie, _ = random_trie((6, 5, 4), 50, g, dense_levels=dense)
    logits, scores, states = random_step(trie, level, 2, 5, g, dead=0.0)
    S = trie.num_states[level]
    states[0] = torch.tensor([S, S + 7, 10**6, -1, -5])  # request 0: only unknown states
    for step in (beam_step_reference, beam_step_triton):
        out = step(logits, scores, states, level, trie, 8)
        assert int(out.n_valid[0]) == 0 and (out.states[0] == -1).all(), step.__name__
        assert int(out.n_valid[1]) > 0


def test_mask_shape_mismatch_is_refused():
    g = torch.Generator().manual_seed(3)
    trie, _ = random_trie((4, 4, 3), 30, g, dense_levels=1)
    logits, scores, states = random_step(trie, 1, 2, 3, g)
    bad = torch.ones(2, trie.num_states[1], dtype=torch.bool)  # level 0's size, not level 2's
    for step in (beam_step_reference, beam_step_triton):
        with pytest.raises(ValueError, match="one bit per state of level 2"):
            step(logits, scores, states, 1, trie, 4, None, bad)
        with pytest.raises(ValueError, match="pass mask_rows"):
            step(logits, scores, states, 1, trie, 4, None, torch.ones(3, trie.num_states[2], dtype=torch.bool))


# ---- Triton with level masks --------------------------------------------------------------------
MASKED_SHAPES = [  # (cards, items, dense_levels, level, B, K, k_out, R)
    ((7, 5, 3), 60, 1, 0, 1, 1, 1, 1),  # K=1, B=1, dense root
    ((7, 5, 3), 60, 1, 1, 3, 6, 9, 2),  # CSR middle, 2 rows for 3 requests
    ((7, 5, 3), 60, 0, 2, 3, 8, 5, 3),  # last level, one row per request
    ((37, 4), 100, 2, 1, 2, 16, 64, 1),  # dense last level, one shared row
    ((781, 2), 300, 1, 0, 2, 1, 64, 2),  # V=781 odd, dense
    ((13, 3, 5), 150, 0, 1, 4, 23, 31, 3),  # odd K and k_out
]


@pytest.mark.parametrize("shape", MASKED_SHAPES, ids=[f"l{s[3]}-K{s[5]}-R{s[7]}" for s in MASKED_SHAPES])
def test_triton_matches_reference_with_level_masks(shape):
    cards, n, dense, level, B, K, k_out, R = shape
    g = torch.Generator().manual_seed(zlib.crc32(repr(shape).encode()))
    trie, _ = random_trie(cards, n, g, dense_levels=dense)
    logits, scores, states = random_step(trie, level, B, K, g)
    leaf_valid = torch.rand(R, trie.num_items, generator=g) < torch.rand(R, 1, generator=g)
    leaf_valid[-1] = False if R > 1 else leaf_valid[-1]  # a fully masked row
    cv = propagate(trie, leaf_valid)[level]
    rows = torch.randint(0, R, (B,), generator=g)
    rows[-1] = R - 1
    got, _ = run_both(logits, scores, states, level, trie, k_out, child_valid=cv, mask_rows=rows, what=str(shape))
    if R > 1:
        assert int(got.n_valid[-1]) == 0  # the fully masked row allows nothing at any level
    for b in range(B):  # every pick leads to an allowed leaf
        n = int(got.n_valid[b])
        assert bool(cv[rows[b], got.states[b, :n]].all())


# ---- memory bounded by the catalogue ----------------------------------------------------------
def test_exclusion_memory_is_bounded_by_catalogue_size():
    """A batch with long exclusion lists on a 100k-item catalogue: no allocation of the mask path
    or the beam step exceeds a bound computed from N (the old (B, K, W, E) comparison would)."""
    g = torch.Generator().manual_seed(4)
    n = 100_000
    p = 1.0 / torch.arange(1, 257, dtype=torch.float64) ** 0.9  # skewed codes: big collision groups
    codes = torch.stack([torch.multinomial(p, n, replacement=True, generator=g) for _ in range(3)])
    sid, dedup = append_dedup_digit(codes)
    cards = (256, 256, 256, dedup)
    trie = PrefixTrie.build(sid, cards)
    B, K, E = 4, 256, 4000
    exclude = torch.randint(0, n, (B, E), generator=g)
    item_mask = torch.rand(n, generator=g) < 0.01
    model = _MockDecoder(cards)
    src, smask = torch.zeros(B, 3, dtype=torch.int64), torch.ones(B, 3, dtype=torch.bool)
    states_total = sum(trie.num_states[1:]) + n
    per_request = 8 * (states_total + B)  # per row: int32 prefix sums, int64 child indices <= one level
    logits_bytes = 4 * B * K * max(cards)  # what the decoder returns, independent of masks
    bound = B * per_request + 4 * logits_bytes
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        masks = masks_from_exclusions(trie, B, exclude, item_mask)
        res = beam_search(model, trie, src, smask, K, 10, masks=masks)
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert masks.nbytes() <= B * states_total + 8 * B
    assert biggest <= bound, f"an op allocated {biggest} bytes, bound {bound}"
    old = B * K * trie.max_children[-1] * E  # the old path's (B, K, W, E) bool comparison at the last level
    assert old > 10 * bound, (old, bound)
    banned = set(exclude[0].tolist()) | set(item_mask.nonzero().squeeze(1).tolist())
    assert (res.n_valid == 10).all() and not banned & set(res.items[0].tolist())


def test_batch_masks_share_the_global_row_and_both_backends_agree():
    """A batch mixing plain, exclusion-only and filtered requests: plain ones read the shared
    global row, the others one row each; the search is the same with either backend, every
    result passes its request's masks, and top_n is full."""
    from sidrec.model.attributes import AttributeIndex
    from sidrec.model.live_trie import LiveCatalogue
    from sidrec.model.request_masks import batch_masks

    g = torch.Generator().manual_seed(8)
    cards = (6, 5, 3)
    _, sm = random_trie(cards, 70, g)
    cat = LiveCatalogue(sm, [f"i{i}" for i in range(70)], cards)
    index = AttributeIndex([{"shade": ["dark" if int(sm[0, i]) < 2 else "light"]} for i in range(70)])
    cat.set_masked([0, 1, 2, 3], True)
    snap = cat.snapshot
    exclude = [[], [5, 6, 7, 8], [], [9]]
    filters = [None, None, {"shade": ["dark"]}, {"shade": ["light", "x"]}]
    masks = batch_masks(snap, index, 4, exclude, filters)
    assert masks.num_rows == 4 and masks.rows.tolist() == [0, 1, 2, 3]
    plain = batch_masks(snap, index, 4)
    assert plain.num_rows == 1 and plain.levels[-1].data_ptr() == snap.global_levels[-1].data_ptr()  # no copy
    assert batch_masks(LiveCatalogue(sm, [f"i{i}" for i in range(70)], cards).snapshot, index, 4) is None
    model = _MockDecoder(cards)
    src, smask = torch.zeros(4, 3, dtype=torch.int64), torch.ones(4, 3, dtype=torch.bool)
    a = beam_search(model, snap.trie, src, smask, 6, 6, beam_step=beam_step_reference, masks=masks)
    b = beam_search(model, snap.trie, src, smask, 6, 6, beam_step=beam_step_triton, masks=masks)
    assert torch.equal(a.items, b.items) and torch.equal(a.n_valid, b.n_valid)
    assert (a.n_valid == 6).all()
    for r, items in enumerate(a.items.tolist()):
        for i in items:
            assert i not in (0, 1, 2, 3) and i not in exclude[r]
            if filters[r]:
                assert index.get(i)["shade"][0] in filters[r]["shade"]
    cat.close()


def test_attribute_index_overlay_against_brute_force():
    from sidrec.model.attributes import AttributeIndex

    g = torch.Generator().manual_seed(9)
    vals = ["a", "b", "c"]
    attrs = [{"k": [vals[int(x)]]} if int(x) < 3 else None for x in torch.randint(0, 4, (50,), generator=g)]
    index = AttributeIndex(attrs)
    truth = list(attrs) + [None] * 10
    for step in range(40):  # base items and new items reset, some twice
        i = int(torch.randint(0, 60, (1,), generator=g))
        a = {"k": [vals[int(torch.randint(0, 3, (1,), generator=g))]], "z": ["1"]} if step % 5 else {}
        index.set(i, a)
        truth[i] = a
        for flt in ({"k": ["a"]}, {"k": ["b", "c"]}, {"k": ["a"], "z": ["1"]}, {"q": ["a"]}):
            want = torch.tensor([t is not None and all(any(v in t.get(n, []) for v in vs) for n, vs in flt.items())
                                 for t in truth])
            assert torch.equal(index.allowed(flt, 60), want), (step, flt)


def test_incremental_deletions_equal_a_full_recompute():
    from sidrec.model.live_trie import LiveCatalogue

    g = torch.Generator().manual_seed(10)
    cards = (5, 4, 3)
    _, sm = random_trie(cards, 50, g)
    cat = LiveCatalogue(sm, [f"i{i}" for i in range(50)], cards)
    for step in range(12):
        items = torch.randint(0, 50, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist()
        cat.set_masked(items, masked=step % 4 != 3)  # mostly deletions, some restores
        snap = cat.snapshot
        full = cat._with_global_masks(snap)
        if full.global_levels is None:
            assert snap.global_levels is None or all(t.all() for t in snap.global_levels)
            continue
        for l, (a, b) in enumerate(zip(snap.global_levels, full.global_levels)):
            assert torch.equal(a, b), (step, l)
        assert torch.equal(snap.leaf_valid, full.leaf_valid)
    cat.close()
