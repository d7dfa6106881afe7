"""Cold-start benchmark: are items added at run time, with no interactions, ever recommended?

Protocol (LIGER, arXiv 2411.18814, adapted): the items that appear only as test targets are held
out from training entirely; where they are too few (Beauty: 9 items), a seeded random 5% of the
catalogue is. Their interactions are removed from every training sequence, the embedding
k-means never sees them, and the model (training/pipeline.py, recipe beauty-cpu with a reduced
time budget, fit on every user's history before the validation item) is exported as a bundle of
the warm items only. The held-out items are then added to a running engine exactly as the
service adds them: their text embedded with the bundle's embedding model, quantized with its
codebooks, a free SID given (training/new_items.py), `engine.add_items` (cold by default).

Users are split by their target: "cold" users' target is a held-out item, "warm" users' is not.
The blend (model/cold_start.py: 'dense' and 'prefix') is tuned on validation users (target =
second-to-last item; the model never trained on it) and test is scored once, through
`RecommendEngine.recommend`, for: the frozen catalogue (no cold item added; cold ids in a history
are unknown and dropped, as the service does), the live catalogue with the blend off, and each
mechanism with its tuned knobs. TIGER protocol otherwise: beam 20, Recall/NDCG@10, no history
exclusion. The last stdout line is one JSON document.

    .venv/bin/python benchmarks/cold_start.py --time-budget 16           # the real run (~30 min)
    .venv/bin/python benchmarks/cold_start.py --time-budget 1 --warm-users 500 --out runs/cold_smoke
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sidrec.model.bundle import ITEM_EMBEDDINGS, load_bundle, save_bundle  # noqa: E402
from sidrec.model.cold_start import ColdStartOptions  # noqa: E402
from sidrec.model.engine import EngineOptions, RecommendEngine  # noqa: E402
from sidrec.training.config import apply_overrides, fingerprint, load_config  # noqa: E402
from sidrec.training.data import InteractionData, leave_one_out, load_dataset  # noqa: E402
from sidrec.training.embeddings import DEFAULT_TEMPLATE, embed_items, render_text  # noqa: E402
from sidrec.training.new_items import assign_new_items  # noqa: E402
from sidrec.training import pipeline as P  # noqa: E402

GRID_DENSE = dict(decay=(1.0, 0.8, 0.6, 0.4), weight=(2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0),
                  bias=tuple(float(b) for b in range(6, -15, -1)))
GRID_PREFIX = dict(bias=tuple(float(b) / 2 for b in range(-12, 13)))
WARM_KEEP = 0.97  # tuning keeps validation warm R@10 >= 97% of the blend-off value (goal: 95% on test)


def choose_cold(seqs: list[list[str]], items: list[str], frac: float, seed: int) -> tuple[str, set[str]]:
    """(protocol, cold item ids): the items seen only as test targets, or a seeded random sample."""
    before = Counter(x for s in seqs for x in s[:-1])
    only_test = {s[-1] for s in seqs} - set(before)
    if len(only_test) >= frac * len(items) / 2:
        return "test-only items", only_test
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(items), size=int(round(frac * len(items))), replace=False)
    return f"random {frac:.0%} of items (seed {seed}; only {len(only_test)} items appear only as test targets)", \
        {items[i] for i in sorted(pick)}


def warm_data(d: InteractionData, cold: set[str]) -> InteractionData:
    """The catalogue without the cold items, each user's sequence up to (not incl.) the test item
    with cold items removed; the pipeline (fit on train + valid) then trains on all but the last
    item of it, i.e. never on a validation or test target."""
    warm_ids = [i for i in d.item_ids if i not in cold]
    pos = {iid: j for j, iid in enumerate(warm_ids)}
    fields = [f for iid, f in zip(d.item_ids, d.item_fields) if iid not in cold]
    users, seqs = [], []
    for u, s in zip(d.user_ids, d.sequences):
        kept = [pos[d.item_ids[x]] for x in s[:-1] if d.item_ids[x] in pos]
        if len(kept) >= 3:
            users.append(u)
            seqs.append(np.asarray(kept, dtype=np.int64))
    return InteractionData(d.name + "-warm", warm_ids, fields, users, seqs, fingerprint(d.fingerprint, sorted(cold)))


def train_bundle(d: InteractionData, full_emb: np.ndarray, cold: set[str], cfg, out: Path) -> Path:
    """The pipeline's sids and train stages on the warm data, then a bundle (its evaluation stage
    is skipped: this benchmark scores through the engine)."""
    wd = warm_data(d, cold)
    run = P.Run(None, out, cfg)
    run.out.mkdir(parents=True, exist_ok=True)
    run.data, run.split = wd, leave_one_out(wd)
    run.fps["data"] = wd.fingerprint
    run.embeddings = full_emb[[i for i, iid in enumerate(d.item_ids) if iid not in cold]]
    run.fps["embed"] = fingerprint(wd.fingerprint, cfg.embed)
    P.stage_sids(run)
    P.stage_train(run)
    extra = {"dataset": {"name": wd.name, "fingerprint": wd.fingerprint, "users": wd.num_users, "items": wd.num_items},
             "sid": {"method": cfg.sid.method, "levels": cfg.sid.levels, "codebook_size": cfg.sid.codebook_size,
                     "dedup_digit": len(run.layout.cardinalities) > cfg.sid.levels,
                     "spread_collisions": cfg.sid.spread_collisions},
             "pipeline": cfg.to_dict()}
    return save_bundle(out / "bundle", run.model, run.sid_map, wd.item_ids, codebooks=P.bundle_books(run),
                       extra_config=extra, overwrite=True, items=P.bundle_items(run))


def users_for(d: InteractionData, split: str) -> tuple[list[list[str]], list[str]]:
    """External-id (histories, targets) of every user for 'valid' or 'test'."""
    cut = 2 if split == "valid" else 1
    hs = [[d.item_ids[x] for x in s[:-cut]] for s in d.sequences]
    ts = [d.item_ids[s[-cut]] for s in d.sequences]
    return hs, ts


def rank(eng: RecommendEngine, hists: list[list[str]], beam: int, top_n: int, bs: int = 128):
    """-> (items (U, top_n) external ids, scores (U, top_n)) through engine.recommend."""
    items, scores = [], []
    for a in range(0, len(hists), bs):
        idx = [eng.to_internal(h)[0] for h in hists[a: a + bs]]
        r = eng.recommend(idx, beam, top_n)
        for row, sc, n in zip(r.items.tolist(), r.scores.tolist(), r.n_valid.tolist()):
            items.append([eng.item_ids[i] for i in row[:n]] + [""] * (top_n - n))
            scores.append(sc[:n] + [float("-inf")] * (top_n - n))
    return items, np.asarray(scores, dtype=np.float32)


def metrics(ranked: list[list[str]], targets: list[str], mask: np.ndarray, k: int = 10) -> dict:
    hits = [(r[:k].index(t) if t in r[:k] else -1) for r, t, m in zip(ranked, targets, mask) if m]
    if not hits:
        return {"users": 0, "recall@10": None, "ndcg@10": None}
    h = np.asarray(hits)
    return {"users": len(hits), "recall@10": round(float((h >= 0).mean()), 5),
            "ndcg@10": round(float(np.where(h >= 0, 1.0 / np.log2(h.clip(0) + 2.0), 0.0).mean()), 5)}


def blend_recall(w_items: np.ndarray, w_scores: np.ndarray, c_items: np.ndarray, c_scores: np.ndarray,
                 targets: np.ndarray, k: int = 10) -> np.ndarray:
    """Hit@k per user of the beam's list merged with scored cold items (a vectorised replay of
    ColdStart.blend for tuning: the same scores and merge, ties aside). Items as int codes."""
    s = torch.from_numpy(np.concatenate([w_scores, c_scores], 1))
    it = np.concatenate([w_items, np.broadcast_to(c_items, c_scores.shape)], 1)
    top = torch.topk(s, k, 1).indices.numpy()
    return (np.take_along_axis(it, top, 1) == targets[:, None]).any(1)


def sample_users(d: InteractionData, split: str, cold: set[str], warm_users: int, seed: int) -> np.ndarray:
    """Every user whose `split` target is cold, and a seeded sample of `warm_users` others (0: all)."""
    _, ts = users_for(d, split)
    is_cold = np.array([t in cold for t in ts])
    warm = np.flatnonzero(~is_cold)
    if warm_users and warm_users < len(warm):
        warm = np.random.default_rng(seed).choice(warm, size=warm_users, replace=False)
    return np.sort(np.concatenate([np.flatnonzero(is_cold), warm]))


def tune(eng: RecommendEngine, d: InteractionData, cold: set[str], beam: int, users: np.ndarray) -> dict:
    """Grid search of both mechanisms on validation users; returns the chosen knobs and table."""
    hs, ts = users_for(d, "valid")
    hs, ts = [hs[u] for u in users], [ts[u] for u in users]
    is_cold = np.array([t in cold for t in ts])
    c_int = torch.tensor(eng.cold.cold_items(), dtype=torch.int64)
    idx = [eng.to_internal(h)[0] for h in hs]
    w_items, w_scores, pre = [], [], []
    for a in range(0, len(idx), 128):  # blend off: the beam's whole list, and what prefix mode reads of it
        r = eng.recommend(idx[a: a + 128], beam, beam)
        w_items.append(r.items.cpu().numpy())
        w_scores.append(r.scores.cpu().float().numpy())
        pre.append(eng.cold.prefix_scores(ColdStartOptions(mode="prefix", bias=0.0), r, eng.sid_map, c_int).numpy())
    w_items, w_scores, pre = np.concatenate(w_items), np.concatenate(w_scores), np.concatenate(pre)
    tgt = np.array([eng.index_of.get(t, -2) for t in ts])
    c_items = c_int.numpy()[None]
    base = blend_recall(w_items, w_scores, c_items[:, :0], np.full((len(ts), 0), -np.inf, np.float32), tgt)
    off = {"cold": float(base[is_cold].mean()), "warm": float(base[~is_cold].mean())}
    floor = WARM_KEEP * off["warm"]
    rows, best = [], {}
    for decay in GRID_DENSE["decay"]:
        cos = torch.cat([eng.cold.dense_scores(ColdStartOptions(weight=1.0, bias=1.0, decay=decay), idx[a: a + 512],
                                               eng.sid_map, c_int, eng.cfg.max_history)
                         for a in range(0, len(idx), 512)]).numpy()  # weight 1, bias 1: the cosine
        for rel in (False, True):
            anchor = w_scores[:, :1] if rel else 0.0
            for wt in GRID_DENSE["weight"]:
                for b in GRID_DENSE["bias"]:
                    hit = blend_recall(w_items, w_scores, c_items, (wt * (cos - 1.0) + b + anchor).astype(np.float32), tgt)
                    rows.append(("dense", dict(decay=decay, weight=wt, bias=b, relative=rel), float(hit[is_cold].mean()),
                                 float(hit[~is_cold].mean())))
    for b in GRID_PREFIX["bias"]:
        hit = blend_recall(w_items, w_scores, c_items, (pre + b).astype(np.float32), tgt)
        rows.append(("prefix", dict(bias=b), float(hit[is_cold].mean()), float(hit[~is_cold].mean())))
    for mode in ("dense", "prefix"):
        ok = [r for r in rows if r[0] == mode and r[3] >= floor]
        pick = max(ok, key=lambda r: (r[2], r[3])) if ok else max((r for r in rows if r[0] == mode), key=lambda r: r[3])
        best[mode] = {"knobs": pick[1], "valid_cold_recall@10": round(pick[2], 5), "valid_warm_recall@10": round(pick[3], 5)}
    return {"off": {k: round(v, 5) for k, v in off.items()}, "best": best, "grid_points": len(rows),
            "users": {"cold": int(is_cold.sum()), "warm": int((~is_cold).sum())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "amazon-beauty"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "cold_start"))
    ap.add_argument("--recipe", default="beauty-cpu")
    ap.add_argument("--time-budget", type=float, default=16.0, help="training minutes")
    ap.add_argument("--cold-frac", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--beam", type=int, default=20)
    ap.add_argument("--warm-users", type=int, default=6000,
                    help="per split: every cold user and a seeded sample of this many warm users (0: all)")
    ap.add_argument("--reuse-bundle", action="store_true",
                    help="score the bundle an earlier run with the same --out, --seed and --cold-frac left in "
                         "<out>/bundle instead of training again (checked against the cold set)")
    args = ap.parse_args()
    t0 = time.time()
    out = Path(args.out)
    d = load_dataset(args.data)
    seqs = [[d.item_ids[x] for x in s] for s in d.sequences]
    protocol, cold = choose_cold(seqs, d.item_ids, args.cold_frac, args.seed)
    print(f"protocol: {protocol}: {len(cold)} cold items of {d.num_items}", flush=True)
    cfg = apply_overrides(load_config(args.recipe), {"train.time_budget_min": args.time_budget})
    texts = [render_text(f, cfg.embed.template or DEFAULT_TEMPLATE) for f in d.item_fields]
    full_emb = embed_items(texts, cfg.embed.model, cache_dir=str(ROOT / "cache" / "embeddings"), allow_empty=True,
                           item_ids=d.item_ids)
    if args.reuse_bundle:
        bundle_path = out / "bundle"
        old = load_bundle(bundle_path)
        kept = set(old.item_ids)
        if kept & cold or len(kept) != d.num_items - len(cold):
            raise SystemExit(f"--reuse-bundle: {bundle_path} was not trained without this run's {len(cold)} cold items "
                             f"(it holds {len(kept)} items, {len(kept & cold)} of them cold); drop the flag to train")
        if ITEM_EMBEDDINGS not in old.codebooks:  # a bundle from before the embeddings were exported
            at = {iid: j for j, iid in enumerate(d.item_ids)}
            rows = [at[i] for i in old.item_ids]
            save_bundle(bundle_path, old.model, old.sid_map, old.item_ids,
                        codebooks={**old.codebooks, ITEM_EMBEDDINGS: torch.from_numpy(full_emb[rows])},
                        metrics=old.metrics, extra_config={k: v for k, v in old.config.items()
                                                           if k in ("dataset", "sid", "pipeline")},
                        overwrite=True, items=P.bundle_items(P.Run(None, out, cfg, data=warm_data(d, cold))))
            print(f"--reuse-bundle: added the warm items' text embeddings to {bundle_path}", flush=True)
    else:
        bundle_path = train_bundle(d, full_emb, cold, cfg, out)
    t_train = time.time() - t0

    cold_ids = [iid for iid in d.item_ids if iid in cold]
    text_of = dict(zip(d.item_ids, texts))
    t1 = time.time()
    new = assign_new_items(bundle_path, [text_of[i] for i in cold_ids], cfg.embed.model)  # as the service does
    fits = [i for i, f in zip(cold_ids, new.fits) if f]
    sids = torch.as_tensor(new.sids[new.fits]).T  # (L, n)
    attrs = {r["item_id"]: r["attributes"] for r in P.bundle_items(P.Run(None, out, cfg, data=d))}
    bundle = load_bundle(bundle_path)
    frozen = RecommendEngine(bundle, EngineOptions(dtype="auto", cold_start=ColdStartOptions(mode="off")))
    live = RecommendEngine(load_bundle(bundle_path), EngineOptions(dtype="auto", cold_start=ColdStartOptions(mode="off")))
    live.add_items(fits, sids, [attrs[i] for i in fits], wait=True, embeddings=new.embeddings[new.fits])
    t_add = time.time() - t1
    parents = {tuple(c) for c in bundle.sid_map[:-1].T.tolist()}  # the warm items' first L-1 codes
    same_prefix = float(np.mean([tuple(c[:-1]) in parents for c in sids.T.tolist()])) if fits else 0.0
    print(f"added {len(fits)} of {len(cold_ids)} cold items in {t_add:.1f} s ({len(cold_ids) - len(fits)} did not "
          f"fit the layout); {same_prefix:.0%} share a parent prefix with a warm item", flush=True)

    tuned = tune(live, d, cold, args.beam, sample_users(d, "valid", cold, args.warm_users, args.seed))
    print("validation (blend off): " + json.dumps(tuned["off"]) + "  chosen: " + json.dumps(tuned["best"]), flush=True)

    sample = sample_users(d, "test", cold, args.warm_users, args.seed + 1)
    hs, ts = users_for(d, "test")
    hs, ts = [hs[u] for u in sample], [ts[u] for u in sample]
    is_cold = np.array([t in cold for t in ts])
    rows = {}
    for name, eng, opts in (("frozen catalogue", frozen, ColdStartOptions(mode="off")),
                            ("live, blend off", live, ColdStartOptions(mode="off")),
                            ("live, dense", live, ColdStartOptions(mode="dense", **tuned["best"]["dense"]["knobs"])),
                            ("live, prefix", live, ColdStartOptions(mode="prefix", **tuned["best"]["prefix"]["knobs"]))):
        eng.options = replace(eng.options, cold_start=opts)
        t = time.time()
        ranked, _ = rank(eng, hs, args.beam, 10)
        rows[name] = {"cold": metrics(ranked, ts, is_cold), "warm": metrics(ranked, ts, ~is_cold),
                      "seconds": round(time.time() - t, 1)}
        print(f"  scored {name} in {rows[name]['seconds']} s", flush=True)
    frozen_w = rows["frozen catalogue"]["warm"]["recall@10"]
    chosen = max(("dense", "prefix"), key=lambda m: (tuned["best"][m]["valid_cold_recall@10"],
                                                     tuned["best"][m]["valid_warm_recall@10"]))
    print(f"\ncold start on {d.name}: {protocol}; {len(fits)} cold items added at run time; beam {args.beam}; "
          f"test users: {int(is_cold.sum())} cold, {int((~is_cold).sum())} warm")
    print(f"{'':20s} {'cold R@10':>10s} {'cold N@10':>10s} {'warm R@10':>10s} {'warm N@10':>10s} {'warm/frozen':>12s}")
    for name, r in rows.items():
        c, w = r["cold"], r["warm"]
        print(f"{name:20s} {c['recall@10'] or 0:10.4f} {c['ndcg@10'] or 0:10.4f} {w['recall@10']:10.4f} "
              f"{w['ndcg@10']:10.4f} {w['recall@10'] / frozen_w if frozen_w else float('nan'):12.3f}")
    print("published LIGER/TIGER cold-start numbers for Beauty: none quoted (not known with certainty here)")
    result = {"benchmark": "cold_start", "dataset": d.name, "protocol": protocol, "cold_items": len(cold),
              "cold_items_added": len(fits), "cold_share_parent_prefix": round(same_prefix, 4), "beam": args.beam,
              "train_minutes_budget": args.time_budget,
              "warm_users_sampled": args.warm_users,
              "test": rows, "validation": tuned, "chosen_mechanism": chosen, "engine_default": ColdStartOptions().__dict__,
              "goal": {"cold_recall@10": 0.05, "warm_vs_frozen": 0.95},
              "goal_met": bool((rows[f"live, {chosen}"]["cold"]["recall@10"] or 0) >= 0.05 and frozen_w
                               and rows[f"live, {chosen}"]["warm"]["recall@10"] >= 0.95 * frozen_w),
              "published": None, "seconds": {"total": round(time.time() - t0, 1), "train": round(t_train, 1),
                                             "add_cold_items": round(t_add, 1)}}
    frozen.close()
    live.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
