"""PrefixTrie: the set of valid SIDs as flat integer tensors that live on the decoding device.

Why our own: constrained decoding libraries keep the trie as Python dicts on the host, which
forces a device->host sync per step. Here every level is a tensor and one step is a gather.

Layout (after YouTube's STATIC constrained decoding): items are sorted by SID; the states at
level l are the distinct l-prefixes in sorted order (level 0 has one state, the root). Level l
stores, for each state, the contiguous range of its children among the states of level l+1:
`row_ptr[l]` (S_l + 1) and `codes[l]` (S_{l+1},) with the code of each child. The child's state
id is its position, so no next-state array is stored. At the last level a child is a leaf: a
position in SID order, and `leaf_item[leaf]` is the internal item index (PID).
The first `dense_levels` levels also get a dense table `dense[l]` (S_l, C_l) -> child state or -1,
which makes those steps a single gather over the whole codebook.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PrefixTrie:
    cardinalities: tuple[int, ...]
    row_ptr: list[Tensor]  # per level l: (S_l + 1,) int32
    codes: list[Tensor]  # per level l: (S_{l+1},) int16/int32, sorted within each row
    dense: list[Tensor | None]  # per level l < dense_levels: (S_l, C_l) int32, child state or -1
    max_children: list[int]  # per level: the largest branching factor
    leaf_item: Tensor  # (N,) int32: leaf position -> internal item index
    item_leaf: Tensor  # (N,) int32: internal item index -> leaf position

    @property
    def num_levels(self) -> int:
        return len(self.cardinalities)

    @property
    def num_items(self) -> int:
        return int(self.leaf_item.shape[0])

    @classmethod
    def build(cls, sid_map: Tensor, cardinalities: tuple[int, ...] | list[int],
              dense_levels: int | None = None) -> "PrefixTrie":
        """sid_map: (L, N) integer codes, item p's SID is sid_map[:, p]. SIDs must be unique."""
        sid_map = torch.as_tensor(sid_map, dtype=torch.int64).cpu()
        if sid_map.dim() != 2:
            raise ValueError(f"sid_map must be 2-D (L, N), got shape {tuple(sid_map.shape)}")
        L, N = sid_map.shape
        cards = tuple(int(c) for c in cardinalities)
        if len(cards) != L:
            raise ValueError(f"sid_map has {L} levels but {len(cards)} cardinalities were given")
        if N == 0:
            raise ValueError("cannot build a prefix trie over an empty catalogue")
        for l in range(L):
            lo, hi = int(sid_map[l].min()), int(sid_map[l].max())
            if lo < 0 or hi >= cards[l]:
                raise ValueError(f"sid_map level {l} has codes in [{lo}, {hi}], outside [0, {cards[l]})")
        # Sort items lexicographically by SID: a single key in mixed radix.
        key = torch.zeros(N, dtype=torch.int64)
        for l in range(L):
            key = key * cards[l] + sid_map[l]
        order = torch.argsort(key, stable=True)
        skey = key[order]
        if N > 1 and bool((skey[1:] == skey[:-1]).any()):
            dup = int(order[1:][skey[1:] == skey[:-1]][0])
            raise ValueError(f"SIDs are not unique (item index {dup} repeats another SID); "
                             "add a de-duplication level")
        ssid = sid_map[:, order]  # (L, N) in SID order
        if dense_levels is None:
            dense_levels = cls.auto_dense_levels(cards, N)
        row_ptr, codes, dense, maxc = [], [], [], []
        # parent_of[l]: for each distinct (l+1)-prefix, index of its l-prefix (its parent state)
        prev_new = torch.ones(N, dtype=torch.bool)  # is this sorted item the first of its l-prefix
        prev_new[1:] = False  # level 0: one root state
        for l in range(L):
            # first-of-(l+1)-prefix flags
            diff = torch.zeros(N, dtype=torch.bool)
            diff[0] = True
            if N > 1:
                diff[1:] = (ssid[: l + 1, 1:] != ssid[: l + 1, :-1]).any(0)
            parent_state = torch.cumsum(prev_new.long(), 0) - 1  # (N,) l-prefix id per item
            child_first = diff.nonzero().squeeze(1)  # positions of the distinct (l+1)-prefixes
            child_parent = parent_state[child_first]
            S_l = int(parent_state[-1]) + 1
            counts = torch.bincount(child_parent, minlength=S_l)
            rp = torch.zeros(S_l + 1, dtype=torch.int64)
            rp[1:] = torch.cumsum(counts, 0)
            c = ssid[l, child_first]
            code_dtype = torch.int16 if cards[l] <= 32767 else torch.int32
            row_ptr.append(rp.to(torch.int32))
            codes.append(c.to(code_dtype))
            maxc.append(int(counts.max()))
            if l < dense_levels:
                tab = torch.full((S_l, cards[l]), -1, dtype=torch.int32)
                tab[child_parent, c] = torch.arange(child_first.numel(), dtype=torch.int32)
                dense.append(tab)
            else:
                dense.append(None)
            prev_new = diff
        leaf_item = order.to(torch.int32)
        item_leaf = torch.empty(N, dtype=torch.int32)
        item_leaf[order] = torch.arange(N, dtype=torch.int32)
        return cls(cards, row_ptr, codes, dense, maxc, leaf_item, item_leaf)

    @staticmethod
    def auto_dense_levels(cards: tuple[int, ...], num_items: int) -> int:
        """Dense tables for level 0 always; for level 1 only while it costs <= 4 bytes per item."""
        if len(cards) < 2:
            return 1
        return 2 if cards[0] * cards[1] * 4 <= 4 * num_items else 1

    def to(self, device: torch.device | str) -> "PrefixTrie":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PrefixTrie(self.cardinalities, [mv(t) for t in self.row_ptr], [mv(t) for t in self.codes],
                          [mv(t) for t in self.dense], list(self.max_children), mv(self.leaf_item),
                          mv(self.item_leaf))

    @property
    def device(self) -> torch.device:
        return self.leaf_item.device

    def nbytes(self) -> int:
        ts = self.row_ptr + self.codes + [t for t in self.dense if t is not None] + [self.leaf_item, self.item_leaf]
        return sum(t.numel() * t.element_size() for t in ts)

    def contains(self, sids: Tensor) -> Tensor:
        """sids (..., L) -> bool (...): whether each SID names a real item (host-side helper)."""
        return self.lookup(sids) >= 0

    def lookup(self, sids: Tensor) -> Tensor:
        """sids (..., L) -> internal item index (...), -1 where the SID is not in the catalogue."""
        shape = sids.shape[:-1]
        s = sids.reshape(-1, sids.shape[-1]).to(self.device, torch.int64)
        state = torch.zeros(s.shape[0], dtype=torch.int64, device=self.device)
        alive = torch.ones_like(state, dtype=torch.bool)
        for l in range(self.num_levels):
            lo = self.row_ptr[l][state.clamp(min=0)].long()
            hi = self.row_ptr[l][state.clamp(min=0) + 1].long()
            width = self.max_children[l]
            idx = lo[:, None] + torch.arange(width, device=self.device)[None]
            ok = idx < hi[:, None]
            idx = idx.clamp(max=self.codes[l].numel() - 1)
            match = ok & (self.codes[l][idx].long() == s[:, l:l + 1])
            alive &= match.any(1)
            state = torch.where(alive, (idx * match).sum(1), torch.full_like(state, -1))
        out = torch.where(alive, self.leaf_item[state.clamp(min=0)].long(), torch.full_like(state, -1))
        return out.reshape(shape)
