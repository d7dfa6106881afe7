"""ColdStart: makes items added at run time (cold: no interactions, a code path the model never
saw in training) reachable, by blending a second score for them into the generative ranking.

Why: a generative model gives a SID path it never trained on almost no probability, so the
constrained beam, which holds the cold item as an ordinary leaf, almost never returns it (LIGER,
arXiv 2411.18814, measured TIGER at ~0 cold-start recall). Two mechanisms are implemented; both
work on the engine's beam result and add the request's cold candidates to it, so nothing in the
beam, the kernels or the trie changes:

- "dense" (LIGER-style): each item is represented by its text embedding where one is known
  (the bundle's `item_embeddings` for base items, the service's embedding for items added at run
  time) and otherwise by its SID reconstruction, the sum of its quantizer codes' centroids. A
  history's profile is the recency-weighted mean of its items' normalised vectors; a cold item's score is an affine map of its cosine to that profile into the
  log-probability scale, `weight * (cos - 1) + bias`, so that it competes with the beam's
  log-probs (a cold item enters the top N only where its similarity beats the warm items'
  likelihood, not in a fixed number of slots). With `relative`, the request's best beam score is
  added, so the bias reads "how far below the model's favourite".
- "prefix": a cold item inherits the probability mass the beam found under its parent prefix
  (its first L-1 codes: the log-sum-exp of the returned items' scores sharing it) plus a log
  prior `bias` (tuned), split evenly among the cold siblings. No similarity: it trusts the
  quantizer to have placed the item beside its kin.

Chosen by measurement: benchmarks/cold_start.py on Amazon Beauty (a seeded 5% of the items,
605, held out of training and of the codebooks and added at run time from their text; knobs
tuned on validation users, keeping warm validation R@10 >= 97% of the blend-off value; test
scored once; 1,059 cold and 6,000 warm test users; record in benchmarks/README.md). With a model
trained for 45 minutes (11 epochs), cold-user test R@10 / N@10: dense on text embeddings
0.0680 / 0.0490, dense on SID reconstructions 0.0293 / 0.0179, prefix 0.0170 / 0.0089, blend
off 0; warm R@10 with dense on embeddings 0.965x the frozen catalogue's. "prefix" loses because
only 54% of the cold items share a parent prefix with any warm item, and where they do, the beam
rarely reaches it; "dense" reads the item's own content, and its text embedding more sharply
than its three codes. Default: dense, with the knobs validation chose (weight 20, bias 0, decay
0.4, absolute).

The same item vectors also re-rank the beam's own (warm) items (`RerankOptions`, `rerank`):
`log p(SID) + weight * (cos - 1)` with the history's profile, over every item the beam returned,
then cut to the request's top N. The generative score decides which items are candidates; the
text similarity moves the ones that resemble the history up the short list, where the model
alone spreads its probability over look-alike codes. Its knobs are chosen per trained model on
validation users (benchmarks/rerank_tune.py) and travel in the bundle's pipeline config.

What this is not: the SID assignment of new items (their text, codebooks, de-duplication codes:
service/ and training/new_items.py) or the masks (model/request_masks.py); it reads the
request's masks and the catalogue snapshot and never returns an item they forbid.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from sidrec.kernels.level_mask import index_tensor
from sidrec.model.attributes import AttributeIndex
from sidrec.model.beam_search import BeamResult
from sidrec.model.live_trie import TrieSnapshot
from sidrec.model.transitions import TransitionOptions, Transitions, add_next_items, lookup, mix_scores

MODES = ("off", "dense", "prefix")


@dataclass(frozen=True)
class ColdStartOptions:
    """The knobs of the blend (EngineOptions carries them). Defaults chosen on Beauty validation
    users (benchmarks/cold_start.py), never on test."""

    mode: str = "dense"  # 'off' | 'dense' | 'prefix'
    weight: float = 20.0  # dense: log-prob units per unit of cosine
    bias: float = 0.0  # dense: the score of a cold item at cosine 1; prefix: the log prior
    decay: float = 0.4  # dense: history weight of the i-th most recent item is decay**i
    # dense: add the request's best beam score to the cold scores, so that the bias is measured
    # from what the model is sure of for this history rather than in absolute log-prob
    relative: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"cold-start mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"cold-start decay must be in (0, 1], got {self.decay!r}")
        if self.weight < 0:
            raise ValueError(f"cold-start weight must be >= 0, got {self.weight!r}")


@dataclass(frozen=True)
class RerankOptions:
    """The hybrid re-rank of the beam's own items (LIGER's dense + generative scores, applied to
    warm items too): `score + weight * (cos - 1)`, cos between the item's text embedding and the
    history's profile (decay as in ColdStartOptions). weight 0 serves the beam's order. A trained
    bundle carries the weight its run chose on validation (`eval.rerank_weight`)."""

    weight: float = 0.0
    decay: float = 0.4

    def __post_init__(self) -> None:
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"re-rank decay must be in (0, 1], got {self.decay!r}")
        if not self.weight >= 0:
            raise ValueError(f"re-rank weight must be >= 0, got {self.weight!r}")


def rerank_scores(scores: Tensor, valid: Tensor, cos: Tensor, has: Tensor, weight: float) -> Tensor:
    """(B, N) re-ranked scores: `score + weight * (cos - 1)` where the history had an item (`has`,
    (B,)), the beam's score where it had none, -inf past the valid slots (`valid`, (B, N))."""
    new = scores + torch.where(has[:, None], weight * (cos - 1.0), torch.zeros_like(cos))
    return torch.where(valid, new, torch.full_like(new, float("-inf")))


