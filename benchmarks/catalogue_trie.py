"""The living catalogue's device side at 1M items: inserts, visibility, rebuilds, masks, and the
beam's latency while a background rebuild runs.

Synthetic SIDs as benchmarks/trie_bytes.py builds them (3 skewed levels of 256 + dedup digit).
Measured on the CPU reference path (model/live_trie.py, model/request_masks.py,
kernels/level_mask.py, kernels/beam_step_ref.py) with random logits standing in for the model,
so the numbers are the catalogue's own cost, not the transformer's:
  insert call      LiveCatalogue.put of 1 and of 1,000 new items (returns before any build)
  visible after    put + wait until the rebuilt trie is live (recommend() sees the items)
  rebuild          PrefixTrie.build over all items + the global level masks
  masks            per request at beam 256: a filter (~10% of items pass; built afresh, and from
                   the engine's FilterMaskCache with 100 exclusions on top) and exclusions (100 /
                   1,000 items), mask construction plus the 4-level search with pruning, against
                   the same search with no mask
  during rebuild   the same search while the builder thread rebuilds continuously, vs idle,
                   with the builder at normal priority and niced (LiveCatalogue's default)
Prints a table, then one JSON line.

    .venv/bin/python benchmarks/catalogue_trie.py [--items 1000000] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sidrec.model.attributes import AttributeIndex  # noqa: E402
from sidrec.model.beam_search import beam_search  # noqa: E402
from sidrec.model.live_trie import LiveCatalogue  # noqa: E402
from sidrec.model.request_masks import FilterMaskCache, batch_masks  # noqa: E402
from trie_bytes import random_sids  # noqa: E402

BEAM = 256


class RandomDecoder:
    """Fixed random logits per level: the search's trie and mask work without a transformer."""

    def __init__(self, cards, g):
        self.offsets = tuple(2 + sum(cards[:l]) for l in range(len(cards)))
        self.logits = [torch.randn(1, BEAM, c, generator=g) for c in cards]

    def prefill(self, src, src_mask):
        return type("P", (), {"keys": [torch.zeros(1)]})()

    def new_cache(self, batch, beams, device, dtype):
        return type("C", (), {"reorder": lambda self, parents, length: None})()

    def decode_step(self, prefix, cache, tokens, step, src_len=None):
        B, K = tokens.shape
        return self.logits[step][:, :K].expand(B, K, -1)


