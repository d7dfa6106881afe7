"""Level-wise validity masks over a PrefixTrie: which states still lead to an allowed leaf.

A request may forbid leaves (deleted items, its own history, `exclude_items`, a `filter` that
most items fail). Masking only the last level lets beams walk into prefixes with nothing allowed
under them, and `top_n` comes back short. Instead, from a boolean over the leaves we derive, for
every state at every level, whether any allowed leaf lies below it, and the beam step treats a
child whose bit is false as invalid at every level (`beam_step_ref`).

Layout: `levels[l]` is (R, S_{l+1}) bool for l = 0..L-1: the validity of the children a step at
level l chooses among (the states of level l+1; at the last level the leaves, S_L = N). R rows
are R distinct masks (row 0 is typically the global one, shared by every request that brings no
mask of its own); `rows` (B,) maps each request to its row. Bytes per row: sum_l S_{l+1} <= L*N
(the leaf level dominates), so memory is bounded by the catalogue, never by beams x excluded.

Two constructions, both vectorised (no Python loop over states):
- `propagate`: bottom-up segment-any through row_ptr: a prefix sum of the children's bits, read
  at each row's bounds (any = csum[hi] > csum[lo]). O(N) per row. Used for filters and for the
  global mask when deletions change.
- `clear_leaves`: a copy of an existing row with a few leaves cleared, re-checking only their
  ancestors (O(N) copy + O(E * branching) per level, falling back to re-deriving a level when
  that would exceed the level's size, so it stays O(N) whatever E is). Used for exclusion
  lists, the common case.

What it is not: the trie (kernels/trie.py) or the scoring (beam_step_ref.py). This module does
not know about items, ids or attributes; callers hand it leaf positions or a leaf-order bool.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sidrec.kernels.trie import PrefixTrie


@dataclass(frozen=True)
class LevelMasks:
    levels: list[Tensor]  # per level l: (R, S_{l+1}) bool, child state has an allowed leaf below
    rows: Tensor  # (B,) int64: the row of each request

    @property
    def num_rows(self) -> int:
        return int(self.levels[0].shape[0])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.levels) + self.rows.numel() * 8


def index_tensor(t: Tensor) -> Tensor:
    """An index tensor torch accepts without widening int32 (int16 tries are small: widen)."""
    return t if t.dtype in (torch.int32, torch.int64) else t.long()


def _segment_any(child_valid: Tensor, row_ptr: Tensor) -> Tensor:
    """child_valid (R, S') bool, row_ptr (S + 1,) -> (R, S) bool: any child of each state valid."""
    R, n = child_valid.shape
    csum = torch.zeros(R, n + 1, dtype=torch.int32, device=child_valid.device)  # (R, S' + 1)
    # the bool viewed as uint8: cumsum straight from bool converts first (measured 3-5x slower)
    torch.cumsum(child_valid.view(torch.uint8), dim=1, dtype=torch.int32, out=csum[:, 1:])
    rp = index_tensor(row_ptr)
    # index_select rather than csum[:, rp]: the advanced-index gather is several times slower
    return csum.index_select(1, rp[1:]) > csum.index_select(1, rp[:-1])


def propagate(trie: PrefixTrie, leaf_valid: Tensor) -> list[Tensor]:
    """leaf_valid (N,) or (R, N) bool in leaf order -> `levels` as in LevelMasks ((R, S_{l+1}) each).

    A state is valid iff some leaf below it is: the root's children first, the leaves last.
    """
    if leaf_valid.dtype != torch.bool:
        raise ValueError(f"leaf_valid must be bool, got {leaf_valid.dtype}")
    lv = leaf_valid[None] if leaf_valid.dim() == 1 else leaf_valid
    if lv.dim() != 2 or lv.shape[1] != trie.num_items:
        raise ValueError(f"leaf_valid must be (N,) or (R, N) with N = {trie.num_items} leaves, "
                         f"got shape {tuple(leaf_valid.shape)}")
    out = [lv]
    for l in range(trie.num_levels - 1, 0, -1):  # states of level l from their children
        out.append(_segment_any(out[-1], trie.row_ptr[l]))
    return out[::-1]


def parent_states(trie: PrefixTrie, level: int, child: Tensor) -> Tensor:
    """States of level `level` owning the given states of level + 1 (children are contiguous)."""
    rp = trie.row_ptr[level]
    return torch.searchsorted(rp, child.to(rp.dtype), right=True).long() - 1


def clear_leaves(trie: PrefixTrie, levels: list[Tensor], leaves: Tensor, inplace: bool = False) -> list[Tensor]:
    """One mask row (levels[l]: (S_{l+1},) bool) with `leaves` forbidden too: a new row (copies),
    or the given row updated when inplace.

    Only the ancestors of the cleared leaves are re-checked: a state turns invalid exactly when
    its last valid child did. leaves: any shape of leaf positions; -1 entries are ignored.
    """
    leaves = leaves.reshape(-1).long()
    leaves = leaves[leaves >= 0]
    out = list(levels) if inplace else [t.clone() for t in levels]
    if leaves.numel() == 0:
        return out
    if int(leaves.max()) >= trie.num_items:
        raise ValueError(f"leaf position {int(leaves.max())} is outside the trie's {trie.num_items} leaves")
    out[-1][leaves] = False
    changed = leaves
    for l in range(trie.num_levels - 1, 0, -1):  # re-check the parents (states of level l)
        parent = torch.unique(parent_states(trie, l, changed))
        if parent.numel() == 0:
            break
        width = max(1, trie.max_children[l])
        if parent.numel() * width > out[l].numel():
            # many parents, or a few huge rows: re-derive the whole level (O(S_{l+1})) so the
            # (P, W) gather below never outgrows the level itself
            alive_all = _segment_any(out[l][None], trie.row_ptr[l])[0]
            changed = (out[l - 1] & ~alive_all).nonzero().squeeze(1)
            out[l - 1] &= alive_all
        else:
            rp = trie.row_ptr[l]
            lo, hi = rp[parent].long(), rp[parent + 1].long()  # (P,)
            idx = lo[:, None] + torch.arange(width, device=lo.device)  # (P, W), P * W <= S_{l+1}
            inside = idx < hi[:, None]
            alive = (out[l][idx.clamp(max=out[l].numel() - 1)] & inside).any(1)
            changed = parent[out[l - 1][parent] & ~alive]
            out[l - 1][parent] = alive & out[l - 1][parent]
        if changed.numel() == 0:
            break
    return out

