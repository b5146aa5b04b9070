"""Datasets as time-ordered item sequences per user, and LC-Rec's leave-one-out split.

The readers (:mod:`odllm.data.readers`) produce the same :class:`Dataset` from every format. Users with too
few interactions are dropped and counted, never silently.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from odllm.checks import settings_from
from odllm.data.fetch import fetch_ml100k
from odllm.data.readers import DataError, read_atomic, read_interactions_csv, read_lcrec

log = logging.getLogger(__name__)


@dataclass
class DatasetStats:
    users: int
    items: int
    interactions: int
    dropped_users: int = 0  # users with fewer than ``min_interactions`` interactions


@dataclass
class Dataset:
    name: str
    sequences: dict[str, list[str]]  # user -> items in time order
    semantic_index: dict[str, list[str]] | None = None  # item -> code tokens (LC-Rec index), if shipped
    item_text: dict[str, str] = field(default_factory=dict)  # item -> title etc., where the data has it
    dropped_users: int = 0

    @property
    def items(self) -> list[str]:
        """Every item that occurs in an interaction, numeric ids in numeric order."""
        seen = {i for seq in self.sequences.values() for i in seq}
        return sorted(seen, key=lambda i: (0, int(i), "") if i.isdigit() else (1, 0, i))

    @property
    def stats(self) -> DatasetStats:
        return DatasetStats(
            users=len(self.sequences),
            items=len(self.items),
            interactions=sum(len(s) for s in self.sequences.values()),
            dropped_users=self.dropped_users,
        )


@dataclass(frozen=True)
class Example:
    user: str
    history: list[str]
    target: str


@dataclass
class Split:
    train: dict[str, list[str]]  # user -> items before the valid target
    valid: list[Example]
    test: list[Example]


def leave_one_out(dataset: Dataset, max_history: int = 20) -> Split:
    """LC-Rec's split: test = last item, valid = second last, train = the rest; histories truncated."""
    if max_history < 1:
        raise ValueError(f"task.max_history must be at least 1, got {max_history}")
    train, valid, test = {}, [], []
    for user, seq in dataset.sequences.items():
        if len(seq) < 3:
            raise ValueError(f"user {user!r} has {len(seq)} interactions; the split needs at least 3")
        train[user] = seq[:-2]
        valid.append(Example(user, seq[:-2][-max_history:], seq[-2]))
        test.append(Example(user, seq[:-1][-max_history:], seq[-1]))
    return Split(train, valid, test)


@dataclass(frozen=True)
class DatasetSource:
    """Where a dataset lies and how to read it (a ``conf/dataset/*.yaml`` entry's reading part)."""

    name: str
    format: str  # atomic (RecBole), lcrec (LC-Rec JSON) or csv
    dir: str | None = None  # atomic, lcrec: the folder holding <name>.inter / <name>.inter.json
    path: str | None = None  # csv: the file
    fetch: bool = False  # atomic: download ml-100k when its files are missing
    require_index: bool = True  # lcrec: X.index.json must exist
    min_interactions: int = 3

    @classmethod
    def from_mapping(cls, values: Mapping) -> DatasetSource:
        """From a dataset config entry; its keys that are not about reading (item_tokens ...) are left out."""
        return settings_from(cls, values, skip_none=True)


def load_dataset(source: DatasetSource) -> Dataset:
    """Reads the dataset and logs its statistics."""
    index = None
    if source.format == "atomic":
        directory = Path(source.dir)
        if source.fetch and not (directory / f"{source.name}.inter").exists():
            fetch_ml100k(directory)
        sequences, text = read_atomic(directory, source.name)
    elif source.format == "lcrec":
        sequences, index, text = read_lcrec(Path(source.dir), source.name, require_index=source.require_index)
    elif source.format == "csv":
        sequences, text = read_interactions_csv(Path(source.path))
    else:
        raise ValueError(f"unknown dataset.format {source.format!r}; choose atomic, lcrec or csv")
    name, min_interactions = source.name, source.min_interactions
    dataset = Dataset(name, {}, index, text)
    dataset.sequences, dataset.dropped_users = drop_short(sequences, min_interactions)
    if not dataset.sequences:
        raise DataError(f"dataset {name}: no user has at least {min_interactions} interactions")
    if index is not None:
        missing = [i for i in dataset.items if i not in index]
        if missing:
            raise DataError(
                f"{len(missing)} items of {name}.inter.json have no code in {name}.index.json "
                f"(e.g. {missing[:5]}); the index must cover every item (rebuild it, or use "
                "dataset.item_tokens=atomic)"
            )
    s = dataset.stats
    log.info(
        "dataset %s: %d users, %d items, %d interactions (%d users with < %d interactions dropped)",
        name, s.users, s.items, s.interactions, s.dropped_users, min_interactions,
    )
    return dataset


def drop_short(sequences: Mapping[str, list[str]], min_interactions: int) -> tuple[dict, int]:
    if min_interactions < 3:
        raise ValueError("dataset.min_interactions must be at least 3 (one train, one valid, one test item)")
    kept = {u: s for u, s in sequences.items() if len(s) >= min_interactions}
    dropped = len(sequences) - len(kept)
    if dropped:
        log.warning("dropped %d users with fewer than %d interactions", dropped, min_interactions)
    return kept, dropped
