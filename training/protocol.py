"""The selection protocol: every recipe choice is made on validation, test is scored once.

Two kinds of run, each leaving a record in a registry directory (default runs/selections/):

- **select**: the recipe fit on train only (`train.fit_on=train`, no refit), the same budget,
  scored on validation only (each user's second-to-last item). Its validation numbers are the
  ones that may steer choices (ablations, recipe edits). Record `<dataset>-<key>.select.json`.
- **final**: the recipe as written (e.g. fit on train + valid), scored on test once. Its
  output shows the matching select record's validation numbers beside its test numbers, and
  says loudly when there is none: nothing then shows that the recipe was chosen on validation.
  Record `<dataset>-<key>.final.json` (the ablation table's test column reads it).

A select run and a final run match when the dataset fingerprint and the recipe key agree; the
key hashes the whole config except what the protocol itself sets (train.fit_on,
train.refit_epochs, the eval section) and where it runs (train.device, train.num_threads); a
final run that finds no record names the nearest one's differing settings.

A select run (a train-only fit) keeps the checkpoint of best validation Recall@10 on
`train.eval_users` sampled users and then scores every user: that pick flatters its validation
numbers a little, the same way for every variant compared.

This module builds the configs, keys, provenance and records, resolves the dataset a run names
(a path or the synthetic generator), and runs one select or final run through
`training.pipeline` (`run_protocol`); the training and scoring are the pipeline's.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from sidrec.training.config import PipelineConfig, fingerprint

PROTOCOLS = ("select", "final")
KEY_EXCLUDES = {"train": ("fit_on", "refit_epochs", "device", "num_threads")}


def resolve_data(spec: str):
    """(InteractionData, path or None) for a dataset path or "synthetic[:ITEMSxUSERS]"."""
    if spec.startswith("synthetic"):
        from sidrec.training.synthetic import make_synthetic

        m = re.fullmatch(r"synthetic(?::(\d+)x(\d+))?", spec)
        if not m:
            raise ValueError(f"--data {spec!r}: expected a dataset path or synthetic[:ITEMSxUSERS]")
        items, users = (int(m.group(1)), int(m.group(2))) if m.group(1) else (400, 1500)
        return make_synthetic(items, users, seed=0), None
    from sidrec.training.data import load_dataset

    return load_dataset(spec), spec


def for_protocol(cfg: PipelineConfig, protocol: str) -> PipelineConfig:
    """The config a `protocol` run trains and scores with."""
    if protocol == "select":
        # No wide-beam recalls: they steer nothing here and a beam of 1000 costs most of an evaluation.
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, fit_on="train", refit_epochs=0),
                                   eval=dataclasses.replace(cfg.eval, splits=("valid",), wide_beams=()))
    if protocol == "final":
        # Validation is scored too where the fit left it unseen (then it is this run's own).
        return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, splits=("valid", "test")))
    raise ValueError(f"unknown protocol {protocol!r}; protocols are {', '.join(PROTOCOLS)}")


def recipe_key(cfg: PipelineConfig) -> str:
    """What a select run and a final run of the same recipe share (see the module docstring)."""
    d = cfg.to_dict()
    d.pop("eval")
    for section, keys in KEY_EXCLUDES.items():
        for k in keys:
            d[section].pop(k)
    return fingerprint(d)


def record_path(registry: str | Path, kind: str, dataset_fingerprint: str, cfg: PipelineConfig) -> Path:
    if kind not in PROTOCOLS:
        raise ValueError(f"unknown record kind {kind!r}; kinds are {', '.join(PROTOCOLS)}")
    return Path(registry) / f"{dataset_fingerprint[:12]}-{recipe_key(cfg)}.{kind}.json"


def provenance(protocol: str, recipe_name: str | None, cfg: PipelineConfig,
               selection: dict | None = None, selection_path: Path | None = None) -> dict[str, Any]:
    """What the evaluate stage records in metrics.json about how this recipe was chosen."""
    out: dict[str, Any] = {"protocol": protocol, "recipe": {"name": recipe_name, "key": recipe_key(cfg),
                                                            "config": cfg.to_dict()}}
    if protocol == "select":
        out["selected_on"] = "validation"
    elif selection is not None:
        out.update({"selected_on": "validation", "selection_record": str(selection_path),
                    "selection_valid": selection.get("valid")})
    else:
        out.update({"selected_on": "unknown", "selection_record": None,
                    "selection_warning": missing_selection_warning(selection_path, cfg)})
    return out


def missing_selection_warning(expected: Path | None, cfg: PipelineConfig | None = None) -> str:
    where = f" (looked for {expected})" if expected is not None else ""
    near = closest_record_difference(expected, cfg) if expected is not None and cfg is not None else None
    return ("no selection record for this recipe on this dataset" + where + ": these test numbers were not "
            "preceded by a validation-only run of the same recipe and budget, so nothing shows the recipe was "
            "chosen without looking at test. Run the same command with --protocol select first."
            + (f" The closest select record on this dataset differs in {near}." if near else ""))


def _flat(d: dict) -> dict[str, Any]:
    return {f"{a}.{b}": v for a, sub in d.items() if a != "eval" for b, v in sub.items()
            if b not in KEY_EXCLUDES.get(a, ())}


def closest_record_difference(expected: Path, cfg: PipelineConfig) -> str | None:
    """How the nearest select record of the same dataset differs from `cfg` ("train.lr: 0.001 there,
    0.002 here"), or None when the registry holds none; so a budget typo is plain to see."""
    prefix = expected.name.split("-", 1)[0]
    mine, best = _flat(cfg.to_dict()), None
    for path in sorted(expected.parent.glob(f"{prefix}-*.select.json")):
        try:
            theirs = _flat(json.loads(path.read_text())["config"])
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            continue
        diff = [f"{k}: {theirs.get(k)!r} there, {v!r} here" for k, v in mine.items() if theirs.get(k) != v]
        if diff and (best is None or len(diff) < len(best)):
            best = diff
    return "; ".join(best[:4]) + (f" (+{len(best) - 4} more)" if len(best) > 4 else "") if best else None


def loud(message: str) -> str:
    """A banner that is hard to miss in a log."""
    bar = "!" * 100
    return f"\n{bar}\n!! WARNING: {message}\n{bar}\n"


def write_record(registry: str | Path, kind: str, metrics: dict, cfg: PipelineConfig, recipe_name: str | None,
                 run_dir: str | Path, **extra: Any) -> Path:
    """Write the select/final record of a finished run (atomically); returns its path."""
    path = record_path(registry, kind, metrics["dataset_fingerprint"], cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"kind": kind, "dataset": metrics["dataset"], "dataset_fingerprint": metrics["dataset_fingerprint"],
           "recipe": recipe_name, "recipe_key": recipe_key(cfg), "config": cfg.to_dict(),
           "run_dir": str(run_dir), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "train_minutes": metrics.get("train_minutes"), "epochs_run": metrics.get("epochs_run"),
           "best_epoch": metrics.get("best_epoch"), "device": metrics.get("device"),
           "valid": metrics.get("valid"), **extra}
    if kind == "final":
        rec["test"] = metrics.get("test")
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(rec, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_record(registry: str | Path, kind: str, dataset_fingerprint: str, cfg: PipelineConfig
                ) -> tuple[dict | None, Path]:
    """(the matching record or None, the path it has or would have)."""
    path = record_path(registry, kind, dataset_fingerprint, cfg)
    if not path.is_file():
        return None, path
    try:
        rec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"selection record {path} is not valid JSON ({e}); delete it and rerun") from None
    if rec.get("recipe_key") != recipe_key(cfg) or rec.get("dataset_fingerprint") != dataset_fingerprint:
        raise ValueError(f"selection record {path} names another recipe or dataset; delete it and rerun")
    return rec, path


def run_protocol(kind: str, cfg: PipelineConfig, data, data_path: str | None, out: str | Path,
                 registry: str | Path, recipe_name: str | None, log=print) -> tuple[dict, dict | None, Path | None]:
    """One select or final run of recipe `cfg` on `data` (an InteractionData) in run directory
    `out`, recorded in `registry` -> (its metrics.json, the select record a final run found or
    None, that record's path). A final run without a select record warns on stderr, loudly."""
    from sidrec.training.pipeline import run_pipeline

    pcfg = for_protocol(cfg, kind)
    sel, sel_path = None, None
    if kind == "final":
        sel, sel_path = read_record(registry, "select", data.fingerprint, cfg)
    prov = provenance(kind, recipe_name, pcfg, sel, sel_path)
    if "selection_warning" in prov:
        print(loud(prov["selection_warning"]), file=sys.stderr)
    out = Path(out)
    run_pipeline(data_path, out, pcfg, until="evaluate" if kind == "select" else "export", data=data,
                 provenance=prov, log=log)
    metrics = json.loads((out / "metrics.json").read_text())
    extra = {"selection_record": str(sel_path) if sel else None} if kind == "final" else {}
    write_record(registry, kind, metrics, pcfg, recipe_name, out, **extra)
    return metrics, sel, sel_path
