"""`sidrec items add FILE --url URL` (token from SIDREC_ADMIN_TOKEN): bulk-ingest items into a running service.

Reads CSV, NDJSON (.jsonl/.ndjson) or Parquet, posts them to `POST /v1/items` in batches of up to
1,000 over one keep-alive connection (so every replica gets them through the catalogue log, and
SIDs are claimed atomically as for any other write), with a tqdm progress bar. Columns: `item_id`,
`text`, and `attributes` (an object in NDJSON, a JSON string in CSV/Parquet); in CSV/Parquet any
other column is an attribute too (values split on `|`). At the end it prints items/s and the
server's own split of the time into embedding (+ quantizing) and insertion (the atomic store
write and the local engine apply), then one JSON line. A busy or restarting service (429, 502-504,
no connection) is retried with its Retry-After; a batch it refuses (409 sid_space_full, 422) is
reported and the load goes on with the next one, since each write is all or nothing.

Why through HTTP and not straight into Redis: the service owns the embedding model, the claim
script and the bounds; a second writer path would have to duplicate all three. Exit codes: 0 ok,
1 some batches were refused (listed), 2 bad input, 3 the token was refused or the service is
unreachable.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence


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


RETRY_STATUSES = (429, 502, 503, 504)  # the service is busy or restarting: the same batch may pass later


def _post(client: Any, chunk: list[dict], retries: int, sleep: Callable[[float], None] = time.sleep) -> Any:
    """POST one batch; a busy or restarting service (429/5xx with Retry-After, or no connection)
    is retried up to `retries` times, waiting what it asks (capped at 30 s). Returns the response,
    or raises the last connection error."""
    import httpx

    for attempt in range(retries + 1):
        try:
            r = client.post("/v1/items", json={"items": chunk})
        except httpx.TransportError:
            if attempt == retries:
                raise
            sleep(min(2.0 ** attempt, 30.0))
            continue
        if r.status_code not in RETRY_STATUSES or attempt == retries:
            return r
        try:
            wait = float(r.headers.get("retry-after", 2.0 ** attempt))
        except ValueError:
            wait = 2.0 ** attempt
        sleep(min(max(wait, 0.1), 30.0))
    raise AssertionError("unreachable")


def _refusal(r: Any) -> dict[str, Any]:
    try:
        err = r.json().get("error", {})
    except ValueError:
        err = {}
    return {"status": r.status_code, "code": err.get("code"), "message": (err.get("message") or r.text)[:300]}


def ingest(path: str, url: str, token: str, batch: int = 1000, progress: bool = True,
           retries: int = 5, transport: Any = None) -> dict[str, Any]:
    """Write the file's items in batches. A batch the service refuses (say 409 sid_space_full: the
    write is all or nothing) is recorded and the load goes on with the next one; the report counts
    items written and lists the refused batches. Timings come from the service's own split."""
    import httpx
    from tqdm import tqdm

    items = list(read_items(path))
    totals = {"read": 0.0, "embed": 0.0, "store": 0.0, "apply": 0.0}
    embedded, written, version, t0 = 0, 0, None, time.perf_counter()
    refused: list[dict[str, Any]] = []
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=300.0, transport=transport) as client, \
            tqdm(total=len(items), unit="item", disable=not progress, desc="items") as bar:
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            r = _post(client, chunk, retries)
            bar.update(len(chunk))
            if r.status_code in (401, 403):  # no later batch can pass either
                raise RuntimeError(f"items {start}..: HTTP {r.status_code}: {_refusal(r)['message']}")
            if r.status_code != 200:
                refused.append({"items": f"{start}..{start + len(chunk) - 1}", **_refusal(r)})
                bar.set_postfix(refused_batches=len(refused))
                continue
            body = r.json()
            for k in totals:
                totals[k] += body["timings_ms"].get(k, 0.0) / 1e3
            embedded += body["embedded"]
            written += len(chunk)
            version = body["catalogue_version"]
    wall = time.perf_counter() - t0
    insert_s = totals["store"] + totals["apply"]
    return {"items": len(items), "written": written, "refused_items": len(items) - written,
            "refused_batches": refused[:20], "embedded": embedded, "wall_s": round(wall, 3),
            "items_per_s": round(written / wall, 1),
            "embed_s": round(totals["embed"], 3),
            "embed_items_per_s": round(embedded / totals["embed"], 1) if totals["embed"] else None,
            "insert_s": round(insert_s, 3), "insert_items_per_s": round(written / insert_s, 1) if insert_s else None,
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
    print(f"{rep['written']} of {rep['items']} items written in {rep['wall_s']} s ({rep['items_per_s']} items/s); "
          f"embedding {rep['embed_s']} s ({rep['embed_items_per_s']} items/s), insertion {rep['insert_s']} s "
          f"({rep['insert_items_per_s']} items/s)")
    for b in rep["refused_batches"]:
        print(f"sidrec items: refused {b['items']}: HTTP {b['status']} {b['code']}: {b['message']}", file=sys.stderr)
    print(json.dumps(rep))
    if rep["refused_items"]:
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
