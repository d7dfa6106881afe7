"""Choose the hybrid ranking's knobs on validation: the transition mixture (`eval.transitions_*`)
and the text re-rank (`eval.rerank_weight`, `eval.rerank_decay`).

The served score of an item is (model/cold_start.py `hybrid_rerank`, the code the engine runs):

    log((1 - mix) * p_beam(SID) + mix * p_next(item | history)) + weight * (cos - 1)

p_next from the transition table of the sequences the model was fit on (model/transitions.py),
with its own history decay, and `extra` next items the beam missed added as candidates; cos
between the item's text embedding and the history's recency-weighted profile. The beam is
searched once per user and p_next looked up once per history decay; every grid point then only
re-sorts those candidates, so a grid of hundreds costs a minute.

Run it on a select run (fit on train only), whose validation users the model never trained on:

    .venv/bin/python benchmarks/rerank_tune.py runs/sel-base
    # then the final run with the chosen knobs (the exported bundle carries them to the service):
    .venv/bin/python benchmarks/quality.py --config beauty-cpu --protocol final \\
        --set eval.rerank_weight=W --set eval.rerank_decay=D

`--split test` is refused unless the grid has at most two points: the chosen one and one with a
knob off, a score on test for an ablation table row, never a grid to choose from. Writes
rerank_tune-<split>.json (this run's grid) and rerank_tune-<split>.png (NDCG@5 and @10 against the
mixture weight, one line per text weight, at the best other knobs) into the run directory, appends
the run's summary to rerank_tune-<split>.jsonl (every run's, kept), and prints one JSON line last.
"""
from __future__ import annotations

import argparse
import dataclasses
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
from sidrec.model.beam_search import BeamResult  # noqa: E402
from sidrec.model.transitions import TransitionOptions, Transitions, add_next_items, lookup, mix_scores  # noqa: E402
from sidrec.training.config import PipelineConfig  # noqa: E402
from sidrec.training.evaluate import (Reranker, rank_users, recall_ndcg, split_targets,  # noqa: E402
                                      transitions_metrics)
from sidrec.training.pipeline import bundle_books, run_pipeline, run_transitions  # noqa: E402
from sidrec.training.protocol import resolve_data  # noqa: E402
from sidrec.training.train import autocast_dtype, build_model  # noqa: E402

KS = (5, 10)
WEIGHTS = (0.0, 0.5, 1.0, 2.0)
DECAYS = (0.2,)
MIX_WEIGHTS = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95)
MIX_DECAYS = (0.1, 0.3)
EXTRAS = (0, 10, 20)
METRICS = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")


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


