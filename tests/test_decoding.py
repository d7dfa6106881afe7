"""Cached decoding and beam search against recomputation and brute force, on small random models.

Weights are scaled up from the training init so that attention is far from uniform and a
wrong cache position, mask or beam reorder changes the logits measurably.
"""
from __future__ import annotations

import pytest
import torch

from sidrec.kernels.trie import PrefixTrie
from sidrec.model.beam_search import beam_search, encode_histories, score_items
from sidrec.model.config import BOS_ID, ModelConfig, SIDLayout
from sidrec.model.transformer import SIDTransformer

ARCHS = ("encoder_decoder", "decoder_only")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from a second thread, and a spinning OpenMP team on a shared CI
    box waits on its descheduled peer at every op (7 s -> 50 s for this file)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(autouse=True, params=["direct", "absorbed+chunks"])
def decode_form(request, monkeypatch):
    """Every test runs with the beams attending to the context directly, and again in absorbed
    form (query/output projections folded into the context) with beam chunks of 3 rows."""
    import sidrec.model.decode as decode

    if request.param == "direct":
        monkeypatch.setattr(decode, "ABSORB_MIN_BEAMS", 10**9)
    else:
        monkeypatch.setattr(decode, "ABSORB_MIN_BEAMS", 1)
        monkeypatch.setattr(decode, "ROW_CHUNK", 3)
    return request.param


CARDS = (5, 4, 3, 2)


