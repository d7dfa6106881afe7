"""The offline half of the `sidrec` command (`sidrec.cli` dispatches here): the pipeline, the
synthetic data generator, the demo bundle and new items' SIDs.

    sidrec train --data ../shared/data/amazon-beauty --out runs/beauty        # every stage
    sidrec train --data ... --out ... --stage sids                             # one stage
    sidrec train --data ... --out ... --set train.epochs=10 --set sid.balanced=true
    sidrec train --data ../shared/data/amazon-beauty --out runs/beauty --config beauty-cpu  # a recipe
    sidrec synth --out data/synthetic                                          # P5-format files
    sidrec demo-bundle bundles/demo                                            # small trained bundle
    sidrec assign-sids --bundle runs/beauty/bundle --text "..."                # SID for a new item

`serve` and `index` belong to the online half (`sidrec.service.cli`); this module never imports it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sidrec.training.config import PipelineConfig, load_config
from sidrec.training.pipeline import STAGES, run_pipeline


def _apply_overrides(cfg: PipelineConfig, sets: list[str]) -> PipelineConfig:
    d = cfg.to_dict()
    for s in sets:
        if "=" not in s or "." not in s.split("=", 1)[0]:
            raise SystemExit(f"--set expects SECTION.KEY=VALUE (e.g. train.epochs=5), got {s!r}")
        key, raw = s.split("=", 1)
        section, name = key.split(".", 1)
        if section not in d or name not in d[section]:
            raise SystemExit(f"--set {key}: unknown setting; known: "
                             + ", ".join(f"{a}.{b}" for a in d for b in d[a]))
        try:
            val = json.loads(raw)
        except json.JSONDecodeError:
            val = raw
        d[section][name] = val
    return PipelineConfig.from_dict(d)


def _cmd_train(a: argparse.Namespace) -> int:
    cfg = load_config(a.config) if a.config else PipelineConfig()
    cfg = _apply_overrides(cfg, a.set or [])
    if a.device:
        cfg = _apply_overrides(cfg, [f"train.device={a.device}"])
    if a.time_budget is not None:
        cfg = _apply_overrides(cfg, [f"train.time_budget_min={a.time_budget}"])
    until = a.until
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and a.stage is None:
        # Under torchrun rank 0 prepares data, embeddings and SIDs while the others wait; then every
        # rank trains (the others find those stages fresh) and only rank 0 evaluates and exports.
        import torch.distributed as dist

        from sidrec.training.distributed import setup

        ctx = setup(cfg.train.device)
        if ctx.is_main:
            run_pipeline(a.data, a.out, cfg, until="sids", force=a.force)
        dist.barrier()
        until = until if ctx.is_main else "train"
        run_pipeline(a.data, a.out, cfg, until=until)
        return 0
    run_pipeline(a.data, a.out, cfg, until=until, only=a.stage, force=a.force)
    return 0


def _cmd_synth(a: argparse.Namespace) -> int:
    from sidrec.training.synthetic import make_synthetic, write_p5

    data = make_synthetic(a.items, a.users, seed=a.seed)
    path = write_p5(data, a.out)
    print(f"wrote synthetic dataset ({data.num_users} users, {data.num_items} items) to {path}")
    return 0


def demo_config(epochs: int = 12) -> PipelineConfig:
    """A small model and codebooks sized for the built-in synthetic catalogue (~1-2 min on 2 cores)."""
    return PipelineConfig.from_dict({
        "sid": {"levels": 3, "codebook_size": 16, "niter": 20},
        "train": {"d_model": 64, "n_heads": 4, "d_head": 16, "d_ff": 256, "n_enc_layers": 2, "n_dec_layers": 2,
                  "batch_size": 128, "lr": 3e-3, "warmup_steps": 50, "epochs": epochs, "patience": 3,
                  "eval_users": 500, "eval_beam": 20, "dropout": 0.1},
        "eval": {"beam": 20, "wide_beams": [100], "wide_users": 300},
    })


def build_demo_bundle(out: str | Path, work: str | Path | None = None, epochs: int = 12, force: bool = False,
                      log=print) -> Path:
    """Train a small model on the built-in synthetic data and export it as a bundle at `out`."""
    from sidrec.training.synthetic import make_synthetic

    out = Path(out)
    if out.exists() and not force:
        log(f"demo bundle already at {out}")
        return out
    data = make_synthetic(400, 1500, seed=0)
    work = Path(work) if work else out.parent / f".{out.name}-work"
    run = run_pipeline(None, work, demo_config(epochs), until="evaluate", data=data, log=log)
    from sidrec.training.pipeline import stage_export

    return stage_export(run, bundle_dir=out)


def _cmd_demo(a: argparse.Namespace) -> int:
    build_demo_bundle(a.out, epochs=a.epochs, force=a.force)
    return 0


def _cmd_assign(a: argparse.Namespace) -> int:
    from sidrec.training.new_items import assign_new_items

    res = assign_new_items(a.bundle, a.text)
    for text, sid, fits, near in zip(a.text, res.sids.tolist(), res.fits.tolist(), res.nearest_existing):
        print(json.dumps({"text": text, "sid": sid, "fits_vocabulary": fits, "shares_prefix_with": near}))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="sidrec", description="semantic-ID generative recommendation")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="run the offline pipeline (all stages, or one with --stage)")
    t.add_argument("--data", help="P5 directory, interactions CSV/Parquet directory, or RecBole files")
    t.add_argument("--out", required=True, help="run directory (stages resume from here)")
    t.add_argument("--stage", choices=STAGES, help="run only this stage (and what it needs)")
    t.add_argument("--until", choices=STAGES, default="export")
    t.add_argument("--config", help="a recipe name (beauty-cpu, beauty-gpu) or a JSON file with "
                   "embed/sid/train/eval sections; --set and --time-budget override it")
    t.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override one setting")
    t.add_argument("--device", help="cpu, cuda, cuda:1 ...")
    t.add_argument("--time-budget", type=float, help="stop training after this many minutes (keeps best)")
    t.add_argument("--force", action="store_true", help="recompute stages even if their inputs are unchanged")
    t.set_defaults(fn=_cmd_train)
    s = sub.add_parser("synth", help="write the built-in synthetic dataset in P5 format")
    s.add_argument("--out", required=True)
    s.add_argument("--items", type=int, default=400)
    s.add_argument("--users", type=int, default=1500)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_cmd_synth)
    d = sub.add_parser("demo-bundle", help="train a small model on synthetic data and export a bundle")
    d.add_argument("out")
    d.add_argument("--epochs", type=int, default=12)
    d.add_argument("--force", action="store_true")
    d.set_defaults(fn=_cmd_demo)
    n = sub.add_parser("assign-sids", help="SIDs for new items' text from a bundle's codebooks (no retraining)")
    n.add_argument("--bundle", required=True)
    n.add_argument("--text", action="append", required=True, help="one new item's text (repeatable)")
    n.set_defaults(fn=_cmd_assign)
    a = p.parse_args(argv)
    try:
        return a.fn(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"sidrec: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
