"""Item text rendering and embeddings (training/embeddings.py); one test loads the real MiniLM offline."""
from __future__ import annotations

import numpy as np
import pytest

from sidrec.training.data import DataError
from sidrec.training.embeddings import (DEFAULT_TEMPLATE, default_model_path, embed_items, hashed_text_embeddings,
                                 render_text)


def test_render_text_omits_missing_fields_cleanly():
    full = {"title": "Red Lipstick", "categories": "Beauty > Lips", "brand": "Acme", "price": "9.99"}
    assert render_text(full) == "Red Lipstick. Category: Beauty > Lips. Brand: Acme. Price: 9.99"
    assert render_text({"title": "Red Lipstick", "categories": "Beauty > Lips", "brand": " "}) == \
        "Red Lipstick. Category: Beauty > Lips"
    assert render_text({"categories": "Beauty > Lips", "price": "3"}) == "Category: Beauty > Lips. Price: 3"
    assert render_text({"brand": "Acme", "asin": "B0"}) == "Brand: Acme"
    assert render_text({}) == ""
    assert render_text(full, "{brand} - {title}!") == "Acme - Red Lipstick!"
    assert render_text({"title": "x"}, "{brand} - {title}!") == "x!"
    with pytest.raises(ValueError, match="named fields"):
        render_text(full, "{} {title}")
    assert "{" not in DEFAULT_TEMPLATE.format(title="a", categories="b", brand="c", price="d")


def test_hashed_embeddings_are_deterministic_and_reflect_shared_words():
    texts = ["red lipstick matte", "red lipstick glossy", "shampoo for dry hair", ""]
    a = hashed_text_embeddings(texts, dim=64, seed=1)
    assert a.shape == (4, 64) and a.dtype == np.float32
    np.testing.assert_array_equal(a, hashed_text_embeddings(texts, dim=64, seed=1))
    assert not np.allclose(a, hashed_text_embeddings(texts, dim=64, seed=2))
    np.testing.assert_allclose(np.linalg.norm(a[:3], axis=1), 1.0, rtol=1e-5)
    assert (a[3] == 0).all()
    assert a[0] @ a[1] > a[0] @ a[2] + 0.3


def test_empty_text_is_an_error_naming_the_item():
    with pytest.raises(DataError, match=r"item index 1 \(id 'b'\) has empty text"):
        embed_items(["fine", "  ", "ok"], model="/nonexistent", item_ids=["a", "b", "c"])
    with pytest.raises(ValueError, match="not a local directory"):
        embed_items(["fine"], model="sentence-transformers/all-MiniLM-L6-v2")


def test_real_minilm_offline_and_cache(tmp_path, monkeypatch):
    import torch

    torch.set_num_threads(1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    texts = ["red matte lipstick for lips", "glossy red lipstick", "anti-dandruff shampoo for dry hair"]
    emb = embed_items(texts, cache_dir=tmp_path, show_progress=False)
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]
    cached = list(tmp_path.glob("*.npy"))
    assert len(cached) == 1 and not list(tmp_path.glob("*.tmp"))

    import sentence_transformers

    def _no_model(*a, **k):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", _no_model)
    np.testing.assert_array_equal(embed_items(texts, cache_dir=tmp_path, show_progress=False), emb)
    assert default_model_path().endswith("model")

    # allow_empty embeds the item id through the same (mocked) path; here it must miss the cache
    with pytest.raises(AssertionError, match="cache should have answered"):
        embed_items(["x", ""], cache_dir=tmp_path, show_progress=False, allow_empty=True, item_ids=["1", "2"])
