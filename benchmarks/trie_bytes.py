"""Prefix-trie size and build time at catalogue scale: bytes per item at 10k, 1M and 10M items.

SIDs are L = 4: three quantizer levels of 256 codes plus a de-duplication digit, drawn the way a
residual quantizer's codes fall: skewed (a few heavy clusters per level, Zipf-like) rather than
uniform, so 3-code collisions - and with them the dedup digit's size - are realistic. The dedup
cardinality is the largest collision group. Prints a table, then one JSON line.

    .venv/bin/python benchmarks/trie_bytes.py [--sizes 10000 1000000 10000000]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sidrec.kernels.trie import PrefixTrie  # noqa: E402
from sidrec.model.sid_assign import append_dedup_digit  # noqa: E402

TARGET = 16.0  # bytes per item we hold ourselves to (STATIC reports ~9 without the PID maps)


def skewed_codes(n: int, card: int, g: torch.Generator, zipf: float = 0.6) -> torch.Tensor:
    """n codes in [0, card) with P(c) ~ 1 / rank(c)^zipf (a random rank per code)."""
    p = 1.0 / torch.arange(1, card + 1, dtype=torch.float64) ** zipf
    p = p[torch.randperm(card, generator=g)]
    return torch.multinomial(p, n, replacement=True, generator=g)


def random_sids(n: int, seed: int = 0, card: int = 256) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(4, n) unique SIDs: 3 skewed levels + dedup digit (rank among items sharing 3 codes)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.stack([skewed_codes(n, card, g) for _ in range(3)])  # (3, n)
    sid, dedup_card = append_dedup_digit(c)
    return sid, (card, card, card, dedup_card)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000, 10_000_000])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'items':>10} {'dedup C':>8} {'dense lv':>8} {'B/item':>7} {'row_ptr':>7} {'codes':>6} "
          f"{'dense':>6} {'leafmap':>7} {'build s':>8} {'lookup ok':>9}")
    for n in args.sizes:
        sid, cards = random_sids(n, seed=n)
        t0 = time.perf_counter()
        trie = PrefixTrie.build(sid, cards)
        build_s = time.perf_counter() - t0
        parts = trie.nbytes(breakdown=True)
        probe = torch.randint(0, n, (min(n, 100_000),), generator=torch.Generator().manual_seed(1))
        ok = bool(torch.equal(trie.lookup(sid[:, probe].T), probe))
        per = {k: v / n for k, v in parts.items()}
        bpi = sum(parts.values()) / n
        dense_lv = sum(d is not None for d in trie.dense)
        print(f"{n:>10} {cards[3]:>8} {dense_lv:>8} {bpi:>7.2f} {per['row_ptr']:>7.2f} {per['codes']:>6.2f} "
              f"{per['dense']:>6.2f} {per['leaf_maps']:>7.2f} {build_s:>8.2f} {str(ok):>9}")
        rows.append({"items": n, "cardinalities": list(cards), "states": trie.num_states,
                     "dense_levels": dense_lv, "bytes_per_item": round(bpi, 3),
                     "bytes_per_item_without_leaf_maps": round(bpi - per["leaf_maps"], 3),
                     "breakdown_bytes_per_item": {k: round(v, 3) for k, v in per.items()},
                     "build_s": round(build_s, 3), "lookup_ok": ok,
                     "meets_target": bpi <= TARGET})
        del trie, sid
    print(json.dumps({"bench": "trie_bytes", "target_bytes_per_item": TARGET, "threads": args.threads,
                      "results": rows}))


if __name__ == "__main__":
    main()
