"""AttributeIndex: per-item attributes (name -> list of string values) and the filter -> item mask.

A request's `filter` is attribute -> allowed values; an item passes when, for every attribute
named, at least one of its values is allowed (DESIGN.md, "HTTP API"). An item without the
attribute fails it, an unknown value matches nothing and an empty list allows nothing: a filter
never widens what is allowed (fail closed).

Index: the bundle's base attributes become, per (attribute, value), a sorted int64 tensor of item
indices, built once in one pass over the items (a few seconds at 1M items, at load time). Run-time
changes (`set`) go to an overlay: the changed base items are flagged in a bool tensor and dropped
from the base postings when read, and the new values are indexed in Python sets (cached as
tensors). So a filter costs O(items matching its values) to collect plus one O(N) boolean per
named attribute, and an update costs O(its values). What it is not: the trie or the mask propagation
(kernels/level_mask.py); it knows item indices, not leaves.
"""
from __future__ import annotations

import threading
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

Attributes = dict[str, list[str]]


def check_attributes(attrs: Any, what: str) -> Attributes:
    """A validated copy of one item's attributes; ValueError naming `what` and the fault."""
    if not isinstance(attrs, Mapping):
        raise ValueError(f"{what}: attributes must be an object of name -> list of strings, got {type(attrs).__name__}")
    out: Attributes = {}
    for k, v in attrs.items():
        if not isinstance(k, str) or not k:
            raise ValueError(f"{what}: attribute names must be non-empty strings, got {k!r}")
        if isinstance(v, str) or not isinstance(v, Sequence) or not all(isinstance(x, str) for x in v):
            raise ValueError(f"{what}: attribute {k!r} must be a list of strings, got {v!r}")
        out[k] = list(dict.fromkeys(v))  # unique, order kept
    return out


def check_filter(flt: Any, what: str) -> dict[str, list[str]]:
    """A filter has the same shape as an item's attributes (name -> allowed values)."""
    return check_attributes(flt, what)


class AttributeIndex:
    def __init__(self, base: Sequence[Attributes | None] | None = None) -> None:
        self._items: dict[int, Attributes] = {}  # only items that have attributes
        self._base: dict[tuple[str, str], Tensor] = {}  # (name, value) -> sorted base item indices
        n_base = len(base) if base else 0
        self._changed_base = torch.zeros(n_base, dtype=torch.bool)  # base items set again at run time
        self._any_changed = False
        self._overlay: dict[tuple[str, str], set[int]] = {}  # run-time postings
        self._overlay_t: dict[tuple[str, str], Tensor] = {}  # ... as tensors, rebuilt when they change
        self._changed: set[int] = set()
        self.version = 0  # bumped by every set: what a cache of filter masks keys on
        self._lock = threading.Lock()  # writers (set) against readers (matching) on other threads
        if base:
            self._index_base(base)

    def _index_base(self, base: Sequence[Attributes | None]) -> None:
        pairs: dict[tuple[str, str], list[int]] = {}
        for i, attrs in enumerate(base):
            if attrs:
                self._items[i] = attrs
                for k, vals in attrs.items():
                    for v in vals:
                        pairs.setdefault((k, v), []).append(i)
        self._base = {kv: torch.tensor(ids, dtype=torch.int64) for kv, ids in pairs.items()}  # ascending

    def get(self, item: int) -> Attributes | None:
        a = self._items.get(item)
        return None if a is None else {k: list(v) for k, v in a.items()}

    def set(self, item: int, attrs: Attributes) -> None:
        """Replace one item's attributes (already validated with check_attributes)."""
        with self._lock:
            self._set(item, attrs)

    def _set(self, item: int, attrs: Attributes) -> None:
        self.version += 1
        old = self._items.get(item)
        if old is not None and item in self._changed:
            for k, vals in old.items():
                for v in vals:
                    self._overlay.get((k, v), set()).discard(item)
                    self._overlay_t.pop((k, v), None)
        self._changed.add(item)
        if item < self._changed_base.numel():
            self._changed_base[item] = True
            self._any_changed = True
        self._items[item] = attrs
        for k, vals in attrs.items():
            for v in vals:
                self._overlay.setdefault((k, v), set()).add(item)
                self._overlay_t.pop((k, v), None)

    def matching(self, name: str, values: Sequence[str]) -> Tensor:
        """Item indices having attribute `name` with any of `values` (int64, may repeat).
        Cost: O(the postings read), plus one bool gather over them when base items were reset."""
        with self._lock:
            parts = []
            for v in values:
                base = self._base.get((name, v))
                if base is not None:
                    if self._any_changed:  # an item set at run time is read from the overlay only
                        base = base[~self._changed_base.index_select(0, base)]
                    parts.append(base)
                if self._overlay.get((name, v)):
                    t = self._overlay_t.get((name, v))
                    if t is None:
                        t = self._overlay_t[(name, v)] = torch.tensor(list(self._overlay[(name, v)]), dtype=torch.int64)
                    parts.append(t)
            return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def allowed(self, flt: Mapping[str, Sequence[str]], n_items: int) -> Tensor:
        """(n_items,) bool: the items passing the filter (AND over names, OR over values)."""
        ok = torch.ones(n_items, dtype=torch.bool)
        for name, values in flt.items():
            hit = torch.zeros(n_items, dtype=torch.bool)
            ids = self.matching(name, values)
            hit[ids[ids < n_items]] = True
            ok &= hit
        return ok
