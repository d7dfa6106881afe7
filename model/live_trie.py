"""LiveCatalogue: the engine's mutable catalogue - item ids, current SIDs, deletions - and the
device trie that serves it, rebuilt off the request path and swapped in atomically.

Why a background rebuild and not an overlay trie merged at step time: measured at 1M items
(3 x 256 + dedup digit, 1 CPU thread), `PrefixTrie.build` takes ~0.2-0.25 s on an idle core
(~1 s on this shared 2-core box under other load), so a full rebuild makes an insert visible in
about a second or less, while the beam step keeps one trie, one kernel and one mask layout (an
overlay doubles every step's gathers and the kernel's state space for the whole life of the
overlay, and needs its own compaction anyway). benchmarks/catalogue_trie.py measures the insert
call, the time to visibility, the rebuild, and the search latency while a rebuild runs. If
visibility must drop well under the build time, the next step is a merge build (the new SIDs
merged into the already sorted leaves instead of a fresh argsort), not an overlay.

How:
- A `TrieSnapshot` is immutable: trie, the catalogue revision it was built at, the item count it
  covers and its global level masks (`kernels.level_mask`: deleted items and stale leaves). A
  request reads `catalogue.snapshot` once and decodes against it, whatever happens meanwhile.
- `add_items` writes the new SIDs (appending new ids; internal indices are never reused), bumps
  the revision and wakes the builder thread; it never builds on the caller's thread. Inserts that
  arrive while a build runs are coalesced into the next build. The builder copies the SIDs under
  the lock, builds without it, and takes the lock only to swap the snapshot reference.
- An update that moves an item's SID retires its old leaf at once (the live trie's global mask
  drops it); the new SID is served from the next snapshot.
- `set_masked` (delete / restore) replaces the live snapshot's global masks (a new snapshot
  object, same trie): immediate, no rebuild. A deletion clears its leaves in a copy of the rows
  and re-checks only their ancestors; a restore re-derives the rows from the leaves (O(N)). The masks are recomputed
  when deletions change, never per request; with nothing masked they are None and cost nothing.
- A masked item keeps its SID (restore is an unmask), so `owner` still names it: its SID cannot
  be given to another item while it exists.
What it is not: the attribute index (model/attributes.py) or the per-request masks
(model/request_masks.py).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import Tensor

from sidrec.kernels.level_mask import clear_leaves, index_tensor, propagate
from sidrec.kernels.trie import PrefixTrie


BUILDER_NICE = 10  # the builder thread's niceness: requests keep their latency while it builds


@dataclass(frozen=True)
class TrieSnapshot:
    trie: PrefixTrie  # on the engine's device
    generation: int  # the catalogue revision it was built at
    n_items: int  # internal indices [0, n_items) are the trie's items
    global_levels: list[Tensor] | None  # per level (S_{l+1},) bool, None when nothing is masked
    leaf_valid: Tensor | None  # (N,) bool in leaf order, the global mask's leaves (None: all valid)


class LiveCatalogue:
    def __init__(self, sid_map: Tensor, item_ids: Sequence[str], cardinalities: Sequence[int],
                 device: torch.device | str = "cpu", builder_nice: int = BUILDER_NICE) -> None:
        sid_map = torch.as_tensor(sid_map).to("cpu", torch.int64)
        self.cards = tuple(int(c) for c in cardinalities)
        self.device = torch.device(device)
        self.builder_nice = builder_nice
        L, N = sid_map.shape
        self._sids = torch.empty(L, max(16, 2 * N), dtype=torch.int64)  # capacity-doubling buffer, CPU
        self._sids[:, :N] = sid_map
        self._dev_sids = self._sids.to(self.device) if self.device.type != "cpu" else self._sids
        self._deleted = torch.zeros(self._sids.shape[1], dtype=torch.bool)
        self.item_ids: list[str] = list(item_ids)
        self.index_of: dict[str, int] = {iid: i for i, iid in enumerate(self.item_ids)}
        self._lock = threading.Lock()  # guards every field below; never held while a trie builds
        self._built = threading.Condition(self._lock)
        self._rev = 0
        self._moved: dict[int, int] = {}  # item -> revision of its last SID move
        self._pending: dict[tuple[int, ...], int] = {}  # SIDs given after the live trie was built -> item
        self._mask_version = 0
        self._builder: threading.Thread | None = None
        self._closed = False
        self._error: BaseException | None = None
        trie = PrefixTrie.build(sid_map, self.cards).to(self.device)
        self._snap = TrieSnapshot(trie, 0, N, None, None)

    # ---- reads ---------------------------------------------------------------------------------
    @property
    def snapshot(self) -> TrieSnapshot:
        return self._snap  # one reference read: atomic

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def sid_map(self) -> Tensor:
        """(L, n) current SIDs on the device (a view: new columns are written, never moved)."""
        return self._dev_sids[:, : len(self.item_ids)]

    @property
    def generation(self) -> int:
        return self._snap.generation

    def sid_of(self, item: int) -> list[int]:
        return self._sids[:, item].tolist()

    def owners(self, sids: Tensor) -> list[int | None]:
        """sids (n, L) -> the item holding each SID now (masked items included), or None."""
        with self._lock:
            return self._owners_locked(sids)

    def _owners_locked(self, sids: Tensor) -> list[int | None]:
        sids = sids.to("cpu", torch.int64)  # (n, L)
        found = self._snap.trie.lookup(sids).cpu()
        current = (self._sids[:, found.clamp(min=0)].T == sids).all(1) & (found >= 0)  # not moved away since
        out: list[int | None] = []
        for sid, idx, cur in zip(map(tuple, sids.tolist()), found.tolist(), current.tolist()):
            p = self._pending.get(sid)
            out.append(p if p is not None else (idx if cur else None))
        return out

    # ---- writes --------------------------------------------------------------------------------
    def put(self, item_ids: Sequence[str], sids: Tensor) -> tuple[int, list[int]]:
        """Insert new ids or move existing ones to new SIDs. Returns (revision, internal indices).

        sids: (L, n) int64. ValueError naming the id for a code outside the layout, a SID held by
        another item, or two ids of the call sharing a SID; nothing is changed then.
        """
        sids = torch.as_tensor(sids)
        L = len(self.cards)
        if sids.dim() != 2 or sids.shape != (L, len(item_ids)):
            raise ValueError(f"sids must be (L, n) = ({L}, {len(item_ids)}), got {tuple(sids.shape)}")
        if sids.is_floating_point() or sids.dtype == torch.bool:
            raise ValueError(f"sids must hold integer codes, got dtype {sids.dtype}")
        sids = sids.to("cpu", torch.int64)
        cards = torch.tensor(self.cards)[:, None]
        bad = ((sids < 0) | (sids >= cards)).any(0)
        if bool(bad.any()):
            j = int(bad.nonzero()[0, 0])
            raise ValueError(f"item {item_ids[j]!r}: SID {sids[:, j].tolist()} has a code outside the layout's "
                             f"cardinalities {list(self.cards)}")
        ids = [str(x) for x in item_ids]
        seen: dict[tuple[int, ...], str] = {}
        for j, sid in enumerate(map(tuple, sids.T.tolist())):
            if sid in seen:
                raise ValueError(f"items {seen[sid]!r} and {ids[j]!r} of one call share SID {list(sid)}")
            seen[sid] = ids[j]
        if len(set(ids)) != len(ids):
            raise ValueError("item_ids of one call must be distinct")
        with self._lock:
            owners = self._owners_locked(sids.T)
            for j, own in enumerate(owners):
                if own is not None and self.item_ids[own] != ids[j]:
                    raise ValueError(f"item {ids[j]!r}: SID {sids[:, j].tolist()} is already held by item "
                                     f"{self.item_ids[own]!r}")
            rev, idx, moved, write = self._rev + 1, [], False, []
            for j, (iid, sid) in enumerate(zip(ids, map(tuple, sids.T.tolist()))):
                i = self.index_of.get(iid)
                if i is None:
                    i = self._append(iid)
                else:
                    old = tuple(self._sids[:, i].tolist())
                    if old == sid:
                        idx.append(i)
                        continue
                    if self._pending.get(old) == i:
                        del self._pending[old]
                    self._moved[i] = rev
                    moved = True
                self._pending[sid] = i
                idx.append(i)
                write.append(j)
            if not write:  # nothing new (a replay of SIDs already held): no revision, no rebuild
                return self._rev, idx
            self._rev = rev
            cols = torch.tensor([idx[j] for j in write], dtype=torch.int64)  # one write of every new or moved column
            self._sids[:, cols] = sids[:, write]
            if self._dev_sids is not self._sids:
                self._dev_sids[:, cols.to(self.device)] = sids[:, write].to(self.device)
            if moved:
                self._mask_version += 1
                self._snap = self._with_global_masks(self._snap)
            self._start_builder()
            self._built.notify_all()
        return rev, idx

    def _append(self, iid: str) -> int:
        i = len(self.item_ids)
        if i == self._sids.shape[1]:  # grow: readers hold views of the old buffer, still valid
            cap = 2 * i
            grown = torch.empty(self._sids.shape[0], cap, dtype=torch.int64)
            grown[:, :i] = self._sids
            deleted = torch.zeros(cap, dtype=torch.bool)
            deleted[:i] = self._deleted
            self._sids, self._deleted = grown, deleted
            self._dev_sids = grown.to(self.device) if self.device.type != "cpu" else grown
        self.item_ids.append(iid)
        self.index_of[iid] = i
        return i

    def set_masked(self, items: Sequence[int], masked: bool) -> None:
        if not items:
            return
        with self._lock:
            idx = torch.tensor(list(items), dtype=torch.int64)
            self._deleted[idx] = masked
            self._mask_version += 1
            snap = self._snap
            if not masked:  # a restore may revive whole prefixes: re-derive from the leaves, O(N)
                self._snap = self._with_global_masks(snap)
                return
            # a deletion only clears bits: a copy of the rows with the leaves cleared and their
            # ancestors re-checked (O(N) copy + O(deleted x branching)), not a re-derivation
            idx = idx[idx < snap.n_items].to(self.device)
            if idx.numel() == 0:
                return
            trie = snap.trie
            base = snap.global_levels or [torch.ones(n, dtype=torch.bool, device=self.device)
                                          for n in trie.num_states[1:] + [trie.num_items]]
            levels = clear_leaves(trie, base, index_tensor(trie.item_leaf)[idx].long())
            self._snap = replace(snap, global_levels=levels, leaf_valid=levels[-1])

    def is_masked(self, item: int) -> bool:
        return bool(self._deleted[item])

    def _with_global_masks(self, snap: TrieSnapshot) -> TrieSnapshot:
        """The snapshot with masks for the current deletions and its stale leaves (items moved
        to another SID after it was built). Called under the lock."""
        return self._masks_for(snap, *self._mask_inputs(snap))

    def _mask_inputs(self, snap: TrieSnapshot) -> tuple[Tensor, Tensor, Tensor]:
        """Copies of what the global masks depend on (under the lock): deleted (n,), moved items
        and their current SIDs."""
        moved = [i for i, r in self._moved.items() if r > snap.generation and i < snap.n_items]
        m = torch.tensor(moved, dtype=torch.int64)
        return self._deleted[: snap.n_items].clone(), m, self._sids[:, m].clone()

    def _masks_for(self, snap: TrieSnapshot, deleted: Tensor, moved: Tensor, moved_sids: Tensor) -> TrieSnapshot:
        invalid = deleted
        if moved.numel():
            still_there = snap.trie.lookup(moved_sids.T.to(snap.trie.device)).cpu() == moved
            invalid[moved[~still_there]] = True  # the old leaf of a moved item returns it no more
        if not bool(invalid.any()):
            return replace(snap, global_levels=None, leaf_valid=None)
        leaf_valid = ~invalid.to(self.device).index_select(0, index_tensor(snap.trie.leaf_item))
        return replace(snap, global_levels=[t[0] for t in propagate(snap.trie, leaf_valid)], leaf_valid=leaf_valid)

    # ---- the builder ---------------------------------------------------------------------------
    def _start_builder(self) -> None:
        if self._builder is None and not self._closed:
            self._builder = threading.Thread(target=self._build_loop, name="sidrec-trie-builder", daemon=True)
            self._builder.start()

    def _build_loop(self) -> None:
        try:  # Linux: a niced builder thread leaves the CPU to the request threads first
            if self.builder_nice:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.builder_nice)
        except (AttributeError, OSError):
            pass
        while True:
            with self._lock:
                while not self._closed and self._rev <= self._snap.generation:
                    self._built.wait()
                if self._closed:
                    return
                rev, n = self._rev, len(self.item_ids)
                sids = self._sids[:, :n].clone()
            try:
                trie = PrefixTrie.build(sids, self.cards).to(self.device)
            except BaseException as e:  # cannot happen for SIDs `put` accepted; never hang waiters
                with self._lock:
                    self._error = e
                    self._built.notify_all()
                return
            fresh = TrieSnapshot(trie, rev, n, None, None)
            with self._lock:
                inputs, version = self._mask_inputs(fresh), self._mask_version
            snap = self._masks_for(fresh, *inputs)  # O(N): off the lock
            with self._lock:
                if self._closed:
                    return
                if version != self._mask_version:  # deletions changed meanwhile: redo (rare)
                    snap = self._with_global_masks(fresh)
                self._snap = snap  # the swap
                self._moved = {i: r for i, r in self._moved.items() if r > rev}
                self._pending = {s: i for s, i in self._pending.items() if self._moved.get(i, 0) > rev or i >= n}
                self._built.notify_all()

    def wait_for(self, generation: int, timeout: float | None = None) -> bool:
        """Block until the live trie covers `generation`. False on timeout, or once closed."""
        with self._lock:
            self._built.wait_for(lambda: self._snap.generation >= generation or self._error is not None
                                 or self._closed, timeout)
            if self._error is not None:
                raise RuntimeError(f"the background trie build failed: {self._error!r}")
            return self._snap.generation >= generation

    def close(self, timeout: float = 30.0) -> None:
        """Stops the builder (a build under way finishes first; nothing is swapped after close)."""
        with self._lock:
            self._closed = True
            self._built.notify_all()
            builder = self._builder
        if builder is not None and builder is not threading.current_thread():
            builder.join(timeout)
