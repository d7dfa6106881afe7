"""RecommendEngine: a loaded bundle ready to decode on one device. No web framework in here.

Owns the model, the live catalogue (model/live_trie.py: ids, SIDs, deletions, the device trie
rebuilt off the request path), the attribute index (model/attributes.py) and the chosen
beam-step implementation; turns internal-index histories into ranked items, with per-request
filters and exclusions as level-wise masks inside the beam (model/request_masks.py), and items
added at run time (cold: never trained on) blended into the ranking (model/cold_start.py).
Mapping external ids is done here too (a dict), so callers without Redis work the same way;
the service's inverse index maps SIDs back to ids for deployments that keep that in Redis.
"""
from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from sidrec.kernels.dispatch import get_beam_step
from sidrec.kernels.trie import PrefixTrie
from sidrec.model.attributes import AttributeIndex, check_attributes, check_filter
from sidrec.model.beam_search import BeamResult, beam_search, encode_histories, score_items
from sidrec.model.bundle import ITEM_EMBEDDINGS, Bundle, load_bundle
from sidrec.model.cold_start import ColdStart, ColdStartOptions, RerankOptions, hybrid_rerank
from sidrec.model.cold_start import allowed as allowed_items
from sidrec.model.live_trie import LiveCatalogue
from sidrec.model.request_masks import FilterMaskCache, batch_masks
from sidrec.model.transitions import TransitionOptions


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX). Without it bf16
    matmuls are emulated and slower than fp32 (measured: 6x slower training on an AVX2 EPYC)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fast_dtype(device: str | torch.device) -> str:
    """"bfloat16" on CUDA and on CPUs with native bf16, else "float32": what "auto" resolves to."""
    kind = torch.device(device).type
    return "bfloat16" if kind == "cuda" or (kind == "cpu" and cpu_has_native_bf16()) else "float32"


def tune_glibc_malloc(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Raise glibc's mmap/trim thresholds for this process (as jemalloc/tcmalloc would behave).

    By default a freed block above a few MB is returned to the OS, and the next step's tensor of
    the same size is page-faulted in again. Returns False where glibc's mallopt is unavailable.
    32 MB is the largest mmap threshold glibc accepts on 64-bit.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
        return bool(ok) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):
        return False


@dataclass(frozen=True)
class EngineOptions:
    device: str = "cpu"
    beam_step: str = "auto"  # 'auto' | 'reference' | 'triton'
    dtype: str = "float32"  # 'float32' | 'bfloat16' (autocast for the transformer) | 'auto' (fast_dtype)
    max_beam_width: int = 4096
    num_threads: int | None = None  # torch intra-op threads on CPU; None keeps torch's default
    backend: str = "torch"  # 'torch' | 'onnx' (onnxruntime, CPU, fp32; exported once into a cache dir)
    onnx_cache_dir: str | None = None  # None: $SIDREC_CACHE/onnx or ~/.cache/sidrec/onnx
    # glibc: keep freed blocks up to 32 MB in the heap instead of unmapping them, so the per-step
    # activations of wide beams are not page-faulted afresh on every request (~5% at beam 1000).
    tune_malloc: bool = True
    # Items added at run time are cold (no interactions): their score is blended into the beam's
    # ranking (model/cold_start.py). mode='off' serves the beam's ranking as it is. The defaults
    # were tuned on Beauty validation users (benchmarks/cold_start.py).
    cold_start: ColdStartOptions = ColdStartOptions()
    # The hybrid re-rank of the beam's items by text similarity to the history (model/cold_start.
    # py): its knobs are those the bundle's training run chose on validation (`eval.rerank_*` in
    # its pipeline config; off where it names none); a weight here overrides the bundle's (0: off).
    rerank_weight: float | None = None
    # The transition mixture (model/transitions.py): p(SID) mixed with p(next item) from the
    # bundle's transition table, with the knobs its training run chose on validation
    # (`eval.transitions_*`; off where it names none or has no table); a weight here overrides.
    transitions_weight: float | None = None


def bundle_rerank(config: Mapping[str, Any]) -> RerankOptions:
    """The re-rank knobs a bundle's training run chose (its pipeline config's eval section)."""
    ev = (config.get("pipeline") or {}).get("eval") or {}
    return RerankOptions(float(ev.get("rerank_weight", 0.0)), float(ev.get("rerank_decay", 0.4)))


def bundle_transitions(config: Mapping[str, Any]) -> TransitionOptions:
    """The transition mixture's knobs a bundle's training run chose (pipeline config, eval)."""
    ev = (config.get("pipeline") or {}).get("eval") or {}
    return TransitionOptions(float(ev.get("transitions_weight", 0.0)), float(ev.get("transitions_decay", 0.1)),
                             int(ev.get("transitions_extra", 0)))