def timed(fn, reps: int) -> float:
    """Median seconds per call."""
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    sid, cards = random_sids(args.items, seed=1)
    n = sid.shape[1]
    t0 = time.perf_counter()
    cat = LiveCatalogue(sid, [f"i{i}" for i in range(n)], cards)
    first_build = time.perf_counter() - t0
    brands = [f"b{i}" for i in range(10)]
    pick = torch.randint(0, 10, (n,), generator=g).tolist()
    t0 = time.perf_counter()
    index = AttributeIndex([{"brand": [brands[p]]} for p in pick])
    index_s = time.perf_counter() - t0
    used: set[tuple[int, ...]] = set()

    def fresh_sids(k: int) -> torch.Tensor:
        """k SIDs not in the catalogue: dedup digits past the largest in use."""
        base = sid[:3, torch.randint(0, n, (k,), generator=g)]
        d = torch.full((1, k), cards[3] - 1)
        out = torch.cat([base, d])
        in_trie = (cat.snapshot.trie.lookup(out.T) >= 0).tolist()
        keep = []
        for j, c in enumerate(map(tuple, out.T.tolist())):
            if c not in used and not in_trie[j]:  # unused, and distinct within the call
                used.add(c)
                keep.append(j)
        return out[:, keep]

    rows = {}
    counter = [0]

    def new_items(k: int):
        s = fresh_sids(k)
        ids = [f"new{counter[0] + j}" for j in range(s.shape[1])]
        counter[0] += s.shape[1]
        return ids, s

    def put(k: int):
        return cat.put(*new_items(k))

    for k in (1, 1000):
        call, vis = [], []
        for _ in range(3):
            ids, s = new_items(k)
            t0 = time.perf_counter()
            rev, _ = cat.put(ids, s)
            call.append(time.perf_counter() - t0)
            cat.wait_for(rev, 60)
            vis.append(time.perf_counter() - t0)
        rows[f"insert_{k}_call_ms"] = 1e3 * statistics.median(call)
        rows[f"insert_{k}_visible_ms"] = 1e3 * statistics.median(vis)
    from sidrec.kernels.trie import PrefixTrie

    sids_now = cat.sid_map.clone()
    rows["rebuild_ms"] = 1e3 * timed(lambda: PrefixTrie.build(sids_now, cards), 3)
    cat.set_masked(list(range(0, n, 100)), True)  # 1% deleted: a global mask exists
    t0 = time.perf_counter()
    cat.set_masked([5], True)
    rows["delete_recompute_ms"] = 1e3 * (time.perf_counter() - t0)

    snap = cat.snapshot
    dec = RandomDecoder(cards, g)
    src, smask = torch.zeros(1, 4, dtype=torch.int64), torch.ones(1, 4, dtype=torch.bool)
    flt = [{"brand": ["b3"]}]
    ex100 = [torch.randint(0, n, (100,), generator=g).tolist()]
    ex1000 = [torch.randint(0, n, (1000,), generator=g).tolist()]

    def search(exclude=None, filters=None, cache=None):
        m = batch_masks(snap, index, 1, exclude, filters, cache)
        return beam_search(dec, snap.trie, src, smask, BEAM, 10, masks=m)

    cache = FilterMaskCache()
    search(filters=flt, cache=cache)  # warm: the filter's rows are cached from here on

    rows["search_global_mask_ms"] = 1e3 * timed(lambda: search(), args.reps)
    rows["filter_mask_build_ms"] = 1e3 * timed(lambda: batch_masks(snap, index, 1, None, flt), args.reps)
    rows["search_filter_ms"] = 1e3 * timed(lambda: search(filters=flt), args.reps)
    rows["filter_mask_cached_ms"] = 1e3 * timed(lambda: batch_masks(snap, index, 1, None, flt, cache), args.reps)
    rows["search_filter_cached_exclude100_ms"] = 1e3 * timed(lambda: search(ex100, flt, cache), args.reps)
    rows["exclude100_mask_build_ms"] = 1e3 * timed(lambda: batch_masks(snap, index, 1, ex100), args.reps)
    rows["search_exclude100_ms"] = 1e3 * timed(lambda: search(exclude=ex100), args.reps)
    rows["search_exclude1000_ms"] = 1e3 * timed(lambda: search(exclude=ex1000), args.reps)
    res = search(filters=flt)
    passing = {i for i, p in enumerate(pick) if p == 3}
    rows["filter_top10_full_and_matching"] = bool(int(res.n_valid[0]) == 10 and
                                                  set(res.items[0].tolist()) <= passing)

    cat.close()
    for nice in (0, 10):  # the builder thread at the default priority, then niced (the default)
        cat = LiveCatalogue(sid, [f"i{i}" for i in range(n)], cards, builder_nice=nice)
        snap = cat.snapshot
        stop = threading.Event()

        def churn():  # keeps the builder busy: a new insert as soon as the last is visible
            while not stop.is_set():
                rev, _ = put(1)
                cat.wait_for(rev, 60)

        idle, busy = [], []
        for _ in range(3):  # interleaved, so load from outside hits both alike
            idle.append(timed(lambda: search(), args.reps))
            stop.clear()
            th = threading.Thread(target=churn)
            th.start()
            time.sleep(0.05)
            busy.append(timed(lambda: search(), args.reps))
            stop.set()
            th.join()
        rows[f"search_idle_ms_nice{nice}"] = 1e3 * statistics.median(idle)
        rows[f"search_during_rebuild_ms_nice{nice}"] = 1e3 * statistics.median(busy)
        cat.close()

    print(f"catalogue: {n} items, cards {list(cards)}, first build {first_build:.2f} s, "
          f"attribute index {index_s:.2f} s, "
          f"{args.threads} thread(s), beam {BEAM}, CPU reference path")
    for k, v in rows.items():
        print(f"  {k:<34} {v:>10.2f}" if not isinstance(v, bool) else f"  {k:<34} {v!s:>10}")
    print(json.dumps({"bench": "catalogue_trie", "items": n, "beam": BEAM, "threads": args.threads,
                      "first_build_s": round(first_build, 3), "attribute_index_s": round(index_s, 3),
                      **{k: (round(v, 3) if not isinstance(v, bool) else v) for k, v in rows.items()}}))


if __name__ == "__main__":
    main()
