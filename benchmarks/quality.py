"""Quality benchmark: the whole offline pipeline on Amazon Beauty (or the synthetic data when the
Beauty files are absent), TIGER protocol, printed as a table and one JSON line last.

Recipes are chosen on validation and scored on test once (`training.protocol`):

    # 1. select: fit on train only, same recipe and budget, score validation (the number that
    #    may steer choices); leaves a record in runs/selections/
    .venv/bin/python benchmarks/quality.py --config beauty-cpu --protocol select
    # 2. final: the recipe as written (beauty-cpu fits on train + valid), test scored once, shown
    #    beside the select run's validation; warns loudly when no select record matches
    .venv/bin/python benchmarks/quality.py --config beauty-cpu --protocol final
    # or both in one command (select into OUT-select, then final into OUT)
    .venv/bin/python benchmarks/quality.py --config beauty-cpu --protocol both

Published rows are printed only for the dataset they were measured on (`training.anchors`).
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

from sidrec.training.anchors import anchor_rows, identify_dataset  # noqa: E402
from sidrec.training.cli import demo_config  # noqa: E402
from sidrec.training.config import PipelineConfig, apply_overrides, load_config  # noqa: E402
from sidrec.training.protocol import loud, recipe_key, resolve_data, run_protocol  # noqa: E402

KEYS = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")


def table_rows(anchors, match, select_m: dict | None, final_m: dict | None, sel_rec: dict | None
               ) -> list[tuple[str, str, dict]]:
    """(label, split, metrics) rows: published anchors, ours on validation and test, and the two
    baselines without a model: popularity, and the transition table alone (model.transitions)."""
    rows = []
    for a in anchors:
        mark = " *" if match.how == "shape" else ""
        rows.append((f"{a.source}, {match.name}{mark}", "test", a.metrics))
    if select_m is not None and select_m.get("valid"):
        rows.append((f"sidrec select (fit on {select_m['fit_on']})", "valid", select_m["valid"]))
    elif sel_rec is not None and sel_rec.get("valid"):
        rows.append(("sidrec select run (record)", "valid", sel_rec["valid"]))
    if final_m is not None:
        if final_m.get("valid"):
            rows.append((f"sidrec final (fit on {final_m['fit_on']})", "valid", final_m["valid"]))
        if final_m.get("test"):
            rows.append((f"sidrec final (fit on {final_m['fit_on']})", "test", final_m["test"]))
    for m in (select_m, final_m):
        for split in ("valid", "test"):
            if m is not None and m.get(split):
                rows.append(("popularity", split, m[split]["popularity"]))
                if m[split].get("transitions_alone"):
                    rows.append(("next-item table alone", split, m[split]["transitions_alone"]))
    seen, unique = set(), []
    for r in rows:  # a baseline appears once per split
        if (r[0], r[1]) not in seen:
            seen.add((r[0], r[1]))
            unique.append(r)
    return unique


def print_table(rows: list[tuple[str, str, dict]]) -> None:
    w = max([len(r[0]) for r in rows] + [30]) + 2
    print(f"\n{'':{w}s}{'split':>7s}{'R@5':>8s}{'N@5':>8s}{'R@10':>8s}{'N@10':>8s}")
    for label, split, m in rows:
        print(f"{label:{w}s}{split:>7s}" + "".join(f"{m[k]:8.4f}" if k in m else f"{'':8s}" for k in KEYS))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "amazon-beauty"),
                   help="dataset path, or synthetic[:ITEMSxUSERS] (the built-in generator; --config applies)")
    p.add_argument("--out", help="run directory (default runs/beauty; a select run alone: runs/beauty-select; "
                   "with --protocol both the select run goes to OUT-select)")
    p.add_argument("--config", help="recipe name (beauty-cpu) or JSON config file; Beauty data only")
    p.add_argument("--protocol", choices=("select", "final", "both"), default="final",
                   help="select: fit on train, score validation; final: the recipe as written, score test "
                        "once; both: select then final")
    p.add_argument("--selections", default=str(ROOT / "runs" / "selections"),
                   help="registry of select/final records (default runs/selections)")
    p.add_argument("--time-budget", type=float, help="training minutes (default: the recipe's, else 75)")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    t0 = time.time()
    if a.data.startswith("synthetic") or Path(a.data).is_dir():
        try:
            data, data_path = resolve_data(a.data)
        except ValueError as e:
            raise SystemExit(f"quality.py: {e}") from None
        synthetic = data_path is None
        cfg = load_config(a.config) if a.config else demo_config() if synthetic else PipelineConfig()
        recipe = a.config or ("demo" if synthetic else "default")
    else:
        from sidrec.training.synthetic import make_synthetic

        print(f"{a.data} not found: running on the built-in synthetic data"
              + (f" with the demo config (--config {a.config} is for the real data)" if a.config else ""),
              file=sys.stderr)
        cfg, data_path, data, recipe = demo_config(), None, make_synthetic(400, 1500, seed=0), "demo"
    budget = a.time_budget if a.time_budget is not None else (cfg.train.time_budget_min or 75.0)
    try:
        cfg = apply_overrides(cfg, [f"train.time_budget_min={budget}", f"train.device={a.device}", *a.set])
    except ValueError as e:
        raise SystemExit(f"quality.py: {e}") from None
    out = Path(a.out) if a.out else ROOT / "runs" / ("beauty-select" if a.protocol == "select" else "beauty")
    registry = Path(a.selections)
    select_m = final_m = sel_rec = None
    sel_path = None
    if a.protocol in ("select", "both"):
        sel_out = out.with_name(out.name + "-select") if a.protocol == "both" else out
        select_m, _, _ = run_protocol("select", cfg, data, data_path, sel_out, registry, recipe)
    if a.protocol in ("final", "both"):
        final_m, sel_rec, sel_path = run_protocol("final", cfg, data, data_path, out, registry, recipe)

    match = identify_dataset(data, data_path)
    anchors = anchor_rows(match)
    print_table(table_rows(anchors, match, select_m, final_m, sel_rec))
    if match is None:
        print(f"no published row: dataset {data.name!r} ({data.num_users:,} users, {data.num_items:,} items) "
              "is not one whose published results we hold")
    elif match.how == "shape":
        print(f"* recognised as {match.name} by shape only: {match.detail}")
    else:
        print(f"recognised as {match.name} by content ({match.detail})")
    main_m = final_m if final_m is not None else select_m
    valid = (select_m or {}).get("valid") or (sel_rec or {}).get("valid") or (final_m or {}).get("valid")
    valid_from = ("this select run" if select_m is not None and select_m.get("valid")
                  else str(sel_path) if sel_rec is not None and sel_rec.get("valid")
                  else "this final run (fit on train)" if final_m is not None and final_m.get("valid") else None)
    test = (final_m or {}).get("test")
    res = {"dataset": main_m["dataset"], "dataset_fingerprint": main_m["dataset_fingerprint"],
           "recognised_as": match.name if match else None, "recognised_by": match.how if match else None,
           "protocol": a.protocol, "selected_on": main_m["selected_on"], "recipe": recipe,
           "recipe_key": recipe_key(cfg),
           "valid": {k: valid[k] for k in KEYS} if valid else None, "valid_from": valid_from,
           "test": {k: test[k] for k in KEYS} if test else None,
           "anchor": ({"source": anchors[0].source, "dataset": match.name, **anchors[0].metrics}
                      if anchors else None),
           "recall@100": (test or {}).get("recall@100"), "recall@1000": (test or {}).get("recall@1000"),
           "popularity_recall@10": (test or valid or {}).get("popularity", {}).get("recall@10"),
           "train_minutes": main_m.get("train_minutes"), "best_epoch": main_m.get("best_epoch"),
           "epochs_run": main_m.get("epochs_run"), "users": (test or valid or {}).get("users"),
           "device": main_m.get("device"), "arch": cfg.train.arch, "fit_on": main_m.get("fit_on"),
           "rerank": main_m.get("rerank"), "transitions": main_m.get("transitions"),
           "transitions_alone": {k: (test or valid or {}).get("transitions_alone", {}).get(k) for k in KEYS},
           "config": main_m["recipe"]["config"], "wall_minutes": round((time.time() - t0) / 60, 1)}
    if test:
        res.update({k: test[k] for k in KEYS})  # the flat keys of earlier JSON lines
    if main_m.get("selection_warning"):
        res["selection_warning"] = main_m["selection_warning"]
        print(loud(main_m["selection_warning"]), file=sys.stderr)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
