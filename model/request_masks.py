"""Per-request level masks for one batch: filters, exclusions and the global deletions, combined.

Every request reads one row of a `LevelMasks` (kernels/level_mask.py). Requests with neither a
filter nor exclusions share the snapshot's precomputed global row (no copy, no work; and when
nothing is masked at all the batch carries no mask). A request with only exclusions gets a copy
of the global row with its excluded leaves cleared and only their ancestors re-checked. A request
with a filter gets its leaves from the attribute index (O(matching items) through item_leaf),
AND the global leaves, propagated bottom-up (O(N)), then its exclusions cleared as above. A
`FilterMaskCache` keeps the propagated rows of recent filters (keyed by the filter, valid for one
snapshot and one attribute version), so a popular filter costs a row copy instead. Memory per
request: one row, sum_l S_{l+1} <= L * N bytes, whatever the number of beams or excluded items.
What it is not: the kernel side (beam_step_*) or the catalogue's bookkeeping (live_trie.py).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Mapping, Sequence

import torch
from torch import Tensor

from sidrec.kernels.level_mask import LevelMasks, clear_leaves, index_tensor, propagate
from sidrec.model.attributes import AttributeIndex
from sidrec.model.live_trie import TrieSnapshot


def filter_leaves(snap: TrieSnapshot, index: AttributeIndex, flt: Mapping[str, Sequence[str]]) -> Tensor:
    """(N,) bool in the snapshot's leaf order: the trie's items passing the filter."""
    trie = snap.trie
    ok = torch.ones(trie.num_items, dtype=torch.bool, device=trie.device)
    item_leaf = index_tensor(trie.item_leaf)
    for name, values in flt.items():
        ids = index.matching(name, values)
        ids = ids[ids < snap.n_items].to(trie.device)  # items added after the build are not leaves yet
        hit = torch.zeros_like(ok)
        hit[item_leaf[ids]] = True
        ok &= hit
    return ok


class FilterMaskCache:
    """LRU of propagated filter rows for the current snapshot and attribute version (the whole
    cache is dropped when either changes: deletions, a swap, an attribute update)."""

    def __init__(self, max_entries: int = 16) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, list[Tensor]] = OrderedDict()
        self._snap: TrieSnapshot | None = None
        self._version = -1
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def rows(self, snap: TrieSnapshot, index: AttributeIndex, flt: Mapping[str, Sequence[str]]) -> list[Tensor]:
        """Per level (S_{l+1},) bool for the filter AND the global mask. Shared: never modify."""
        key = tuple(sorted((k, tuple(sorted(set(v)))) for k, v in flt.items()))
        version = index.version
        with self._lock:
            if self._snap is not snap or self._version != version:
                self._entries.clear()
                self._snap, self._version = snap, version
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return hit
            self.misses += 1
        rows = _filter_rows(snap, index, flt)
        with self._lock:
            if self._snap is snap and self._version == version and self.max_entries > 0:
                self._entries[key] = rows
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        return rows


def _filter_rows(snap: TrieSnapshot, index: AttributeIndex, flt: Mapping[str, Sequence[str]]) -> list[Tensor]:
    leaf_ok = filter_leaves(snap, index, flt)
    if snap.leaf_valid is not None:
        leaf_ok &= snap.leaf_valid
    return [t[0] for t in propagate(snap.trie, leaf_ok)]


def _excluded_leaves(snap: TrieSnapshot, items: Sequence[int]) -> Tensor:
    ids = torch.as_tensor(list(items), dtype=torch.int64)
    ids = ids[(ids >= 0) & (ids < snap.n_items)].to(snap.trie.device)  # not in this trie: nothing to clear
    return index_tensor(snap.trie.item_leaf)[ids].long()


def batch_masks(snap: TrieSnapshot, index: AttributeIndex, batch: int,
                exclude: Sequence[Sequence[int]] | None = None,
                filters: Sequence[Mapping[str, Sequence[str]] | None] | None = None,
                cache: FilterMaskCache | None = None) -> LevelMasks | None:
    """LevelMasks for `batch` requests, or None when nothing at all is masked."""
    trie = snap.trie
    device = trie.device
    exclude = list(exclude) if exclude is not None else [[]] * batch
    filters = list(filters) if filters is not None else [None] * batch
    if len(exclude) != batch or len(filters) != batch:
        raise ValueError(f"exclude and filters need one entry per request ({batch}); got "
                         f"{len(exclude)} and {len(filters)}")
    own = [b for b in range(batch) if filters[b] is not None or len(exclude[b])]
    if not own:
        return None if snap.global_levels is None else \
            LevelMasks([t[None] for t in snap.global_levels], torch.zeros(batch, dtype=torch.int64, device=device))
    base_levels = snap.global_levels
    if base_levels is None:  # nothing deleted: an all-valid row to start the exclusions from
        base_levels = [torch.ones(n, dtype=torch.bool, device=device) for n in trie.num_states[1:] + [trie.num_items]]
    shared_row = len(own) < batch
    R = len(own) + shared_row
    levels = [torch.empty(R, t.numel(), dtype=torch.bool, device=device) for t in base_levels]  # (R, S_{l+1})
    rows = torch.zeros(batch, dtype=torch.int64)
    if shared_row:
        for t, src in zip(levels, base_levels):
            t[0] = src
    for r, b in enumerate(own, start=int(shared_row)):
        rows[b] = r
        if filters[b] is not None:
            start = cache.rows(snap, index, filters[b]) if cache is not None else _filter_rows(snap, index, filters[b])
        else:
            start = base_levels
        for t, src in zip(levels, start):
            t[r] = src
        if len(exclude[b]):
            clear_leaves(trie, [t[r] for t in levels], _excluded_leaves(snap, exclude[b]), inplace=True)
    return LevelMasks(levels, rows.to(device))