def make_model(arch: str, seed: int, cards=CARDS, max_history: int = 6, scale: float = 25.0) -> SIDTransformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(layout=SIDLayout(cards), arch=arch, d_model=32, n_heads=2, d_head=16, d_ff=64,
                      n_enc_layers=2, n_dec_layers=2, dropout=0.1, max_history=max_history)
    m = SIDTransformer(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "n1" in name or "n2" in name or "n3" in name or "norm" in name:
                p.uniform_(0.5, 1.5)  # norms away from 1 too
            else:
                p.mul_(scale)
    return m


def make_catalogue(n: int, cards=CARDS, seed: int = 0) -> torch.Tensor:
    """(L, n) unique SIDs drawn at random from the full code space."""
    g = torch.Generator().manual_seed(seed)
    total = 1
    for c in cards:
        total *= c
    keys = torch.randperm(total, generator=g)[:n]
    sids = []
    for c in reversed(cards):
        sids.append(keys % c)
        keys = keys // c
    return torch.stack(sids[::-1])


def teacher_forced_logp(model: SIDTransformer, src, mask, sid_map: torch.Tensor) -> torch.Tensor:
    """(B, N) log-probability of every catalogue item by the training forward pass."""
    B, N = src.shape[0], sid_map.shape[1]
    tgt = sid_map.T  # (N, L)
    out = torch.zeros(B, N)
    with torch.no_grad():
        for b in range(B):
            logits = model(src[b:b + 1].expand(N, -1), mask[b:b + 1].expand(N, -1), tgt)
            for l, lg in enumerate(logits):
                out[b] += torch.log_softmax(lg, -1).gather(1, tgt[:, l:l + 1]).squeeze(1)
    return out


HISTORIES = [[], [3], [0, 1, 2, 3], list(range(10))]  # empty, short, and longer than max_history (6)


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decode_matches_forward_with_reorder(arch):
    model = make_model(arch, seed=1)
    sid_map = make_catalogue(30)
    L = sid_map.shape[0]
    src, mask = encode_histories(HISTORIES, sid_map, model.offsets, model.cfg.max_history)
    B, K = len(HISTORIES), 7
    g = torch.Generator().manual_seed(0)
    targets = sid_map[:, torch.randint(0, sid_map.shape[1], (B, K), generator=g)].permute(1, 2, 0)  # (B, K, L)
    prefix = model.prefill(src, mask)
    cache = model.new_cache(B, K, src.device, torch.float32)
    tokens = torch.full((B, 1), BOS_ID)
    paths = targets[:, :1]  # beams hold prefixes of these targets; step 0 has one beam
    for level in range(L):
        logits = model.decode_step(prefix, cache, tokens, level, mask.sum(1))  # (B, Kc, C)
        Kc = tokens.shape[1]
        ref = model(src.repeat_interleave(Kc, 0), mask.repeat_interleave(Kc, 0), paths.reshape(B * Kc, L))[level]
        torch.testing.assert_close(logits, ref.view(B, Kc, -1), rtol=1e-4, atol=1e-4)
        if level < L - 1:  # random parents (repeats included): beam j continues parent[j] with a new code
            parents = torch.randint(0, Kc, (B, K), generator=g)
            cache.reorder(parents, level + 1)
            new = torch.gather(paths, 1, parents[..., None].expand(-1, -1, L)).clone()
            new[:, :, level] = targets[:, :, level]
            paths = new
            tokens = paths[:, :, level] + model.offsets[level]


def test_history_longer_than_max_keeps_most_recent():
    model = make_model("encoder_decoder", seed=2)
    sid_map = make_catalogue(30)
    long = list(range(12))
    a = encode_histories([long], sid_map, model.offsets, 6)
    b = encode_histories([long[-6:]], sid_map, model.offsets, 6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    src, mask = encode_histories([long[:6]], sid_map, model.offsets, 6)
    assert not torch.equal(src, a[0])  # the oldest items really were dropped


def _trie_and_model(arch: str, n_items: int = 40, seed: int = 3):
    model = make_model(arch, seed=seed)
    sid_map = make_catalogue(n_items, seed=seed)
    return model, sid_map, PrefixTrie.build(sid_map, CARDS)


@pytest.mark.parametrize("arch", ARCHS)
def test_beam_search_equals_brute_force(arch):
    model, sid_map, trie = _trie_and_model(arch)
    N = sid_map.shape[1]
    src, mask = encode_histories(HISTORIES, sid_map, model.offsets, model.cfg.max_history)
    logp = teacher_forced_logp(model, src, mask, sid_map)  # (B, N)
    top_n = 10
    res = beam_search(model, trie, src, mask, N, top_n)  # beam >= catalogue: exact search
    ref_scores, ref_items = torch.sort(logp, dim=1, descending=True)
    assert torch.equal(res.items, ref_items[:, :top_n])
    torch.testing.assert_close(res.scores, ref_scores[:, :top_n], rtol=1e-4, atol=1e-4)
    assert torch.equal(res.sids, sid_map[:, res.items].permute(1, 2, 0))
    assert torch.equal(res.n_valid, torch.full((len(HISTORIES),), top_n))


def test_per_request_widths_equal_separate_runs():
    model, sid_map, trie = _trie_and_model("encoder_decoder")
    src, mask = encode_histories(HISTORIES, sid_map, model.offsets, model.cfg.max_history)
    widths = [3, 12, 5, 40]
    batched = beam_search(model, trie, src, mask, widths, 3)
    for b, w in enumerate(widths):
        alone = beam_search(model, trie, src[b:b + 1], mask[b:b + 1], w, 3)
        assert torch.equal(batched.items[b], alone.items[0]), (b, w)
        torch.testing.assert_close(batched.scores[b], alone.scores[0], rtol=1e-5, atol=1e-5)


def test_exclude_items_and_item_mask():
    model, sid_map, trie = _trie_and_model("encoder_decoder")
    N = sid_map.shape[1]
    src, mask = encode_histories(HISTORIES[:2], sid_map, model.offsets, model.cfg.max_history)
    full = beam_search(model, trie, src, mask, N, 8)
    exclude = torch.tensor([[full.items[0, 0].item(), full.items[0, 2].item(), -1], [full.items[1, 1].item(), -1, -1]])
    item_mask = torch.zeros(N, dtype=torch.bool)
    item_mask[full.items[1, 0]] = True
    res = beam_search(model, trie, src, mask, N, 5, exclude_items=exclude, item_mask=item_mask)
    banned0 = {int(exclude[0, 0]), int(exclude[0, 1]), int(full.items[1, 0])}
    banned1 = {int(exclude[1, 0]), int(full.items[1, 0])}
    expect0 = [i for i in full.items[0].tolist() if i not in banned0][:5]
    expect1 = [i for i in full.items[1].tolist() if i not in banned1][:5]
    assert res.items[0].tolist() == expect0
    assert res.items[1].tolist() == expect1


def test_fill_when_fewer_valid_items_than_top_n():
    model = make_model("encoder_decoder", seed=4)
    sid_map = make_catalogue(4, seed=4)
    trie = PrefixTrie.build(sid_map, CARDS)
    src, mask = encode_histories([[0, 1], [2]], sid_map, model.offsets, model.cfg.max_history)
    exclude = torch.tensor([[3, -1], [-1, -1]])
    res = beam_search(model, trie, src, mask, 6, 6, exclude_items=exclude)
    assert res.n_valid.tolist() == [3, 4]
    assert (res.items[0, 3:] == -1).all() and (res.items[1, 4:] == -1).all()
    assert torch.isneginf(res.scores[0, 3:]).all() and torch.isneginf(res.scores[1, 4:]).all()
    assert torch.isfinite(res.scores[0, :3]).all() and torch.isfinite(res.scores[1, :4]).all()
    assert sorted(res.items[0, :3].tolist()) == [0, 1, 2]


def test_beam_width_below_top_n_is_an_error():
    model, sid_map, trie = _trie_and_model("encoder_decoder")
    src, mask = encode_histories([[1]], sid_map, model.offsets, model.cfg.max_history)
    with pytest.raises(ValueError, match=r"top_n must be in \[1, beam_width\]; got top_n=5, beam_width=3"):
        beam_search(model, trie, src, mask, 3, 5)


@pytest.mark.parametrize("arch", ARCHS)
def test_score_items_equals_beam_scores(arch):
    model, sid_map, trie = _trie_and_model(arch)
    src, mask = encode_histories(HISTORIES, sid_map, model.offsets, model.cfg.max_history)
    res = beam_search(model, trie, src, mask, 16, 6)
    cand = torch.cat([res.items, torch.full((len(HISTORIES), 2), -1)], 1)
    scores = score_items(model, src, mask, cand, sid_map)
    torch.testing.assert_close(scores[:, :6], res.scores, rtol=1e-5, atol=1e-5)
    assert torch.isneginf(scores[:, 6:]).all()


def test_bf16_autocast_stays_close_to_fp32():
    model = make_model("encoder_decoder", seed=5, scale=1.0)  # the training init scale
    sid_map = make_catalogue(40, seed=5)
    src, mask = encode_histories(HISTORIES, sid_map, model.offsets, model.cfg.max_history)
    cand = torch.arange(40).expand(len(HISTORIES), -1)
    ref = score_items(model, src, mask, cand, sid_map)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = score_items(model, src, mask, cand, sid_map)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)


def test_decode_weights_follow_parameter_updates():
    """Evaluation during training must see the current weights, not a stale packed copy."""
    model = make_model("encoder_decoder", seed=6)
    sid_map = make_catalogue(20, seed=6)
    src, mask = encode_histories([[1, 2]], sid_map, model.offsets, model.cfg.max_history)
    cand = torch.arange(20)[None]
    before = score_items(model, src, mask, cand, sid_map)
    with torch.no_grad():
        model.decoder[0].self_attn.q.weight.mul_(-1.5)  # in place, as an optimizer step is
        model.decoder[1].ff.up.weight.add_(0.3)
    after = score_items(model, src, mask, cand, sid_map)
    logp = teacher_forced_logp(model, src, mask, sid_map)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, logp, rtol=1e-4, atol=1e-4)


