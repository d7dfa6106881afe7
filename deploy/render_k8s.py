"""Render a kustomize directory in Python: the subset of kustomize that deploy/k8s uses.

CI validates the rendered CPU and GPU manifests (tests/test_deploy_manifests.py) on machines that
have PyPI but no `kustomize` or `kubectl` binary, so the rendering it validates must come from
Python. This renders exactly the features deploy/k8s uses, and refuses any other field of a
kustomization.yaml with an error naming it (so an overlay that grows a new feature fails loudly
here instead of being validated half-rendered):

- `resources`: YAML files (one or more documents) and directories holding a kustomization.yaml;
- `patches` with `path:` (strategic merge, the target named by the patch's kind and name):
  mappings merge key by key; lists of mappings that all carry `name` (containers, env, volumes,
  ports, ...) merge item by item on `name`; any other list is replaced, as kubectl does for
  lists without a patch merge key;
- `images` (`name`, `newName`, `newTag`);
- `replacements` with a `source` (kind, name, fieldPath) and `targets` (select kind/name,
  fieldPaths with `[key=value]` list selectors).

Where `kubectl kustomize` exists, the test compares this renderer's output with it, document by
document. It is not a general kustomize; it writes nothing.

    python deploy/render_k8s.py deploy/k8s/overlays/gpu > gpu.yaml
"""
from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any

import yaml

KNOWN_FIELDS = {"apiVersion", "kind", "resources", "patches", "images", "replacements"}
_SELECTOR = re.compile(r"^\[([^=\]]+)=([^\]]*)\]$")


class RenderError(ValueError):
    """A kustomization this renderer cannot render faithfully (the message names the field)."""


def _key(doc: dict) -> tuple[str, str]:
    return doc.get("kind", ""), (doc.get("metadata") or {}).get("name", "")


def _load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def strategic_merge(base: Any, patch: Any) -> Any:
    """Merge `patch` into a copy of `base` (kubectl's strategic merge, for the fields above)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = strategic_merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if (isinstance(base, list) and isinstance(patch, list) and base and patch
            and all(isinstance(x, dict) and "name" in x for x in base + patch)):
        out = [copy.deepcopy(x) for x in base]
        index = {x["name"]: i for i, x in enumerate(out)}
        for item in patch:
            if item["name"] in index:
                out[index[item["name"]]] = strategic_merge(out[index[item["name"]]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def _split_path(field_path: str) -> list[str]:
    """'a.[name=x].b' -> ['a', '[name=x]', 'b'] (selectors may hold dots in their value)."""
    parts, buf, depth = [], "", 0
    for ch in field_path:
        if ch == "." and depth == 0:
            parts.append(buf)
            buf = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        buf += ch
    parts.append(buf)
    return parts


def _walk(node: Any, part: str, field_path: str) -> Any:
    m = _SELECTOR.match(part)
    if m:
        if not isinstance(node, list):
            raise RenderError(f"fieldPath {field_path!r}: {part} selects from a list, found {type(node).__name__}")
        hits = [x for x in node if isinstance(x, dict) and str(x.get(m.group(1))) == m.group(2)]
        if len(hits) != 1:
            raise RenderError(f"fieldPath {field_path!r}: {part} matches {len(hits)} items, need exactly one")
        return hits[0]
    if not isinstance(node, dict) or part not in node:
        raise RenderError(f"fieldPath {field_path!r}: no field {part!r}")
    return node[part]


def get_field(doc: dict, field_path: str) -> Any:
    node: Any = doc
    for part in _split_path(field_path):
        node = _walk(node, part, field_path)
    return node


def set_field(doc: dict, field_path: str, value: Any) -> None:
    parts = _split_path(field_path)
    node: Any = doc
    for part in parts[:-1]:
        node = _walk(node, part, field_path)
    if not isinstance(node, dict) or parts[-1] not in node:
        # kustomize's default (create: false) only replaces a field that exists
        raise RenderError(f"fieldPath {field_path!r}: no field {parts[-1]!r} to replace")
    node[parts[-1]] = value


def _find(docs: list[dict], kind: str, name: str, what: str) -> dict:
    hits = [d for d in docs if _key(d) == (kind, name)]
    if len(hits) != 1:
        raise RenderError(f"{what}: {len(hits)} resources are {kind}/{name}, need exactly one")
    return hits[0]


def _images(docs: list[dict], images: list[dict]) -> None:
    for doc in docs:
        spec = ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            name, _, tag = c["image"].partition(":")
            for rule in images:
                if rule["name"] == name:
                    c["image"] = f"{rule.get('newName', name)}:{rule.get('newTag', tag)}".rstrip(":")


def _replacements(docs: list[dict], replacements: list[dict]) -> None:
    for r in replacements:
        src = r["source"]
        value = get_field(_find(docs, src["kind"], src["name"], "replacement source"), src["fieldPath"])
        for target in r["targets"]:
            sel = target["select"]
            doc = _find(docs, sel["kind"], sel["name"], "replacement target")
            for fp in target["fieldPaths"]:
                set_field(doc, fp, copy.deepcopy(value))


def render(directory: str | Path) -> list[dict]:
    """The documents `kubectl kustomize DIRECTORY` would print (for the supported subset)."""
    d = Path(directory)
    kfile = d / "kustomization.yaml"
    if not kfile.is_file():
        raise RenderError(f"{d} has no kustomization.yaml")
    k = yaml.safe_load(kfile.read_text()) or {}
    unknown = sorted(set(k) - KNOWN_FIELDS)
    if unknown:
        raise RenderError(f"{kfile}: fields {unknown} are not supported by this renderer "
                          f"(supported: {sorted(KNOWN_FIELDS)})")
    docs: list[dict] = []
    for res in k.get("resources", []):
        p = (d / res).resolve()
        docs += render(p) if p.is_dir() else _load_docs(p)
    for patch in k.get("patches", []):
        if set(patch) != {"path"}:
            raise RenderError(f"{kfile}: only `patches: - path: FILE` is supported, got {patch}")
        for pdoc in _load_docs(d / patch["path"]):
            target = _find(docs, *_key(pdoc), what=f"patch {patch['path']}")
            docs[docs.index(target)] = strategic_merge(target, pdoc)
    _images(docs, k.get("images", []))
    _replacements(docs, k.get("replacements", []))
    return docs


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python deploy/render_k8s.py KUSTOMIZE_DIR", file=sys.stderr)
        return 2
    try:
        docs = render(argv[0])
    except (RenderError, OSError, yaml.YAMLError) as e:
        print(f"render_k8s: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
