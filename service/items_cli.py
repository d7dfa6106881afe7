"""`sidrec items add FILE --url URL` (token from SIDREC_ADMIN_TOKEN): bulk-ingest items into a running service.

Reads CSV, NDJSON (.jsonl/.ndjson) or Parquet, posts them to `POST /v1/items` in batches of up to
1,000 over one keep-alive connection (so every replica gets them through the catalogue log, and
SIDs are claimed atomically as for any other write), with a tqdm progress bar. Columns: `item_id`,
`text`, and `attributes` (an object in NDJSON, a JSON string in CSV/Parquet); in CSV/Parquet any
other column is an attribute too (values split on `|`). At the end it prints items/s and the
server's own split of the time into embedding (+ quantizing) and insertion (the atomic store
write and the local engine apply), then one JSON line.

Why through HTTP and not straight into Redis: the service owns the embedding model, the claim
script and the bounds; a second writer path would have to duplicate all three. Exit codes: 0 ok,
2 bad input, 3 the service refused or is unreachable.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence


def _attrs_from_row(row: dict[str, Any]) -> dict[str, list[str]] | None:
    attrs: dict[str, list[str]] = {}
    raw = row.pop("attributes", None)
    if isinstance(raw, str) and raw.strip():
        raw = json.loads(raw)
    if isinstance(raw, dict):
        attrs.update({str(k): [str(x) for x in (v if isinstance(v, list) else [v])] for k, v in raw.items()})
    for k, v in row.items():
        if k not in ("item_id", "text") and v not in (None, ""):
            attrs[k] = [x for x in str(v).split("|") if x]
    return attrs or None


def _item(row: dict[str, Any], where: str) -> dict[str, Any]:
    row = dict(row)
    if not row.get("item_id"):
        raise ValueError(f"{where}: no item_id")
    out: dict[str, Any] = {"item_id": str(row["item_id"])}
    if row.get("text"):
        out["text"] = str(row["text"])
    attrs = _attrs_from_row(row)
    if attrs is not None:
        out["attributes"] = attrs
    return out


def read_items(path: str | Path) -> Iterator[dict[str, Any]]:
    """Items from a CSV, NDJSON or Parquet file, validated row by row (errors name the row)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield _item(json.loads(line), f"{path}:{n}")
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
    elif suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","), 2):
                yield _item(row, f"{path}:{n}")
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError("reading Parquet needs pyarrow (pip install pyarrow)") from None
        for n, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield _item(row, f"{path}: row {n}")
    else:
        raise ValueError(f"{path}: unknown format {suffix!r}; use .csv, .tsv, .jsonl/.ndjson or .parquet")


def ingest(path: str, url: str, token: str, batch: int = 1000, progress: bool = True) -> dict[str, Any]:
    import httpx
    from tqdm import tqdm

    items = list(read_items(path))
    totals = {"read": 0.0, "embed": 0.0, "store": 0.0, "apply": 0.0}
    embedded, version, t0 = 0, None, time.perf_counter()
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=300.0) as client, \
            tqdm(total=len(items), unit="item", disable=not progress, desc="items") as bar:
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            r = client.post("/v1/items", json={"items": chunk})
            if r.status_code != 200:
                raise RuntimeError(f"items {start}..{start + len(chunk) - 1}: HTTP {r.status_code}: {r.text[:500]}")
            body = r.json()
            for k in totals:
                totals[k] += body["timings_ms"].get(k, 0.0) / 1e3
            embedded += body["embedded"]
            version = body["catalogue_version"]
            bar.update(len(chunk))
    wall = time.perf_counter() - t0
    n = len(items)
    insert_s = totals["store"] + totals["apply"]
    return {"items": n, "embedded": embedded, "wall_s": round(wall, 3), "items_per_s": round(n / wall, 1),
            "embed_s": round(totals["embed"], 3),
            "embed_items_per_s": round(embedded / totals["embed"], 1) if totals["embed"] else None,
            "insert_s": round(insert_s, 3), "insert_items_per_s": round(n / insert_s, 1) if insert_s else None,
            "catalogue_version": version}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sidrec items", description="bulk-ingest items into a running sidrec service")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("add", help="add or update items from a CSV / NDJSON / Parquet file")
    a.add_argument("file")
    a.add_argument("--url", default="http://127.0.0.1:8000", help="the service (default http://127.0.0.1:8000)")
    a.add_argument("--token", default=None, help=argparse.SUPPRESS)  # kept for scripts; prefer the environment
    a.add_argument("--batch", type=int, default=1000, help="items per request (1..1000, default 1000)")
    a.add_argument("--no-progress", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv[1:] if argv[:1] == ["items"] else argv)  # sidrec.cli passes its command too
    token = args.token or os.environ.get("SIDREC_ADMIN_TOKEN")
    if not token:  # read from the environment: a token on the command line shows in `ps`
        print("sidrec items: set SIDREC_ADMIN_TOKEN to the service's admin token", file=sys.stderr)
        return 2
    if not 1 <= args.batch <= 1000:
        print("sidrec items: --batch must be within 1..1000", file=sys.stderr)
        return 2
    try:
        rep = ingest(args.file, args.url, token, args.batch, not args.no_progress)
    except (ValueError, OSError) as e:
        print(f"sidrec items: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # HTTP refusals, connection errors
        print(f"sidrec items: {type(e).__name__}: {e}", file=sys.stderr)
        return 3
    print(f"{rep['items']} items in {rep['wall_s']} s ({rep['items_per_s']} items/s); embedding "
          f"{rep['embed_s']} s ({rep['embed_items_per_s']} items/s), insertion {rep['insert_s']} s "
          f"({rep['insert_items_per_s']} items/s)")
    print(json.dumps(rep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
