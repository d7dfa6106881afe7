"""Interaction-log readers, the leave-one-out split and sliding training windows.

Reads three formats into one `InteractionData` (dense internal item and user indices, per-user
item sequences oldest first, per-item text fields, and a fingerprint of the inputs):

- P5 / TIGER (`sequential_data.txt` + `item_text.tsv`, or `item_titles.tsv` as fallback);
- a generic interactions table plus an items table, CSV/TSV or Parquet (`read_interactions`);
- RecBole atomic files (`<name>.inter` + `<name>.item`).

Policy for imperfect input, the same in every reader:
- anything malformed (missing file or column, wrong field count, non-integer P5 token, an item
  in the log that the item table lacks, duplicate ids, an empty catalogue) raises `DataError`
  naming the file, the line (or row) or id, and what was expected;
- users with fewer than `min_interactions` (default 3, what leave-one-out needs) and items
  without text (identifiers such as `asin` do not count) are soft problems: by default one
  `warnings.warn` gives the count and a few ids, the users are dropped and the items kept (the
  embedding stage decides what they get); `strict=True` turns both into errors.

This module is not the model's input encoding (SID tokens, padding to tokens) nor the
evaluation protocol; it only produces item-index sequences and splits them.
"""
from __future__ import annotations

import csv
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

P5_SEQUENCES = "sequential_data.txt"
P5_ITEM_FILES = ("item_text.tsv", "item_titles.tsv")
P5_DEFAULT_COLUMNS = {3: ("item_id", "asin", "title"), 5: ("item_id", "asin", "title", "categories", "brand")}
ID_FIELDS = frozenset({"asin"})  # fields kept in item_fields that are identifiers, not text
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq", ".csv.gz", ".tsv.gz")


class DataError(ValueError):
    """Bad input data; the message names the file, line or id at fault and what was expected."""


@dataclass(frozen=True, eq=False)
class InteractionData:
    name: str
    item_ids: list[str]  # internal item index -> external item id
    item_fields: list[dict[str, str]]  # per internal item: non-empty text fields
    user_ids: list[str]  # internal user index -> external user id
    sequences: list[np.ndarray]  # per user: int64 internal item indices, oldest first
    fingerprint: str  # sha256 hex of the input files' contents and the reader options

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))


@dataclass(frozen=True, eq=False)
class Split:
    """Leave-one-out split as in TIGER/P5: last item tests, second-to-last validates."""

    train: list[np.ndarray]  # per user: seq[:-2]
    valid_history: list[np.ndarray]  # per user: seq[:-2]
    valid_target: np.ndarray  # (U,) seq[-2]
    test_history: list[np.ndarray]  # per user: seq[:-1]
    test_target: np.ndarray  # (U,) seq[-1]


