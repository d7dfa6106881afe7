"""Model and SID-layout configuration: frozen dataclasses serialised into a bundle's config.json.

This module is the single description of the token layout shared by training, evaluation and
serving. It is not the training recipe (see `training.config`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

PAD_ID = 0  # padding in encoder inputs; never predicted
BOS_ID = 1  # first decoder input
NUM_SPECIAL = 2


@dataclass(frozen=True)
class SIDLayout:
    """Token layout of semantic IDs.

    An item's SID is L codes; code c at level l is token `offsets[l] + c`. Offsets start after
    the special tokens (pad=0, bos=1) and are cumulative sums of the level cardinalities, so every
    level owns a disjoint slice of the shared vocabulary.
    """

    cardinalities: tuple[int, ...]  # C_l per level; the last level is the de-duplication digit

    def __post_init__(self) -> None:
        if not self.cardinalities or any(int(c) < 1 for c in self.cardinalities):
            raise ValueError(f"SID cardinalities must be positive integers, got {self.cardinalities}")

    @property
    def num_levels(self) -> int:
        return len(self.cardinalities)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [], NUM_SPECIAL
        for c in self.cardinalities:
            out.append(acc)
            acc += c
        return tuple(out)

    @property
    def vocab_size(self) -> int:
        return NUM_SPECIAL + sum(self.cardinalities)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_levels": self.num_levels,
            "cardinalities": list(self.cardinalities),
            "offsets": list(self.offsets),
            "vocab_size": self.vocab_size,
            "special_tokens": {"pad": PAD_ID, "bos": BOS_ID},
            "token_of_code": "token = offsets[level] + code",
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SIDLayout":
        layout = cls(tuple(int(c) for c in d["cardinalities"]))
        if "offsets" in d and list(d["offsets"]) != list(layout.offsets):
            raise ValueError(f"SID layout offsets {d['offsets']} disagree with cardinalities {layout.cardinalities}")
        return layout


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the SID transformer.

    Defaults follow GRID's TIGER configuration (4+4 layers, d_model 128, 6 heads of 64, d_ff 1024):
    small enough to train on a CPU, and the size the published Beauty numbers were measured at.
    """

    layout: SIDLayout
    arch: str = "encoder_decoder"  # or "decoder_only" (SID-GR style)
    d_model: int = 128
    n_heads: int = 6
    d_head: int = 64  # T5's d_kv: heads * d_head (384) need not equal d_model
    d_ff: int = 1024
    n_enc_layers: int = 4
    n_dec_layers: int = 4
    dropout: float = 0.1
    # Dropout on attention probabilities; None = `dropout`. On a CPU the (B, H, S, S) random mask
    # is the costliest op of a packed decoder-only step (21% of it, measured), so the packed
    # recipe turns it off and keeps the residual and feed-forward dropout.
    attn_dropout: float | None = None
    # Dropout inside the feed-forward block (after the GELU); None = `dropout`. The residual
    # dropout after the block stays either way. On a CPU dropout masks took 28% of a packed
    # decoder-only step (measured; the RNG is serial), and this (B, S, d_ff) one is most of that.
    ff_dropout: float | None = None
    max_history: int = 20  # items kept from the end of a history; older ones are dropped

    def __post_init__(self) -> None:
        if self.arch not in ("encoder_decoder", "decoder_only"):
            raise ValueError(f"arch must be 'encoder_decoder' or 'decoder_only', got {self.arch!r}")
        for name in ("d_model", "n_heads", "d_head", "d_ff", "n_dec_layers", "max_history"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def num_levels(self) -> int:
        return self.layout.num_levels

    @property
    def max_source_tokens(self) -> int:
        return self.max_history * self.layout.num_levels

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "layout"}
        d["layout"] = self.layout.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        layout = SIDLayout.from_dict(d.pop("layout"))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(layout=layout, **d)
