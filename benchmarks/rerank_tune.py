"""Choose the hybrid re-rank's knobs on validation (`eval.rerank_weight`, `eval.rerank_decay`).

The beam's own items are re-scored `log p(SID) + weight * (cos - 1)`, cos between the item's text
embedding and the history's recency-weighted profile (model/cold_start.py: `RerankOptions`, the
same code the engine runs). The beam is searched once per user; every (weight, decay) pair then
only re-sorts those items, so a grid costs seconds.

Run it on a select run (fit on train only), whose validation users the model never trained on:

    .venv/bin/python benchmarks/rerank_tune.py runs/sel-base
    # then the final run with the chosen knobs (the exported bundle carries them to the service):
    .venv/bin/python benchmarks/quality.py --config beauty-cpu --protocol final \\
        --set eval.rerank_weight=W --set eval.rerank_decay=D

`--split test` is refused unless `--weights` names at most two values (the chosen one and 0): a
score on test for an ablation table row, never a grid to choose from. Writes
rerank_tune-<split>.json and rerank_tune-<split>.png (NDCG@5 and @10 against the weight, one line
per decay) into the run directory, and one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sidrec.kernels.trie import PrefixTrie  # noqa: E402
from sidrec.model.bundle import ITEM_EMBEDDINGS  # noqa: E402
from sidrec.model.cold_start import RerankOptions, rerank_scores  # noqa: E402
from sidrec.training.config import PipelineConfig  # noqa: E402
from sidrec.training.evaluate import Reranker, rank_users, recall_ndcg, split_targets  # noqa: E402
from sidrec.training.pipeline import bundle_books, run_pipeline  # noqa: E402
from sidrec.training.protocol import resolve_data  # noqa: E402
from sidrec.training.train import autocast_dtype, build_model  # noqa: E402

KS = (5, 10)
WEIGHTS = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)
DECAYS = (0.2, 0.4, 0.7, 1.0)


def load_run(run_dir: Path, data_spec: str, device: str | None = None):
    """The run's pipeline state up to its SIDs (all loaded from its stages) and its trained model."""
    from safetensors.torch import load_file

    cfg_path = run_dir / "pipeline_config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{run_dir} is not a run directory (no pipeline_config.json)")
    cfg = PipelineConfig.from_dict(json.loads(cfg_path.read_text()))
    ckpt = run_dir / "checkpoints" / ("refit.safetensors" if cfg.train.refit_epochs > 0 else "best.safetensors")
    if not ckpt.is_file():
        raise ValueError(f"{run_dir}: no trained checkpoint at {ckpt}; has its train stage finished?")
    data, path = resolve_data(data_spec)
    run = run_pipeline(path, run_dir, cfg, until="sids", data=data if path is None else None, log=lambda m: None)
    model = build_model(cfg.train, run.layout)
    model.load_state_dict(load_file(str(ckpt)))
    model.to(device or cfg.train.device).eval()
    return cfg, run, model


