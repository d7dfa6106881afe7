"""Beam step: the reference against brute force, and the Triton kernel against the reference.

The Triton kernel runs in the interpreter (TRITON_INTERPRET=1, set before triton is imported),
on CPU tensors, one program at a time: shapes are small and many. Every test draws fresh data.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

import math  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sidrec.kernels.beam_step_ref import beam_step_reference, candidates, ordered_keys  # noqa: E402
from sidrec.kernels.dispatch import get_beam_step  # noqa: E402
from sidrec.kernels.level_mask import propagate  # noqa: E402
from sidrec.kernels.trie import PrefixTrie  # noqa: E402

triton = pytest.importorskip("triton")
from sidrec.kernels.beam_step_triton import beam_step_triton  # noqa: E402

NEG_INF = float("-inf")
FIELDS = ("scores", "parents", "codes", "states", "n_valid")


# ---- random inputs ---------------------------------------------------------------------------
def random_trie(cards, n, g, dense_levels=None) -> tuple[PrefixTrie, torch.Tensor]:
    space = math.prod(cards)
    flat = torch.randperm(space, generator=g)[:min(n, space)]
    cols = []
    for c in reversed(cards):
        cols.append(flat % c)
        flat = flat // c
    sm = torch.stack(cols[::-1])  # (L, n) distinct SIDs, random item order
    return PrefixTrie.build(sm, cards, dense_levels=dense_levels), sm


def random_step(trie, level, B, K, g, dead=0.2, ties=False):
    """Logits, scores and states of K beams on random distinct states of `level` (some dead)."""
    V = trie.cardinalities[level]
    S = trie.num_states[level]
    if ties:
        # Many exact ties: few distinct values, and every beam of a request has the same row up to
        # an integer shift (log-softmax is then bit-identical across beams in both backends;
        # permuted rows would not be: summation order changes the last bit).
        base = torch.randint(0, 3, (B, 1, V), generator=g).float()
        logits = base + torch.randint(-2, 3, (B, K, 1), generator=g).float()
        scores = torch.randint(-2, 0, (B, K), generator=g).float()
    else:
        logits = torch.randn(B, K, V, generator=g) * 3
        scores = -torch.rand(B, K, generator=g) * 10
    states = torch.stack([torch.randperm(max(S, K), generator=g)[:K] for _ in range(B)]) % S
    kill = torch.rand(B, K, generator=g) < dead
    states[kill] = -1
    scores[kill] = NEG_INF
    return logits, scores, states


def level_mask(trie, level, B, exclude=None, leaf_mask=None):
    """The level's (B, S_{l+1}) child mask from (B, E) excluded leaves (-1 padding) and a global
    leaf mask, built the slow obvious way: a (B, N) leaf bool, then propagated. None if no mask."""
    if exclude is None and leaf_mask is None:
        return None
    ok = torch.ones(B, trie.num_items, dtype=torch.bool)
    if leaf_mask is not None:
        ok &= ~leaf_mask
    if exclude is not None:
        for b in range(B):
            for leaf in exclude[b].tolist():
                if leaf >= 0:
                    ok[b, leaf] = False
    return propagate(trie, ok)[level]


# ---- comparison ------------------------------------------------------------------------------
def assert_steps_match(got, ref, logits, scores, states, level, trie, child_valid=None,
                       atol=1e-5, what=""):
    """`got` is a correct step if it matches `ref` up to rounding: the same n_valid, scores equal
    within atol position by position, each pick a real candidate whose reference score is that
    score, no pick twice, and its own order descending with equal scores in (beam, child) order.
    Candidates whose scores differ by a rounding error (log-sum-exp summed in another order) may
    therefore swap; exact ties are checked exactly by the tie tests. Says where it differs."""
    assert got.n_valid.dtype == torch.int64
    assert torch.equal(got.n_valid, ref.n_valid), f"{what} n_valid {got.n_valid.tolist()} != {ref.n_valid.tolist()}"
    for f in ("parents", "codes", "states"):
        t = getattr(got, f)
        assert t.dtype == torch.int64 and t.shape == ref.scores.shape, f"{what} {f}: {t.dtype} {tuple(t.shape)}"
    both_inf = (got.scores == NEG_INF) & (ref.scores == NEG_INF)
    ok = torch.isclose(got.scores, ref.scores, atol=atol, rtol=1e-6) | both_inf
    if not ok.all():
        b, i = (~ok).nonzero()[0].tolist()
        raise AssertionError(f"{what} scores differ at (b={b}, pos={i}): got {got.scores[b, i].item()} "
                             f"want {ref.scores[b, i].item()}; {int((~ok).sum())} of {ok.numel()} differ")
    for name, fill in (("parents", 0), ("codes", 0), ("states", -1)):  # fill rule past n_valid
        t = getattr(got, name)
        tail = torch.arange(t.shape[1])[None] >= got.n_valid[:, None]
        assert (t[tail] == fill).all() and (got.scores[tail] == NEG_INF).all(), f"{what} fill rule broken in {name}"
    cand, code, child = candidates(logits, scores, states, level, trie, child_valid)
    for b in range(logits.shape[0]):
        n = int(got.n_valid[b])
        picks = list(zip(got.scores[b, :n].tolist(), got.parents[b, :n].tolist(), got.codes[b, :n].tolist(),
                         got.states[b, :n].tolist(), ref.parents[b, :n].tolist(), ref.codes[b, :n].tolist(),
                         ref.states[b, :n].tolist()))
        assert len({(p, c) for _, p, c, *_ in picks}) == n, f"{what} request {b} picked a candidate twice"
        for i, (sc, p, c, nxt, rp, rc, rs) in enumerate(picks):
            if (p, c) == (rp, rc):
                assert nxt == rs, f"{what} (b={b}, pos={i}) next state {nxt}, reference {rs}"
                continue
            hit = (code[b, p] == c) & (child[b, p] >= 0)
            assert hit.any(), f"{what} (b={b}, pos={i}) picked (parent {p}, code {c}): not a valid candidate"
            assert int(child[b, p][hit][0]) == nxt, f"{what} (b={b}, pos={i}) wrong next state {nxt}"
            assert abs(float(cand[b, p][hit][0]) - sc) <= atol, (
                f"{what} (b={b}, pos={i}) picked (parent {p}, code {c}) with score {sc}, but its reference "
                f"score is {float(cand[b, p][hit][0])}")
        for i in range(n - 1):
            (s0, p0, c0, *_), (s1, p1, c1, *_) = picks[i], picks[i + 1]
            assert s0 > s1 or (s0 == s1 and (p0, c0) < (p1, c1)), (
                f"{what} (b={b}, pos={i}): ({s0}, parent {p0}, code {c0}) before ({s1}, parent {p1}, code {c1}): "
                "not descending, or an exact tie not resolved to the lower (beam, child) index")


def run_both(logits, scores, states, level, trie, k_out, widths=None, exclude=None, leaf_mask=None, what="",
             child_valid=None, mask_rows=None):
    if child_valid is None:
        child_valid = level_mask(trie, level, logits.shape[0], exclude, leaf_mask)
    ref = beam_step_reference(logits, scores, states, level, trie, k_out, widths, child_valid, mask_rows)
    got = beam_step_triton(logits, scores, states, level, trie, k_out, widths, child_valid, mask_rows)
    rows_valid = None if child_valid is None or mask_rows is None else child_valid[mask_rows]
    assert_steps_match(got, ref, logits, scores, states, level, trie,
                       child_valid if rows_valid is None else rows_valid, what=what)
    return got, ref


@pytest.mark.parametrize("seed", range(4))
def test_ordered_keys_equal_stable_descending_sort(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 3, (3, 500), generator=g).float() / 4  # many exact ties, both signs
    x[x == 0] = torch.tensor([0.0, -0.0]).repeat(250)[: int((x == 0).sum())]  # +0.0 and -0.0 tie
    x[:, ::7] = NEG_INF
    x[1, :50] = float("inf")
    want = torch.sort(x, dim=1, descending=True, stable=True).indices
    keys = ordered_keys(x)
    got = 0xFFFFFFFF - (torch.sort(keys, dim=1, descending=True).values & 0xFFFFFFFF)
    assert torch.equal(got, want)
    assert all(row.unique().numel() == row.numel() for row in keys)  # distinct within a request


# ---- reference vs brute force ----------------------------------------------------------------
def brute_force(logits, scores, prefixes, level, sids, k_out, widths=None, exclude_items=None, item_mask=None):
    """Enumerate every valid extension of every beam's prefix with full-softmax scores; an
    extension with no allowed item (excluded or masked) below it is not valid, at any level.

    prefixes[b][k]: tuple of codes or None (dead). Returns per request a list of
    (score, parent, code, next state) with states defined from scratch as ranks of sorted prefixes.
    """
    L = len(sids[0])
    allowed = [[s for i, s in enumerate(sids)
                if not (exclude_items is not None and i in exclude_items[b]) and
                not (item_mask is not None and bool(item_mask[i]))] for b in range(logits.shape[0])]
    logp = torch.log_softmax(logits.float(), -1)
    nxt = sorted({s[: level + 1] for s in sids})
    state_of = {p: i for i, p in enumerate(nxt)}
    out = []
    for b in range(logits.shape[0]):
        cand = []
        for k, pre in enumerate(prefixes[b]):
            if pre is None:
                continue
            for c in sorted({s[level] for s in sids if s[:level] == pre}):
                full = (*pre, c)
                if not any(a[: level + 1] == full for a in allowed[b]):  # pruned: nothing allowed below
                    continue
                val = float(scores[b, k] + logp[b, k, c])
                if val > NEG_INF:
                    cand.append((-val, k, c, state_of[full]))
        cand.sort()  # by score, then beam, then code: the tie rule
        w = k_out if widths is None else min(k_out, int(widths[b]))
        out.append([(-v, k, c, s) for v, k, c, s in cand[:w]])
    return out


@pytest.mark.parametrize("seed", range(12))
def test_reference_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    L = 1 + seed % 3
    cards = tuple(int(x) for x in torch.randint(2, 7, (L,), generator=g))
    trie, sm = random_trie(cards, int(torch.randint(1, 40, (1,), generator=g)), g,
                           dense_levels=[None, 0, L][seed % 3])
    sids = [tuple(sm[:, p].tolist()) for p in range(sm.shape[1])]
    level = seed % L
    prefixes_all = sorted({s[:level] for s in sids})
    B, K = 1 + seed % 2, 1 + seed % 5
    logits, scores, states = random_step(trie, level, B, K, g, ties=seed % 4 == 0)
    prefixes = [[None if s < 0 else prefixes_all[s] for s in row.tolist()] for row in states]
    k_out = int(torch.randint(1, 12, (1,), generator=g))
    widths = torch.randint(1, k_out + 1, (B,), generator=g) if seed % 2 else None
    excl_items = [set(torch.randint(0, len(sids), (2,), generator=g).tolist()) for _ in range(B)]
    item_mask = torch.rand(len(sids), generator=g) < 0.2
    exclude = torch.full((B, 2), -1, dtype=torch.int64)  # (B, 2) leaves, -1 where the two draws coincided
    for b, e in enumerate(excl_items):
        exclude[b, : len(e)] = trie.item_leaf.long()[sorted(e)]
    leaf_mask = item_mask[trie.leaf_item.long()]
    masked = seed % 3 != 2  # every third seed without masks
    cv = level_mask(trie, level, B, exclude, leaf_mask) if masked else None
    ref = beam_step_reference(logits, scores, states, level, trie, k_out, widths, cv)
    want = brute_force(logits, scores, prefixes, level, sids, k_out, widths,
                       excl_items if masked else None, item_mask if masked else None)
    for b in range(B):
        n = len(want[b])
        assert int(ref.n_valid[b]) == n, f"request {b}: n_valid {int(ref.n_valid[b])}, brute force {n}"
        got = list(zip(ref.scores[b, :n].tolist(), ref.parents[b, :n].tolist(), ref.codes[b, :n].tolist(),
                       ref.states[b, :n].tolist()))
        assert got == want[b], f"request {b}: reference {got} != brute force {want[b]}"
        assert (ref.scores[b, n:] == NEG_INF).all() and (ref.states[b, n:] == -1).all()
        assert (ref.parents[b, n:] == 0).all() and (ref.codes[b, n:] == 0).all()


# ---- Triton vs reference ---------------------------------------------------------------------
# (cards, items, dense_levels, level, B, K, k_out): every dispatch branch, odd V, K=1, B=1, big K.
SHAPES = [
    ((7, 5, 3), 60, 1, 0, 1, 1, 1),  # dense root, K=1, B=1
    ((7, 5, 3), 60, 1, 1, 2, 6, 9),  # CSR middle
    ((7, 5, 3), 60, 1, 2, 3, 8, 5),  # CSR last level
    ((37, 4), 100, 0, 0, 2, 1, 37),  # odd V, CSR at the root
    ((37, 4), 100, 2, 1, 2, 16, 64),  # dense last level
    ((781, 2), 300, 1, 0, 1, 1, 64),  # V=781: one partly masked BLOCK_V chunk
    ((781, 2), 300, 0, 1, 2, 40, 40),
    ((3, 2, 2), 12, 1, 1, 2, 512, 512),  # K = k_out = 512, tiny V
    ((3, 2, 2), 12, 0, 2, 1, 4096, 4096),  # K = 4096, k_out > K * W: padded tail
    ((2,), 2, None, 0, 3, 5, 16),  # single level, everything padded
    ((1, 1), 1, None, 1, 1, 3, 2),  # one item
]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"V{s[0][s[3]]}-l{s[3]}-K{s[5]}-k{s[6]}" for s in SHAPES])
def test_triton_matches_reference_shapes(shape):
    cards, n, dense, level, B, K, k_out = shape
    g = torch.Generator().manual_seed(zlib.crc32(repr(shape).encode()))
    trie, _ = random_trie(cards, n, g, dense_levels=dense)
    logits, scores, states = random_step(trie, level, B, K, g)
    run_both(logits, scores, states, level, trie, k_out, what=str(shape))


def test_triton_large_v_chunks():
    """V = 2500 > BLOCK_V = 1024: the online log-sum-exp crosses chunk boundaries."""
    g = torch.Generator().manual_seed(7)
    trie, _ = random_trie((2500, 2), 300, g, dense_levels=1)
    logits, scores, states = random_step(trie, 0, 2, 1, g, dead=0.0)
    run_both(logits, scores, states, 0, trie, 100, what="V2500 dense")
    trie, _ = random_trie((2, 2500), 300, g, dense_levels=0)  # CSR gathers codes from a 2500-wide row
    logits, scores, states = random_step(trie, 1, 2, 3, g)
    run_both(logits, scores, states, 1, trie, 50, what="V2500 csr")


@pytest.mark.parametrize("level,dense", [(0, 1), (1, 1), (1, 2), (2, 0)])
def test_triton_exact_ties_break_to_lower_index(level, dense):
    g = torch.Generator().manual_seed(100 + level)
    trie, _ = random_trie((6, 6, 3), 80, g, dense_levels=dense)
    logits, scores, states = random_step(trie, level, 2, 12, g, ties=True)
    got, ref = run_both(logits, scores, states, level, trie, 30, what="ties")
    for f in FIELDS[1:]:  # ties are exact in both: nothing may swap (scores: see run_both)
        assert torch.equal(getattr(got, f), getattr(ref, f)), f


def test_triton_dead_beams_and_empty_rows():
    g = torch.Generator().manual_seed(11)
    trie, _ = random_trie((5, 4, 3), 40, g, dense_levels=1)
    for level in range(3):
        logits, scores, states = random_step(trie, level, 2, 7, g, dead=1.0)  # all beams dead
        got, _ = run_both(logits, scores, states, level, trie, 6, what=f"all dead l{level}")
        assert (got.n_valid == 0).all() and (got.states == -1).all() and (got.scores == NEG_INF).all()
    # last level: every leaf of request 0's beams masked -> rows with no valid child
    logits, scores, states = random_step(trie, 2, 2, 6, g, dead=0.0)
    leaf_mask = torch.zeros(trie.num_items, dtype=torch.bool)
    rp = trie.row_ptr[2].long()
    for s in states[0].tolist():
        leaf_mask[rp[s]:rp[s + 1]] = True
    got, _ = run_both(logits, scores, states, 2, trie, 8, leaf_mask=leaf_mask, what="masked rows")
    masked_everywhere = bool(leaf_mask[torch.cat([torch.arange(rp[s], rp[s + 1]) for s in states[1].tolist()])].all())
    assert int(got.n_valid[0]) == 0 and (masked_everywhere or int(got.n_valid[1]) > 0)


def test_triton_widths_exclusions_and_mask():
    g = torch.Generator().manual_seed(12)
    trie, _ = random_trie((6, 5, 4), 90, g, dense_levels=1)
    B, K = 4, 10
    for level in range(3):
        logits, scores, states = random_step(trie, level, B, K, g)
        widths = torch.tensor([1, 3, 10, 7])
        exclude = torch.randint(0, trie.num_items, (B, 6), generator=g)
        exclude[:, -2:] = -1  # padding
        exclude[0, 0] = trie.row_ptr[2][states[0].clamp(min=0)[0]]  # surely a candidate leaf
        leaf_mask = torch.rand(trie.num_items, generator=g) < 0.3
        run_both(logits, scores, states, level, trie, 10, widths, exclude, leaf_mask, what=f"l{level}")
        run_both(logits, scores, states, level, trie, 10, widths, exclude[:, :0], None, what=f"E=0 l{level}")


def test_triton_noncontiguous_logits_and_empty_batch():
    g = torch.Generator().manual_seed(13)
    trie, _ = random_trie((9, 4), 30, g, dense_levels=1)
    logits, scores, states = random_step(trie, 1, 3, 5, g)
    wide = torch.randn(3, 10, 4, generator=g)
    wide[:, ::2] = logits
    run_both(wide[:, ::2], scores, states, 1, trie, 7, what="strided K")
    logits, scores, states = random_step(trie, 0, 2, 1, g, dead=0.0)
    run_both(logits.transpose(0, 1).contiguous().transpose(0, 1), scores, states, 0, trie, 7, what="strided B")
    e = beam_step_triton(logits[:0], scores[:0], states[:0], 0, trie, 4)
    r = beam_step_reference(logits[:0], scores[:0], states[:0], 0, trie, 4)
    for f in FIELDS:
        assert getattr(e, f).shape == getattr(r, f).shape


@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_triton_matches_reference_random(data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 31 - 1), label="seed"))
    L = data.draw(st.integers(1, 3), label="L")
    cards = tuple(data.draw(st.lists(st.sampled_from([1, 2, 3, 5, 8, 13, 37]), min_size=L, max_size=L), label="cards"))
    trie, _ = random_trie(cards, data.draw(st.integers(1, 60), label="n"), g,
                          dense_levels=data.draw(st.sampled_from([None, 0, 1, L]), label="dense"))
    level = data.draw(st.integers(0, L - 1), label="level")
    B = data.draw(st.integers(1, 3), label="B")
    K = data.draw(st.one_of(st.integers(1, 24), st.integers(25, 600)), label="K")
    k_out = data.draw(st.one_of(st.integers(1, 48), st.integers(K, 2 * K + 8)), label="k_out")
    logits, scores, states = random_step(trie, level, B, K, g, dead=data.draw(st.sampled_from([0.0, 0.3, 1.0])),
                                         ties=data.draw(st.booleans(), label="ties"))
    widths = torch.randint(1, k_out + 1, (B,), generator=g) if data.draw(st.booleans(), label="widths") else None
    exclude = leaf_mask = None
    if data.draw(st.booleans(), label="exclusions"):
        exclude = torch.randint(-1, trie.num_items, (B, data.draw(st.integers(0, 5))), generator=g)
        leaf_mask = torch.rand(trie.num_items, generator=g) < 0.3
    run_both(logits, scores, states, level, trie, k_out, widths, exclude, leaf_mask, what="random")


# ---- dispatch and integration ----------------------------------------------------------------
def test_dispatch():
    assert get_beam_step("cpu") is beam_step_reference
    assert get_beam_step("cpu", "reference") is beam_step_reference
    assert get_beam_step("cpu", "triton") is beam_step_triton  # TRITON_INTERPRET=1 here
    assert get_beam_step("cuda") is beam_step_triton  # chosen once, by device type (no GPU needed)
    with pytest.raises(ValueError, match="backend must be one of"):
        get_beam_step("cpu", "cuda-fast")


def test_dispatch_refuses_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        get_beam_step("cpu", "triton")


class _MockDecoder:
    """Deterministic pseudo-random logits from (request, previous token, level): no model needed."""

    def __init__(self, cards):
        self.cards = cards
        self.offsets = tuple(2 + sum(cards[:l]) for l in range(len(cards)))
        g = torch.Generator().manual_seed(5)
        self.table = [torch.randn(4, 2 + sum(cards), c, generator=g) * 2 for c in cards]

    def prefill(self, src, src_mask):
        return type("P", (), {"keys": [torch.zeros(1)]})()

    def new_cache(self, batch, beams, device, dtype):
        return type("C", (), {"reorder": lambda self, parents, length: None})()

    def decode_step(self, prefix, cache, tokens, step, src_len=None):
        B = tokens.shape[0]
        return self.table[step][torch.arange(B)[:, None] % 4, tokens]  # (B, K, C_step)


def test_beam_search_same_with_either_backend():
    from sidrec.model.beam_search import beam_search

    g = torch.Generator().manual_seed(21)
    cards = (6, 5, 3)
    trie, _ = random_trie(cards, 70, g)
    model = _MockDecoder(cards)
    src, mask = torch.zeros(3, 3, dtype=torch.int64), torch.ones(3, 3, dtype=torch.bool)
    excl = torch.tensor([[0, 5], [-1, -1], [3, -1]])
    item_mask = torch.rand(70, generator=g) < 0.1
    kw = dict(exclude_items=excl, item_mask=item_mask)
    a = beam_search(model, trie, src, mask, [20, 7, 12], 5, beam_step=beam_step_reference, **kw)
    b = beam_search(model, trie, src, mask, [20, 7, 12], 5, beam_step=beam_step_triton, **kw)
    assert torch.equal(a.items, b.items) and torch.equal(a.sids, b.sids) and torch.equal(a.n_valid, b.n_valid)
    torch.testing.assert_close(a.scores, b.scores)
