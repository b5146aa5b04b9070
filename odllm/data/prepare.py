"""``python -m odllm.data.prepare``: raw Amazon Reviews 2018 files -> an LC-Rec-format dataset with item text.

Input (JSON lines, gzip): ``<category>_5.json.gz`` (or the full ``<category>.json.gz``) with ``reviewerID``,
``asin``, ``unixReviewTime`` per review, and ``meta_<category>.json.gz`` with ``asin``, ``title``,
``description``, ``brand``, ``category``. Steps, in this order:

1. items without metadata (no meta record, or an empty title) are dropped;
2. each user's reviews are put in time order (ties keep file order) and repeated (user, item) pairs keep the
   first, so the k-core below counts distinct items;
3. k-core filtering iterated to a fixed point: users and items with fewer than ``k`` interactions are removed
   until none is left (removing an item can push a user under k, and the other way round);
4. users and items are renumbered from 0 in the order of their sorted ids (reviewerID, asin).

Output: ``<name>.inter.json`` (user -> item ids in time order) and ``<name>.item.json`` (item -> title,
description, brand, categories, asin), LC-Rec's file layout.
"""

from __future__ import annotations

import gzip
import html
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import hydra
from omegaconf import DictConfig

from odllm.checks import check_prepare, user_errors
from odllm.data.readers import DataError, order_events
from odllm.files import write_json

log = logging.getLogger(__name__)

AMAZON_ORIGIN = "Amazon Reviews 2018 files (https://nijianmo.github.io/amazon/): per-category reviews and metadata"


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    if not path.is_file():
        raise DataError(f"{path} not found; set prepare.raw_dir to the folder that holds the {AMAZON_ORIGIN}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {line_no}: not JSON ({e.msg}); expected one record per line") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}, line {line_no}: expected a JSON object per line")
            yield line_no, record


def clean_text(value: object, sep: str = " ") -> str:
    """Amazon text fields: strings or lists of strings (joined by ``sep``), with HTML entities and tags."""
    if isinstance(value, list):
        value = sep.join(str(v) for v in value if v)
    text = re.sub(r"<[^>]+>", " ", html.unescape(str(value or "")))
    return " ".join(text.split())


def read_meta(path: Path) -> dict[str, dict[str, str]]:
    """asin -> cleaned text fields, for items with a non-empty title (the first record of an asin wins)."""
    meta: dict[str, dict[str, str]] = {}
    for line_no, r in _json_lines(path):
        if "asin" not in r:
            raise DataError(f"{path}, line {line_no}: a metadata record needs an 'asin'")
        title = clean_text(r.get("title"))
        if title and r["asin"] not in meta:
            meta[r["asin"]] = {
                "title": title,
                "description": clean_text(r.get("description")),
                "brand": clean_text(r.get("brand")),
                "categories": clean_text(r.get("category"), sep=", "),
            }
    return meta


def read_reviews(path: Path) -> list[tuple[str, str, float]]:
    events = []
    for line_no, r in _json_lines(path):
        try:
            events.append((str(r["reviewerID"]), str(r["asin"]), float(r["unixReviewTime"])))
        except (KeyError, TypeError, ValueError):
            raise DataError(
                f"{path}, line {line_no}: a review needs reviewerID, asin and a numeric unixReviewTime"
            ) from None
    return events


def k_core(sequences: dict[str, list[str]], k: int) -> tuple[dict[str, list[str]], int]:
    """Removes users and items with fewer than ``k`` interactions until none is left; returns the rounds too."""
    rounds = 0
    while True:
        counts = Counter(i for seq in sequences.values() for i in seq)
        kept = {u: [i for i in seq if counts[i] >= k] for u, seq in sequences.items()}
        kept = {u: seq for u, seq in kept.items() if len(seq) >= k}
        if kept == sequences:
            return sequences, rounds
        sequences, rounds = kept, rounds + 1


def prepare_amazon(reviews: Path, meta_path: Path, k: int = 5) -> tuple[dict[str, list[int]], dict[str, dict]]:
    """Returns LC-Rec's ``inter`` (user -> item ids) and ``item`` (item id -> text fields) mappings."""
    meta = read_meta(meta_path)
    events = read_reviews(reviews)
    with_meta = [e for e in events if e[1] in meta]
    log.info("%d reviews, %d of them of the %d items with metadata", len(events), len(with_meta), len(meta))
    sequences, rounds = k_core(order_events(with_meta), k)
    if not sequences:
        raise DataError(f"{reviews}: no user and item is left after {k}-core filtering")
    items = sorted({i for seq in sequences.values() for i in seq})
    item_id = {asin: n for n, asin in enumerate(items)}
    inter = {str(n): [item_id[i] for i in sequences[u]] for n, u in enumerate(sorted(sequences))}
    item = {str(item_id[a]): {**meta[a], "asin": a} for a in items}
    log.info(
        "%d-core after %d rounds: %d users, %d items, %d interactions",
        k, rounds, len(inter), len(item), sum(len(s) for s in inter.values()),
    )
    return inter, item


def review_file(raw_dir: Path, category: str) -> Path:
    """``<category>_5.json.gz`` (the published 5-core) when present, else the full ``<category>.json.gz``."""
    five = raw_dir / f"{category}_5.json.gz"
    return five if five.is_file() else raw_dir / f"{category}.json.gz"


def prepare(raw_dir: str | Path, category: str, name: str, out_dir: str | Path, k: int = 5) -> Path:
    """Raw Amazon-2018 files of ``category`` in ``raw_dir`` -> ``<out_dir>/<name>/`` in LC-Rec's format."""
    raw = Path(raw_dir)
    inter, item = prepare_amazon(review_file(raw, category), raw / f"meta_{category}.json.gz", k)
    out = Path(out_dir) / name
    write_json(out / f"{name}.item.json", item)
    write_json(out / f"{name}.inter.json", inter)
    log.info("wrote %s; build an index with python -m odllm.index (see README)", out)
    return out


@hydra.main(version_base="1.3", config_path=str(Path(__file__).parents[2] / "conf"), config_name="prepare")
@user_errors
def main(cfg: DictConfig) -> None:
    check_prepare(cfg)
    p = cfg.prepare
    prepare(p.raw_dir, p.category, p.name, p.out_dir, p.k)


if __name__ == "__main__":
    main()
