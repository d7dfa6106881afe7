"""What the hybrid ranking costs on the request path: ms/request of RecommendEngine.recommend on a
trained bundle with its ranking stages switched on one at a time, side by side in one run.

Modes (the same engine options except the two weights):
* beam-only: the constrained beam's own order (transition and text weights 0);
* +text: the text re-rank alone (the bundle's weight, transitions 0);
* +transitions: the transition mixture alone (the bundle's knobs, text 0);
* hybrid: both, as the bundle serves by default.

Histories are real ones (the bundle's dataset, the test split's histories) when --data names the
dataset; widths and batch sizes as given. Rounds alternate the modes so that machine noise falls
on all of them alike. Prints a table, then one JSON line.

    .venv/bin/python benchmarks/hybrid_cost.py runs/beauty-transitions/bundle [--beams 20 100]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sidrec.model.bundle import load_bundle  # noqa: E402
from sidrec.model.engine import EngineOptions, RecommendEngine  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "amazon-beauty"),
                   help="the bundle's dataset, for real histories (random ones when absent)")
    p.add_argument("--beams", type=int, nargs="+", default=[20, 100])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--requests", type=int, default=256, help="requests per mode and cell")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top-n", type=int, default=10)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    bundle = load_bundle(a.bundle)
    index = {iid: i for i, iid in enumerate(bundle.item_ids)}
    rng = np.random.default_rng(0)
    hists: list[list[int]] = []
    if Path(a.data).is_dir():
        from sidrec.training.data import leave_one_out, load_dataset

        d = load_dataset(a.data)
        split = leave_one_out(d)
        idx = rng.choice(len(split.test_history), a.requests, replace=False)
        hists = [[index[d.item_ids[i]] for i in split.test_history[u] if d.item_ids[i] in index] for u in idx]
    if not hists:
        hists = [rng.integers(0, bundle.num_items, rng.integers(1, 20)).tolist() for _ in range(a.requests)]
    base = dict(dtype="float32", num_threads=a.threads)
    modes = {"beam-only": dict(rerank_weight=0.0, transitions_weight=0.0),
             "+text": dict(transitions_weight=0.0), "+transitions": dict(rerank_weight=0.0), "hybrid": {}}
    engines = {m: RecommendEngine(bundle, EngineOptions(**base, **kw)) for m, kw in modes.items()}
    knobs = {"text": engines["hybrid"].rerank.__dict__, "transitions": engines["hybrid"].mix.__dict__}
    rows = []
    for beam in a.beams:
        for bs in a.batches:
            times: dict[str, list[float]] = {m: [] for m in modes}
            for m in modes:  # warm-up
                engines[m].recommend(hists[:bs], beam, a.top_n)
            for _ in range(a.rounds):
                for m, eng in engines.items():
                    t = time.perf_counter()
                    for s in range(0, len(hists) - bs + 1, bs):
                        eng.recommend(hists[s: s + bs], beam, a.top_n)
                    times[m].append((time.perf_counter() - t) * 1000 / (len(hists) // bs * bs))
            row = {"beam": beam, "batch": bs, **{m: round(statistics.median(v), 3) for m, v in times.items()}}
            row["hybrid_over_beam_only"] = round(row["hybrid"] / row["beam-only"], 3)
            rows.append(row)
    for eng in engines.values():
        eng.close()
    print(f"\n{'beam':>5} {'batch':>6} " + " ".join(f"{m:>13}" for m in modes) + "   ms/request")
    for r in rows:
        print(f"{r['beam']:>5} {r['batch']:>6} " + " ".join(f"{r[m]:>13.3f}" for m in modes))
    out = {"benchmark": "hybrid_cost", "bundle": str(a.bundle), "threads": a.threads, "requests": len(hists),
           "knobs": knobs, "rows": rows, "load_avg": os.getloadavg()[0]}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
