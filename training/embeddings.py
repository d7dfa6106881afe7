"""Item text -> vectors for training: the rendering and the encoder are `model.text_embed`'s (the
same code the service runs on items added live; re-exported here), and this module adds what an
offline run wants on top: an on-disk `.npy` cache keyed by sha256(model identity + texts),
written atomically, empty-text handling and progress.

Models are only ever loaded from a local directory with the Hugging Face hub offline: this module
never downloads. `hashed_text_embeddings` is a cheap deterministic bag-of-words stand-in for tests.

This module is not the quantiser (see `training.quantize`) and does not choose which fields an
item has (see `training.data`).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from sidrec.model.text_embed import (DEFAULT_MODEL, DEFAULT_TEMPLATE, ENCODE_BATCH, default_model_path, encode,
                                     hashed_text_embeddings, load_sentence_model, render_text)
from sidrec.training.data import DataError

__all__ = ["DEFAULT_MODEL", "DEFAULT_TEMPLATE", "default_model_path", "embed_items", "hashed_text_embeddings",
           "render_text", "cache_key"]

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


def embed_items(texts: list[str], model: str | None = None, *, batch_size: int = ENCODE_BATCH, device: str = "cpu",
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
    st = load_sentence_model(model_dir, device)
    t0 = time.perf_counter()
    emb = encode(st, texts, batch_size, show_progress)  # (N, D)
    if show_progress:
        print(f"embedded {len(texts)} texts with {model_dir.name} in {time.perf_counter() - t0:.1f}s")
    if cache_path is not None:
        _save_npy_atomic(cache_path, emb)
    return emb
