"""Ablations at equal wall time, judged on validation: a base recipe and named variants, each a
set of `section.key=value` overrides (benchmarks/ablations.json), each trained on train only for
the same `train.time_budget_min` and scored on validation (`training.protocol`, select runs).

    .venv/bin/python benchmarks/ablate.py --data ../shared/data/amazon-beauty \
        --variants benchmarks/ablations.json --time-budget 20 --out runs/ablate
    .venv/bin/python benchmarks/ablate.py --data synthetic:120x300 --variants my.json --time-budget 0.2

Every variant's keys are checked before anything trains (an unknown key fails, naming it).
Writes per variant its run directory, learning curves (curves/<variant>.png, the pipeline's plot)
and its full recipe (<variant>/recipe.json: `quality.py --protocol final --config` that file
refits it and scores test once, after which the table's test column shows it); then
ablation.md (the table), ablation_curves.png (validation NDCG@10 against training minutes, all
variants) and one JSON line last. Test numbers appear only for variants that had a final run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sidrec.training.config import PipelineConfig, apply_overrides, load_config  # noqa: E402
from sidrec.training.protocol import read_record, resolve_data, run_protocol  # noqa: E402

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


def load_variants(path: str | Path) -> tuple[str | None, list[dict]]:
    """(the file's base recipe or None, its variants as {name, about, set: {key: value}})."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"variants file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"variants file {path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("variants"), list) or not raw["variants"]:
        raise ValueError(f"variants file {path}: expected {{\"base\": RECIPE, \"variants\": [{{\"name\": ..., "
                         f"\"set\": {{\"section.key\": value}}}}, ...]}}")
    out, seen = [], set()
    for i, v in enumerate(raw["variants"]):
        name = v.get("name") if isinstance(v, dict) else None
        if not isinstance(name, str) or not NAME.match(name):
            raise ValueError(f"variants file {path}: variant {i} needs a 'name' of letters, digits, _ . + - "
                             f"(it names a directory), got {name!r}")
        if name in seen:
            raise ValueError(f"variants file {path}: variant name {name!r} appears twice")
        seen.add(name)
        sets = v.get("set", {})
        if isinstance(sets, list):  # ["section.key=value", ...] as on the command line
            sets = dict(s.split("=", 1) if isinstance(s, str) and "=" in s else (s, None) for s in sets)
            sets = {k: _parse(k, raw_v, name, path) for k, raw_v in sets.items()}
        if not isinstance(sets, dict):
            raise ValueError(f"variants file {path}: variant {name!r}: 'set' must be an object or a list")
        unknown = set(v) - {"name", "about", "set"}
        if unknown:
            raise ValueError(f"variants file {path}: variant {name!r} has unknown fields {sorted(unknown)}")
        out.append({"name": name, "about": str(v.get("about", "")), "set": sets})
    return raw.get("base"), out


def _parse(key: str, raw: str | None, name: str, path: Path):
    if raw is None:
        raise ValueError(f"variants file {path}: variant {name!r}: {key!r} is not SECTION.KEY=VALUE")
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def build_configs(base: PipelineConfig, variants: list[dict], budget: float, extra: list[str]
                  ) -> list[PipelineConfig]:
    """Each variant's recipe; every key is checked here, before anything trains."""
    base = apply_overrides(base, [*extra, f"train.time_budget_min={budget}", "eval.wide_beams=[]"])
    cfgs = []
    for v in variants:
        try:
            cfg = apply_overrides(base, v["set"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"variant {v['name']!r}: {e}") from None
        if cfg.train.time_budget_min != budget:
            raise ValueError(f"variant {v['name']!r} sets train.time_budget_min; ablations run at equal "
                             f"wall time ({budget} min each, --time-budget)")
        cfgs.append(cfg)
    return cfgs


def _fmt(x) -> str:
    return f"{x:.4f}" if isinstance(x, float) else "" if x is None else str(x)


def plot_overlay(rows: list[dict], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sidrec.figures import save_figure

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        h = [e for e in r["history"] if "valid_ndcg@10" in e]
        if h:
            ax.plot([e["elapsed_minutes"] for e in h], [e["valid_ndcg@10"] for e in h], marker="o", label=r["name"])
    if not ax.lines:
        plt.close(fig)
        return None
    ax.set_xlabel("training minutes")
    ax.set_ylabel("validation NDCG@10 (sampled users)")
    ax.set_title("ablations at equal wall time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=110)


def markdown_table(rows: list[dict], base_name: str, budget: float) -> str:
    base = next((r for r in rows if r["name"] == base_name), rows[0])
    lines = [f"Ablations at {budget:g} training minutes each, fit on train, judged on validation "
             f"(delta against `{base['name']}`); test only for variants refit and scored by a final run.", "",
             "| variant | what changed | val R@10 | val N@10 | val N@5 | ΔN@10 | epochs | train min | "
             "test R@10 | test N@10 | test N@5 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        v, t = r["valid"] or {}, r["test"] or {}
        delta = (v["ndcg@10"] - base["valid"]["ndcg@10"]) if v and base["valid"] else None
        minutes = "" if r["train_minutes"] is None else f"{r['train_minutes']:.2f}"
        lines.append(f"| {r['name']} | {r['changed']} | {_fmt(v.get('recall@10'))} | {_fmt(v.get('ndcg@10'))} | "
                     f"{_fmt(v.get('ndcg@5'))} | {'' if delta is None else f'{delta:+.4f}'} | "
                     f"{_fmt(r['epochs_run'])} | {minutes} | {_fmt(t.get('recall@10'))} | "
                     f"{_fmt(t.get('ndcg@10'))} | {_fmt(t.get('ndcg@5'))} |")
    return "\n".join(lines) + "\n"


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "amazon-beauty"),
                   help="dataset path, or synthetic[:ITEMSxUSERS] (the built-in generator)")
    p.add_argument("--variants", default=str(ROOT / "benchmarks" / "ablations.json"))
    p.add_argument("--base", help="base recipe name or JSON file (default: the variants file's 'base'; "
                   "'demo' = the synthetic demo config)")
    p.add_argument("--only", help="comma-separated variant names to run (default: all)")
    p.add_argument("--time-budget", type=float, required=True, help="training minutes per variant (equal)")
    p.add_argument("--set", action="append", default=[], help="override applied to the base, every variant")
    p.add_argument("--out", default=str(ROOT / "runs" / "ablate"))
    p.add_argument("--selections", default=str(ROOT / "runs" / "selections"))
    a = p.parse_args(argv)
    t0 = time.time()
    try:
        file_base, variants = load_variants(a.variants)
        if a.only:
            wanted = [s.strip() for s in a.only.split(",") if s.strip()]
            missing = [w for w in wanted if w not in {v["name"] for v in variants}]
            if missing:
                raise ValueError(f"--only names unknown variants {missing}; the file has "
                                 f"{[v['name'] for v in variants]}")
            variants = [v for v in variants if v["name"] in wanted]
        base_spec = a.base or file_base
        if base_spec == "demo":
            from sidrec.training.cli import demo_config

            base = demo_config()
        else:
            base = load_config(base_spec) if base_spec else PipelineConfig()
        cfgs = build_configs(base, variants, a.time_budget, a.set)
        data, data_path = resolve_data(a.data)
    except ValueError as e:
        raise SystemExit(f"ablate.py: {e}") from None
    out = Path(a.out)
    (out / "curves").mkdir(parents=True, exist_ok=True)
    rows = []
    for v, cfg in zip(variants, cfgs):
        run_dir = out / v["name"]
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(run_dir / "recipe.json", {"_about": f"ablation variant {v['name']}: {v['about']}",
                                              **cfg.to_dict()})
        print(f"== {v['name']}: {v['about'] or 'no description'} ({json.dumps(v['set'])})", file=sys.stderr)
        m, _, _ = run_protocol("select", cfg, data, data_path, run_dir, a.selections,
                               f"{base_spec or 'default'} + {v['name']}", log=lambda s: print(s, file=sys.stderr))
        curves = run_dir / "report" / "learning_curves.png"
        png = out / "curves" / f"{v['name']}.png"
        if curves.is_file():
            shutil.copyfile(curves, png)
        final, _ = read_record(a.selections, "final", data.fingerprint, cfg)
        hist_path = run_dir / "checkpoints" / "history.json"
        rows.append({"name": v["name"], "about": v["about"],
                     "changed": ", ".join(f"{k}={json.dumps(x)}" for k, x in v["set"].items()) or "(base)",
                     "valid": {k: m["valid"][k] for k in ("recall@5", "ndcg@5", "recall@10", "ndcg@10")},
                     "test": {k: final["test"][k] for k in ("recall@5", "ndcg@5", "recall@10", "ndcg@10")}
                     if final and final.get("test") else None,
                     "epochs_run": m.get("epochs_run"), "train_minutes": m.get("train_minutes"),
                     "curves": str(png) if png.is_file() else None, "recipe": str(run_dir / "recipe.json"),
                     "history": json.loads(hist_path.read_text()) if hist_path.is_file() else []})
    base_name = variants[0]["name"]
    table = markdown_table(rows, base_name, a.time_budget)
    md = out / "ablation.md"
    tmp = md.with_name(f"ablation.md.{os.getpid()}.tmp")
    tmp.write_text(table)
    os.replace(tmp, md)
    overlay = plot_overlay(rows, out / "ablation_curves.png")
    print("\n" + table)
    best = max(rows, key=lambda r: r["valid"]["ndcg@10"])
    res = {"dataset": data.name, "dataset_fingerprint": data.fingerprint, "base": base_spec or "default",
           "time_budget_min": a.time_budget, "selected_on": "validation", "best_on_validation": best["name"],
           "variants": [{k: r[k] for k in ("name", "changed", "valid", "test", "epochs_run", "train_minutes",
                                           "curves", "recipe")} for r in rows],
           "table": str(md), "overlay": str(overlay) if overlay else None,
           "wall_minutes": round((time.time() - t0) / 60, 2)}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
