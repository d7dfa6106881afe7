"""The onnxruntime backend decodes like the PyTorch module (small random models, exported to tmp)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from sidrec.kernels.trie import PrefixTrie  # noqa: E402
from sidrec.model.beam_search import beam_search, encode_histories, score_items  # noqa: E402
from sidrec.model.bundle import load_bundle, save_bundle  # noqa: E402
from sidrec.model.config import BOS_ID  # noqa: E402
from sidrec.model.engine import EngineOptions, RecommendEngine  # noqa: E402
from sidrec.model.onnx_backend import OnnxDecoder  # noqa: E402
from tests.test_decoding import CARDS, HISTORIES, _one_thread, make_catalogue, make_model  # noqa: E402,F401


@pytest.fixture(scope="module", params=["encoder_decoder", "decoder_only"])
def pair(request, tmp_path_factory):
    model = make_model(request.param, seed=11, scale=8.0)
    onnx = OnnxDecoder.from_model(model, cache_dir=tmp_path_factory.mktemp("onnx"), num_threads=1)
    return model, onnx


def test_steps_match_torch(pair):
    model, onnx = pair
    sid_map = make_catalogue(30)
    src, mask = encode_histories(HISTORIES, sid_map, model.offsets, model.cfg.max_history)
    p_t, p_o = model.prefill(src, mask), onnx.prefill(src, mask)
    for a, b in zip(p_t.keys + p_t.values, p_o.keys + p_o.values):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    B, K = src.shape[0], 5
    c_t = model.new_cache(B, K, src.device, torch.float32)
    c_o = onnx.new_cache(B, K, src.device, torch.float32)
    tokens = torch.full((B, 1), BOS_ID)
    g = torch.Generator().manual_seed(0)
    for level in range(len(CARDS)):
        lt = model.decode_step(p_t, c_t, tokens, level, mask.sum(1))
        lo = onnx.decode_step(p_o, c_o, tokens, level, mask.sum(1))
        torch.testing.assert_close(lo, lt, rtol=1e-4, atol=1e-4)
        if level < len(CARDS) - 1:
            parents = torch.randint(0, tokens.shape[1], (B, K), generator=g)
            c_t.reorder(parents, level + 1)
            c_o.reorder(parents, level + 1)
            tokens = torch.randint(0, CARDS[level], (B, K), generator=g) + model.offsets[level]


def test_beam_search_and_scores_match_torch(pair):
    model, onnx = pair
    sid_map = make_catalogue(40, seed=1)
    trie = PrefixTrie.build(sid_map, CARDS)
    src, mask = encode_histories(HISTORIES, sid_map, model.offsets, model.cfg.max_history)
    r_t = beam_search(model, trie, src, mask, [4, 9, 16, 40], 4)
    r_o = beam_search(onnx, trie, src, mask, [4, 9, 16, 40], 4)
    assert torch.equal(r_o.items, r_t.items)
    torch.testing.assert_close(r_o.scores, r_t.scores, rtol=1e-4, atol=1e-4)
    cand = r_t.items
    torch.testing.assert_close(score_items(onnx, src, mask, cand, sid_map),
                               score_items(model, src, mask, cand, sid_map), rtol=1e-4, atol=1e-4)


def test_engine_selects_onnx_backend(tmp_path):
    model = make_model("encoder_decoder", seed=12, scale=8.0)
    sid_map = make_catalogue(40, seed=2)
    save_bundle(tmp_path / "b", model, sid_map, [f"item{i}" for i in range(40)])
    bundle = load_bundle(tmp_path / "b")
    cache = tmp_path / "onnx"
    eng_t = RecommendEngine(bundle, EngineOptions())
    eng_o = RecommendEngine(load_bundle(tmp_path / "b"), EngineOptions(backend="onnx", onnx_cache_dir=str(cache)))
    assert isinstance(eng_o.decoder, OnnxDecoder) and any(cache.rglob("step0.onnx"))
    hist = [[1, 2, 3], [], [5]]
    a, b = eng_t.recommend(hist, 12, 5, exclude=[[1], [], []]), eng_o.recommend(hist, 12, 5, exclude=[[1], [], []])
    assert torch.equal(a.items, b.items)
    torch.testing.assert_close(b.scores, a.scores, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="onnx backend runs fp32"):
        RecommendEngine(bundle, EngineOptions(backend="onnx", dtype="bfloat16"))
    with pytest.raises(ValueError, match="backend must be 'torch' or 'onnx'"):
        RecommendEngine(bundle, EngineOptions(backend="tensorrt"))
