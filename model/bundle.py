"""Bundle I/O: the versioned directory that is the contract between training and serving.

A bundle holds `config.json` (model hyper-parameters, SID layout, format version, dataset
fingerprint, creation time, evaluation summary, and the sha256 of every file), `model.safetensors`,
`sid_map.safetensors` (PID->SID, int64 [L, N]), `codebooks.safetensors` (quantizer centroids
`codebook_<level>`, and optionally `item_embeddings`, float16 [N, D]: the base items' text
embeddings in the codebooks' space, which the cold-start blend compares with new items'),
`item_ids.json` (internal index -> external id), `metrics.json`, an optional
`transitions.safetensors` (the item -> next-item table of the training sequences, CSR over the
internal indices: `indptr` int64 [N+1], `indices` int32 [nnz], `values` float32 [nnz]; see
model/transitions.py), an optional `report/` folder,
and an optional `items.jsonl`: one JSON object per line, {"item_id", "text", "attributes"} for
the base items (attributes: name -> list of strings), so filters work on day one and a new model
can re-quantize the items' text. Bundles without it load with no attributes and no text.

Weights are safetensors only: a bundle never contains a pickle. A bundle is written into a
temporary sibling directory and renamed into place when complete; loading verifies every
checksum and shape and refuses a broken bundle with a message naming the file at fault.
This module needs neither the training package nor the service.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sidrec.model.attributes import check_attributes
from sidrec.model.config import ModelConfig
from sidrec.model.transformer import SIDTransformer
from sidrec.model.transitions import TRANSITIONS_FILE, Transitions

FORMAT_VERSION = 1
REQUIRED = ("config.json", "model.safetensors", "sid_map.safetensors", "item_ids.json")


ITEM_EMBEDDINGS = "item_embeddings"  # optional entry of codebooks.safetensors (module docstring)


class BundleError(ValueError):
    """A bundle is missing, incomplete, corrupted or incompatible."""


@dataclass
class Bundle:
    path: Path
    config: dict[str, Any]
    model_config: ModelConfig
    model: SIDTransformer
    sid_map: torch.Tensor  # (L, N) int64
    item_ids: list[str]
    codebooks: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    item_attributes: list[dict[str, list[str]] | None] | None = None  # per internal index, from items.jsonl
    item_texts: list[str | None] | None = None
    transitions: Transitions | None = None

    @property
    def version(self) -> str:
        return str(self.config.get("version", "unknown"))

    @property
    def num_items(self) -> int:
        return len(self.item_ids)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_bundle(path: str | Path, model: SIDTransformer, sid_map: torch.Tensor, item_ids: list[str],
                codebooks: dict[str, torch.Tensor] | None = None, metrics: dict[str, Any] | None = None,
                extra_config: dict[str, Any] | None = None, report_dir: str | Path | None = None,
                overwrite: bool = False, items: list[dict[str, Any]] | None = None,
                transitions: Transitions | None = None) -> Path:
    """Write a complete bundle at `path` atomically (temp dir + rename). Returns the path.

    items: optional base-item records {"item_id", "text", "attributes"} written as items.jsonl
    (validated first: every id must be in item_ids, once)."""
    path = Path(path)
    sid_map = torch.as_tensor(sid_map).to(torch.int64).cpu().contiguous()
    cfg = model.cfg
    if sid_map.dim() != 2 or sid_map.shape[0] != cfg.num_levels:
        raise BundleError(f"sid_map must be [L={cfg.num_levels}, N], got {tuple(sid_map.shape)}")
    if sid_map.shape[1] != len(item_ids):
        raise BundleError(f"sid_map has {sid_map.shape[1]} items but item_ids has {len(item_ids)}")
    if len(set(item_ids)) != len(item_ids):
        raise BundleError("item_ids contains duplicates")
    if items is not None:
        _parse_items([json.dumps(r) for r in items], item_ids, "items")  # refuse what load would refuse
    if path.exists() and not overwrite:
        raise BundleError(f"bundle path {path} already exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        save_file({"sid_map": sid_map}, str(tmp / "sid_map.safetensors"))
        books = {k: v.detach().to(torch.float16 if k == ITEM_EMBEDDINGS else torch.float32).cpu().contiguous()
                 for k, v in (codebooks or {}).items()}
        if ITEM_EMBEDDINGS in books and tuple(books[ITEM_EMBEDDINGS].shape[:1]) != (len(item_ids),):
            raise BundleError(f"{ITEM_EMBEDDINGS} must have one row per item ({len(item_ids)}), got "
                              f"{tuple(books[ITEM_EMBEDDINGS].shape)}")
        save_file(books or {"empty": torch.zeros(0)}, str(tmp / "codebooks.safetensors"))
        if transitions is not None:
            if transitions.num_items != len(item_ids):
                raise BundleError(f"the transition table covers {transitions.num_items} items, the bundle "
                                  f"{len(item_ids)}")
            save_file({k: v.contiguous() for k, v in transitions.tensors().items()}, str(tmp / TRANSITIONS_FILE))
        _write_json(tmp / "item_ids.json", list(item_ids))
        _write_json(tmp / "metrics.json", metrics or {})
        if items is not None:
            lines = (json.dumps({"item_id": r["item_id"], "text": r.get("text", ""),
                                 "attributes": r.get("attributes") or {}}, ensure_ascii=False) for r in items)
            (tmp / "items.jsonl").write_text("".join(x + "\n" for x in lines), encoding="utf-8")
        if report_dir is not None and Path(report_dir).is_dir():
            shutil.copytree(report_dir, tmp / "report")
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        config = {
            "format_version": FORMAT_VERSION,
            "version": time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6],
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": cfg.to_dict(),
            "num_items": len(item_ids),
            **(extra_config or {}),
            "files": files,
        }
        _write_json(tmp / "config.json", config)
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _parse_items(lines: list[str], item_ids: list[str], where: str
                 ) -> tuple[list[dict[str, list[str]] | None], list[str | None]]:
    """items.jsonl lines -> (attributes, texts) per internal index. BundleError naming the line."""
    index = {iid: i for i, iid in enumerate(item_ids)}
    attrs: list[dict[str, list[str]] | None] = [None] * len(item_ids)
    texts: list[str | None] = [None] * len(item_ids)
    seen: set[str] = set()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise BundleError(f"{where} line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise BundleError(f"{where} line {n}: must be a JSON object, got {type(rec).__name__}")
        extra = set(rec) - {"item_id", "text", "attributes"}
        if extra:
            raise BundleError(f"{where} line {n}: unknown fields {sorted(extra)}")
        iid = rec.get("item_id")
        if not isinstance(iid, str):
            raise BundleError(f"{where} line {n}: item_id must be a string, got {iid!r}")
        if iid not in index:
            raise BundleError(f"{where} line {n}: item_id {iid!r} is not in item_ids.json")
        if iid in seen:
            raise BundleError(f"{where} line {n}: item_id {iid!r} appears twice")
        seen.add(iid)
        text = rec.get("text", "")
        if not isinstance(text, str):
            raise BundleError(f"{where} line {n}: text must be a string, got {type(text).__name__}")
        try:
            a = check_attributes(rec.get("attributes") or {}, f"{where} line {n}")
        except ValueError as e:
            raise BundleError(str(e)) from None
        attrs[index[iid]], texts[index[iid]] = a, text
    return attrs, texts


def read_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"bundle directory {path} does not exist")
    for name in REQUIRED:
        if not (path / name).is_file():
            raise BundleError(f"bundle {path} is incomplete: {name} is missing")
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{path / 'config.json'} is not valid JSON (line {e.lineno}): {e.msg}") from None
    fv = config.get("format_version")
    if fv != FORMAT_VERSION:
        raise BundleError(f"{path / 'config.json'} has format_version {fv!r}; this sidrec reads {FORMAT_VERSION}")
    return config


def load_bundle(path: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> Bundle:
    """Load and validate a bundle. Raises BundleError naming the file at fault."""
    path = Path(path)
    config = read_config(path)
    if verify:
        for name, digest in config.get("files", {}).items():
            f = path / name
            if not f.is_file():
                raise BundleError(f"bundle {path} is incomplete: {name} is missing")
            if _sha256(f) != digest:
                raise BundleError(f"bundle file {f} is corrupted (sha256 differs from config.json)")
    try:
        mcfg = ModelConfig.from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{path / 'config.json'}: invalid model config ({e})") from None
    model = SIDTransformer(mcfg)
    try:
        state = load_file(str(path / "model.safetensors"))
        model.load_state_dict(state, strict=True)
    except (RuntimeError, OSError) as e:
        raise BundleError(f"{path / 'model.safetensors'} does not match the model config: "
                          f"{str(e).splitlines()[0][:200]}") from None
    model.eval().to(device)
    sid_map = load_file(str(path / "sid_map.safetensors")).get("sid_map")
    item_ids = json.loads((path / "item_ids.json").read_text())
    if sid_map is None or sid_map.dim() != 2 or sid_map.shape[0] != mcfg.num_levels:
        raise BundleError(f"{path / 'sid_map.safetensors'} must hold 'sid_map' of shape [{mcfg.num_levels}, N]")
    if sid_map.shape[1] != len(item_ids):
        raise BundleError(f"{path / 'sid_map.safetensors'} has {sid_map.shape[1]} items, "
                          f"item_ids.json has {len(item_ids)}")
    cards = torch.tensor(mcfg.layout.cardinalities)[:, None]
    if bool((sid_map < 0).any()) or bool((sid_map >= cards).any()):
        raise BundleError(f"{path / 'sid_map.safetensors'} has codes outside the layout's cardinalities")
    codebooks = {}
    if (path / "codebooks.safetensors").is_file():
        codebooks = {k: v for k, v in load_file(str(path / "codebooks.safetensors")).items() if k != "empty"}
        emb = codebooks.get(ITEM_EMBEDDINGS)
        if emb is not None and (emb.dim() != 2 or emb.shape[0] != len(item_ids)):
            raise BundleError(f"{path / 'codebooks.safetensors'}: {ITEM_EMBEDDINGS} has shape {tuple(emb.shape)}, "
                              f"expected one row for each of the {len(item_ids)} items")
    transitions = None
    if (path / TRANSITIONS_FILE).is_file():
        try:
            transitions = Transitions.from_tensors(load_file(str(path / TRANSITIONS_FILE)), len(item_ids))
        except ValueError as e:
            raise BundleError(f"{path / TRANSITIONS_FILE}: {e}") from None
    metrics = json.loads((path / "metrics.json").read_text()) if (path / "metrics.json").is_file() else {}
    item_ids = list(map(str, item_ids))
    attrs = texts = None
    if (path / "items.jsonl").is_file():
        f = path / "items.jsonl"
        # split on "\n" only: str.splitlines would also split inside a text holding U+2028
        attrs, texts = _parse_items(f.read_text(encoding="utf-8").split("\n"), item_ids, str(f))
    return Bundle(path, config, mcfg, model, sid_map.to(torch.int64), item_ids, codebooks, metrics, attrs, texts,
                  transitions)