def fingerprint_bytes(blobs: Sequence[bytes], options: dict) -> str:
    """sha256 over the reader options and each file's bytes (names excluded, so a copy of the
    same data in another directory, or written by `write_p5`, has the same fingerprint)."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for b in blobs:
        h.update(b"\0file\0")
        h.update(b)
    return h.hexdigest()


def fingerprint(paths: Sequence[Path], options: dict) -> str:
    return fingerprint_bytes([Path(p).read_bytes() for p in paths], options)


def p5_options(items_file: str = P5_ITEM_FILES[0], min_interactions: int = 3, strict: bool = False) -> dict:
    return {"reader": "p5", "items_file": items_file, "min_interactions": min_interactions, "strict": strict}


def _few(ids: Sequence[object], k: int = 5) -> str:
    shown = ", ".join(repr(str(i)) for i in list(ids)[:k])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > k else "")


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    return path


def _finish(name: str, source: str, item_ids: list[str], item_fields: list[dict[str, str]],
            user_ids: list[str], sequences: list[np.ndarray], fp: str,
            min_interactions: int, strict: bool) -> InteractionData:
    """Shared tail of every reader: empty-catalogue check, short users, items without text."""
    if not item_ids:
        raise DataError(f"{source}: the item catalogue is empty (expected at least one item)")
    short = [u for u, s in zip(user_ids, sequences) if len(s) < min_interactions]
    if short:
        msg = (f"{source}: {len(short)} of {len(user_ids)} users have fewer than {min_interactions} "
               f"interactions (leave-one-out needs 3): {_few(short)}")
        if strict:
            raise DataError(msg)
        warnings.warn(msg + "; they were dropped (strict=True makes this an error)", stacklevel=3)
        keep = [i for i, s in enumerate(sequences) if len(s) >= min_interactions]
        user_ids = [user_ids[i] for i in keep]
        sequences = [sequences[i] for i in keep]
    if not user_ids:
        raise DataError(f"{source}: no user has at least {min_interactions} interactions")
    textless = [item_ids[i] for i, f in enumerate(item_fields) if not (f.keys() - ID_FIELDS)]
    if textless:
        msg = f"{source}: {len(textless)} items have no text at all: {_few(textless)}"
        if strict:
            raise DataError(msg)
        warnings.warn(msg + " (kept; embed_items(allow_empty=True) embeds their id instead)", stacklevel=3)
    return InteractionData(name, item_ids, item_fields, user_ids, sequences, fp)


def _fields_from_columns(columns: dict[str, Sequence[object]], n: int) -> list[dict[str, str]]:
    """Per-row dicts of the non-empty, non-null values of the given text columns."""
    out: list[dict[str, str]] = [{} for _ in range(n)]
    for col, values in columns.items():
        for row, v in zip(out, values):
            s = "" if v is None or (isinstance(v, float) and v != v) else str(v).strip()
            if s:
                row[col] = s
    return out


def _read_p5_items(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise DataError(f"{path}: the item catalogue is empty (expected at least one item)")
    first = lines[0].rstrip("\r").split("\t")
    if first[0] == "item_id":
        columns, start = tuple(first), 1
    elif len(first) in P5_DEFAULT_COLUMNS:
        columns, start = P5_DEFAULT_COLUMNS[len(first)], 0
    else:
        raise DataError(f"{path}:1: expected a header 'item_id<TAB>...' or 3/5 tab-separated columns "
                        f"(item_id, asin, title[, categories, brand]), got {len(first)} columns")
    item_ids: list[str] = []
    item_fields: list[dict[str, str]] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(lines[start:], start=start + 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) != len(columns):
            raise DataError(f"{path}:{lineno}: expected {len(columns)} tab-separated fields "
                            f"({', '.join(columns)}), got {len(cells)}")
        iid = cells[0].strip()
        if not iid:
            raise DataError(f"{path}:{lineno}: empty item_id")
        if iid in seen:
            raise DataError(f"{path}:{lineno}: item id {iid!r} already defined on line {seen[iid]}")
        seen[iid] = lineno
        item_ids.append(iid)
        item_fields.append({c: v.strip() for c, v in zip(columns[1:], cells[1:]) if v.strip()})
    return item_ids, item_fields


def read_p5(directory: str | Path, *, min_interactions: int = 3, strict: bool = False) -> InteractionData:
    """Read the P5/TIGER layout: `sequential_data.txt` (`user item_1 ... item_n`, integer ids,
    time order) and `item_text.tsv` (or `item_titles.tsv`). Internal item order = item-file order."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"P5 dataset directory {directory} does not exist")
    seq_path = _require_file(directory / P5_SEQUENCES, "P5 sequence file")
    items_path = next((directory / f for f in P5_ITEM_FILES if (directory / f).is_file()), None)
    if items_path is None:
        raise DataError(f"P5 dataset {directory} has no item table: expected {' or '.join(P5_ITEM_FILES)}")
    item_ids, item_fields = _read_p5_items(items_path)
    if not item_ids:
        raise DataError(f"{items_path}: the item catalogue is empty (expected at least one item)")
    index = {iid: i for i, iid in enumerate(item_ids)}
    user_ids: list[str] = []
    sequences: list[np.ndarray] = []
    seen: dict[str, int] = {}
    with open(seq_path, encoding="utf-8", errors="replace") as f:  # bad bytes fail the integer check
        for lineno, line in enumerate(f, start=1):
            tokens = line.split()
            if not tokens:
                continue
            bad = next((t for t in tokens if not (t.isascii() and t.isdigit())), None)
            if bad is not None:
                raise DataError(f"{seq_path}:{lineno}: expected 'user_id item_1 ... item_n' with "
                                f"integer ids separated by spaces, found {bad[:40]!r}")
            uid = tokens[0]
            if uid in seen:
                raise DataError(f"{seq_path}:{lineno}: user {uid!r} already appears on line {seen[uid]}")
            seen[uid] = lineno
            try:
                seq = np.array([index[t] for t in tokens[1:]], dtype=np.int64)
            except KeyError as e:
                raise DataError(f"{seq_path}:{lineno}: item {e.args[0]!r} (user {uid!r}) is not in "
                                f"the item table {items_path.name}") from None
            user_ids.append(uid)
            sequences.append(seq)
    fp = fingerprint([seq_path, items_path], p5_options(items_path.name, min_interactions, strict))
    return _finish(directory.name, str(directory), item_ids, item_fields, user_ids, sequences, fp,
                   min_interactions, strict)


