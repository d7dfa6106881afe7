"""Reference beam step in PyTorch: the semantics every backend must reproduce, and the CPU path.

One step of SID beam search at level l, for B requests with up to K beams each:

    logp[b, k, c]  = log_softmax(logits[b, k, :])[c]            (model probability of code c)
    cand[b, k, j]  = scores[b, k] + logp[b, k, code of child j of state[b, k]]
    out            = top-k_out of cand over (k, j), ties broken by the lower (k, child) index

Only a beam's valid children are scored: for CSR levels the candidates are the <= max_children
children of each beam's state (K x branching, not K x V); for dense levels the whole codebook is
gathered through the dense table. Dead beams carry score -inf and state -1.

Fill rule: when fewer than k_out candidates are valid, the tail of the output has score -inf,
parent 0, code 0 and state -1, and `n_valid[b]` says how many leading entries are real.
Per-request beam widths: entries at positions >= beam_widths[b] are filled the same way.
Masks (every level, `level_mask.py`): `child_valid` (R, S_{l+1}) says which states of level l+1
(leaves at the last level) still have an allowed leaf below them, `mask_rows` (B,) which row each
request reads (None: row b when R == B, row 0 when R == 1). A child whose bit is false is invalid,
so a beam never enters a prefix with nothing allowed under it. Cost per request: one O(1) read per
candidate; memory: the rows, bounded by the catalogue (no batch x beam x branching x excluded).
Fail closed: a state outside [0, S_l) is dead (as -1 is), a dense entry of -1 is no child.

Top-k: the order is that of a stable descending sort of the flat (B, K * W) candidates. It is
computed as torch.topk over distinct int64 keys `ordered(score) << 32 | (2^32 - 1 - flat)`
(`ordered_keys`), which gives exactly that order with no tie left to chance, and is 3-30x faster
on the CPU than the sort (benchmarks/beam_step_bench.py). The Triton path builds the same keys.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sidrec.kernels.trie import PrefixTrie

NEG_INF = float("-inf")
LOW32 = 0xFFFFFFFF


def ordered_keys(flat: Tensor) -> Tensor:
    """(B, M) float32 -> (B, M) distinct int64 keys: a larger key is a higher score, or an equal
    score at a lower index - so the k largest keys are the first k of a stable descending sort.

    ordered(x): the float32 bits as int32, with the 31 magnitude bits of negative numbers flipped,
    is monotone in x (-0.0 is first made +0.0). The low 32 bits hold 2^32 - 1 - index, so among
    equal scores the lower index has the larger key. Needs M < 2^32.
    """
    bits = (flat.float() + 0.0).view(torch.int32).long()
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    index = torch.arange(flat.shape[1], device=flat.device, dtype=torch.int64)
    return (ordered << 32) | (LOW32 - index)


@dataclass
class StepOutput:
    scores: Tensor  # (B, k_out) float32 cumulative log-probabilities, -inf past n_valid
    parents: Tensor  # (B, k_out) int64 beam index in the previous step
    codes: Tensor  # (B, k_out) int64 code chosen at this level
    states: Tensor  # (B, k_out) int64 state at the next level (a leaf at the last level), -1 past n_valid
    n_valid: Tensor  # (B,) int64


def resolve_mask_rows(child_valid: Tensor | None, mask_rows: Tensor | None, B: int, level: int,
                      trie: PrefixTrie) -> Tensor | None:
    """Checks a level's mask against the trie and the batch; returns (B,) int64 rows (or None)."""
    if child_valid is None:
        return None
    S_next = trie.num_items if level == trie.num_levels - 1 else trie.num_states[level + 1]
    if child_valid.dim() != 2 or child_valid.shape[1] != S_next:
        raise ValueError(f"child_valid at level {level} must be (R, {S_next}) (one bit per state of level "
                         f"{level + 1}), got shape {tuple(child_valid.shape)}")
    R = child_valid.shape[0]
    if mask_rows is None:
        if R not in (1, B):
            raise ValueError(f"child_valid has {R} rows for {B} requests: pass mask_rows (B,)")
        return torch.arange(B, device=child_valid.device) if R == B and R > 1 else \
            torch.zeros(B, dtype=torch.int64, device=child_valid.device)
    if tuple(mask_rows.shape) != (B,):
        raise ValueError(f"mask_rows must be (B,) = ({B},), got {tuple(mask_rows.shape)}")
    return mask_rows.to(torch.int64)