def reconstructions(codebooks: Sequence[Tensor], sids: Tensor) -> Tensor:
    """sids (L, n) -> (n, D) unit vectors: sum over the quantizer levels of the codes' centroids
    (a trailing dedup digit beyond the codebooks is ignored)."""
    rec = codebooks[0][sids[0]].clone()
    for lv in range(1, len(codebooks)):
        rec += codebooks[lv][sids[lv]]
    return torch.nn.functional.normalize(rec.float(), dim=-1)


def allowed(snap: TrieSnapshot, attributes: AttributeIndex, items: Tensor,
            exclude: Sequence[Sequence[int]] | None,
            filters: Sequence[Mapping[str, list[str]] | None] | None) -> Tensor:
    """(B, M) bool: which of `items` (B, M; negative = an empty slot) request b may receive: served
    by the snapshot, not deleted or retired in it, not excluded, passing the request's filter.
    The same rules the beam's masks apply (model/request_masks.py), for items added beside it."""
    items = items.cpu().to(torch.int64)
    ok = (items >= 0) & (items < snap.n_items)
    if items.numel() == 0:
        return ok
    safe = torch.where(ok, items, torch.zeros_like(items))
    if snap.leaf_valid is not None:  # deletions and stale leaves, as the beam's global mask
        leaves = index_tensor(snap.trie.item_leaf)[safe.reshape(-1).to(snap.trie.device)]
        ok &= snap.leaf_valid[leaves].cpu().view(items.shape)
    for b in range(items.shape[0]):
        if exclude is not None and len(exclude[b]):
            ok[b] &= ~torch.isin(items[b], torch.as_tensor(list(exclude[b]), dtype=torch.int64))
        if filters is not None and filters[b] is not None:
            for name, values in filters[b].items():
                ok[b] &= torch.isin(items[b], attributes.matching(name, values))
    return ok


