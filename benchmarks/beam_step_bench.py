"""Reference beam step on the CPU: time per step at beam 10 .. 4096, per level type, and where
the time goes (log-softmax over the codebook, gathering the valid children, top-k).

Trie: 1M items, L = 4 (3 x 256 + dedup digit, as in benchmarks/trie_bytes.py). Level 1 has a
dense table (one gather over the codebook); levels 2 and 3 are CSR (only each beam's children).
Live beams sit on distinct random states, so at level 1 (256 states) at most 256 are alive, as in
a real search. Alongside the reference's stable sort, the same top-k is timed as torch.topk over
int64 (score, index) keys - the trick the Triton path uses to make ties deterministic.
Prints a table, then one JSON line.

    .venv/bin/python benchmarks/beam_step_bench.py [--items 1000000] [--beams 10 100 256 1000 4096]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sidrec.kernels.beam_step_ref import beam_step_reference, candidates  # noqa: E402
from sidrec.kernels.trie import PrefixTrie  # noqa: E402
from trie_bytes import random_sids  # noqa: E402


def timeit(fn, reps: int) -> float:
    """Median wall time of fn() in ms (one warm-up call)."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def keyed_topk(cand: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k flat indices of cand (B, M) float32, ties to the lower index, via distinct int64 keys."""
    bits = (cand + 0.0).view(torch.int32).long()
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    idx = torch.arange(cand.shape[1], dtype=torch.int64)
    keys = (ordered << 32) | (0xFFFFFFFF - idx)
    top = torch.topk(keys, k, dim=1).values
    return 0xFFFFFFFF - (top & 0xFFFFFFFF)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--beams", type=int, nargs="+", default=[10, 100, 256, 1000, 4096])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sid, cards = random_sids(args.items, seed=args.items)
    trie = PrefixTrie.build(sid, cards)
    g = torch.Generator().manual_seed(0)
    levels = {"dense (l1)": 1, "csr (l2)": 2, "csr-last (l3)": 3}
    rows = []
    hdr = (f"{'level':>14} {'beam':>5} {'W':>4} {'step ms':>8} {'lsm %':>6} {'gather %':>8} {'topk %':>7} "
           f"{'keyed topk ms':>13} {'sort ms':>8}")
    print(f"trie: {args.items} items, dense levels {[d is not None for d in trie.dense]}, "
          f"max children {trie.max_children}, batch {args.batch}, threads {args.threads}")
    print(hdr)
    for name, level in levels.items():
        V, S = trie.cardinalities[level], trie.num_states[level]
        for K in args.beams:
            B = args.batch
            logits = torch.randn(B, K, V, generator=g) * 2
            alive = min(K, S)
            states = torch.full((B, K), -1, dtype=torch.int64)
            states[:, :alive] = torch.stack([torch.randperm(S, generator=g)[:alive] for _ in range(B)])
            scores = torch.where(states >= 0, -torch.rand(B, K, generator=g) * 5, torch.full((B, K), float("-inf")))
            reps = max(3, min(50, int(2e6 / (B * K * V))))
            t_lsm = timeit(lambda: torch.log_softmax(logits.float(), -1), reps)
            t_cand = timeit(lambda: candidates(logits, scores, states, level, trie), reps)
            t_all = timeit(lambda: beam_step_reference(logits, scores, states, level, trie, K), reps)
            cand = candidates(logits, scores, states, level, trie)[0].reshape(B, -1)
            k = min(K, cand.shape[1])
            t_sort = timeit(lambda: torch.sort(cand, dim=1, descending=True, stable=True), reps)
            t_key = timeit(lambda: keyed_topk(cand, k), reps)
            ref_idx = torch.sort(cand, dim=1, descending=True, stable=True).indices[:, :k]
            top = torch.gather(cand, 1, ref_idx)
            same = bool(torch.equal(keyed_topk(cand, k)[top > float("-inf")], ref_idx[top > float("-inf")]))
            W = cand.shape[1] // K
            gather = max(t_cand - t_lsm, 0.0)
            topk = max(t_all - t_cand, 0.0)
            share = lambda x: 100.0 * x / max(t_all, 1e-9)  # noqa: E731
            print(f"{name:>14} {K:>5} {W:>4} {t_all:>8.3f} {share(t_lsm):>6.1f} {share(gather):>8.1f} "
                  f"{share(topk):>7.1f} {t_key:>13.3f} {t_sort:>8.3f}")
            rows.append({"level": name, "beam": K, "candidates_per_beam": W, "step_ms": round(t_all, 4),
                         "log_softmax_ms": round(t_lsm, 4), "gather_ms": round(gather, 4),
                         "topk_ms": round(topk, 4), "stable_sort_ms": round(t_sort, 4),
                         "keyed_topk_ms": round(t_key, 4), "keyed_topk_matches_sort": same})
    print(json.dumps({"bench": "beam_step_reference_cpu", "items": args.items, "batch": args.batch,
                      "threads": args.threads, "results": rows}))


if __name__ == "__main__":
    main()