def _read_table(path: Path, what: str):
    import pandas as pd

    _require_file(path, what)
    name = path.name.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            return pd.read_parquet(path), False
        sep = "\t" if name.endswith((".tsv", ".tsv.gz", ".inter", ".item")) else ","
        quoting = csv.QUOTE_NONE if name.endswith((".inter", ".item")) else csv.QUOTE_MINIMAL
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, quoting=quoting), True
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as e:
        raise DataError(f"{what} {path} could not be parsed: {str(e).splitlines()[0][:300]}") from None


def _require_columns(df, path: Path, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; the file has {list(df.columns)}")


def _where(path: Path, text: bool) -> Callable[[int], str]:
    # row r of a text table sits on line r + 2 (line 1 is the header)
    return (lambda r: f"{path}:{r + 2}") if text else (lambda r: f"{path} row {r}")


def _to_key_array(series, path: Path, col: str, where: Callable[[int], str]) -> np.ndarray:
    isna = series.isna().to_numpy()
    s = series.astype(str).str.strip().to_numpy(dtype=object)
    bad = np.flatnonzero(isna | (s == ""))
    if len(bad):
        raise DataError(f"{where(int(bad[0]))}: empty {col!r} ({len(bad)} rows in {path.name} lack one)")
    return s


def _to_times(series, path: Path, col: str, where: Callable[[int], str]) -> np.ndarray:
    import pandas as pd

    num = pd.to_numeric(series, errors="coerce")
    if num.isna().any():
        with warnings.catch_warnings():  # mixed formats fall back to dateutil; that is fine here
            warnings.simplefilter("ignore", UserWarning)
            dt = pd.to_datetime(series, errors="coerce", utc=True)
        if dt.isna().any():
            r = int(np.flatnonzero((num.isna() & dt.isna()).to_numpy())[0])
            raise DataError(f"{where(r)}: {col!r} must be a number or a date, got {series.iloc[r]!r}")
        return dt.astype("int64").to_numpy(dtype=np.float64)
    return num.to_numpy(dtype=np.float64)


def _from_tables(name: str, inter, inter_path: Path, inter_text: bool, items, items_path: Path,
                 items_text: bool, user_col: str, item_col: str, time_col: str | None,
                 text_columns: Sequence[str] | None, fp: str, min_interactions: int,
                 strict: bool) -> InteractionData:
    import pandas as pd

    _require_columns(inter, inter_path, [user_col, item_col] + ([time_col] if time_col else []))
    _require_columns(items, items_path, [item_col] + list(text_columns or []))
    iw, tw = _where(inter_path, inter_text), _where(items_path, items_text)
    item_keys = _to_key_array(items[item_col], items_path, item_col, tw)
    if len(item_keys) == 0:
        raise DataError(f"{items_path}: the item catalogue is empty (expected at least one item)")
    dup = pd.Index(item_keys).duplicated()
    if dup.any():
        r = int(np.flatnonzero(dup)[0])
        raise DataError(f"{tw(r)}: item id {item_keys[r]!r} appears more than once in the item table")
    cols = list(text_columns) if text_columns is not None else [c for c in items.columns if c != item_col]
    item_fields = _fields_from_columns({c: items[c].tolist() for c in cols}, len(item_keys))

    users = _to_key_array(inter[user_col], inter_path, user_col, iw)
    icodes = pd.Index(item_keys).get_indexer(_to_key_array(inter[item_col], inter_path, item_col, iw))
    unknown = np.flatnonzero(icodes < 0)
    if len(unknown):
        ids = list(dict.fromkeys(str(inter[item_col].iloc[r]).strip() for r in unknown[:1000]))
        raise DataError(f"{iw(int(unknown[0]))}: item {ids[0]!r} is not in the item table {items_path}; "
                        f"{len(unknown)} interactions name unknown items: {_few(ids)}")
    ucodes, uniques = pd.factorize(users)  # users in order of first appearance
    times = _to_times(inter[time_col], inter_path, time_col, iw) if time_col else np.zeros(len(users))
    order = np.lexsort((times, ucodes))  # stable: equal timestamps keep file order
    bounds = np.cumsum(np.bincount(ucodes, minlength=len(uniques)))[:-1]
    sequences = np.split(icodes[order].astype(np.int64), bounds)
    return _finish(name, str(inter_path), [str(k) for k in item_keys], item_fields,
                   [str(u) for u in uniques], sequences, fp, min_interactions, strict)


def read_interactions(interactions_path: str | Path, items_path: str | Path, *, user_col: str = "user_id",
                      item_col: str = "item_id", time_col: str | None = "timestamp",
                      text_columns: Sequence[str] | None = None, min_interactions: int = 3,
                      strict: bool = False) -> InteractionData:
    """Read an interactions table (user, item, timestamp; CSV/TSV/Parquet) and an items table
    (`item_col` + text columns; all other columns if `text_columns` is None). Each user's events
    are sorted by timestamp, stably; `time_col=None` keeps file order."""
    ip, tp = Path(interactions_path), Path(items_path)
    inter, inter_text = _read_table(ip, "interactions file")
    items, items_text = _read_table(tp, "items file")
    opts = {"reader": "interactions", "user_col": user_col, "item_col": item_col, "time_col": time_col,
            "text_columns": list(text_columns) if text_columns is not None else None,
            "min_interactions": min_interactions, "strict": strict}
    fp = fingerprint([ip, tp], opts)
    return _from_tables(ip.stem.split(".")[0], inter, ip, inter_text, items, tp, items_text, user_col,
                        item_col, time_col, text_columns, fp, min_interactions, strict)


def _recbole_paths(directory_or_prefix: str | Path) -> tuple[Path, Path]:
    p = Path(directory_or_prefix)
    if p.is_dir():
        inters = sorted(p.glob("*.inter"))
        if len(inters) != 1:
            raise DataError(f"RecBole directory {p} must hold exactly one .inter file, found "
                            f"{[x.name for x in inters] or 'none'}")
        prefix = inters[0].with_suffix("")
    else:
        prefix = p.with_suffix("") if p.suffix in (".inter", ".item") else p
    return (_require_file(prefix.with_name(prefix.name + ".inter"), "RecBole interaction file"),
            _require_file(prefix.with_name(prefix.name + ".item"), "RecBole item file"))


def read_recbole(directory_or_prefix: str | Path, *, min_interactions: int = 3,
                 strict: bool = False) -> InteractionData:
    """Read RecBole atomic files `<name>.inter` (`user_id:token item_id:token timestamp:float ...`)
    and `<name>.item` (`item_id:token` + text fields). Header types are stripped from names."""
    inter_path, item_path = _recbole_paths(directory_or_prefix)
    inter, _ = _read_table(inter_path, "RecBole interaction file")
    items, _ = _read_table(item_path, "RecBole item file")
    for df in (inter, items):
        df.columns = [str(c).split(":", 1)[0].strip() for c in df.columns]
    text_cols = [c for c in items.columns if c != "item_id"]
    time_col = "timestamp" if "timestamp" in inter.columns else None
    opts = {"reader": "recbole", "min_interactions": min_interactions, "strict": strict}
    fp = fingerprint([inter_path, item_path], opts)
    return _from_tables(inter_path.stem, inter, inter_path, True, items, item_path, True, "user_id",
                        "item_id", time_col, text_cols, fp, min_interactions, strict)


def _find_table(directory: Path, stem: str) -> Path | None:
    return next((directory / (stem + s) for s in TABLE_SUFFIXES if (directory / (stem + s)).is_file()), None)


def load_dataset(path: str | Path, **options) -> InteractionData:
    """Read a dataset, detecting its format from the files present:
    P5 (`sequential_data.txt`), RecBole (`*.inter` or a prefix), or `interactions.*` + `items.*`."""
    p = Path(path)
    if p.is_dir() and (p / P5_SEQUENCES).is_file():
        return read_p5(p, **options)
    if (p.is_dir() and any(p.glob("*.inter"))) or p.suffix == ".inter" or p.with_name(p.name + ".inter").is_file():
        return read_recbole(p, **options)
    if p.is_dir():
        inter, items = _find_table(p, "interactions"), _find_table(p, "items")
        if inter and items:
            return read_interactions(inter, items, **options)
        present = sorted(x.name for x in p.iterdir())[:20]
        raise DataError(f"{p}: no known dataset layout; expected {P5_SEQUENCES} (P5), a *.inter file "
                        f"(RecBole), or interactions.{{csv,tsv,parquet}} + items.{{csv,tsv,parquet}}; "
                        f"found {present}")
    raise DataError(f"dataset path {p} does not exist (expected a directory or a RecBole prefix)")


def leave_one_out(data: InteractionData) -> Split:
    """Last item -> test target, second-to-last -> validation target, the rest -> training."""
    short = [u for u, s in zip(data.user_ids, data.sequences) if len(s) < 3]
    if short:
        raise DataError(f"{data.name}: leave-one-out needs >= 3 interactions per user; "
                        f"{len(short)} users have fewer: {_few(short)}")
    seqs = data.sequences
    train = [s[:-2] for s in seqs]
    return Split(train, list(train), np.array([s[-2] for s in seqs], dtype=np.int64),
                 [s[:-1] for s in seqs], np.array([s[-1] for s in seqs], dtype=np.int64))


def sliding_windows(train: list[np.ndarray], max_history: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (history -> next item) pair inside each sequence: for t in 1..n-1 the history is
    seq[max(0, t - max_history):t] and the target seq[t]. S = sum over sequences of max(n - 1, 0).

    Returns (hist_items (S, H) int64 left-padded with -1, most recent item last; hist_len (S,);
    target (S,)), built without a Python loop over windows.
    """
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    lens = np.fromiter((len(s) for s in train), dtype=np.int64, count=len(train))
    H = int(max_history)
    if lens.sum() == 0 or (lens <= 1).all():
        return np.full((0, H), -1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in train])  # (sum n,)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])  # (U,)
    nwin = np.maximum(lens - 1, 0)  # (U,)
    seq_of = np.repeat(np.arange(len(train)), nwin)  # (S,)
    first = np.repeat(np.cumsum(nwin) - nwin, nwin)  # (S,) index of the sequence's first window
    t = np.arange(len(seq_of)) - first + 1  # (S,) position of the target inside its sequence
    tpos = starts[seq_of] + t  # (S,) target position in `flat`
    pos = tpos[:, None] - H + np.arange(H)[None, :]  # (S, H)
    valid = pos >= starts[seq_of][:, None]  # (S, H)
    hist = np.where(valid, flat[np.clip(pos, 0, None)], -1)  # (S, H)
    return hist.astype(np.int64), np.minimum(t, H).astype(np.int64), flat[tpos]


def popularity(train: list[np.ndarray], num_items: int) -> np.ndarray:
    """(N,) interaction counts over the training sequences."""
    flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in train] + [np.zeros(0, np.int64)])
    if len(flat) and (flat.min() < 0 or flat.max() >= num_items):
        raise DataError(f"training sequences hold item index {int(flat.max())} outside [0, {num_items})")
    return np.bincount(flat, minlength=num_items).astype(np.int64)
