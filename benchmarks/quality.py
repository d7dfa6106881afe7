"""Quality benchmark: the whole offline pipeline on Amazon Beauty (or the synthetic data when the
Beauty files are absent), TIGER protocol, printed as a table and one JSON line last.

    .venv/bin/python benchmarks/quality.py --data ../shared/data/amazon-beauty --out runs/beauty \
        --config beauty-cpu

Stages resume: a second call with the same settings only re-reads the metrics.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sidrec.training.config import PipelineConfig, load_config  # noqa: E402
from sidrec.training.cli import _apply_overrides, demo_config  # noqa: E402
from sidrec.training.pipeline import run_pipeline  # noqa: E402

TIGER = {"recall@5": 0.0454, "ndcg@5": 0.0321, "recall@10": 0.0648, "ndcg@10": 0.0384}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "amazon-beauty"))
    p.add_argument("--out", default=str(ROOT / "runs" / "beauty"))
    p.add_argument("--config", help="recipe name (beauty-cpu) or JSON config file; Beauty data only")
    p.add_argument("--time-budget", type=float, help="training minutes (default: the recipe's, else 75)")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    t0 = time.time()
    data = None
    if Path(a.data).is_dir():
        cfg = load_config(a.config) if a.config else PipelineConfig()
        name_path = a.data
    else:
        from sidrec.training.synthetic import make_synthetic

        print(f"{a.data} not found: running on the built-in synthetic data"
              + (f" with the demo config (--config {a.config} is for the real data)" if a.config else ""),
              file=sys.stderr)
        cfg, name_path, data = demo_config(), None, make_synthetic(400, 1500, seed=0)
    budget = a.time_budget if a.time_budget is not None else (cfg.train.time_budget_min or 75.0)
    cfg = _apply_overrides(cfg, [f"train.time_budget_min={budget}", f"train.device={a.device}", *a.set])
    run_pipeline(name_path, a.out, cfg, until="export", data=data)
    m = json.loads((Path(a.out) / "metrics.json").read_text())
    pop = m["popularity"]
    print(f"\n{'':22s}{'R@5':>8s}{'N@5':>8s}{'R@10':>8s}{'N@10':>8s}")
    print(f"{'TIGER (paper)':22s}" + "".join(f"{TIGER[k]:8.4f}" for k in TIGER))
    print(f"{'sidrec':22s}" + "".join(f"{m[k]:8.4f}" for k in TIGER))
    print(f"{'popularity':22s}" + "".join(f"{pop[k]:8.4f}" for k in TIGER))
    out = {"dataset": m["dataset"], "recall@5": m["recall@5"], "ndcg@5": m["ndcg@5"], "recall@10": m["recall@10"],
           "ndcg@10": m["ndcg@10"], "recall@100": m.get("recall@100"), "recall@1000": m.get("recall@1000"),
           "popularity_recall@10": pop["recall@10"], "train_minutes": m.get("train_minutes"),
           "best_epoch": m.get("best_epoch"), "users": m.get("users"), "device": m.get("device"),
           "arch": cfg.train.arch, "fit_on": cfg.train.fit_on, "refit_epochs": cfg.train.refit_epochs,
           "wall_minutes": round((time.time() - t0) / 60, 1)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