def test_engine_bf16_matches_fp32(tmp_path):
    """The engine's bf16 mode (bf16 matmuls and per-beam cache) ranks like fp32 on a small model."""
    from sidrec.model.bundle import load_bundle, save_bundle
    from sidrec.model.engine import EngineOptions, RecommendEngine

    model = make_model("encoder_decoder", seed=7, scale=1.0)
    sid_map = make_catalogue(40, seed=7)
    save_bundle(tmp_path / "b", model, sid_map, [f"i{i}" for i in range(40)])
    e32 = RecommendEngine(load_bundle(tmp_path / "b"), EngineOptions(dtype="float32"))
    e16 = RecommendEngine(load_bundle(tmp_path / "b"), EngineOptions(dtype="bfloat16"))
    hist = [[1, 2, 3], [], [5, 6]]
    a, b = e32.recommend(hist, 40, 5), e16.recommend(hist, 40, 5)
    torch.testing.assert_close(b.scores, a.scores, rtol=2e-2, atol=2e-2)
    overlap = sum(len(set(x) & set(y)) for x, y in zip(a.items.tolist(), b.items.tolist()))
    assert overlap >= 0.8 * a.items.numel()


def test_engine_auto_dtype_is_bf16_only_where_bf16_is_native(tmp_path, monkeypatch):
    import sidrec.model.engine as engine_mod
    from sidrec.model.bundle import load_bundle, save_bundle
    from sidrec.model.engine import EngineOptions, RecommendEngine

    save_bundle(tmp_path / "b", make_model("decoder_only", seed=3), make_catalogue(30, seed=3),
                [f"i{i}" for i in range(30)])
    bundle = load_bundle(tmp_path / "b")
    for native, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(engine_mod, "cpu_has_native_bf16", lambda native=native: native)
        eng = RecommendEngine(bundle, EngineOptions(dtype="auto"))
        assert eng.options.dtype == want
        assert (eng.recommend([[1, 2]], 10, 5).items[0] >= 0).all()
    assert engine_mod.fast_dtype("cuda") == "bfloat16"
    with pytest.raises(ValueError, match="'float32', 'bfloat16' or 'auto'"):
        RecommendEngine(bundle, EngineOptions(dtype="float16"))
