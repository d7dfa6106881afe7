"""PrefixTrie: build correctness against a brute-force set of SIDs, lookups, errors, layout."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sidrec.kernels.trie import PrefixTrie


def random_sid_map(cards: tuple[int, ...], n: int, seed: int) -> torch.Tensor:
    """n distinct SIDs drawn uniformly from prod(cards), in random item order. (L, n) int64."""
    g = torch.Generator().manual_seed(seed)
    space = 1
    for c in cards:
        space *= c
    flat = torch.randperm(space, generator=g)[:n]
    out = []
    for c in reversed(cards):
        out.append(flat % c)
        flat = flat // c
    return torch.stack(out[::-1])


def check_trie(trie: PrefixTrie, sm: torch.Tensor) -> None:
    """Every structural promise of the layout, checked against the brute-force prefix sets."""
    L, N = sm.shape
    sids = [tuple(sm[:, p].tolist()) for p in range(N)]
    assert trie.num_levels == L and trie.num_items == N
    for l in range(L):
        parents = sorted({s[:l] for s in sids})
        children = sorted({s[: l + 1] for s in sids})
        rp, codes = trie.row_ptr[l].long(), trie.codes[l].long()
        assert rp.shape[0] == len(parents) + 1 and codes.shape[0] == len(children)
        assert trie.max_children[l] == int((rp[1:] - rp[:-1]).max())
        for s_id, p in enumerate(parents):
            got = [(*p, c) for c in codes[rp[s_id]:rp[s_id + 1]].tolist()]
            want = [c for c in children if c[:l] == p]
            assert got == want, f"level {l} state {s_id} ({p}): children {got} != {want}"
            want_ids = [children.index(c) for c in want]
            assert list(range(int(rp[s_id]), int(rp[s_id + 1]))) == want_ids
            if trie.dense[l] is not None:
                row = trie.dense[l][s_id]
                for code in range(trie.cardinalities[l]):
                    ch = (*p, code)
                    expect = children.index(ch) if ch in children else -1
                    assert int(row[code]) == expect, f"dense level {l} state {s_id} code {code}"
    full = sorted(sids)
    for leaf, sid in enumerate(full):
        item = int(trie.leaf_item[leaf])
        assert sids[item] == sid
        assert int(trie.item_leaf[item]) == leaf


@pytest.mark.parametrize("cards,n,dense", [
    ((1,), 1, None), ((5,), 5, None), ((3, 4), 7, 0), ((3, 4), 12, 2), ((4, 3, 2), 17, 1),
    ((2, 2, 2, 2), 9, None), ((37, 5), 60, None), ((781, 3), 50, 1), ((300, 2), 40, 0),
])
def test_build_matches_brute_force(cards, n, dense):
    sm = random_sid_map(cards, n, seed=n)
    trie = PrefixTrie.build(sm, cards, dense_levels=dense)
    check_trie(trie, sm)
    assert torch.equal(trie.lookup(sm.T), torch.arange(n))


@settings(max_examples=40, deadline=None)
@given(cards=st.lists(st.integers(1, 6), min_size=1, max_size=4), data=st.data())
def test_build_random(cards, data):
    cards = tuple(cards)
    space = 1
    for c in cards:
        space *= c
    n = data.draw(st.integers(1, min(space, 40)))
    sm = random_sid_map(cards, n, seed=data.draw(st.integers(0, 2 ** 16)))
    trie = PrefixTrie.build(sm, cards, dense_levels=data.draw(st.sampled_from([None, 0, 1, len(cards)])))
    check_trie(trie, sm)
    # lookup: every SID of the space, found exactly when it is an item
    everything = torch.tensor(list(itertools.product(*[range(c) for c in cards])))
    got = trie.lookup(everything)
    index = {tuple(sm[:, p].tolist()): p for p in range(n)}
    want = torch.tensor([index.get(tuple(s), -1) for s in everything.tolist()])
    assert torch.equal(got, want)
    assert torch.equal(trie.contains(everything), want >= 0)


def test_lookup_rejects_non_items_and_out_of_range_codes():
    cards = (4, 4, 3)
    sm = random_sid_map(cards, 20, seed=1)
    trie = PrefixTrie.build(sm, cards)
    probe = torch.tensor([[9, 0, 0], [0, 300, 0], [-1, 0, 0], [3, 3, 7]])
    assert (trie.lookup(probe) == -1).all()
    batched = torch.stack([sm.T[:6].reshape(2, 3, 3), probe[:3][None].expand(2, 3, 3)])  # (2, 2, 3, 3)
    out = trie.lookup(batched)
    assert out.shape == (2, 2, 3)
    assert torch.equal(out[0].reshape(-1), torch.arange(6)) and (out[1] == -1).all()
    with pytest.raises(ValueError, match="3 codes"):
        trie.lookup(torch.zeros(2, 2, dtype=torch.int64))


def test_duplicate_sids_rejected_with_both_items_named():
    sm = torch.tensor([[0, 1, 2, 1], [1, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"not unique: items 1 and 3 share SID \[1, 0\]"):
        PrefixTrie.build(sm, (3, 2))


@pytest.mark.parametrize("sm,cards,match", [
    (torch.tensor([[0, 3]]), (3,), r"level 0 has codes in \[0, 3\], outside \[0, 3\)"),
    (torch.tensor([[0, 1], [0, -1]]), (2, 2), r"level 1 .*first offending item index 1"),
    (torch.zeros(2, 0, dtype=torch.int64), (2, 2), "empty catalogue"),
    (torch.zeros(2, 3, dtype=torch.int64), (2,), "2 levels but 1 cardinalities"),
    (torch.zeros(3, dtype=torch.int64), (2,), "must be 2-D"),
    (torch.zeros(2, 3), (2, 2), "integer codes"),
    (torch.zeros(0, 3, dtype=torch.int64), (), "no levels"),
])
def test_bad_input_rejected(sm, cards, match):
    with pytest.raises(ValueError, match=match):
        PrefixTrie.build(sm, cards)


def test_compact_dtypes_and_auto_dense():
    cards = (256, 256, 256, 4)
    sm = random_sid_map((256, 256, 256), 3000, seed=3)
    sm = torch.cat([sm, torch.zeros(1, 3000, dtype=torch.int64)])
    trie = PrefixTrie.build(sm, cards)
    assert all(c.dtype == torch.uint8 for c in trie.codes)
    assert all(r.dtype == torch.int16 for r in trie.row_ptr)  # 3000 items: int16 indices suffice
    assert trie.leaf_item.dtype == trie.item_leaf.dtype == torch.int16
    big = PrefixTrie.build(random_sid_map((256, 256), 40000, seed=5), (256, 256), dense_levels=2)
    assert big.row_ptr[1].dtype == big.leaf_item.dtype == torch.int32 and big.row_ptr[0].dtype == torch.int16
    assert big.dense[1] is not None and big.dense[1].dtype == torch.int32
    # root table (1 KiB) is kept; level 1's (256 KiB) would cost ~87 bytes per item: CSR instead
    assert trie.dense[0] is not None and trie.dense[1] is None
    parts = trie.nbytes(breakdown=True)
    assert sum(parts.values()) == trie.nbytes()
    assert PrefixTrie.build(torch.tensor([[0, 5000]]), (40000,)).codes[0].dtype == torch.int32
    assert PrefixTrie.build(torch.tensor([[0, 500]]), (600,)).codes[0].dtype == torch.int16


def test_to_device_roundtrip_keeps_everything():
    cards = (5, 3)
    sm = random_sid_map(cards, 9, seed=4)
    trie = PrefixTrie.build(sm, cards).to("cpu")
    check_trie(trie, sm)
    assert trie.device == torch.device("cpu")
