"""The one beam search of sidrec: L steps over a device-side prefix trie, KV-cached.

Training's evaluation and the service both call `beam_search`; there is no other copy.
It is not a general sequence generator: it decodes exactly one item's L SID codes.

Per request the history is encoded once (`model.prefill`); every beam then attends to that
shared prefix by indexing. Each step runs the decoder on the K live beams, then the fused beam
step (`kernels`) scores only valid trie children and keeps the top K. Widths are Python ints
fixed before the loop, so the loop never waits on the device: a level keeps at most as many
beams as the trie has prefixes there (known from tensor shapes), so at beam 1000 the second
level decodes the 256 possible first codes rather than 1000 rows of which 744 are dead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor

from sidrec.kernels.beam_step_ref import StepOutput, beam_step_reference
from sidrec.kernels.level_mask import LevelMasks, clear_leaves, propagate
from sidrec.kernels.trie import PrefixTrie
from sidrec.model.config import BOS_ID, PAD_ID


class Decoder(Protocol):
    """What beam search needs of a model (the PyTorch module and the ONNX backend both fit)."""

    offsets: tuple[int, ...]

    def prefill(self, src: Tensor, src_mask: Tensor): ...
    def new_cache(self, batch: int, beams: int, device: torch.device, dtype: torch.dtype): ...
    def decode_step(self, prefix, cache, tokens: Tensor, step: int, src_len: Tensor | None = None) -> Tensor: ...


@dataclass
class BeamResult:
    items: Tensor  # (B, N) int64 internal item index, -1 past n_valid
    sids: Tensor  # (B, N, L) int64 codes
    scores: Tensor  # (B, N) float32 log-probability of the whole SID, -inf past n_valid
    n_valid: Tensor  # (B,) int64


def encode_histories(histories: Sequence[Sequence[int]], sid_map: Tensor, offsets: Sequence[int],
                     max_history: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Internal item indices (oldest first) -> left-padded SID tokens.

    Keeps the `max_history` most recent items (older ones are dropped, as in training).
    Returns src (B, T) int64 and mask (B, T) bool, T = L * longest kept history (>= 1 item slot,
    so an empty history is a fully padded row and the model predicts from no context).
    """
    L = sid_map.shape[0]
    kept = [list(h)[-max_history:] if max_history > 0 else [] for h in histories]
    n_max = max([len(h) for h in kept] + [1])
    B = len(kept)
    items = torch.full((B, n_max), -1, dtype=torch.int64)
    for b, h in enumerate(kept):
        if h:
            items[b, n_max - len(h):] = torch.as_tensor(h, dtype=torch.int64)
    valid = items >= 0  # (B, n)
    codes = sid_map.to(torch.int64)[:, items.clamp(min=0)]  # (L, B, n)
    tokens = codes.permute(1, 2, 0) + torch.as_tensor(list(offsets), dtype=torch.int64)  # (B, n, L)
    tokens = torch.where(valid[..., None], tokens, torch.full_like(tokens, PAD_ID))
    src = tokens.reshape(B, n_max * L)
    mask = valid[..., None].expand(B, n_max, L).reshape(B, n_max * L)
    return src.to(device), mask.to(device)


def masks_from_exclusions(trie: PrefixTrie, B: int, exclude_items: Tensor | None = None,
                          item_mask: Tensor | None = None, leaf_mask: Tensor | None = None) -> LevelMasks | None:
    """Level masks from a global item (or leaf-order) mask and (B, E) per-request excluded items.

    One shared row when no request excludes anything, else one row per request: memory
    B x (sum of states) bytes at most, whatever E is. Excluded indices outside [0, N) are an error.
    """
    device = trie.device
    N = trie.num_items
    if leaf_mask is None and item_mask is not None:
        if item_mask.shape != (N,):
            raise ValueError(f"item_mask must be ({N},), got {tuple(item_mask.shape)}")
        leaf_mask = item_mask.to(device).index_select(0, trie.leaf_item.long())
    has_ex = exclude_items is not None and exclude_items.numel() > 0 and bool((exclude_items >= 0).any())
    if leaf_mask is None and not has_ex:
        return None
    base = propagate(trie, torch.ones(N, dtype=torch.bool, device=device) if leaf_mask is None
                     else ~leaf_mask.to(device=device, dtype=torch.bool))
    if not has_ex:
        return LevelMasks(base, torch.zeros(B, dtype=torch.int64, device=device))
    ex = exclude_items.to(device=device, dtype=torch.int64)
    if int(ex.max()) >= N:
        raise ValueError(f"exclude_items holds item index {int(ex.max())}, outside the catalogue's {N} items")
    leaves = torch.where(ex >= 0, trie.item_leaf.long()[ex.clamp(min=0)], torch.full_like(ex, -1))
    per_row = [clear_leaves(trie, [t[0] for t in base], leaves[b]) for b in range(B)]
    levels = [torch.stack([r[l] for r in per_row]) for l in range(trie.num_levels)]
    return LevelMasks(levels, torch.arange(B, device=device))