def candidates(logits: Tensor, scores: Tensor, states: Tensor, level: int, trie: PrefixTrie,
               child_valid: Tensor | None = None, mask_rows: Tensor | None = None
               ) -> tuple[Tensor, Tensor, Tensor]:
    """Scored candidates. Returns cand (B, K, W) float32, code (B, K, W), child state (B, K, W)."""
    B, K, V = logits.shape
    rows = resolve_mask_rows(child_valid, mask_rows, B, level, trie)
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, K, V)
    alive = (states >= 0) & (states < trie.num_states[level])  # fail closed: unknown states are dead
    s = torch.where(alive, states, torch.zeros_like(states))
    dense = trie.dense[level]
    if dense is not None:
        child = dense[s].long()  # (B, K, V)
        code = torch.arange(V, device=logits.device).expand(B, K, V)
        lp = logp
    else:
        rp = trie.row_ptr[level]
        lo, hi = rp[s].long(), rp[s + 1].long()  # (B, K)
        W = max(1, trie.max_children[level])
        child = lo[..., None] + torch.arange(W, device=logits.device)  # (B, K, W)
        ok = child < hi[..., None]
        child = torch.where(ok, child, torch.full_like(child, -1))
        code = trie.codes[level][child.clamp(min=0)].long()
        lp = torch.gather(logp, 2, code)
    valid = (child >= 0) & alive[..., None]
    if rows is not None:  # (B, K, W) reads of each request's row: no per-exclusion expansion
        valid &= child_valid[rows[:, None, None], child.clamp(min=0)]
    cand = torch.where(valid, scores[..., None].float() + lp, torch.full_like(lp, NEG_INF))
    child = torch.where(valid, child, torch.full_like(child, -1))
    return cand, code, child


def beam_step_reference(logits: Tensor, scores: Tensor, states: Tensor, level: int, trie: PrefixTrie,
                        k_out: int, beam_widths: Tensor | None = None,
                        child_valid: Tensor | None = None, mask_rows: Tensor | None = None
                        ) -> StepOutput:
    """logits (B, K, V) for level `level`; scores (B, K); states (B, K); child_valid (R, S_{l+1})
    bool and mask_rows (B,): the level's mask (see module docstring)."""
    B, K, _ = logits.shape
    cand, code, child = candidates(logits, scores, states, level, trie, child_valid, mask_rows)
    W = cand.shape[2]
    flat = cand.reshape(B, K * W)
    k = min(k_out, K * W)
    # = the first k of a stable descending sort: equal scores keep the lower flat index first
    keys = torch.topk(ordered_keys(flat), k, dim=1, sorted=True).values
    idx = LOW32 - (keys & LOW32)
    top = torch.gather(flat, 1, idx)
    parents = idx // W
    codes = torch.gather(code.reshape(B, K * W), 1, idx)
    nxt = torch.gather(child.reshape(B, K * W), 1, idx)
    valid = top > NEG_INF
    pos = torch.arange(k, device=logits.device)[None]
    if beam_widths is not None:
        valid &= pos < beam_widths[:, None]
    if k < k_out:  # pad to the requested width
        pad = k_out - k
        top = torch.cat([top, top.new_full((B, pad), NEG_INF)], 1)
        parents = torch.cat([parents, parents.new_zeros(B, pad)], 1)
        codes = torch.cat([codes, codes.new_zeros(B, pad)], 1)
        nxt = torch.cat([nxt, nxt.new_full((B, pad), -1)], 1)
        valid = torch.cat([valid, valid.new_zeros(B, pad)], 1)
    top = torch.where(valid, top, torch.full_like(top, NEG_INF))
    parents = torch.where(valid, parents, torch.zeros_like(parents))
    codes = torch.where(valid, codes, torch.zeros_like(codes))
    nxt = torch.where(valid, nxt, torch.full_like(nxt, -1))
    return StepOutput(top, parents, codes, nxt, valid.sum(1))
