"""Fixtures of the living-catalogue tests: a bundle whose SIDs come from its items' text, and an
engine that accepts live inserts.

`text_bundle` builds a real bundle (model.bundle.save_bundle) over items in 8 text topics: the
text is embedded with `hashed:64` (model.text_embed's deterministic bag of words, named in the
bundle config, so the service embeds new text exactly as the bundle's items were), level-0
centroids are the topic means and deeper levels random residuals, SIDs come from
model.sid_assign. A new item whose text shares a topic's words lands in that topic's prefix.

`LiveEngine` is a stand-in until the engine of the `masks` branch (add_items, set_attributes,
filters inside the beam) lands on main: it implements that API on today's RecommendEngine by
rebuilding the prefix trie on every insert and by turning a filter into the engine's existing
per-request exclusion. Where RecommendEngine already has add_items, `engine_class()` returns the
real engine, so these tests then run against it unchanged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from sidrec.kernels.trie import PrefixTrie
from sidrec.model.bundle import save_bundle
from sidrec.model.config import ModelConfig, SIDLayout
from sidrec.model.engine import RecommendEngine
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


class LiveEngine(RecommendEngine):
    """RecommendEngine plus the living-catalogue API, by trie rebuilds (a test stand-in, see above)."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.item_ids = list(self.item_ids)
        self._attrs: dict[str, dict[str, list[str]]] = {}
        self.trie_generation = 0

    def sid_owner(self, sid: Sequence[int]) -> str | None:
        p = int(self.trie.lookup(torch.as_tensor(list(sid))[None])[0])
        return None if p < 0 else self.item_ids[p]

    def item_sid(self, item_id: str) -> tuple[int, ...] | None:
        i = self.index_of.get(item_id)
        return None if i is None else tuple(int(c) for c in self.sid_map[:, i].tolist())

    def attributes_of(self, item_id: str) -> dict[str, list[str]]:
        return dict(self._attrs.get(item_id, {}))

    def add_items(self, item_ids, sids, attributes=None, wait=False) -> int:
        sids = torch.as_tensor(sids, dtype=torch.int64).cpu()  # (L, n)
        sm = self.sid_map.cpu().clone()
        for k, iid in enumerate(item_ids):
            owner = self.sid_owner(sids[:, k].tolist())
            if owner is not None and owner != iid:
                raise ValueError(f"item {iid}: SID {sids[:, k].tolist()} is held by item {owner}")
            i = self.index_of.get(iid)
            if i is None:
                self.index_of[iid] = len(self.item_ids)
                self.item_ids.append(iid)
                sm = torch.cat([sm, sids[:, k:k + 1]], 1)
            else:
                sm[:, i] = sids[:, k]
            if attributes is not None and attributes[k] is not None:  # None: leave them as they are
                self._attrs[iid] = dict(attributes[k])
        self.sid_map = sm.to(self.device)
        self.trie = PrefixTrie.build(sm, self.cfg.layout.cardinalities).to(self.device)
        grow = len(self.item_ids) - self.item_mask.numel()
        if grow:
            self.item_mask = torch.cat([self.item_mask, torch.zeros(grow, dtype=torch.bool, device=self.device)])
        self._leaf_mask = self.item_mask[self.trie.leaf_item.long()]
        self.trie_generation += 1
        return self.trie_generation  # the generation that serves them (live at once here)

    def set_attributes(self, item_ids, attributes) -> list[str]:
        unknown = []
        for iid, a in zip(item_ids, attributes):
            if iid in self.index_of:
                self._attrs[iid] = dict(a)
            else:
                unknown.append(iid)
        return unknown

    def _passes(self, iid: str, filt: dict[str, list[str]]) -> bool:
        attrs = self._attrs.get(iid, {})
        return all(set(attrs.get(k, ())) & set(v) for k, v in filt.items())

    def recommend(self, histories, beam_width, top_n, exclude=None, filters=None):
        if filters is not None and any(filters):
            exclude = [list(e) for e in (exclude or [[] for _ in histories])]
            for b, f in enumerate(filters):
                if f:
                    exclude[b] += [i for i, iid in enumerate(self.item_ids) if not self._passes(iid, f)]
        return super().recommend(histories, beam_width, top_n, exclude=exclude)


def engine_class() -> type:
    return RecommendEngine if hasattr(RecommendEngine, "add_items") else LiveEngine
