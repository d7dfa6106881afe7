"""The offline pipeline as resumable stages: data -> embed -> sids -> train -> evaluate -> export.

Each stage writes its outputs under the run directory (atomically) with a `<stage>.json` stamp
holding the fingerprint of its inputs; a rerun skips a stage whose stamp matches and recomputes
it (and everything after it) when the data, the config or an upstream output changed.
This module orchestrates; the work itself lives in the modules it calls.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sidrec.kernels.trie import PrefixTrie
from sidrec.model.bundle import ITEM_EMBEDDINGS, save_bundle
from sidrec.model.config import SIDLayout
from sidrec.training.config import PipelineConfig, fingerprint

STAGES = ("data", "embed", "sids", "train", "evaluate", "export")
PROVENANCE_KEYS = ("protocol", "selected_on", "recipe", "selection_record", "selection_valid", "selection_warning")


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


@dataclass
class Run:
    """State passed between stages (filled lazily, so any stage can run alone)."""

    data_path: str | None
    out: Path
    cfg: PipelineConfig
    log: Callable[[str], None] = print
    force: bool = False
    data: Any = None
    split: Any = None
    embeddings: np.ndarray | None = None
    sid_map: torch.Tensor | None = None
    codebooks: dict[str, torch.Tensor] = field(default_factory=dict)
    layout: SIDLayout | None = None
    model: Any = None
    fps: dict[str, str] = field(default_factory=dict)
    # Merged into metrics.json by the evaluate stage: protocol, recipe, selected_on ...
    # (training.protocol.provenance); not part of any fingerprint.
    provenance: dict[str, Any] = field(default_factory=dict)
    transitions: Any = None  # model.transitions.Transitions of the fit sequences (run_transitions)

    def stamp_path(self, stage: str) -> Path:
        return self.out / "stages" / f"{stage}.json"

    def is_fresh(self, stage: str, fp: str) -> bool:
        p = self.stamp_path(stage)
        if self.force or not p.is_file():
            return False
        try:
            return json.loads(p.read_text()).get("fingerprint") == fp
        except json.JSONDecodeError:
            return False

    def stamp(self, stage: str, fp: str, **info: Any) -> None:
        self.stamp_path(stage).parent.mkdir(parents=True, exist_ok=True)
        _atomic_json(self.stamp_path(stage), {"stage": stage, "fingerprint": fp,
                                              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **info})


def stage_data(run: Run) -> None:
    from sidrec.training.data import leave_one_out, load_dataset

    if run.data is None:
        if run.data_path is None:
            raise ValueError("no dataset given: pass --data PATH (a P5 directory, interactions table or RecBole files)")
        run.data = load_dataset(run.data_path)
        run.split = leave_one_out(run.data)
    d = run.data
    run.fps["data"] = d.fingerprint
    if not run.is_fresh("data", d.fingerprint):
        run.out.mkdir(parents=True, exist_ok=True)
        _atomic_json(run.out / "item_ids.json", d.item_ids)
        run.stamp("data", d.fingerprint, name=d.name, users=d.num_users, items=d.num_items,
                  interactions=d.num_interactions)
    run.log(f"data: {d.name}: {d.num_users} users, {d.num_items} items, {d.num_interactions} interactions")


def stage_embed(run: Run) -> None:
    from sidrec.training.embeddings import DEFAULT_TEMPLATE, embed_items, render_text

    if run.data is None:
        stage_data(run)
    c = run.cfg.embed
    template = c.template or DEFAULT_TEMPLATE
    texts = [render_text(f, template) for f in run.data.item_fields]
    fp = fingerprint(run.fps["data"], c)
    run.fps["embed"] = fp
    path = run.out / "embeddings.npy"
    if run.is_fresh("embed", fp) and path.is_file():
        run.embeddings = np.load(path)
        return
    t = time.time()
    # Items without any text are embedded by their id (the readers already warned about them).
    cache = os.environ.get("SIDREC_CACHE_DIR", "cache")
    run.embeddings = embed_items(texts, c.model, batch_size=c.batch_size, cache_dir=str(Path(cache) / "embeddings"),
                                 allow_empty=True, item_ids=run.data.item_ids)
    tmp = path.with_name(f"embeddings.{os.getpid()}.tmp.npy")
    np.save(tmp, run.embeddings)
    os.replace(tmp, path)
    run.stamp("embed", fp, shape=list(run.embeddings.shape), seconds=round(time.time() - t, 1))


def stage_sids(run: Run) -> None:
    from sidrec.training.quantize import rq_kmeans, rq_vae, spread_last_level
    from sidrec.training.sids import add_dedup_digit, plot_codebook_usage, sid_report

    if run.embeddings is None:
        stage_embed(run)
    c = run.cfg.sid
    fp = fingerprint(run.fps["embed"], c)
    run.fps["sids"] = fp
    path = run.out / "sids.safetensors"
    if run.is_fresh("sids", fp) and path.is_file():
        _load_sids(run, path)
        return
    X = run.embeddings
    if c.method == "rq_kmeans":
        rq = rq_kmeans(X, c.levels, c.codebook_size, balanced=c.balanced, niter=c.niter, seed=c.seed)
    elif c.method == "rq_vae":
        rq = rq_vae(X, c.levels, c.codebook_size, seed=c.seed)
    else:
        raise ValueError(f"unknown SID method {c.method!r}: use 'rq_kmeans' or 'rq_vae'")
    cards = tuple(int(cb.shape[0]) for cb in rq.codebooks)
    spread = None
    if c.spread_collisions:
        before = sid_report(rq.codes, None, None, cards)["collision_rate_before_dedup"]
        rq, moved = spread_last_level(rq, X)
        spread = {"collision_rate_of_quantiser": before, "items_moved": moved}
    sid_map, dedup_card = add_dedup_digit(rq.codes)
    if dedup_card > 1:
        cards += (int(dedup_card),)
    else:  # every code tuple is unique: a digit that is always 0 would only cost a decoding step
        sid_map = sid_map[:-1]
    report = sid_report(rq.codes, rq.codebooks, rq.latent(X), cards)  # the codebooks' space
    if spread is not None:
        report["spread_collisions"] = spread
    (run.out / "report").mkdir(parents=True, exist_ok=True)
    plot_codebook_usage(sid_map.T, cards, run.out / "report" / "codebook_usage.png")
    tensors = {"sid_map": torch.as_tensor(sid_map, dtype=torch.int64),
               "cardinalities": torch.tensor(cards, dtype=torch.int64)}
    for l, cb in enumerate(rq.codebooks):
        tensors[f"codebook_{l}"] = torch.as_tensor(np.asarray(cb), dtype=torch.float32)
    tmp = path.with_name(f"sids.{os.getpid()}.tmp.safetensors")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    _atomic_json(run.out / "report" / "sid_report.json", report)
    run.stamp("sids", fp, cardinalities=list(cards), method=c.method)
    run.log("sids: " + json.dumps({k: v for k, v in report.items() if not isinstance(v, (list, dict))}))
    _load_sids(run, path)


def _load_sids(run: Run, path: Path) -> None:
    t = load_file(str(path))
    run.sid_map = t["sid_map"]
    run.layout = SIDLayout(tuple(int(c) for c in t["cardinalities"].tolist()))
    run.codebooks = {k: v for k, v in t.items() if k.startswith("codebook_")}


def stage_train(run: Run) -> None:
    from sidrec.training.data import sliding_windows
    from sidrec.training.packing import PackedSet
    from sidrec.training.train import WindowSet, build_model, save_weights, train_model

    if run.sid_map is None:
        stage_sids(run)
    c = run.cfg.train
    fp = fingerprint(run.fps["sids"], run.fps["data"], c)
    run.fps["train"] = fp
    ckpt_dir = run.out / "checkpoints"
    final_ckpt = ckpt_dir / ("refit.safetensors" if c.refit_epochs > 0 else "best.safetensors")
    if run.is_fresh("train", fp) and final_ckpt.is_file():
        run.model = build_model(c, run.layout)
        run.model.load_state_dict(load_file(str(final_ckpt)))
        run.model.eval()
        return
    def samples(seqs: list[np.ndarray]) -> WindowSet | PackedSet:
        if c.objective == "packed":
            return PackedSet.from_sequences(seqs, c.max_history)
        return WindowSet(*sliding_windows(seqs, c.max_history))

    if c.fit_on == "train+valid":
        # Every seq[:-1]: the validation targets are trained on, so there is no validation set
        # to stop on; the schedule is the time budget's (or `epochs`), and the last epoch is kept.
        data, valid_h, valid_t = samples(run.split.test_history), [], np.zeros(0, np.int64)
    else:
        data, valid_h, valid_t = samples(run.split.train), run.split.valid_history, np.asarray(run.split.valid_target)
    run.log(f"train: {len(data)} training targets ({c.objective}, fit on {c.fit_on}), arch {c.arch}, "
            f"dtype {c.dtype}")
    res = train_model(c, run.layout, run.sid_map, data, valid_h, valid_t, out_dir=ckpt_dir, log=run.log)
    run.model = res.model
    refit_minutes = 0.0
    if c.refit_epochs > 0:
        import dataclasses

        rc = dataclasses.replace(c, lr=c.lr * c.min_lr_ratio, min_lr_ratio=1.0, warmup_steps=1,
                                 epochs=c.refit_epochs, time_budget_min=None, eval_users=0)
        data2 = samples(run.split.test_history)  # every seq[:-1]
        run.log(f"train: refit for {c.refit_epochs} epoch(s) on {len(data2)} train + validation targets")
        ref = train_model(rc, run.layout, run.sid_map, data2, [], np.zeros(0, np.int64),
                          log=run.log, init_state=res.model.state_dict())
        run.model, refit_minutes = ref.model, ref.train_seconds / 60
        if int(os.environ.get("RANK", "0")) == 0:
            save_weights(run.model, ckpt_dir / "refit.safetensors")
    if int(os.environ.get("RANK", "0")) != 0:
        return
    from sidrec.training.report import plot_learning_curves

    (run.out / "report").mkdir(parents=True, exist_ok=True)
    plot_learning_curves(res.history, run.out / "report" / "learning_curves.png")
    run.stamp("train", fp, best_epoch=res.best_epoch, best_valid_recall10=res.best_valid,
              train_minutes=round(res.train_seconds / 60 + refit_minutes, 2), refit_epochs=c.refit_epochs,
              samples_per_second=round(res.samples_per_second, 1),
              epochs_run=len(res.history))


def seen_validation_targets(c) -> bool:
    """Whether a model trained with TrainConfig `c` has trained on the validation targets."""
    return c.fit_on == "train+valid" or c.refit_epochs > 0


def stage_evaluate(run: Run) -> dict:
    """Score the splits `eval.splits` names (validation and test side by side by default) and
    write metrics.json: one block per split, the test split's numbers also at the top level (the
    bundle's evaluation summary), and the run's provenance (`Run.provenance`: protocol, recipe,
    the split that selected it), which is refreshed even when the scores are fresh."""
    if run.model is None:
        stage_train(run)
    ce = run.cfg.eval
    fp = fingerprint(run.fps["train"], ce)
    run.fps["evaluate"] = fp
    path = run.out / "metrics.json"
    fresh = run.is_fresh("evaluate", fp) and path.is_file()
    metrics = json.loads(path.read_text()) if fresh else _score_splits(run)
    for k in PROVENANCE_KEYS:  # only this call's provenance: none left over from an earlier one
        metrics.pop(k, None)
    metrics.update({"protocol": None, "selected_on": None, **run.provenance})
    _atomic_json(path, metrics)
    if not fresh:
        run.stamp("evaluate", fp)
        run.log("evaluate: " + json.dumps({k: v for k, v in metrics.items() if k != "recipe"}))
    return metrics


def fit_sequences(run: Run) -> list[np.ndarray]:
    """The sequences the model was fit on: seq[:-2] (train), or seq[:-1] (train + valid)."""
    return run.split.test_history if seen_validation_targets(run.cfg.train) else run.split.train


def run_transitions(run: Run):
    """The item-transition table of the sequences the model was fit on (model.transitions), with
    the run's eval.transitions_* shape; built once per run (seconds), and never from a split's
    targets the model did not train on."""
    from sidrec.model.transitions import Transitions

    ce = run.cfg.eval
    if run.transitions is None:
        if run.split is None:
            stage_data(run)
        run.transitions = Transitions.fit(fit_sequences(run), run.data.num_items, ce.transitions_window,
                                          ce.transitions_gap_decay, ce.transitions_top_k)
    return run.transitions


def _score_splits(run: Run) -> dict:
    from sidrec.training.evaluate import evaluate, popularity_metrics, split_targets, transitions_metrics
    from sidrec.training.train import autocast_dtype

    ce, c, sp = run.cfg.eval, run.cfg.train, run.split
    trie = PrefixTrie.build(run.sid_map, run.layout.cardinalities)
    dtype = autocast_dtype(c.dtype, torch.device(c.device))
    stamp = json.loads(run.stamp_path("train").read_text()) if run.stamp_path("train").is_file() else {}
    metrics: dict[str, Any] = {
        "dataset": run.data.name, "dataset_fingerprint": run.data.fingerprint, "beam": ce.beam,
        "train_minutes": stamp.get("train_minutes"), "best_epoch": stamp.get("best_epoch"),
        "epochs_run": stamp.get("epochs_run"), "device": c.device, "fit_on": c.fit_on,
        # What picked the checkpoint inside this run (the recipe's selection is `selected_on`).
        "checkpoint_selected_on": "validation" if c.fit_on == "train" else "last epoch",
    }
    rerank = None
    if ce.rerank_weight > 0 or ce.transitions_weight > 0:
        from sidrec.model.cold_start import RerankOptions
        from sidrec.model.transitions import TransitionOptions
        from sidrec.training.evaluate import Reranker

        if ce.rerank_weight > 0 and not run.codebooks:
            raise ValueError("eval.rerank_weight > 0 needs item vectors: this run's quantizer kept no codebooks")
        books = bundle_books(run) if ce.rerank_weight > 0 else {}
        table = run_transitions(run) if ce.transitions_weight > 0 else None
        rerank = Reranker.from_run(run.codebooks, run.layout.num_levels, books.get(ITEM_EMBEDDINGS),
                                   RerankOptions(ce.rerank_weight, ce.rerank_decay), table,
                                   TransitionOptions(ce.transitions_weight, ce.transitions_decay,
                                                     ce.transitions_extra))
        if ce.rerank_weight > 0:
            metrics["rerank"] = {"weight": ce.rerank_weight, "decay": ce.rerank_decay,
                                 "vectors": "text embeddings" if ITEM_EMBEDDINGS in books else "SID reconstructions"}
        if table is not None:
            metrics["transitions"] = {"weight": ce.transitions_weight, "decay": ce.transitions_decay,
                                      "extra": ce.transitions_extra, "window": ce.transitions_window,
                                      "gap_decay": ce.transitions_gap_decay, "top_k": ce.transitions_top_k,
                                      "nnz": table.nnz, "fit_on": run.cfg.train.fit_on}
    t = time.time()
    for name in ce.splits:
        if name == "valid" and seen_validation_targets(c):
            metrics["valid"] = None
            metrics["valid_skipped"] = (f"the model trained on the validation targets (fit_on={c.fit_on}, "
                                        f"refit_epochs={c.refit_epochs}); its validation numbers come from "
                                        "a selection run that fits on train only")
            continue
        hist, tgt = split_targets(sp, name)
        m = evaluate(run.model, trie, run.sid_map, hist, tgt, beam=ce.beam, wide_beams=ce.wide_beams,
                     wide_users=ce.wide_users, batch_size=ce.batch_size, dtype=dtype, progress=True,
                     rerank=rerank)
        m["popularity"] = popularity_metrics(sp.train, tgt, run.data.num_items, ks=(5, 10))
        m["transitions_alone"] = transitions_metrics(run_transitions(run), hist, tgt, ce.transitions_decay,
                                                     run.model.cfg.max_history, ks=(5, 10))
        metrics[name] = m
    if metrics.get("test"):  # the flat keys the bundle and older readers know
        metrics.update({"split": "test (leave-one-out)", **metrics["test"]})
    metrics["eval_seconds"] = round(time.time() - t, 1)
    return metrics


def bundle_books(run: Run) -> dict[str, torch.Tensor]:
    """The bundle's codebooks, with the items' text embeddings (float16) beside them when the
    codebooks live in the embedding space (RQ-KMeans), so the cold-start blend can compare a new
    item's embedding with the history's rather than with SID reconstructions."""
    books = dict(run.codebooks or {})
    if run.embeddings is None and run.data is not None and run.fps.get("data"):
        stage_embed(run)  # cached on disk by its stage: a load, not a re-embedding
    X = run.embeddings
    dim = next(iter(books.values())).shape[1] if books else None
    if (run.cfg.sid.method == "rq_kmeans" and X is not None and dim == X.shape[1]
            and len(X) == run.sid_map.shape[1]):
        books[ITEM_EMBEDDINGS] = torch.as_tensor(np.asarray(X), dtype=torch.float16)
    return books


def bundle_items(run: Run) -> list[dict[str, Any]]:
    """items.jsonl records from the item table: the text that was embedded, and as attributes
    every other non-id column (Beauty: categories split into their path levels, brand)."""
    from sidrec.training.data import ID_FIELDS
    from sidrec.training.embeddings import DEFAULT_TEMPLATE, render_text

    template = run.cfg.embed.template or DEFAULT_TEMPLATE
    out = []
    for iid, f in zip(run.data.item_ids, run.data.item_fields):
        attrs = {k: ([p.strip() for p in v.split(">") if p.strip()] if k == "categories" else [v])
                 for k, v in f.items() if k not in ID_FIELDS and k != "title"}
        out.append({"item_id": iid, "text": render_text(f, template), "attributes": attrs})
    return out


def stage_export(run: Run, bundle_dir: Path | None = None) -> Path:
    if run.model is None:
        stage_train(run)
    metrics = stage_evaluate(run)
    d = run.data
    bundle_dir = bundle_dir or run.out / "bundle"
    sid_stamp = json.loads(run.stamp_path("sids").read_text())
    extra = {"dataset": {"name": d.name, "fingerprint": d.fingerprint, "users": d.num_users, "items": d.num_items},
             "sid": {"method": run.cfg.sid.method, "levels": run.cfg.sid.levels,
                     "codebook_size": run.cfg.sid.codebook_size,
                     "dedup_digit": len(run.layout.cardinalities) > run.cfg.sid.levels,
                     "spread_collisions": run.cfg.sid.spread_collisions,
                     "cardinalities": sid_stamp.get("cardinalities")},
             "evaluation": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
             "pipeline": run.cfg.to_dict()}
    path = save_bundle(bundle_dir, run.model, run.sid_map, d.item_ids, codebooks=bundle_books(run), metrics=metrics,
                       extra_config=extra, report_dir=run.out / "report", overwrite=True, items=bundle_items(run),
                       transitions=run_transitions(run))
    run.stamp("export", fingerprint(run.fps.get("evaluate"), str(path)), bundle=str(path))
    run.log(f"export: bundle written to {path}")
    return path


def run_pipeline(data_path: str | None, out: str | Path, cfg: PipelineConfig, until: str = "export",
                 only: str | None = None, force: bool = False, log: Callable[[str], None] = print,
                 data: Any = None, provenance: dict[str, Any] | None = None) -> Run:
    """Run stages up to `until` (or just `only`, computing what it needs). `data` may be an
    already-loaded InteractionData (the synthetic generator's), instead of a path. `provenance`
    is recorded in metrics.json (see `training.protocol`)."""
    run = Run(data_path, Path(out), cfg, log=log, force=force, provenance=dict(provenance or {}))
    run.out.mkdir(parents=True, exist_ok=True)
    _atomic_json(run.out / "pipeline_config.json", cfg.to_dict())
    if data is not None:
        from sidrec.training.data import leave_one_out

        run.data, run.split = data, leave_one_out(data)
    fns = {"data": stage_data, "embed": stage_embed, "sids": stage_sids, "train": stage_train,
           "evaluate": stage_evaluate, "export": stage_export}
    stages = [only] if only else STAGES[: STAGES.index(until) + 1]
    for s in stages:
        if s not in fns:
            raise ValueError(f"unknown stage {s!r}; stages are {', '.join(STAGES)}")
        fns[s](run)
    return run