@torch.no_grad()
def beam_search(model: Decoder, trie: PrefixTrie, src: Tensor, src_mask: Tensor,
                beam_width: int | Sequence[int], top_n: int,
                exclude_items: Tensor | None = None, item_mask: Tensor | None = None,
                leaf_mask: Tensor | None = None,
                beam_step: Callable[..., StepOutput] = beam_step_reference,
                masks: LevelMasks | None = None) -> BeamResult:
    """Top-`top_n` valid items for each history by beam search over the SID levels.

    src, src_mask: (B, T) from `encode_histories`. beam_width: one int, or one per request
    (each request keeps its own width; the batch runs at the largest). top_n <= every width.
    exclude_items: (B, E) internal item indices never returned (e.g. the history), -1 padding.
    item_mask: (N,) bool over internal items, True = never returned (deleted, out of stock).
    leaf_mask: the same mask already in the trie's leaf order (what a long-lived caller keeps);
    it takes the place of item_mask and saves the per-call gather over the catalogue.
    masks: level-wise masks prepared by the caller (`kernels.level_mask`), in place of the three
    above. Whichever form is given, every level is pruned: a beam never enters a prefix with no
    allowed item below it, so a request gets top_n items whenever top_n are allowed and reachable.
    Returns `BeamResult`; a request with fewer than top_n reachable items gets -1/-inf fill.
    """
    B = src.shape[0]
    widths = [int(beam_width)] * B if isinstance(beam_width, int) else [int(w) for w in beam_width]
    if len(widths) != B:
        raise ValueError(f"got {len(widths)} beam widths for {B} histories")
    if min(widths) < 1:
        raise ValueError(f"beam_width must be >= 1, got {min(widths)}")
    if top_n < 1 or top_n > min(widths):
        raise ValueError(f"top_n must be in [1, beam_width]; got top_n={top_n}, beam_width={min(widths)}")
    K = max(widths)
    device = src.device
    L = trie.num_levels
    width_t = None if min(widths) == K else torch.tensor(widths, device=device)
    if masks is None:
        masks = masks_from_exclusions(trie, B, exclude_items, item_mask, leaf_mask)
    elif tuple(masks.rows.shape) != (B,):
        raise ValueError(f"masks.rows must be (B,) = ({B},), got {tuple(masks.rows.shape)}")

    prefix = model.prefill(src, src_mask)
    src_len = src_mask.sum(1)
    cache = model.new_cache(B, K, device, prefix.keys[0].dtype)
    tokens = torch.full((B, 1), BOS_ID, dtype=torch.int64, device=device)
    scores = torch.zeros(B, 1, device=device)
    states = torch.zeros(B, 1, dtype=torch.int64, device=device)
    codes_hist = torch.zeros(B, 1, 0, dtype=torch.int64, device=device)  # (B, K, l)
    live = 1  # an upper bound on the live beams of a request, known without asking the device
    for level in range(L):
        logits = model.decode_step(prefix, cache, tokens, level, src_len)  # (B, Kc, C_l)
        if level < L - 1:
            # No more beams than (l+1)-prefixes in the catalogue, nor than children of the live
            # beams: at beam 1000 the second level runs 256 rows instead of 1000 (744 dead).
            live = min(K, trie.row_ptr[level + 1].numel() - 1, live * max(1, trie.max_children[level]))
            k_out = live
        else:
            k_out = top_n
        out = beam_step(logits, scores, states, level, trie, k_out, width_t,
                        None if masks is None else masks.levels[level], None if masks is None else masks.rows)
        idx = out.parents[..., None].expand(-1, -1, codes_hist.shape[2])
        codes_hist = torch.cat([torch.gather(codes_hist, 1, idx), out.codes[..., None]], dim=2)
        scores, states = out.scores, out.states
        if level < L - 1:
            cache.reorder(out.parents, level + 1)
            tokens = out.codes + model.offsets[level]
    n_valid = out.n_valid
    items = torch.where(states >= 0, trie.leaf_item.long()[states.clamp(min=0)], torch.full_like(states, -1))
    return BeamResult(items, codes_hist, scores, n_valid)


@torch.no_grad()
def score_items(model: Decoder, src: Tensor, src_mask: Tensor, candidates: Tensor, sid_map: Tensor) -> Tensor:
    """Log-likelihood of each candidate item under the model (ranking mode).

    candidates: (B, M) internal item indices (-1 padding). Returns (B, M) float32, -inf at padding.
    The candidates of a request run as that request's beams, sharing its encoded history; the
    BOS step, the same for all of them, runs once per request.
    """
    B, M = candidates.shape
    L = sid_map.shape[0]
    device = src.device
    cand = candidates.to(device=device, dtype=torch.int64)
    codes = sid_map.to(device=device, dtype=torch.int64)[:, cand.clamp(min=0)].permute(1, 2, 0)  # (B, M, L)
    prefix = model.prefill(src, src_mask)
    src_len = src_mask.sum(1)
    cache = model.new_cache(B, max(M, 1), device, prefix.keys[0].dtype)
    total = torch.zeros(B, M, device=device)
    tokens = torch.full((B, 1), BOS_ID, dtype=torch.int64, device=device)  # step 0: one row, every candidate's
    for level in range(L):
        logp = torch.log_softmax(model.decode_step(prefix, cache, tokens, level, src_len).float(), -1)
        logp = logp.expand(B, M, -1)
        total += torch.gather(logp, 2, codes[..., level:level + 1]).squeeze(2)
        if level == 0:  # every candidate continues the one BOS beam (a no-op for a shared-position cache)
            cache.reorder(torch.zeros(B, M, dtype=torch.int64, device=device), 1)
        tokens = codes[..., level] + model.offsets[level]
    return torch.where(cand >= 0, total, torch.full_like(total, float("-inf")))
