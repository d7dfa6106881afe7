"""Evaluation by the TIGER protocol: leave-one-out, full-catalogue ranking by constrained beam search.

Recall@k and NDCG@k with one relevant item per user, on either leave-one-out split: "valid"
(history seq[:-2], target seq[-2]; the split every recipe choice is made on) or "test" (history
seq[:-1], target seq[-1]; scored once for the chosen recipe). Ranking calls `model.beam_search` — the same
beam search the service runs — so offline numbers are the numbers serving delivers. Also the
popularity baseline on the same split, and wide-beam recalls (@100, @1000) for retrieval use.
This module does not train anything.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from sidrec.kernels.trie import PrefixTrie
from sidrec.model.beam_search import beam_search, encode_histories
from sidrec.model.cold_start import ColdStart, RerankOptions, hybrid_rerank
from sidrec.model.transformer import SIDTransformer
from sidrec.model.transitions import TransitionOptions, Transitions

SPLITS = ("valid", "test")


@dataclass(frozen=True)
class Reranker:
    """The engine's hybrid ranking for offline scoring (model.cold_start.hybrid_rerank): the item
    vectors (a ColdStart holding every item's text embedding) and the text re-rank's knobs, the
    transition table and the mixture's knobs."""

    store: ColdStart
    options: RerankOptions
    transitions: Transitions | None = None
    mix: TransitionOptions = TransitionOptions()

    @classmethod
    def from_run(cls, codebooks: Mapping[str, torch.Tensor], num_levels: int, embeddings: np.ndarray | None,
                 options: RerankOptions, transitions: Transitions | None = None,
                 mix: TransitionOptions = TransitionOptions()) -> "Reranker":
        emb = None if embeddings is None else torch.as_tensor(np.asarray(embeddings), dtype=torch.float16)
        return cls(ColdStart(codebooks or {}, num_levels, emb), options, transitions, mix)

    def apply(self, res, histories: Sequence[Sequence[int]], sid_map: torch.Tensor, keep: int, max_history: int):
        return hybrid_rerank(self.store, self.options, self.transitions, self.mix, res, histories, sid_map, keep,
                             max_history)


def split_targets(split, name: str) -> tuple[list[np.ndarray], np.ndarray]:
    """(histories, targets) of a `training.data.Split` for split `name` ("valid" or "test")."""
    if name == "valid":
        return split.valid_history, np.asarray(split.valid_target)
    if name == "test":
        return split.test_history, np.asarray(split.test_target)
    raise ValueError(f"unknown split {name!r}; splits are {', '.join(SPLITS)}")


def recall_ndcg(ranked: np.ndarray, targets: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """ranked (U, n) item indices (-1 = empty slot), targets (U,). One relevant item per user."""
    ranked = np.asarray(ranked)
    targets = np.asarray(targets)
    if ranked.shape[0] != targets.shape[0]:
        raise ValueError(f"{ranked.shape[0]} rankings for {targets.shape[0]} targets")
    hit = ranked == targets[:, None]  # (U, n)
    pos = np.where(hit.any(1), hit.argmax(1), np.iinfo(np.int64).max)
    out = {}
    for k in ks:
        inside = pos < k
        out[f"recall@{k}"] = float(inside.mean()) if len(pos) else 0.0
        gains = np.where(inside, 1.0 / np.log2(np.minimum(pos, k) + 2.0), 0.0)
        out[f"ndcg@{k}"] = float(gains.mean()) if len(pos) else 0.0
    return out


def popularity_ranking(train: Sequence[np.ndarray], num_items: int, n: int) -> np.ndarray:
    counts = np.bincount(np.concatenate([np.asarray(s, dtype=np.int64) for s in train] or [np.zeros(0, np.int64)]),
                         minlength=num_items)
    return np.argsort(-counts, kind="stable")[:n]


def popularity_metrics(train: Sequence[np.ndarray], targets: np.ndarray, num_items: int,
                       ks: Sequence[int] = (5, 10)) -> dict[str, float]:
    top = popularity_ranking(train, num_items, max(ks))
    ranked = np.broadcast_to(top, (len(targets), len(top)))
    return recall_ndcg(ranked, targets, ks)


def transitions_ranking(table: Transitions, histories: Sequence[np.ndarray], n: int, decay: float,
                        max_history: int) -> np.ndarray:
    """(U, n) the transition table's own ranking (model.transitions: p_next alone, no model)."""
    out = np.full((len(histories), n), -1, dtype=np.int64)
    for u, h in enumerate(histories):
        items, _ = table.top(h, n, decay, max_history)
        out[u, : items.numel()] = items.numpy()
    return out


def transitions_metrics(table: Transitions, histories: Sequence[np.ndarray], targets: np.ndarray, decay: float,
                        max_history: int, ks: Sequence[int] = (5, 10)) -> dict[str, float]:
    """The baseline the mixture must beat: the next-item table alone, on the same split."""
    return recall_ndcg(transitions_ranking(table, histories, max(ks), decay, max_history), targets, ks)


@torch.no_grad()
def rank_users(model: SIDTransformer, trie: PrefixTrie, sid_map: torch.Tensor, histories: Sequence[np.ndarray],
               beam: int, top_n: int, batch_size: int = 128, dtype: torch.dtype | None = None,
               beam_step=None, progress: bool = False, desc: str = "rank", rerank: Reranker | None = None,
               scores: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Top-`top_n` internal items per history (U, top_n), -1 where fewer valid items exist; with
    `rerank`, the beam's `beam` items re-ranked (as the engine does) before the cut; with
    `scores`, also their (U, top_n) scores (-inf past the valid ones)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # Batches of similar history length waste less compute on padding.
    order = np.argsort([len(h) for h in histories], kind="stable")
    out = np.full((len(histories), top_n), -1, dtype=np.int64)
    out_s = np.full((len(histories), top_n), -np.inf, dtype=np.float32)
    kwargs = {} if beam_step is None else {"beam_step": beam_step}
    batches = range(0, len(order), batch_size)
    it = tqdm(batches, desc=desc, leave=False, disable=not progress)
    ac = (torch.autocast(device.type, dtype=dtype) if dtype not in (None, torch.float32)
          else torch.autocast(device.type, enabled=False))
    sid_dev = sid_map.to(device)
    for start in it:
        idx = order[start: start + batch_size]
        src, mask = encode_histories([histories[i] for i in idx], sid_dev, model.offsets,
                                     model.cfg.max_history, device)
        with ac:
            res = beam_search(model, trie, src, mask, beam, beam if rerank is not None else top_n, **kwargs)
        if rerank is not None:
            res = rerank.apply(res, [histories[i] for i in idx], sid_dev, top_n, model.cfg.max_history)
        out[idx] = res.items[:, :top_n].cpu().numpy()
        out_s[idx] = res.scores[:, :top_n].float().cpu().numpy()
    model.train(was_training)
    return (out, out_s) if scores else out


def evaluate(model: SIDTransformer, trie: PrefixTrie, sid_map: torch.Tensor, histories: Sequence[np.ndarray],
             targets: np.ndarray, beam: int = 20, ks: Sequence[int] = (5, 10),
             wide_beams: Sequence[int] = (), wide_users: int = 1000, batch_size: int = 128,
             dtype: torch.dtype | None = None, seed: int = 0, progress: bool = False,
             rerank: Reranker | None = None) -> dict[str, float]:
    """TIGER-protocol metrics over all given users; wide-beam recalls on a seeded user sample.
    `rerank` applies to the @5/@10 ranking (the wide-beam recalls count the beam's set)."""
    top_n = max(ks)
    ranked = rank_users(model, trie, sid_map, histories, max(beam, top_n), top_n, batch_size, dtype,
                        progress=progress, desc=f"eval beam {beam}", rerank=rerank)
    metrics = recall_ndcg(ranked, targets, ks)
    metrics["users"] = len(targets)
    rng = np.random.default_rng(seed)
    for wb in wide_beams:
        n = min(wide_users, len(targets))
        sample = rng.choice(len(targets), size=n, replace=False) if n < len(targets) else np.arange(n)
        wb_eff = min(wb, trie.num_items)
        bs = max(1, min(batch_size, int(math.ceil(batch_size * 20 / wb_eff))))
        r = rank_users(model, trie, sid_map, [histories[i] for i in sample], wb_eff, wb_eff, bs, dtype,
                       progress=progress, desc=f"eval beam {wb}")
        metrics[f"recall@{wb}"] = recall_ndcg(r, targets[sample], [wb])[f"recall@{wb}"]
        metrics[f"recall@{wb}_users"] = n
    return metrics
