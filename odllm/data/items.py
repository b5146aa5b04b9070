"""Item tokens: how each item is written as a short sequence of new vocabulary tokens.

Three kinds, chosen by ``dataset.item_tokens``: ``semantic`` (the dataset's own index, e.g. LC-Rec's 4 RQ-VAE
codes per item), ``learned`` (an index ``python -m odllm.index`` built, read from an LC-Rec-format
``<name>.index.json`` under ``paths.indices_dir``) and ``atomic`` (one fresh token per item). All of them are
an ``item -> code`` mapping made by :func:`build_item_codes`.

Shared codes: LC-Rec's released indices give a few items the same full code. The model can only emit
codes, so a recommendation is a code, and a code counts as a hit for every item that carries it (LC-Rec's
rule: exact match of the token string). ``ItemCodes.collisions`` reports how often that happens.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from odllm.data.dataset import Dataset
from odllm.data.readers import DataError, read_index, read_json

INDEX_FILE = "item_index.json"
INDEX_SUFFIX = ".index.json"  # a learned index: <paths.indices_dir>/<name>.index.json
REWRITE = "re-run train.py (compress.py for a compressed model) to write the model directory again"


@dataclass
class ItemCodes:
    """item id -> tuple of token strings; all codes have the same length."""

    codes: dict[str, tuple[str, ...]]
    kind: str = "semantic"
    _by_code: dict[tuple[str, ...], list[str]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.codes:
            raise ValueError("an item index needs at least one item")
        lengths = {len(c) for c in self.codes.values()}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(
                f"every item code must have the same non-zero length; found lengths {sorted(lengths)}. "
                "Pad short codes with an extra level (as TIGER does) before using the index."
            )
        self._by_code = defaultdict(list)
        for item, code in self.codes.items():
            self._by_code[code].append(item)

    @property
    def code_length(self) -> int:
        return len(next(iter(self.codes.values())))

    def tokens(self) -> list[str]:
        """The new vocabulary, in a stable order (level by level, then by name)."""
        levels: list[set[str]] = [set() for _ in range(self.code_length)]
        for code in self.codes.values():
            for level, tok in enumerate(code):
                levels[level].add(tok)
        seen: dict[str, None] = {}
        for level in levels:
            for tok in sorted(level):
                seen.setdefault(tok, None)
        return list(seen)

    def text(self, item: str) -> str:
        try:
            return "".join(self.codes[item])
        except KeyError:
            raise KeyError(f"item {item!r} has no code in the item index") from None

    def items_for(self, code: Sequence[str]) -> list[str]:
        return self._by_code.get(tuple(code), [])

    @property
    def collisions(self) -> int:
        """Items that share their full code with at least one other item."""
        return sum(len(v) for v in self._by_code.values() if len(v) > 1)

    @property
    def distinct_codes(self) -> int:
        return len(self._by_code)

    def save(self, directory: str | Path) -> None:
        payload = {"kind": self.kind, "codes": {k: list(v) for k, v in self.codes.items()}}
        (Path(directory) / INDEX_FILE).write_text(json.dumps(payload))

    @classmethod
    def load(cls, directory: str | Path) -> ItemCodes:
        """The index a saved model was trained with; a missing or damaged file is a :class:`DataError` that
        names it and the fix."""
        path = Path(directory) / INDEX_FILE
        if not path.is_file():
            raise DataError(f"{path} is missing: a model directory written by train.py holds its item index there; "
                            f"{REWRITE}")
        try:
            payload = read_json(path)
        except DataError as e:
            raise DataError(f"{e}; {REWRITE}") from None
        codes, kind = payload.get("codes"), payload.get("kind")
        if kind not in ("semantic", "learned", "atomic") or not isinstance(codes, dict):
            raise DataError(f"{path} is damaged: it needs \"kind\" (semantic, learned or atomic) and \"codes\" "
                            f"(item -> list of tokens), found kind={kind!r}, codes of type {type(codes).__name__}; "
                            f"{REWRITE}")
        bad = [item for item, code in codes.items()
               if not item.strip() or not isinstance(code, list) or not code
               or not all(isinstance(t, str) and t.strip() for t in code)]
        if bad:
            raise DataError(f"{path} is damaged: {len(bad)} items (e.g. {bad[:3]}) have a blank id or no list of "
                            f"token strings; {REWRITE}")
        try:
            return cls({k: tuple(v) for k, v in codes.items()}, kind=kind)
        except ValueError as e:  # empty, or codes of different lengths
            raise DataError(f"{path} is damaged: {e}; {REWRITE}") from None


def atomic_codes(items: Sequence[str]) -> ItemCodes:
    return ItemCodes({item: (f"<item_{item}>",) for item in items}, kind="atomic")


def build_item_codes(
    kind: str,
    items: Sequence[str],
    semantic_index: Mapping[str, Sequence[str]] | None,
    learned_index: Mapping[str, Sequence[str]] | None = None,
) -> ItemCodes:
    """The seam for item tokenisations: ``semantic`` (dataset index), ``learned`` (odllm's index) or ``atomic``."""
    if kind == "atomic":
        return atomic_codes(items)
    if kind not in ("semantic", "learned"):
        raise ValueError(f"unknown item token kind {kind!r}; choose 'semantic', 'learned' or 'atomic'")
    index = semantic_index if kind == "semantic" else learned_index
    if index is None:
        raise ValueError(
            "dataset.item_tokens=semantic needs the dataset's index file (X.index.json); "
            "use dataset.item_tokens=learned (python -m odllm.index) or atomic for datasets without one"
            if kind == "semantic"
            else "dataset.item_tokens=learned needs the index that python -m odllm.index wrote"
        )
    missing = [i for i in items if i not in index]
    if missing:
        raise ValueError(f"{len(missing)} items have no {kind} code, e.g. {missing[:5]}")
    return ItemCodes({i: tuple(index[i]) for i in items}, kind=kind)


def learned_index_path(index: str | None, indices_dir: str | Path) -> Path:
    """``dataset.index``: a path to an X.index.json file, or a name under ``paths.indices_dir``."""
    built = sorted(p.name.removesuffix(INDEX_SUFFIX) for p in Path(indices_dir).glob(f"*{INDEX_SUFFIX}"))
    hint = f"indices in {indices_dir}: {built or 'none'}; build one with `python -m odllm.index dataset=<name>`"
    if not index:
        raise ValueError(f"dataset.item_tokens=learned needs dataset.index=<name or path to X.index.json> ({hint})")
    path = Path(index) if index.endswith(".json") else Path(indices_dir) / f"{index}{INDEX_SUFFIX}"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found ({hint})")
    return path


def item_codes_for(dataset: Dataset, kind: str, index: str | None, indices_dir: str | Path) -> ItemCodes:
    """The item index of ``kind`` (``dataset.item_tokens``); a learned one (``dataset.index``, a name in
    ``indices_dir`` or a path) must cover every item of the dataset."""
    if kind != "learned":
        return build_item_codes(kind, dataset.items, dataset.semantic_index)
    path = learned_index_path(index, indices_dir)
    index = read_index(path)
    missing = [i for i in dataset.items if i not in index]
    if missing:
        raise DataError(
            f"{path} has no code for {len(missing)} items of {dataset.name} (e.g. {missing[:5]}): it was built for "
            f"other data; rebuild it with `python -m odllm.index dataset=...`"
        )
    return build_item_codes(kind, dataset.items, None, index)