class ColdStart:
    """The cold items of one engine and their blend into a beam result."""

    def __init__(self, codebooks: Mapping[str, Tensor], num_levels: int,
                 item_embeddings: Tensor | None = None) -> None:
        names = sorted((k for k in codebooks if k.startswith("codebook_")), key=lambda k: int(k.split("_")[1]))
        self.codebooks = [codebooks[k].float().cpu() for k in names]  # per level (C_l, D)
        if len(self.codebooks) > num_levels:
            raise ValueError(f"{len(self.codebooks)} codebooks for SIDs of {num_levels} codes")
        self.dim = int(self.codebooks[0].shape[1]) if self.codebooks else None
        # Text embeddings by internal index, float16, where known (`_known`); grown by a quarter.
        self._emb = torch.zeros(0, self.dim or 0, dtype=torch.float16)
        self._known = torch.zeros(0, dtype=torch.bool)
        self._cold: set[int] = set()
        self._version = 0  # bumped by every mark and embedding change
        self._rec: tuple[tuple, Tensor] | None = None  # the cold candidates' vectors, reused
        self._sorted: tuple[int, Tensor] | None = None  # (version, the cold items sorted), reused
        self._lock = threading.Lock()
        if item_embeddings is not None and item_embeddings.numel() and self.dim is not None:
            if item_embeddings.dim() != 2 or item_embeddings.shape[1] != self.dim:
                raise ValueError(f"the bundle's item embeddings are {tuple(item_embeddings.shape)}, but its "
                                 f"codebooks are {self.dim}-dimensional")
            self.set_embeddings(range(item_embeddings.shape[0]), item_embeddings)

    @property
    def can_score_dense(self) -> bool:
        return bool(self.codebooks)

    def set_embeddings(self, items: Sequence[int], embeddings: Tensor | None) -> None:
        """Record the text embeddings (n, D) of `items` (new or moved ones); None forgets theirs,
        so that their SID reconstruction stands in (a text change without a known embedding)."""
        idx = torch.as_tensor(list(items), dtype=torch.int64)
        if embeddings is not None:
            x = torch.as_tensor(embeddings).float().cpu()
            if self.dim is None or x.dim() != 2 or x.shape != (idx.numel(), self.dim):
                raise ValueError(f"item embeddings must be ({idx.numel()}, {self.dim}) to match the codebooks, "
                                 f"got {tuple(x.shape)}")
            x = torch.nn.functional.normalize(x, dim=-1).half()
        with self._lock:
            if idx.numel() == 0:
                return
            need = int(idx.max()) + 1
            if need > self._known.numel():
                if embeddings is None:
                    idx = idx[idx < self._known.numel()]
                else:
                    cap = max(need, self._known.numel() * 5 // 4 + 1024)  # 1.25x: the base may be large
                    emb = torch.zeros(cap, self.dim, dtype=torch.float16)
                    known = torch.zeros(cap, dtype=torch.bool)
                    emb[: self._known.numel()] = self._emb
                    known[: self._known.numel()] = self._known
                    self._emb, self._known = emb, known
            if embeddings is None:
                self._known[idx] = False
            else:
                self._emb[idx] = x
                self._known[idx] = True
            self._version += 1

    def vectors(self, items: Tensor, sids: Tensor) -> Tensor:
        """(n, D) unit vectors of `items`: the text embedding where known, else the SID
        reconstruction from `sids` (L, N), the whole catalogue's SIDs."""
        emb, known = self._emb, self._known
        has = torch.zeros(items.numel(), dtype=torch.bool)
        inside = items < known.numel()
        has[inside] = known[items[inside]]
        if bool(has.all()):
            return emb[items].float()
        out = reconstructions(self.codebooks, sids[:, items])
        if bool(has.any()):
            out[has] = emb[items[has]].float()
        return out

    def mark(self, items: Sequence[int], cold: bool) -> None:
        with self._lock:
            (self._cold.update if cold else self._cold.difference_update)(int(i) for i in items)
            self._version += 1

    def is_cold(self, item: int) -> bool:
        return item in self._cold

    @property
    def has_cold(self) -> bool:
        return bool(self._cold)

    def cold_tensor(self) -> Tensor:
        """The cold items, sorted, int64: rebuilt only after a change, not on every request."""
        with self._lock:
            got = self._sorted
            if got is None or got[0] != self._version:
                got = self._sorted = (self._version, torch.tensor(sorted(self._cold), dtype=torch.int64))
            return got[1]

    def cold_items(self) -> list[int]:
        return self.cold_tensor().tolist()

    # ---- candidates -----------------------------------------------------------------------------
    def candidates(self, snap: TrieSnapshot, attributes: AttributeIndex, batch: int,
                   exclude: Sequence[Sequence[int]] | None,
                   filters: Sequence[Mapping[str, list[str]] | None] | None) -> tuple[Tensor, Tensor]:
        """The cold items the snapshot serves, and (B, M) bool: which each request may receive
        (not deleted or retired in the snapshot, not excluded, passing the request's filter)."""
        items = self.cold_tensor()
        items = items[items < snap.n_items]  # (M,): the ones this snapshot serves
        return items, allowed(snap, attributes, items.expand(batch, -1), exclude, filters)

    # ---- scores ---------------------------------------------------------------------------------
    def dense_scores(self, opts: ColdStartOptions, histories: Sequence[Sequence[int]], sid_map: Tensor,
                     items: Tensor, max_history: int) -> Tensor:
        """(B, M) calibrated scores of the cold `items` for each history (-inf for an empty one)."""
        B, M = len(histories), items.numel()
        sids = sid_map.to("cpu", torch.int64)
        # Every change to the cold set, their SIDs (add_items marks moved items) or their
        # embeddings bumps the version; within one, snapshots differ only in how many they serve.
        key = (self._version, items.numel())
        got = self._rec
        if got is not None and got[0] == key:
            cand = got[1]
        else:  # recomputed only after add_items (M x D floats; a gather per request otherwise)
            cand = self.vectors(items, sids)  # (M, D)
            self._rec = (key, cand)
        prof, has = self.profiles(histories, sids, opts.decay, max_history)
        cos = prof @ cand.T  # (B, M)
        s = opts.weight * (cos - 1.0) + opts.bias
        return torch.where(has[:, None], s, torch.full((B, M), float("-inf")))

    def profiles(self, histories: Sequence[Sequence[int]], sids: Tensor, decay: float,
                 max_history: int) -> tuple[Tensor, Tensor]:
        """((B, D) unit profiles, (B,) bool: the history had an item). A profile is the mean of the
        history's item vectors weighted decay**i for the i-th most recent; zero for an empty one."""
        B = len(histories)
        kept = [list(h)[-max_history:] if max_history > 0 else [] for h in histories]
        lens = torch.tensor([len(h) for h in kept], dtype=torch.int64)
        prof = torch.zeros(B, self.dim or 0)
        has = lens > 0
        if bool(has.any()):  # every history's items in one gather, summed per history
            flat = torch.tensor([i for h in kept for i in h], dtype=torch.int64)
            row = torch.repeat_interleave(torch.arange(B), lens)
            age = (torch.repeat_interleave(torch.cumsum(lens, 0), lens) - 1 - torch.arange(flat.numel())).float()
            w = decay ** age  # most recent: 1
            prof.index_add_(0, row, w[:, None] * self.vectors(flat, sids))
        return torch.nn.functional.normalize(prof, dim=-1), has

    # ---- the hybrid re-rank of the beam ---------------------------------------------------------
    def rerank(self, opts: RerankOptions, res: BeamResult, histories: Sequence[Sequence[int]], sid_map: Tensor,
               keep: int, max_history: int, p_next: Tensor | None = None, mix_weight: float = 0.0) -> BeamResult:
        """The beam's items re-scored `score + weight * (cos - 1)` (cos: the item's vector against
        the history's profile; an empty history keeps the beam's scores), sorted, best `keep`.
        With `p_next` (B, N), `score` is first the transition mixture's (model/transitions.py:
        `mix_scores` with `mix_weight`)."""
        sids = sid_map.to("cpu", torch.int64)
        items, scores = res.items.cpu(), res.scores.cpu().float()
        B, N = items.shape
        n_valid = res.n_valid.cpu()
        valid = torch.arange(N)[None, :] < n_valid[:, None]
        if p_next is not None:
            scores = mix_scores(scores, p_next, mix_weight)
        if opts.weight > 0:
            vec = self.vectors(items.clamp(min=0).reshape(-1), sids).view(B, N, -1)
            prof, has = self.profiles(histories, sids, opts.decay, max_history)
            new = rerank_scores(scores, valid, torch.einsum("bnd,bd->bn", vec, prof), has, opts.weight)
        else:
            new = torch.where(valid, scores, torch.full_like(scores, float("-inf")))
        # by (-score, beam rank): equal scores keep the beam's order
        order = torch.argsort(new, dim=1, descending=True, stable=True)[:, :keep]
        out_items = torch.where(torch.gather(valid, 1, order), torch.gather(items, 1, order), -1)
        out_sids = torch.gather(res.sids.cpu(), 1, order[:, :, None].expand(-1, -1, res.sids.shape[2]))
        dev = res.items.device
        return BeamResult(out_items.to(dev), out_sids.to(dev), torch.gather(new, 1, order).to(dev),
                          n_valid.clamp(max=keep).to(dev))

    @staticmethod
    def prefix_scores(opts: ColdStartOptions, res: BeamResult, sid_map: Tensor, items: Tensor) -> Tensor:
        """(B, M): log-sum-exp of the beam's returned scores under each cold item's parent prefix,
        plus the log prior, shared evenly among the cold siblings; -inf where the beam found none."""
        L = sid_map.shape[0]
        B, M = res.items.shape[0], items.numel()
        cold_pre = sid_map.to("cpu", torch.int64)[: L - 1, items].T  # (M, L-1)
        key = {}
        for j, p in enumerate(map(tuple, cold_pre.tolist())):
            key.setdefault(p, []).append(j)
        out = torch.full((B, M), float("-inf"))
        scores, sids, n_valid = res.scores.cpu().float(), res.sids.cpu(), res.n_valid.cpu().tolist()
        for b in range(B):
            mass: dict[tuple, Tensor] = {}
            for n in range(n_valid[b]):
                p = tuple(sids[b, n, : L - 1].tolist())
                if p in key:
                    mass[p] = scores[b, n] if p not in mass else torch.logaddexp(mass[p], scores[b, n])
            for p, m in mass.items():
                js = key[p]
                out[b, js] = m + opts.bias - torch.log(torch.tensor(float(len(js))))
        return out

    # ---- the blend ------------------------------------------------------------------------------
    def blend(self, opts: ColdStartOptions, res: BeamResult, top_n: int, items: Tensor, allowed: Tensor,
              cold_scores: Tensor, sid_map: Tensor) -> BeamResult:
        """The beam's items and the allowed cold items merged by score, top `top_n` per request.
        An item in both keeps the larger score. Ties break by internal index (deterministic)."""
        B = res.items.shape[0]
        L = sid_map.shape[0]
        sids_all = sid_map.to("cpu", torch.int64)
        out_items = torch.full((B, top_n), -1, dtype=torch.int64)
        out_scores = torch.full((B, top_n), float("-inf"))
        out_sids = torch.zeros(B, top_n, L, dtype=torch.int64)
        n_out = torch.zeros(B, dtype=torch.int64)
        r_items, r_scores, r_valid = res.items.cpu(), res.scores.cpu().float(), res.n_valid.cpu().tolist()
        cs = torch.where(allowed, cold_scores, torch.full_like(cold_scores, float("-inf")))
        # only a request's top_n cold candidates can enter its top_n: (B, n) of them, sorted
        # by (-score, index) so that equal scores keep the lower index (topk alone does not say)
        order = torch.argsort(cs, dim=1, descending=True, stable=True)[:, :top_n]  # (B, n)
        top_s, top_i = torch.gather(cs, 1, order), items[order]
        for b in range(B):
            best: dict[int, float] = {}
            for i, s in zip(r_items[b, : r_valid[b]].tolist(), r_scores[b, : r_valid[b]].tolist()):
                best[i] = max(s, best.get(i, float("-inf")))
            keep = torch.isfinite(top_s[b])
            for i, s in zip(top_i[b][keep].tolist(), top_s[b][keep].tolist()):
                best[i] = max(s, best.get(i, float("-inf")))
            ranked = sorted(best.items(), key=lambda t: (-t[1], t[0]))[:top_n]
            n = len(ranked)
            if n:
                idx = torch.tensor([i for i, _ in ranked], dtype=torch.int64)
                out_items[b, :n] = idx
                out_scores[b, :n] = torch.tensor([s for _, s in ranked])
                out_sids[b, :n] = sids_all[:, idx].T
            n_out[b] = n
        dev = res.items.device
        return BeamResult(out_items.to(dev), out_sids.to(dev), out_scores.to(dev), n_out.to(dev))


def hybrid_rerank(store: ColdStart, text: RerankOptions, table: Transitions | None, mix: TransitionOptions,
                  res: BeamResult, histories: Sequence[Sequence[int]], sid_map: Tensor, keep: int,
                  max_history: int, allowed=None) -> BeamResult:
    """The served ranking of a beam result (the engine's and the offline evaluation's one path):
    the transition mixture's extra next items added (`allowed` as in `add_next_items`), every
    item's p(SID) mixed with p(next) (model/transitions.py), then the text re-rank, sorted, best
    `keep`. Neither on (both weights 0, or no table): `res` unchanged."""
    mixing = table is not None and mix.weight > 0
    if not mixing and text.weight <= 0:
        return res
    p_next = None
    if mixing:
        dists = table.dists(histories, mix.decay, max_history)  # once per request, for both uses
        res = add_next_items(res, dists, mix, sid_map, allowed)
        p_next = lookup(dists, res.items)
    return store.rerank(text, res, histories, sid_map, keep, max_history, p_next, mix.weight)
