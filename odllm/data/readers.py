"""Readers of interaction files, each validating its input: RecBole atomic files (ml-100k), LC-Rec JSON
files (Instruments, Games, Arts) and a user's own CSV/TSV. Each returns user -> items in time order (and item
text where the files have it); a malformed or missing file is a :class:`DataError` naming the file and the fix.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file and the fix."""


def _require(path: Path, origin: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path} not found. {origin}")
    return path

UTF8_FIX = (
    "re-save it as UTF-8 (a spreadsheet: 'CSV UTF-8'; a shell: iconv -f <its encoding> -t UTF-8 in > out)"
)


def read_text(path: Path) -> str:
    """The file as UTF-8 text, with or without a byte-order mark; anything else is a :class:`DataError` naming
    the file, the first bad byte (offset and line) and the fix. Line ends (LF or CRLF) are left to the parser."""
    data = path.read_bytes()
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError(f"{path} is UTF-16 text (a byte-order mark says so), odllm reads UTF-8: {UTF8_FIX}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        bad = data[e.start : e.start + 4]
        raise DataError(
            f"{path} is not UTF-8 text: byte offset {e.start} (line {line}) starts {bad!r}; {UTF8_FIX}"
        ) from None


def blank(value: object) -> bool:
    return isinstance(value, str) and not value.strip()


def _json_no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise DataError(f"duplicate key {key!r}")
        out[key] = value
    return out


def read_json(path: Path) -> dict:
    try:
        data = json.loads(read_text(path), object_pairs_hook=_json_no_duplicates)
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


def missing_index_fix(name: str) -> str:
    """The two ways on when a dataset ships no X.index.json."""
    return (
        f"Either build an index with `python -m odllm.index dataset={name.lower()}` and train with "
        "`dataset.item_tokens=learned dataset.index=<its name> dataset.require_index=false`, or use one token per "
        "item: `dataset.item_tokens=atomic dataset.require_index=false`."
    )


def _item_id(value: object, path: Path, where: str) -> str:
    """An item id of a JSON file: a string or an integer, not blank (true/false, floats and null are refused)."""
    if isinstance(value, bool) or not isinstance(value, int | str) or blank(value):
        raise DataError(f"{path}: {where} holds the item id {value!r}; item ids are non-blank strings or integers")
    return str(value)


def read_lcrec(directory: Path, name: str, require_index: bool = True):
    """``X.inter.json`` (user -> item ids in time order), ``X.index.json`` (item -> tokens), ``X.item.json``."""
    inter_path = _require(directory / f"{name}.inter.json", LCREC_ORIGIN)
    sequences = {}
    for user, items in read_json(inter_path).items():
        if blank(user):
            raise DataError(f"{inter_path}: a blank user id {user!r}; give every user a non-blank id")
        if not isinstance(items, list):
            raise DataError(f"{inter_path}: user {user!r} must map to a list of item ids, found {type(items).__name__}")
        sequences[user] = [_item_id(i, inter_path, f"user {user!r}") for i in items]
    index_path = directory / f"{name}.index.json"
    index = None
    if index_path.exists():
        index = read_index(index_path)
    elif require_index:
        raise DataError(f"{index_path} not found: dataset.item_tokens=semantic needs the dataset's own item index. "
                        + missing_index_fix(name))
    text = {}
    item_path = directory / f"{name}.item.json"
    if item_path.exists():
        for item, meta in read_json(item_path).items():
            text[_item_id(item, item_path, "a key")] = _item_text(meta)
    return sequences, index, text


def read_index(path: Path) -> dict[str, list[str]]:
    """An LC-Rec-format item index ``{"item": ["<a_12>", "<b_3>", ...]}``: non-blank ids and tokens."""
    index = {}
    for item, code in read_json(path).items():
        _item_id(item, path, "a key")
        if not isinstance(code, list) or not code or not all(isinstance(t, str) and not blank(t) for t in code):
            raise DataError(f"{path}: item {item!r} must map to a non-empty list of non-blank token strings "
                            f"(found {code!r}); rebuild the index")
        index[item] = code
    return index


def _item_text(meta: object) -> str:
    if isinstance(meta, dict):
        parts = [str(meta[k]) for k in ("title", "categories", "brand") if meta.get(k)]
        return "; ".join(parts)
    return str(meta)

ATOMIC_ORIGIN = (
    "RecBole atomic files (<name>.inter with user_id, item_id, timestamp columns) are fetched for ml-100k "
    "when dataset.fetch=true; or point paths.data_dir / ODLLM_DATA_DIR at a folder holding <name>/<name>.inter."
)


def _read_atomic_table(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header names (types cut off) and the (line, fields) of every non-empty row; tab separated, LF or CRLF."""
    rows = list(csv.reader(io.StringIO(read_text(path), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise DataError(f"{path} is empty")
    header = [h.split(":")[0].strip() for h in rows[0]]
    body = [(line, row) for line, row in enumerate(rows[1:], start=2) if row]  # a blank line (e.g. the last) is skipped
    for line, row in body:
        if len(row) != len(header):
            raise DataError(f"{path}, line {line}: {len(row)} fields, the header has {len(header)} (tab separated)")
    return header, body


def read_atomic(directory: Path, name: str):
    """RecBole atomic files: ``<name>.inter`` and, optionally, ``<name>.item`` for item text."""
    path = _require(directory / f"{name}.inter", ATOMIC_ORIGIN)
    header, rows = _read_atomic_table(path)
    missing = {"user_id", "item_id", "timestamp"} - set(header)
    if missing:
        raise DataError(f"{path}: header lacks {sorted(missing)} (found {header})")
    u, i, t = header.index("user_id"), header.index("item_id"), header.index("timestamp")
    events = [_event(r[u], r[i], r[t], path, n, ("user_id", "item_id")) for n, r in rows]
    text = {}
    item_path = directory / f"{name}.item"
    if item_path.exists():
        header, rows = _read_atomic_table(item_path)
        if "item_id" not in header:
            raise DataError(f"{item_path}: header lacks ['item_id'] (found {header})")
        fields = [h for h in ("movie_title", "title", "release_year", "class", "genre") if h in header]
        for n, r in rows:
            item = _id(r[header.index("item_id")], item_path, n, "item_id")
            values = [r[header.index(f)] for f in fields]
            text[item] = "; ".join(v for v in values if v)
    return order_events(events), text


def _id(value: str, path: Path, line: int, column: str) -> str:
    value = value.strip()
    if not value:
        raise DataError(f"{path}, line {line}: the {column} cell is blank; fill it in or delete the line")
    return value


def _event(user: str, item: str, ts: str, path: Path, line: int, columns=("user", "item")) -> tuple[str, str, float]:
    """One interaction, checked: non-blank user and item ids, a finite timestamp."""
    return _id(user, path, line, columns[0]), _id(item, path, line, columns[1]), _float(ts, path, line)


def _float(value: str, path: Path, line: int) -> float:
    try:
        number = float(value)
    except ValueError:
        raise DataError(f"{path}, line {line}: timestamp {value!r} is not a number") from None
    if not math.isfinite(number):  # a NaN key breaks the sort of the whole user; inf would always be the test target
        raise DataError(f"{path}, line {line}: timestamp {value!r} is not a finite number; fix or delete the line")
    return number


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

DELIMITERS = {",": "comma", "\t": "tab", ";": "semicolon"}
CSV_COLUMNS = ("user", "item", "timestamp")


def _csv_header(path: Path, first_line: str) -> tuple[str, list[str]]:
    """The delimiter (comma, tab or semicolon: the one whose header names user, item, timestamp) and the
    column names (stripped, lower case)."""
    best = None
    for delimiter in DELIMITERS:
        fields = [c.strip().lower() for c in next(csv.reader([first_line], delimiter=delimiter), [])]
        missing = sorted(set(CSV_COLUMNS) - set(fields))
        if not missing:
            return delimiter, fields
        if best is None or len(fields) > len(best[1]):
            best = (delimiter, fields, missing)
    _, fields, missing = best
    raise DataError(
        f"{path}: the header must name user, item, timestamp[, title], separated by commas, tabs or semicolons "
        f"(missing {missing}; the first line reads {first_line.strip()[:80]!r})"
    )


def read_interactions_csv(path: Path):
    """A user's own file: header ``user,item,timestamp[,title]``, separated by commas, tabs or semicolons
    (spreadsheet exports: byte-order mark, CRLF line ends and quoted fields are read too)."""
    _require(path, "Pass dataset.path=/path/to/interactions.csv (columns user,item,timestamp[,title]).")
    text = read_text(path)
    if not text.strip():
        raise DataError(f"{path} is empty: it needs a header user,item,timestamp[,title] and one line per interaction")
    delimiter, fields = _csv_header(path, text.splitlines()[0])
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    reader.fieldnames = fields
    next(reader, None)  # the header row, parsed above
    events, titles = [], {}
    for row in reader:
        line = reader.line_num
        if None in row.values() or None in row:
            raise DataError(f"{path}, line {line}: expected {len(fields)} fields separated by "
                            f"{DELIMITERS[delimiter]}s, as in the header")
        events.append(_event(row["user"], row["item"], row["timestamp"], path, line))
        if row.get("title"):
            titles[events[-1][1]] = row["title"].strip()
    if not events:
        raise DataError(f"{path} has a header but no interactions")
    return order_events(events), titles