def with_next_items(items: np.ndarray, scores: np.ndarray, hist, table: Transitions, decay: float, extra: int,
                    max_history: int, sid_map: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates (U, N + extra): the beam's items, then up to `extra` most likely next items the
    beam missed (score -inf), by the engine's own `add_next_items`; their scores; and their p_next."""
    n_valid = torch.as_tensor((items >= 0).sum(1))
    it = torch.as_tensor(items)
    res = BeamResult(it, sid_map[:, it.clamp(min=0).reshape(-1)].T.reshape(*it.shape, -1),
                     torch.as_tensor(scores), n_valid)
    dists = table.dists(hist, decay, max_history)  # as hybrid_rerank: once per history
    res = add_next_items(res, dists, TransitionOptions(0.0, decay, extra), sid_map)
    return res.items.numpy(), res.scores.numpy(), lookup(dists, res.items).numpy()


def rescore(items: np.ndarray, scores: np.ndarray, p_next: np.ndarray | None, mix: float, cos: torch.Tensor | None,
            has: torch.Tensor | None, weight: float, top_n: int) -> np.ndarray:
    """(U, top_n) items after the hybrid ranking of (U, N) candidates: the engine's scores
    (`mix_scores`, then `rerank_scores`), sorted as ColdStart.rerank sorts them."""
    valid = torch.as_tensor(items >= 0)
    s = torch.as_tensor(scores)
    if p_next is not None and mix > 0:
        s = mix_scores(s, torch.as_tensor(p_next), mix)
    if weight > 0:
        new = rerank_scores(s, valid, cos, has, weight)
    else:
        new = torch.where(valid, s, torch.full_like(s, float("-inf")))
    order = torch.argsort(new, dim=1, descending=True, stable=True)[:, :top_n]
    return torch.where(torch.gather(valid, 1, order), torch.gather(torch.as_tensor(items), 1, order), -1).numpy()


def text_cos(store, items: np.ndarray, hist, sids: torch.Tensor, decay: float, max_history: int,
             chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, N) cosine of each candidate's vector to its history's profile, and (U,) has-history;
    gathered in chunks of users (the (U, N, D) block would not fit)."""
    allv = store.vectors(torch.arange(sids.shape[1]), sids)  # (num_items, D)
    prof, has = store.profiles(hist, sids, decay, max_history)
    idx = torch.as_tensor(np.maximum(items, 0))
    cos = torch.zeros(items.shape)
    for a in range(0, len(items), chunk):
        cos[a: a + chunk] = torch.einsum("und,ud->un", allv[idx[a: a + chunk]], prof[a: a + chunk])
    return cos, has


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "amazon-beauty"))
    p.add_argument("--split", choices=("valid", "test"), default="valid")
    p.add_argument("--beam", type=int, help="beam width (default: the run's eval.beam)")
    p.add_argument("--weights", type=float, nargs="+", default=list(WEIGHTS), help="text re-rank weights")
    p.add_argument("--decays", type=float, nargs="+", default=list(DECAYS), help="text re-rank history decays")
    p.add_argument("--mix-weights", type=float, nargs="+", default=list(MIX_WEIGHTS),
                   help="transition mixture weights (0: the beam's p(SID) alone)")
    p.add_argument("--mix-decays", type=float, nargs="+", default=list(MIX_DECAYS),
                   help="the transition mixture's history decays")
    p.add_argument("--extras", type=int, nargs="+", default=list(EXTRAS),
                   help="next items the beam missed added as candidates")
    p.add_argument("--window", type=int, help="transition table window (default: the run's eval.transitions_window)")
    p.add_argument("--gap-decay", type=float, help="transition table gap decay (default: the run's)")
    p.add_argument("--top-k", type=int, help="transition table row length (default: the run's)")
    p.add_argument("--device", help="where the beam runs (default: the run's train.device)")
    p.add_argument("--users", type=int, help="score a seeded sample of this many users (default all)")
    a = p.parse_args(argv)
    points = len(a.weights) * len(a.decays) * len(a.mix_weights) * len(a.mix_decays) * len(a.extras)
    if a.split == "test" and points > 2:
        p.error(f"--split test scores at most two grid points (the one validation chose, and one with a knob "
                f"off), got {points}: a grid on test would choose on test")
    for d in a.decays:
        RerankOptions(max(a.weights), d)  # the engine's bounds, checked before anything runs
    for d in a.mix_decays:
        for e in a.extras:
            TransitionOptions(max(a.mix_weights), d, e)

    t0 = time.time()
    cfg, run, model = load_run(a.run_dir, a.data, a.device)
    if a.split == "valid" and (cfg.train.fit_on != "train" or cfg.train.refit_epochs > 0):
        raise SystemExit(f"{a.run_dir} trained on the validation targets (fit_on={cfg.train.fit_on}); "
                         "choose knobs on a select run (fit on train only)")
    shape = {"transitions_window": a.window, "transitions_gap_decay": a.gap_decay, "transitions_top_k": a.top_k}
    shape = {k: v for k, v in shape.items() if v is not None}
    if shape:
        run.cfg = cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, **shape))
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
    mh = model.cfg.max_history
    table = run_transitions(run)  # the sequences the model was fit on
    alone = {}  # the table by itself, per decay: the baseline the mixture must beat
    for d in a.mix_decays:
        alone[d] = {k: round(v, 5) for k, v in transitions_metrics(table, hist, tgt, d, mh, KS).items()}

    books = bundle_books(run)
    vectors = "text embeddings" if ITEM_EMBEDDINGS in books else "SID reconstructions"
    sids = run.sid_map.to(torch.int64)
    store = Reranker.from_run(run.codebooks, run.layout.num_levels, books.get(ITEM_EMBEDDINGS),
                              RerankOptions()).store  # every item's vector, once
    rows = []
    e_max = max(a.extras)
    for md in a.mix_decays:
        cand, sc, p_next = with_next_items(items, scores, hist, table, md, e_max, mh, sids)
        n_beam = (items >= 0).sum(1)  # the extras follow each user's valid beam items
        for e in a.extras:
            # the first e extra candidates only (the rest invalid), as add_next_items would give
            c_e = cand.copy()
            c_e[np.arange(c_e.shape[1])[None, :] >= (n_beam + e)[:, None]] = -1
            for td in a.decays:
                cos, has = (text_cos(store, c_e, hist, sids, td, mh) if any(w > 0 for w in a.weights)
                            else (None, None))
                for mw in a.mix_weights:
                    if mw == 0 and (e > 0 or md != a.mix_decays[0]):
                        continue  # the same ranking as (mix 0, first decay, extra 0)
                    for w in a.weights:
                        m = recall_ndcg(rescore(c_e, sc, p_next, mw, cos, has, w, top_n), tgt, KS)
                        rows.append({"mix_weight": mw, "mix_decay": md, "extra": e, "weight": w, "decay": td,
                                     **{k: round(v, 5) for k, v in m.items()}})
    best = max(rows, key=lambda r: (r["ndcg@10"], r["ndcg@5"], -r["extra"], -r["weight"], -r["mix_weight"]))
    off = next((r for r in rows if r["weight"] == 0.0 and r["mix_weight"] == 0.0), None)

    print(f"\n{a.split}, {len(tgt):,} users, beam {beam}, vectors: {vectors}, transitions: {table.nnz:,} entries "
          f"(window {cfg.eval.transitions_window}, gap decay {cfg.eval.transitions_gap_decay}, "
          f"top {cfg.eval.transitions_top_k})")
    for d, m in alone.items():
        print(f"the transition table alone, decay {d}: " + ", ".join(f"{k} {m[k]:.4f}" for k in METRICS))
    head = ("mix", "m.decay", "extra", "weight", "decay")
    print(" ".join(f"{h:>7}" for h in head) + " " + " ".join(f"{k:>10}" for k in METRICS))
    for r in rows:
        mark = "  <- best" if r is best else ""
        print(" ".join(f"{r[k]:>7}" for k in ("mix_weight", "mix_decay", "extra", "weight", "decay")) + " "
              + " ".join(f"{r[k]:>10.4f}" for k in METRICS) + mark)
    tshape = {"window": cfg.eval.transitions_window, "gap_decay": cfg.eval.transitions_gap_decay,
              "top_k": cfg.eval.transitions_top_k, "nnz": table.nnz}
    out = {"benchmark": "rerank_tune", "run": str(a.run_dir), "split": a.split, "users": len(tgt), "beam": beam,
           "vectors": vectors, "fit_on": cfg.train.fit_on, "chosen_by": "ndcg@10", "transitions": tshape,
           "best": best, "off": off, "transitions_alone": alone, "grid": rows, "search_s": round(search_s, 1),
           "wall_s": round(time.time() - t0, 1)}
    tmp = a.run_dir / f"rerank_tune-{a.split}.json.tmp"
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(a.run_dir / f"rerank_tune-{a.split}.json")
    with open(a.run_dir / f"rerank_tune-{a.split}.jsonl", "a") as f:  # every run's summary, kept
        f.write(json.dumps({k: v for k, v in out.items() if k != "grid"}) + "\n")
    if len(a.mix_weights) > 1:
        plot(rows, best, a.run_dir / f"rerank_tune-{a.split}.png", f"{a.split}, beam {beam}",
             alone.get(best["mix_decay"]))
    print(json.dumps({k: v for k, v in out.items() if k != "grid"}))
    return 0


def plot(rows: list[dict], best: dict, path: Path, title: str, alone: dict | None = None) -> None:
    """NDCG@5 and @10 against the mixture weight, one line per text weight, at the best run's
    other knobs (history decays and extra candidates); `alone`, the table's own metrics at the
    best history decay, as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sidrec.figures import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("ndcg@5", "ndcg@10")):
        for w in sorted({r["weight"] for r in rows}):
            rs = [r for r in rows if r["weight"] == w and r["decay"] == best["decay"]
                  and (r["mix_weight"] == 0 or (r["mix_decay"] == best["mix_decay"] and r["extra"] == best["extra"]))]
            rs.sort(key=lambda r: r["mix_weight"])
            ax.plot([r["mix_weight"] for r in rs], [r[key] for r in rs], marker="o", label=f"text weight {w}")
        if alone:
            ax.axhline(alone[key], color="grey", linestyle="--", label="the table alone")
        ax.set_xlabel(f"transition mixture weight (history decay {best['mix_decay']}, {best['extra']} extra)")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"Hybrid ranking of the beam: {title}")
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
