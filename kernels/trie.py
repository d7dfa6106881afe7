"""PrefixTrie: the set of valid SIDs as flat integer tensors that live on the decoding device.

Why our own: constrained-decoding libraries keep the trie as Python dicts on the host, which
forces a device->host sync per step. Here every level is a tensor and one step is a gather.
This module builds and queries the structure; it does not score anything (see `beam_step_ref`).

Layout (after YouTube's STATIC constrained decoding): items are sorted by SID; the states at
level l are the distinct l-prefixes in sorted order (level 0 has one state, the root). Level l
stores, for each state, the contiguous range of its children among the states of level l+1:
`row_ptr[l]` (S_l + 1,) and `codes[l]` (S_{l+1},) with the code of each child, sorted
within a row. The child's state id is its position, so no next-state array is stored. At the
last level a child is a leaf: a position in SID order, and `leaf_item[leaf]` is the internal
item index (PID); `item_leaf` is the inverse permutation.

Compactness (bytes per item, N items, S_l states; "idx" = 2 bytes while the indexed count is
<= 32767, else 4: index tensors are int16 for small catalogues and int32 otherwise):
    codes:    sum_l S_{l+1} * (1 byte if C_l <= 256, 2 if <= 32767, else 4)
    row_ptr:  sum_l (S_l + 1) * idx(S_{l+1})
    dense:    S_l * C_l * idx(S_{l+1}) for the few dense levels (each costs <= ~1 byte per item)
    leaf_item + item_leaf: 2 * idx(N) per item (the PID <-> leaf permutation)
Consumers read index tensors with `.long()` (or `.to(tl.int64)` in a kernel), whatever the dtype.
The dense table `dense[l]` (S_l, C_l) -> child state or -1 turns a step at level l into one
gather over the whole codebook; it pays where S_l * C_l is small next to N (the first levels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

DENSE_BYTES_PER_ITEM = 1.0  # a level gets a dense table while it costs at most this much per item
DENSE_MIN_BYTES = 4096  # ... or is this small in absolute terms (the root's table always is)


def _code_dtype(cardinality: int) -> torch.dtype:
    if cardinality <= 256:
        return torch.uint8
    if cardinality <= 32767:
        return torch.int16
    return torch.int32


def _index_dtype(max_value: int) -> torch.dtype:
    """Smallest signed dtype holding indices up to max_value (and -1): int16 for small catalogues."""
    if max_value <= 32767:
        return torch.int16
    if max_value < 2 ** 31:
        return torch.int32
    raise ValueError(f"{max_value} trie nodes exceed the int32 index space")


def _sid_order(sid_map: Tensor, cards: tuple[int, ...]) -> Tensor:
    """Permutation sorting items lexicographically by SID (stable)."""
    L, N = sid_map.shape
    if math.prod(cards) < 2 ** 62:  # one mixed-radix int64 key: a single sort
        key = torch.zeros(N, dtype=torch.int64)
        for l in range(L):
            key = key * cards[l] + sid_map[l]
        return torch.argsort(key, stable=True)
    order = torch.arange(N)
    for l in reversed(range(L)):  # LSD radix: stable sorts from the last level to the first
        order = order[torch.argsort(sid_map[l, order], stable=True)]
    return order


@dataclass
class PrefixTrie:
    cardinalities: tuple[int, ...]
    row_ptr: list[Tensor]  # per level l: (S_l + 1,) int16/int32
    codes: list[Tensor]  # per level l: (S_{l+1},) uint8/int16/int32, sorted within each row
    dense: list[Tensor | None]  # per level l: (S_l, C_l) int16/int32 child state or -1, or None
    max_children: list[int]  # per level: the largest branching factor
    leaf_item: Tensor  # (N,) int16/int32: leaf position -> internal item index
    item_leaf: Tensor  # (N,) int16/int32: internal item index -> leaf position

    @property
    def num_levels(self) -> int:
        return len(self.cardinalities)

    @property
    def num_items(self) -> int:
        return int(self.leaf_item.shape[0])

    @property
    def num_states(self) -> list[int]:
        """S_l for l = 0..L-1 (the number of distinct l-prefixes)."""
        return [int(rp.shape[0]) - 1 for rp in self.row_ptr]

    @classmethod
    def build(cls, sid_map: Tensor, cardinalities: tuple[int, ...] | list[int],
              dense_levels: int | None = None) -> "PrefixTrie":
        """sid_map: (L, N) integer codes, item p's SID is sid_map[:, p]. SIDs must be unique.

        dense_levels: how many leading levels get a dense table; None chooses per level (a table
        is kept while it costs <= DENSE_BYTES_PER_ITEM bytes per item or DENSE_MIN_BYTES in all).
        """
        sid_map = torch.as_tensor(sid_map)
        if sid_map.is_floating_point() or sid_map.is_complex() or sid_map.dtype == torch.bool:
            raise ValueError(f"sid_map must hold integer codes, got dtype {sid_map.dtype}")
        sid_map = sid_map.to(device="cpu", dtype=torch.int64)
        if sid_map.dim() != 2:
            raise ValueError(f"sid_map must be 2-D (L, N), got shape {tuple(sid_map.shape)}")
        L, N = sid_map.shape
        cards = tuple(int(c) for c in cardinalities)
        if L == 0:
            raise ValueError("sid_map has no levels (shape (0, N)); an SID needs at least one code")
        if len(cards) != L:
            raise ValueError(f"sid_map has {L} levels but {len(cards)} cardinalities were given")
        if min(cards) < 1:
            raise ValueError(f"cardinalities must be >= 1, got {cards}")
        if N == 0:
            raise ValueError("cannot build a prefix trie over an empty catalogue (sid_map has 0 items)")
        for l in range(L):
            lo, hi = int(sid_map[l].min()), int(sid_map[l].max())
            if lo < 0 or hi >= cards[l]:
                bad = int(((sid_map[l] < 0) | (sid_map[l] >= cards[l])).nonzero()[0, 0])
                raise ValueError(f"sid_map level {l} has codes in [{lo}, {hi}], outside [0, {cards[l]}) "
                                 f"(first offending item index {bad}, code {int(sid_map[l, bad])})")
        order = _sid_order(sid_map, cards)
        # index_select, not sid_map[:, order]: the advanced-index gather along dim 1 is ~3x slower
        ssid = sid_map.index_select(1, order)  # (L, N) in SID order
        del sid_map
        # new_prefix[i]: sorted item i starts a new (l+1)-prefix; grows level by level (OR of diffs)
        new_prefix = torch.zeros(N, dtype=torch.bool)
        new_prefix[0] = True
        parent_new = new_prefix.clone()  # level 0: every item's 0-prefix is the root
        row_ptr, codes, dense, maxc = [], [], [], []
        for l in range(L):
            if N > 1:
                new_prefix[1:] |= ssid[l, 1:] != ssid[l, :-1]
            parent_state = torch.cumsum(parent_new, 0, dtype=torch.int64) - 1  # (N,) l-prefix id
            child_first = new_prefix.nonzero().squeeze(1)  # first sorted item of each (l+1)-prefix
            child_parent = parent_state.index_select(0, child_first)
            del parent_state
            S_l = int(child_parent[-1]) + 1
            counts = torch.bincount(child_parent, minlength=S_l)
            idx_dtype = _index_dtype(child_first.numel())
            rp = torch.zeros(S_l + 1, dtype=idx_dtype)
            rp[1:] = torch.cumsum(counts, 0)
            c = ssid[l].index_select(0, child_first)
            row_ptr.append(rp)
            codes.append(c.to(_code_dtype(cards[l])))
            maxc.append(int(counts.max()))
            table_bytes = S_l * cards[l] * rp.element_size()
            want_dense = (l < dense_levels if dense_levels is not None else
                          (not dense or dense[-1] is not None)
                          and table_bytes <= max(DENSE_MIN_BYTES, DENSE_BYTES_PER_ITEM * N))
            if want_dense:
                tab = torch.full((S_l, cards[l]), -1, dtype=idx_dtype)
                tab[child_parent, c] = torch.arange(child_first.numel(), dtype=idx_dtype)
                dense.append(tab)
            else:
                dense.append(None)
            parent_new = new_prefix.clone()
        if N > 1:
            dup = ~new_prefix[1:]  # after the last level, a repeated prefix is a repeated SID
            if bool(dup.any()):
                i = int(dup.nonzero()[0, 0]) + 1
                a, b = int(order[i - 1]), int(order[i])
                raise ValueError(f"SIDs are not unique: items {min(a, b)} and {max(a, b)} share SID "
                                 f"{ssid[:, i].tolist()}; add or fix the de-duplication level")
        leaf_item = order.to(_index_dtype(N))
        item_leaf = torch.empty(N, dtype=leaf_item.dtype)
        item_leaf.index_copy_(0, order, torch.arange(N, dtype=leaf_item.dtype))
        return cls(cards, row_ptr, codes, dense, maxc, leaf_item, item_leaf)

    def to(self, device: torch.device | str) -> "PrefixTrie":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PrefixTrie(self.cardinalities, [mv(t) for t in self.row_ptr], [mv(t) for t in self.codes],
                          [mv(t) for t in self.dense], list(self.max_children), mv(self.leaf_item),
                          mv(self.item_leaf))

    @property
    def device(self) -> torch.device:
        return self.leaf_item.device

    def nbytes(self, breakdown: bool = False) -> int | dict[str, int]:
        """Device bytes held by the trie (optionally per part: row_ptr, codes, dense, leaf maps)."""
        size = lambda ts: sum(t.numel() * t.element_size() for t in ts if t is not None)  # noqa: E731
        parts = {"row_ptr": size(self.row_ptr), "codes": size(self.codes), "dense": size(self.dense),
                 "leaf_maps": size([self.leaf_item, self.item_leaf])}
        return parts if breakdown else sum(parts.values())

    def contains(self, sids: Tensor) -> Tensor:
        """sids (..., L) -> bool (...): whether each SID names a real item (host-side helper)."""
        return self.lookup(sids) >= 0

    def lookup(self, sids: Tensor) -> Tensor:
        """sids (..., L) -> internal item index (...), -1 where the SID is not in the catalogue.

        Codes outside a level's range simply match nothing (fail closed: an unknown prefix names
        no item). Non-integer codes are refused rather than truncated into a real code.
        """
        sids = torch.as_tensor(sids)
        if sids.is_floating_point() or sids.is_complex() or sids.dtype == torch.bool:
            raise ValueError(f"SIDs must hold integer codes, got dtype {sids.dtype}")
        if sids.shape[-1] != self.num_levels:
            raise ValueError(f"SIDs must have {self.num_levels} codes in the last dimension, "
                             f"got shape {tuple(sids.shape)}")
        shape = sids.shape[:-1]
        s = sids.reshape(-1, sids.shape[-1]).to(self.device, torch.int64)
        state = torch.zeros(s.shape[0], dtype=torch.int64, device=self.device)
        alive = torch.ones_like(state, dtype=torch.bool)
        for l in range(self.num_levels):
            st = state.clamp(min=0)
            lo, hi = self.row_ptr[l][st].long(), self.row_ptr[l][st + 1].long()
            idx = lo[:, None] + torch.arange(self.max_children[l], device=self.device)[None]  # (n, W)
            ok = idx < hi[:, None]
            idx = idx.clamp(max=self.codes[l].numel() - 1)
            match = ok & (self.codes[l][idx].long() == s[:, l:l + 1])
            alive &= match.any(1)
            state = torch.where(alive, (idx * match).sum(1), torch.full_like(state, -1))
        out = torch.where(alive, self.leaf_item[state.clamp(min=0)].long(), torch.full_like(state, -1))
        return out.reshape(shape)