class CatalogueIds:
    """External item ids <-> internal indices, shared by the engine and its process proxy.
    Needs `bundle` (with `.version`), `item_ids` and `index_of` on the instance."""

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def to_internal(self, external: Sequence[str]) -> tuple[list[int], list[str]]:
        """External ids -> (known internal indices in order, unknown ids)."""
        known, unknown = [], []
        for x in external:
            i = self.index_of.get(str(x))
            (unknown.append(str(x)) if i is None else known.append(i))
        return known, unknown


class RecommendEngine(CatalogueIds):
    def __init__(self, bundle: Bundle, options: EngineOptions | None = None) -> None:
        self.options = options or EngineOptions()
        if self.options.dtype not in ("float32", "bfloat16", "auto"):
            raise ValueError(f"engine dtype must be 'float32', 'bfloat16' or 'auto', got {self.options.dtype!r}")
        if self.options.dtype == "auto":  # onnxruntime runs fp32 only
            self.options = replace(self.options, dtype="float32" if self.options.backend == "onnx"
                                   else fast_dtype(self.options.device))
        if self.options.backend not in ("torch", "onnx"):
            raise ValueError(f"engine backend must be 'torch' or 'onnx', got {self.options.backend!r}")
        if self.options.backend == "onnx" and (self.options.dtype != "float32" or self.options.device != "cpu"):
            raise ValueError("the onnx backend runs fp32 on the CPU: use dtype='float32', device='cpu' "
                             f"(got dtype={self.options.dtype!r}, device={self.options.device!r})")
        if self.options.num_threads:
            torch.set_num_threads(self.options.num_threads)
        if self.options.tune_malloc and torch.device(self.options.device).type == "cpu":
            tune_glibc_malloc()
        self.device = torch.device(self.options.device)
        self.bundle = bundle
        self.model = bundle.model.to(self.device).eval()
        self.cfg = bundle.model_config
        self.catalogue = LiveCatalogue(bundle.sid_map, bundle.item_ids, self.cfg.layout.cardinalities, self.device)
        self.item_ids = self.catalogue.item_ids  # grows with add_items (shared list)
        self.index_of = self.catalogue.index_of
        self.attributes = AttributeIndex(getattr(bundle, "item_attributes", None))
        books = getattr(bundle, "codebooks", None) or {}
        self.cold = ColdStart(books, self.cfg.layout.num_levels, books.get(ITEM_EMBEDDINGS))
        if self.options.cold_start.mode == "dense" and not self.cold.can_score_dense:
            # no codebooks, no reconstructions (nor SIDs from text): served as before, recorded here
            self.options = replace(self.options, cold_start=replace(self.options.cold_start, mode="off"))
        self.rerank = bundle_rerank(bundle.config)
        if self.options.rerank_weight is not None:
            self.rerank = replace(self.rerank, weight=self.options.rerank_weight)
        if not self.cold.can_score_dense:  # no item vectors to compare
            self.rerank = replace(self.rerank, weight=0.0)
        self.transitions = getattr(bundle, "transitions", None)
        self.mix = bundle_transitions(bundle.config)
        if self.options.transitions_weight is not None:
            self.mix = replace(self.mix, weight=self.options.transitions_weight)
        if self.transitions is None:  # a bundle without a table: nothing to mix
            self.mix = replace(self.mix, weight=0.0)
        self.filter_masks = FilterMaskCache()  # propagated rows of recent filters (popular ones repeat)
        self.beam_step = get_beam_step(self.device, self.options.beam_step)
        self.decoder = self.model  # what beam search runs: the module itself, or its ONNX export
        if self.options.backend == "onnx":
            from sidrec.model.onnx_backend import OnnxDecoder  # onnxruntime only when asked for

            self.decoder = OnnxDecoder.from_model(self.model, self.options.onnx_cache_dir, self.options.num_threads)
        self._lock = threading.Lock()  # the model is not re-entrant across threads

    @classmethod
    def from_path(cls, path: str, options: EngineOptions | None = None) -> "RecommendEngine":
        opts = options or EngineOptions()
        return cls(load_bundle(path, device=opts.device), opts)

    @property
    def ranking(self) -> dict[str, Any]:
        """The ranking stages this engine serves after the beam, with their knobs (GET /v1/model)."""
        t = self.transitions
        return {"text_rerank": {"weight": self.rerank.weight, "decay": self.rerank.decay},
                "transitions": {"weight": self.mix.weight, "decay": self.mix.decay, "extra": self.mix.extra,
                                "table_entries": None if t is None else t.nnz}}

    @property
    def trie(self) -> PrefixTrie:
        """The live trie (replaced by the background builder after inserts)."""
        return self.catalogue.snapshot.trie

    @property
    def sid_map(self) -> Tensor:
        """(L, num_items) current SIDs on the device, added items included."""
        return self.catalogue.sid_map

    @property
    def trie_generation(self) -> int:
        """The catalogue revision the live trie covers (compare with add_items' return value)."""
        return self.catalogue.generation

    def set_masked(self, external: Sequence[str], masked: bool = True) -> list[str]:
        """Mask (or unmask) items without rebuilding anything: the level masks are recomputed
        here, once, and every later request sees them. Returns the ids not in the catalogue."""
        idx, unknown = self.to_internal(external)
        self.catalogue.set_masked(idx, masked)
        return unknown

    def add_items(self, item_ids: Sequence[str], sids: Tensor,
                  attributes: Sequence[Mapping[str, list[str]]] | None = None, wait: bool = False,
                  timeout: float | None = 60.0, cold: bool = True, embeddings: Any = None) -> int:
        """Insert new ids, or move existing ids to new SIDs (their old SID is retired at once).

        sids: (L, n) int64. New ids get new internal indices (appended, never reused); an id given
        the SID it already holds changes nothing (no rebuild). attributes: per item a dict that
        replaces its attributes, or None to leave them as they are. Raises
        ValueError naming the id when a SID is held by another item (masked ones included: a
        deleted item keeps its SID so that it can be restored) or a code is outside the layout.
        Returns the trie generation that serves the items; wait=True returns once recommend()
        sees them (TimeoutError after `timeout` seconds). cold: the items have no interactions yet
        (the default for items added at run time; base items are warm): the cold-start blend
        scores them (EngineOptions.cold_start); cold=False marks them warm. embeddings: per item
        a text embedding (D values in the codebooks' space, which the dense blend compares) or
        None, for which the item's SID reconstruction stands in; an (n, D) array does for all.
        """
        item_ids = [str(x) for x in item_ids]
        checked = None
        if attributes is not None:
            if len(attributes) != len(item_ids):
                raise ValueError(f"got {len(attributes)} attribute dicts for {len(item_ids)} items")
            checked = [None if a is None else check_attributes(a, f"item {i!r}") for i, a in zip(item_ids, attributes)]
        rows = [None] * len(item_ids) if embeddings is None or self.cold.dim is None else list(embeddings)
        if len(rows) != len(item_ids):
            raise ValueError(f"got {len(rows)} embeddings for {len(item_ids)} items")
        for iid, r in zip(item_ids, rows):
            if r is not None and np.shape(r) != (self.cold.dim,):
                raise ValueError(f"embeddings must be ({len(item_ids)}, {self.cold.dim}), a row None where unknown: "
                                 f"item {iid!r} has shape {np.shape(r)}")
        gen, idx = self.catalogue.put(item_ids, sids)
        self.cold.mark(idx, cold)
        known = [k for k, r in enumerate(rows) if r is not None]
        if known:
            self.cold.set_embeddings([idx[k] for k in known], np.stack([np.asarray(rows[k], np.float32) for k in known]))
        if len(known) < len(rows):
            self.cold.set_embeddings([idx[k] for k, r in enumerate(rows) if r is None], None)
        if checked is not None:
            for i, a in zip(idx, checked):
                if a is not None:  # None: leave the item's attributes as they are
                    self.attributes.set(i, a)
        if wait and not self.catalogue.wait_for(gen, timeout):
            raise TimeoutError(f"trie generation {gen} not live after {timeout} s")
        return gen

    def set_attributes(self, item_ids: Sequence[str], attributes: Sequence[Mapping[str, list[str]]]) -> list[str]:
        """Replace the attributes of known items (never moves a SID). Returns the unknown ids."""
        if len(attributes) != len(item_ids):
            raise ValueError(f"got {len(attributes)} attribute dicts for {len(item_ids)} items")
        checked = [check_attributes(a or {}, f"item {i!r}") for i, a in zip(item_ids, attributes)]
        unknown = []
        for iid, a in zip(item_ids, checked):
            i = self.index_of.get(str(iid))
            if i is None:
                unknown.append(str(iid))
            else:
                self.attributes.set(i, a)
        return unknown

    def item_sid(self, item_id: str) -> list[int] | None:
        i = self.index_of.get(str(item_id))
        return None if i is None else self.catalogue.sid_of(i)

    def sid_owner(self, sid: Sequence[int]) -> str | None:
        """The item holding this SID now (a masked item still holds its SID), or None."""
        sid = list(sid)
        if len(sid) != len(self.catalogue.cards):
            raise ValueError(f"a SID has {len(self.catalogue.cards)} codes, got {len(sid)}")
        if any(not 0 <= int(c) < card for c, card in zip(sid, self.catalogue.cards)):
            return None  # outside the layout: nobody holds it
        [own] = self.catalogue.owners(torch.tensor([sid], dtype=torch.int64))
        return None if own is None else self.item_ids[own]

    def attributes_of(self, item_id: str) -> dict[str, list[str]] | None:
        """The item's attributes ({} when it has none), None for an unknown id."""
        i = self.index_of.get(str(item_id))
        return None if i is None else (self.attributes.get(i) or {})

    def _autocast(self):
        if self.options.dtype == "bfloat16" and self.options.backend == "torch":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def recommend(self, histories: Sequence[Sequence[int]], beam_width: int | Sequence[int], top_n: int,
                  exclude: Sequence[Sequence[int]] | None = None,
                  filters: Sequence[Mapping[str, list[str]] | None] | None = None) -> BeamResult:
        """Top-`top_n` items for each internal-index history. exclude: per-request items to skip;
        filters: per request None or attribute -> allowed values. Both are masks inside the beam
        (invalid prefixes pruned), so a request gets top_n items whenever top_n pass."""
        widths = [beam_width] * len(histories) if isinstance(beam_width, int) else list(beam_width)
        if not histories:
            raise ValueError("recommend needs at least one history")
        if max(widths) > self.options.max_beam_width:
            raise ValueError(f"beam_width {max(widths)} exceeds the engine's limit {self.options.max_beam_width}")
        B = len(histories)
        if filters is not None:
            if len(filters) != B:
                raise ValueError(f"got {len(filters)} filters for {B} histories")
            filters = [None if f is None else check_filter(f, f"filter of request {b}") for b, f in enumerate(filters)]
        if exclude is not None and len(exclude) != B:
            raise ValueError(f"got {len(exclude)} exclusion lists for {B} histories")
        snap = self.catalogue.snapshot  # one consistent trie + masks for the whole request
        src, mask = encode_histories(histories, self.sid_map, self.model.offsets, self.cfg.max_history, self.device)
        masks = batch_masks(snap, self.attributes, B, exclude, filters, self.filter_masks)
        opts, rerank, mix = self.options.cold_start, self.rerank, self.mix
        mode = opts.mode if self.cold.has_cold else "off"
        hybrid = rerank.weight > 0 or mix.weight > 0
        # prefix mode reads every returned beam, and the re-rank re-sorts them all
        n_beam = max(top_n, min(widths)) if mode == "prefix" or hybrid else top_n
        with self._lock, torch.inference_mode(), self._autocast():
            res = beam_search(self.decoder, snap.trie, src, mask, widths if len(set(widths)) > 1 else widths[0],
                              n_beam, beam_step=self.beam_step, masks=masks)
        if hybrid:
            def may_receive(items: Tensor) -> Tensor:
                return allowed_items(snap, self.attributes, items, exclude, filters)

            res = hybrid_rerank(self.cold, rerank, self.transitions, mix, res, histories, self.sid_map,
                                n_beam if mode == "prefix" else top_n, self.cfg.max_history, may_receive)
        if mode == "off":
            return res
        sid_map = self.sid_map
        items, allowed = self.cold.candidates(snap, self.attributes, B, exclude, filters)
        if items.numel() == 0:
            return res
        if mode == "dense":
            cold_scores = self.cold.dense_scores(opts, histories, sid_map, items, self.cfg.max_history)
            if opts.relative:  # measured from the request's best beam score (-inf: none, nothing cold)
                cold_scores = cold_scores + res.scores[:, :1].float().cpu()
        else:
            cold_scores = self.cold.prefix_scores(opts, res, sid_map, items)
        return self.cold.blend(opts, res, top_n, items, allowed, cold_scores, sid_map)

    def score(self, histories: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]]) -> Tensor:
        """Log-likelihood (B, M) of each candidate item (internal indices; ragged rows padded -inf)."""
        src, mask = encode_histories(histories, self.sid_map, self.model.offsets, self.cfg.max_history, self.device)
        M = max([len(c) for c in candidates] + [1])
        cand = torch.full((len(candidates), M), -1, dtype=torch.int64)
        for b, c in enumerate(candidates):
            if c:
                cand[b, : len(c)] = torch.as_tensor(list(c), dtype=torch.int64)
        with self._lock, torch.inference_mode(), self._autocast():
            return score_items(self.decoder, src, mask, cand.to(self.device), self.sid_map).cpu()

    def close(self) -> None:
        """Stops the background trie builder (the engine serves on with its last trie)."""
        self.catalogue.close()
