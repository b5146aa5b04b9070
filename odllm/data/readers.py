"""Readers of interaction files, each validating its input: RecBole atomic files (ml-100k), LC-Rec JSON
files (Instruments, Games, Arts) and a user's own CSV/TSV. Each returns user -> items in time order (and item
text where the files have it); a malformed or missing file is a :class:`DataError` naming the file and the fix.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file and the fix."""

def _require(path: Path, origin: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path} not found. {origin}")
    return path

def _json_no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise DataError(f"duplicate key {key!r}")
        out[key] = value
    return out

def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_json_no_duplicates)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except DataError as e:
        raise DataError(f"{path}: {e} (every user / item may appear only once)") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} must hold a JSON object at the top level, found {type(data).__name__}")
    return data

LCREC_ORIGIN = (
    "LC-Rec-format files come from LC-Rec's released data (X.inter.json, X.index.json) or from raw "
    "Amazon-2018 reviews run through a prepare step; set paths.data_dir or ODLLM_DATA_DIR to the folder "
    "that holds <Name>/<Name>.inter.json."
)

def read_lcrec(directory: Path, name: str, require_index: bool = True):
    """``X.inter.json`` (user -> item ids in time order), ``X.index.json`` (item -> tokens), ``X.item.json``."""
    inter = read_json(_require(directory / f"{name}.inter.json", LCREC_ORIGIN))
    sequences = {}
    for user, items in inter.items():
        if not isinstance(items, list) or not all(isinstance(i, int | str) for i in items):
            raise DataError(f"{directory / f'{name}.inter.json'}: user {user!r} must map to a list of item ids")
        sequences[str(user)] = [str(i) for i in items]
    index_path = directory / f"{name}.index.json"
    index = None
    if index_path.exists():
        raw = read_json(index_path)
        index = {}
        for item, code in raw.items():
            if not isinstance(code, list) or not code or not all(isinstance(t, str) for t in code):
                raise DataError(f"{index_path}: item {item!r} must map to a non-empty list of token strings")
            index[str(item)] = code
    elif require_index:
        _require(index_path, LCREC_ORIGIN)
    text = {}
    item_path = directory / f"{name}.item.json"
    if item_path.exists():
        for item, meta in read_json(item_path).items():
            text[str(item)] = _item_text(meta)
    return sequences, index, text

def _item_text(meta: object) -> str:
    if isinstance(meta, dict):
        parts = [str(meta[k]) for k in ("title", "categories", "brand") if meta.get(k)]
        return "; ".join(parts)
    return str(meta)

ATOMIC_ORIGIN = (
    "RecBole atomic files (<name>.inter with user_id, item_id, timestamp columns) are fetched for ml-100k "
    "when dataset.fetch=true; or point paths.data_dir / ODLLM_DATA_DIR at a folder holding <name>/<name>.inter."
)

def _read_atomic_table(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise DataError(f"{path} is empty")
    header = [h.split(":")[0] for h in rows[0]]
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"{path}, line {line}: {len(row)} fields, the header has {len(header)}")
    return header, rows[1:]

def read_atomic(directory: Path, name: str):
    """RecBole atomic files: ``<name>.inter`` and, optionally, ``<name>.item`` for item text."""
    path = _require(directory / f"{name}.inter", ATOMIC_ORIGIN)
    header, rows = _read_atomic_table(path)
    missing = {"user_id", "item_id", "timestamp"} - set(header)
    if missing:
        raise DataError(f"{path}: header lacks {sorted(missing)} (found {header})")
    u, i, t = header.index("user_id"), header.index("item_id"), header.index("timestamp")
    events = [(r[u], r[i], _float(r[t], path, n)) for n, r in enumerate(rows, start=2)]
    text = {}
    item_path = directory / f"{name}.item"
    if item_path.exists():
        header, rows = _read_atomic_table(item_path)
        fields = [h for h in ("movie_title", "title", "release_year", "class", "genre") if h in header]
        for r in rows:
            values = [r[header.index(f)] for f in fields]
            text[r[header.index("item_id")]] = "; ".join(v for v in values if v)
    return order_events(events), text

def _float(value: str, path: Path, line: int) -> float:
    try:
        return float(value)
    except ValueError:
        raise DataError(f"{path}, line {line}: timestamp {value!r} is not a number") from None

def order_events(events: list[tuple[str, str, float]]) -> dict[str, list[str]]:
    """Per-user time order (stable for ties: file order); repeated user-item pairs keep the first."""
    by_user: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for user, item, ts in events:
        by_user[user].append((ts, item))
    sequences = {}
    for user, seq in by_user.items():
        seen: set[str] = set()
        ordered = []
        for _, item in sorted(seq, key=lambda e: e[0]):
            if item not in seen:
                seen.add(item)
                ordered.append(item)
        sequences[user] = ordered
    return sequences

def read_interactions_csv(path: Path):
    """A user's own file: header ``user,item,timestamp[,title]``, comma or tab separated."""
    _require(path, "Pass dataset.path=/path/to/interactions.csv (columns user,item,timestamp[,title]).")
    with path.open(encoding="utf-8", newline="") as f:
        first = f.readline()
        f.seek(0)
        delimiter = "\t" if first.count("\t") > first.count(",") else ","
        reader = csv.DictReader(f, delimiter=delimiter)
        fields = [c.strip() for c in (reader.fieldnames or [])]
        missing = {"user", "item", "timestamp"} - set(fields)
        if missing:
            raise DataError(f"{path}: the header must name user, item, timestamp (missing {sorted(missing)})")
        reader.fieldnames = fields
        events, text = [], {}
        for line, row in enumerate(reader, start=2):
            if None in row.values() or None in row:
                raise DataError(f"{path}, line {line}: expected {len(fields)} fields")
            events.append((row["user"].strip(), row["item"].strip(), _float(row["timestamp"], path, line)))
            if row.get("title"):
                text[row["item"].strip()] = row["title"].strip()
    if not events:
        raise DataError(f"{path} has a header but no interactions")
    return order_events(events), text
