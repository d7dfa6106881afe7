"""Fixtures of the living-catalogue tests: a bundle whose SIDs come from its items' text.

`text_bundle` builds a real bundle (model.bundle.save_bundle) over items in 8 text topics: the
text is embedded with `hashed:64` (model.text_embed's deterministic bag of words, named in the
bundle config, so the service embeds new text exactly as the bundle's items were), level-0
centroids are the topic means and deeper levels random residuals, SIDs come from
model.sid_assign. A new item whose text shares a topic's words lands in that topic's prefix.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sidrec.model.bundle import save_bundle
from sidrec.model.config import ModelConfig, SIDLayout
from sidrec.model.sid_assign import add_dedup_digit, quantize
from sidrec.model.text_embed import hashed_text_embeddings
from sidrec.model.transformer import SIDTransformer

TOPICS = ["lipstick matte red lips gloss", "shampoo hair wash scalp conditioner", "sunscreen spf skin sun lotion",
          "perfume scent floral fragrance musk", "nail polish varnish manicure coat", "razor shave blade beard foam",
          "mascara lashes eyeliner brow liner", "toothpaste teeth mint whitening brush"]
DIM = 64


def topic_text(t: int, i: int) -> str:
    return f"{TOPICS[t]} variant{i} edition{i * 7 % 13}"


def text_bundle(path: Path, per_topic: int = 8, seed: int = 0, width: int = 8) -> Path:
    """`width`: codes at levels 1 and 2 (8 for tests; wider leaves room for many added items)."""
    rng = np.random.default_rng(seed)
    texts = [topic_text(t, i) for t in range(len(TOPICS)) for i in range(per_topic)]
    ids = [f"t{t}-{i}" for t in range(len(TOPICS)) for i in range(per_topic)]
    X = hashed_text_embeddings(texts, DIM)
    topic = np.repeat(np.arange(len(TOPICS)), per_topic)
    c0 = np.stack([X[topic == t].mean(0) for t in range(len(TOPICS))])
    R1 = X - c0[topic]
    c1 = R1[rng.choice(len(X), width, replace=False)] * 0.5
    c2 = rng.standard_normal((width, DIM)).astype(np.float32) * 0.05
    books = [c0.astype(np.float32), c1.astype(np.float32), c2]
    codes, _ = quantize(X, books)
    assert (codes[:, 0] == topic).all(), "topic centroids must own their items"
    sid_map, card = add_dedup_digit(codes)
    layout = (8, width, width, max(4, card))
    torch.manual_seed(seed)
    cfg = ModelConfig(SIDLayout(layout), d_model=32, n_heads=2, d_head=16, d_ff=64, n_enc_layers=1, n_dec_layers=1)
    model = SIDTransformer(cfg)
    return save_bundle(path, model, torch.from_numpy(sid_map), ids,
                       codebooks={f"codebook_{k}": torch.from_numpy(b) for k, b in enumerate(books)},
                       extra_config={"embedding": {"model": f"hashed:{DIM}"}, "sid": {"method": "rq_kmeans"}},
                       overwrite=True)