def rescore(items: np.ndarray, scores: np.ndarray, cos: torch.Tensor, has: torch.Tensor, weight: float,
            top_n: int) -> np.ndarray:
    """(U, top_n) items after the re-rank of (U, N) beam items: the engine's scores
    (`rerank_scores`), sorted as ColdStart.rerank sorts them."""
    valid = torch.as_tensor(items >= 0)
    new = rerank_scores(torch.as_tensor(scores), valid, cos, has, weight)
    order = torch.argsort(new, dim=1, descending=True, stable=True)[:, :top_n]
    return torch.where(torch.gather(valid, 1, order), torch.gather(torch.as_tensor(items), 1, order), -1).numpy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "amazon-beauty"))
    p.add_argument("--split", choices=("valid", "test"), default="valid")
    p.add_argument("--beam", type=int, help="beam width (default: the run's eval.beam)")
    p.add_argument("--weights", type=float, nargs="+", default=list(WEIGHTS))
    p.add_argument("--decays", type=float, nargs="+", default=list(DECAYS))
    p.add_argument("--device", help="where the beam runs (default: the run's train.device)")
    p.add_argument("--users", type=int, help="score a seeded sample of this many users (default all)")
    a = p.parse_args(argv)
    if a.split == "test" and len(set(a.weights) - {0.0}) > 1:
        p.error("--split test scores at most one non-zero weight (the one validation chose): "
                "a grid on test would choose on test")
    for d in a.decays:
        RerankOptions(max(a.weights), d)  # the engine's bounds, checked before anything runs

    t0 = time.time()
    cfg, run, model = load_run(a.run_dir, a.data, a.device)
    if a.split == "valid" and (cfg.train.fit_on != "train" or cfg.train.refit_epochs > 0):
        raise SystemExit(f"{a.run_dir} trained on the validation targets (fit_on={cfg.train.fit_on}); "
                         "choose knobs on a select run (fit on train only)")
    hist, tgt = split_targets(run.split, a.split)
    if a.users and a.users < len(tgt):
        pick = np.random.default_rng(0).choice(len(tgt), a.users, replace=False)
        hist, tgt = [hist[i] for i in pick], tgt[pick]
    beam = a.beam or cfg.eval.beam
    top_n = max(KS)
    trie = PrefixTrie.build(run.sid_map, run.layout.cardinalities)
    dtype = autocast_dtype(cfg.train.dtype, next(model.parameters()).device)
    items, scores = rank_users(model, trie, run.sid_map, hist, max(beam, top_n), max(beam, top_n),
                               cfg.eval.batch_size, dtype, progress=True, desc=f"{a.split} beam {beam}", scores=True)
    search_s = time.time() - t0

    books = bundle_books(run)
    vectors = "text embeddings" if ITEM_EMBEDDINGS in books else "SID reconstructions"
    sids = run.sid_map.to(torch.int64)
    store = Reranker.from_run(run.codebooks, run.layout.num_levels, books.get(ITEM_EMBEDDINGS),
                              RerankOptions()).store  # every item's vector, once
    vec = store.vectors(torch.as_tensor(np.maximum(items, 0)).reshape(-1), sids).view(*items.shape, -1)
    rows = []
    for decay in a.decays:
        prof, has = store.profiles(hist, sids, decay, model.cfg.max_history)
        cos = torch.einsum("und,ud->un", vec, prof)
        for w in a.weights:
            m = recall_ndcg(rescore(items, scores, cos, has, w, top_n), tgt, KS)
            rows.append({"weight": w, "decay": decay, **{k: round(v, 5) for k, v in m.items()}})
    best = max(rows, key=lambda r: (r["ndcg@10"], r["ndcg@5"], -r["weight"]))
    off = next((r for r in rows if r["weight"] == 0.0), None)

    print(f"\n{a.split}, {len(tgt):,} users, beam {beam}, vectors: {vectors}")
    print(f"{'weight':>7} {'decay':>6} " + " ".join(f"{k:>10}" for k in ("recall@5", "ndcg@5", "recall@10", "ndcg@10")))
    for r in rows:
        mark = "  <- best" if r is best else ""
        print(f"{r['weight']:>7} {r['decay']:>6} " + " ".join(f"{r[k]:>10.4f}" for k in
                                                          ("recall@5", "ndcg@5", "recall@10", "ndcg@10")) + mark)
    out = {"benchmark": "rerank_tune", "run": str(a.run_dir), "split": a.split, "users": len(tgt), "beam": beam,
           "vectors": vectors, "fit_on": cfg.train.fit_on, "chosen_by": "ndcg@10",
           "best": best, "off": off, "grid": rows, "search_s": round(search_s, 1),
           "wall_s": round(time.time() - t0, 1)}
    tmp = a.run_dir / f"rerank_tune-{a.split}.json.tmp"
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(a.run_dir / f"rerank_tune-{a.split}.json")
    if len(a.weights) > 1:
        plot(rows, a.decays, a.run_dir / f"rerank_tune-{a.split}.png", f"{a.split}, beam {beam}")
    print(json.dumps({k: v for k, v in out.items() if k != "grid"}))
    return 0


def plot(rows: list[dict], decays, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sidrec.figures import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("ndcg@5", "ndcg@10")):
        for d in decays:
            rs = [r for r in rows if r["decay"] == d]
            ax.plot([r["weight"] for r in rs], [r[key] for r in rs], marker="o", label=f"decay {d}")
        ax.set_xlabel("re-rank weight (log-prob units per unit of cosine)")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"Hybrid re-rank of the beam: {title}")
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
