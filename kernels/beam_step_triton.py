"""Fused beam step in Triton: the CUDA path, with exactly the semantics of `beam_step_ref`.

What it is: one step of trie-constrained SID beam search for B requests x K beams, in three
launches and no host synchronisation (so it can sit inside a captured CUDA graph):

1. `_beam_candidates_kernel`, one program per (request, block of BLOCK_K beams):
       m, s       = max_v x[k, v],  sum_v exp(x[k, v] - m)     online over V in BLOCK_V chunks:
                    m' = max(m, max_v x),  s' = s * exp(m - m') + sum_v exp(x - m')
       cand[k, j] = scores[k] + ((x[k, code(k, j)] - m) - log s)   for the valid children j only
   A child whose bit in the request's mask row is 0 (no allowed leaf below it) is no candidate.
   Dense levels read child = dense[state, j] for j < V; CSR levels read the children
   row_ptr[state] .. row_ptr[state + 1] and gather the logits of their codes, so a CSR level
   costs K x max_children, not K x V. The candidate is written as one int64 sort key
       key = ordered(cand) << 32 | (2^32 - 1 - flat)         flat = k * W + j
   where ordered() maps float32 bits to int32 monotonically (negative floats: flip the 31
   magnitude bits). Larger key = larger score, and on equal scores the lower flat index wins:
   exactly the reference's stable descending sort, with no ties left for top-k to break.
2. `torch.topk` over the (B, K * W) keys (a radix select on CUDA). The keys are distinct, so
   the result is deterministic whatever algorithm topk uses.
3. `_beam_select_kernel` decodes the k_out best keys back into score, parent beam, code and next
   state, and applies the fill rule (-inf / 0 / 0 / -1 past n_valid and past beam_widths[b]).

What it is not: a general top-k, or the reference. A fully fused per-request Triton top-k
(radix select in shared memory) would save the key buffer's round trip through HBM; it is left
for later because torch.topk on distinct int64 keys is already exact and deterministic.
Requires: the flat candidate index K * W < 2^32 (K <= 4096 and W <= V <= 2^20 are far inside).

Versus the reference: the same picks, fill rule, n_valid and tie order; scores agree to float
rounding (the log-sum-exp is summed in another order, so candidates a rounding error apart may
swap - the tests allow exactly that). Two degenerate inputs differ: a logits row with no finite
value gives no candidates here (NaN there), and a score of -0.0 comes out as +0.0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sidrec.kernels.beam_step_ref import StepOutput, resolve_mask_rows
from sidrec.kernels.trie import PrefixTrie

LOW32: tl.constexpr = tl.constexpr(0xFFFFFFFF)  # a key's index field is LOW32 - flat: lower flat first
TILE = 4096  # elements per (beam, child) tile: BLOCK_K * BLOCK_V


@triton.jit
def _beam_candidates_kernel(
    logits_ptr, logits_b_stride, logits_k_stride,  # (B, K, V), last dim contiguous
    scores_ptr, states_ptr,  # (B, K) float32 / int64, contiguous
    dense_ptr, row_ptr_ptr, codes_ptr,  # trie level: (S, V) int32 table, or CSR (S + 1,), (S',)
    valid_ptr, valid_row_stride, rows_ptr,  # (R, S_{l+1}) uint8 child-state mask; (B,) int64 row per request
    keys_ptr,  # (B, K * W) int64 out
    K, n_cols, W, n_states,  # beams, codebook size V, candidates per beam (V if dense else max_children), S_l
    IS_DENSE: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    rows = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # beam indices of this block
    row_ok = rows < K
    row_off = pid_b * logits_b_stride + rows.to(tl.int64) * logits_k_stride  # (BLOCK_K,)

    # ---- log-sum-exp of each beam's logits row, online over V -------------------------------
    m = tl.full((BLOCK_K,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_K,), tl.float32)
    for v0 in range(0, n_cols, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(logits_ptr + row_off[:, None] + cols[None, :],
                    mask=row_ok[:, None] & (cols < n_cols)[None, :], other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: keep s at 0
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        m = m_new
    # logp = (x - m) - log(s), in the reference's order of operations: rows that differ by a
    # constant shift then give bit-identical log-probabilities, so their exact ties stay exact.
    # s >= 1 once a row has a finite logit; a row with none (padding, or all -inf) gets
    # log_s = +inf, so its candidates come out -inf instead of NaN.
    log_s = tl.where(s > 0, tl.log(tl.maximum(s, 1.0)), float("inf"))  # (BLOCK_K,)
    m = tl.where(s > 0, m, 0.0)

    # ---- valid children of each beam, scored -------------------------------------------------
    state = tl.load(states_ptr + pid_b * K + rows, mask=row_ok, other=-1)
    alive = row_ok & (state >= 0) & (state < n_states)  # fail closed: an unknown state is dead
    st = tl.maximum(state, 0).to(tl.int64)
    score = tl.load(scores_ptr + pid_b * K + rows, mask=row_ok, other=float("-inf")).to(tl.float32)
    if not IS_DENSE:
        lo = tl.load(row_ptr_ptr + st, mask=alive, other=0).to(tl.int64)
        hi = tl.load(row_ptr_ptr + st + 1, mask=alive, other=0).to(tl.int64)
    if HAS_MASK:
        valid_row = valid_ptr + tl.load(rows_ptr + pid_b) * valid_row_stride
    key_row = keys_ptr + pid_b * K * W + rows.to(tl.int64)[:, None] * W  # (BLOCK_K, 1)
    for j0 in range(0, W, BLOCK_W):
        j = j0 + tl.arange(0, BLOCK_W)
        j_ok = j < W
        if IS_DENSE:
            child = tl.load(dense_ptr + st[:, None] * n_cols + j[None, :],
                            mask=alive[:, None] & j_ok[None, :], other=-1).to(tl.int64)
            ok = child >= 0
            code = j[None, :].to(tl.int64)
        else:
            child = lo[:, None] + j[None, :]
            ok = alive[:, None] & (child < hi[:, None]) & j_ok[None, :]
            code = tl.load(codes_ptr + child, mask=ok, other=0).to(tl.int64)
        if HAS_MASK:  # one byte per candidate: does the child still lead to an allowed leaf?
            ok = ok & (tl.load(valid_row + child, mask=ok, other=0) != 0)
        x = tl.load(logits_ptr + row_off[:, None] + code, mask=ok, other=float("-inf")).to(tl.float32)
        logp = (x - m[:, None]) - log_s[:, None]
        cand = tl.where(ok, score[:, None] + logp, float("-inf")) + 0.0  # + 0.0: -0.0 -> +0.0
        # float -> order-preserving int32: negative floats count down, so flip their magnitude bits
        bits = cand.to(tl.int32, bitcast=True)
        ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        flat = rows.to(tl.int64)[:, None] * W + j[None, :]
        key = (ordered.to(tl.int64) << 32) | (LOW32 - flat)
        tl.store(key_row + j[None, :], key, mask=row_ok[:, None] & j_ok[None, :])


@triton.jit
def _beam_select_kernel(
    topkeys_ptr, n_top,  # (B, n_top) int64, descending
    states_ptr, widths_ptr,  # (B, K) int64 input states; (B,) int64 beam widths
    dense_ptr, row_ptr_ptr, codes_ptr,
    out_scores_ptr, out_parents_ptr, out_codes_ptr, out_states_ptr,  # (B, k_out)
    K, n_cols, W, k_out,
    IS_DENSE: tl.constexpr, HAS_WIDTHS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pos = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_out = pos < k_out
    key = tl.load(topkeys_ptr + pid_b * n_top + pos, mask=pos < n_top, other=0)
    flat = LOW32 - (key & LOW32)
    ordered = (key >> 32).to(tl.int32)
    score = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(tl.float32, bitcast=True)
    valid = (pos < n_top) & (score > float("-inf"))
    if HAS_WIDTHS:
        valid = valid & (pos < tl.load(widths_ptr + pid_b))
    parent = flat // W
    j = flat - parent * W
    st = tl.load(states_ptr + pid_b * K + parent, mask=valid, other=0)
    if IS_DENSE:
        child = tl.load(dense_ptr + st * n_cols + j, mask=valid, other=-1).to(tl.int64)
        code = j
    else:
        child = tl.load(row_ptr_ptr + st, mask=valid, other=0).to(tl.int64) + j
        code = tl.load(codes_ptr + child, mask=valid, other=0).to(tl.int64)
    out = pid_b * k_out + pos
    tl.store(out_scores_ptr + out, tl.where(valid, score, float("-inf")), mask=in_out)
    tl.store(out_parents_ptr + out, tl.where(valid, parent, 0), mask=in_out)
    tl.store(out_codes_ptr + out, tl.where(valid, code, 0), mask=in_out)
    tl.store(out_states_ptr + out, tl.where(valid, child, -1), mask=in_out)


def _empty_output(B: int, k_out: int, device: torch.device) -> StepOutput:
    return StepOutput(torch.full((B, k_out), float("-inf"), device=device),
                      torch.zeros(B, k_out, dtype=torch.int64, device=device),
                      torch.zeros(B, k_out, dtype=torch.int64, device=device),
                      torch.full((B, k_out), -1, dtype=torch.int64, device=device),
                      torch.zeros(B, dtype=torch.int64, device=device))


def beam_step_triton(logits: Tensor, scores: Tensor, states: Tensor, level: int, trie: PrefixTrie,
                     k_out: int, beam_widths: Tensor | None = None,
                     child_valid: Tensor | None = None, mask_rows: Tensor | None = None
                     ) -> StepOutput:
    """logits (B, K, V) for level `level`; scores (B, K); states (B, K). See `beam_step_ref`."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, K, V), got shape {tuple(logits.shape)}")
    B, K, V = logits.shape
    if tuple(scores.shape) != (B, K) or tuple(states.shape) != (B, K):
        raise ValueError(f"scores and states must be (B, K) = {(B, K)}, got {tuple(scores.shape)} "
                         f"and {tuple(states.shape)}")
    device = logits.device
    if trie.device != device:
        raise ValueError(f"the trie is on {trie.device} but logits are on {device}; move it with trie.to(device)")
    dense = trie.dense[level]
    if dense is not None and dense.shape[1] != V:
        raise ValueError(f"level {level} has a codebook of {dense.shape[1]} codes but logits have V={V}")
    if B == 0 or K == 0 or k_out == 0:
        return _empty_output(B, k_out, device)
    W = V if dense is not None else max(1, trie.max_children[level])
    if K * W >= 2 ** 32:
        raise ValueError(f"K * W = {K * W} candidates per request exceed the 32-bit key index")
    rows = resolve_mask_rows(child_valid, mask_rows, B, level, trie)
    if logits.stride(2) != 1:
        logits = logits.contiguous()
    scores = scores.to(torch.float32).contiguous()
    states = states.to(torch.int64).contiguous()
    row_ptr, codes = trie.row_ptr[level], trie.codes[level]
    dummy = row_ptr  # placeholder for pointers a constexpr branch never reads
    if rows is not None:
        valid = child_valid if child_valid.stride(1) == 1 else child_valid.contiguous()
        valid = valid.view(torch.uint8) if valid.dtype == torch.bool else valid.to(torch.uint8)
        rows = rows.contiguous()

    # Launcher: one program per (request, BLOCK_K beams); tiles of ~TILE elements.
    BLOCK_V = min(triton.next_power_of_2(V), 1024)
    BLOCK_W = BLOCK_V if dense is not None else min(triton.next_power_of_2(W), 1024)
    BLOCK_K = max(1, min(triton.next_power_of_2(K), TILE // max(BLOCK_V, BLOCK_W)))
    keys = torch.empty(B, K * W, dtype=torch.int64, device=device)
    _beam_candidates_kernel[(B, triton.cdiv(K, BLOCK_K))](
        logits, logits.stride(0), logits.stride(1), scores, states,
        dense if dense is not None else dummy, row_ptr, codes,
        valid if rows is not None else dummy, valid.stride(0) if rows is not None else 0,
        rows if rows is not None else states, keys, K, V, W, trie.num_states[level],
        IS_DENSE=dense is not None, HAS_MASK=rows is not None,
        BLOCK_K=BLOCK_K, BLOCK_V=BLOCK_V, BLOCK_W=BLOCK_W,
    )
    n_top = min(k_out, K * W)
    top = torch.topk(keys, n_top, dim=1, largest=True, sorted=True).values.contiguous()  # (B, n_top)

    out = StepOutput(torch.empty(B, k_out, dtype=torch.float32, device=device),
                     torch.empty(B, k_out, dtype=torch.int64, device=device),
                     torch.empty(B, k_out, dtype=torch.int64, device=device),
                     torch.empty(B, k_out, dtype=torch.int64, device=device), None)
    widths = beam_widths.to(torch.int64).contiguous() if beam_widths is not None else states
    BLOCK = min(triton.next_power_of_2(k_out), 1024)
    _beam_select_kernel[(B, triton.cdiv(k_out, BLOCK))](
        top, n_top, states, widths, dense if dense is not None else dummy, row_ptr, codes,
        out.scores, out.parents, out.codes, out.states, K, V, W, k_out,
        IS_DENSE=dense is not None, HAS_WIDTHS=beam_widths is not None, BLOCK=BLOCK,
    )
    out.n_valid = (out.scores > float("-inf")).sum(1)  # valid entries form a prefix
    return out
