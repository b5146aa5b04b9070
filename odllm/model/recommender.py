"""A recommender on disk: model + tokenizer + item index + task settings, in one directory.

train.py writes it, compress.py and evaluate.py read it. The directory is written atomically: a killed
run never leaves a half-written model where a good one was (:mod:`odllm.files`). Loading checks every part
first, so a missing or damaged file is a :class:`SavedModelError` that names it and the fix, and it refuses a
model trained on another dataset unless asked (:func:`check_dataset`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from odllm.data.items import ItemCodes
from odllm.data.prompts import SeqRecEncoder
from odllm.data.readers import DataError
from odllm.eval.generation import ItemTrie, recommend
from odllm.files import recover_directory, write_directory_atomically

META_FILE = "odllm.json"
COMPRESSION_FILE = "compression.json"  # written beside the weights by odllm.compress.saved
SHARD_INDEX = "model.safetensors.index.json"
JSON_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json",
              "special_tokens_map.json", SHARD_INDEX, COMPRESSION_FILE)


class SavedModelError(DataError):
    """A saved model directory lacks a file or holds a damaged one; the message names the file and the fix."""


def rewrite_hint(directory: Path) -> str:
    """The fix for a damaged model directory: write it again with the job that wrote it."""
    try:
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = None
    if (directory / COMPRESSION_FILE).exists() or (isinstance(meta, dict) and meta.get("compression")):
        return f"re-run compress.py (model_dir=<the dense model>) to write {directory} again"
    return f"re-run train.py to write {directory} again (or pass model_dir=<another saved model>)"


@contextmanager
def reading(path: Path, fix: str) -> Iterator[None]:
    """Any failure of a library reading ``path`` becomes a :class:`SavedModelError` naming it and ``fix``
    (the library's exception stays chained, for HYDRA_FULL_ERROR=1)."""
    try:
        yield
    except SavedModelError:
        raise
    except Exception as e:  # safetensors, tokenizers and transformers raise their own types for a damaged file
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise SavedModelError(f"{path} is damaged or incomplete ({detail}); {fix}") from e


def check_saved_files(directory: Path, fix: str) -> None:
    """Every JSON file parses, every weight file is there with a complete safetensors header (a truncated file
    fails here: its header promises more bytes than the file holds)."""
    for name in JSON_FILES:
        if (directory / name).exists():
            with reading(directory / name, fix):
                json.loads((directory / name).read_text(encoding="utf-8"))
    if (directory / SHARD_INDEX).exists():
        with reading(directory / SHARD_INDEX, fix):
            files = sorted(set(json.loads((directory / SHARD_INDEX).read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    for file in files:
        if not (directory / file).is_file():
            raise SavedModelError(f"{directory / file} is missing (weights are saved as safetensors); {fix}")
        with reading(directory / file, fix), safe_open(directory / file, framework="pt") as f:
            list(f.keys())
    if not (directory / "tokenizer_config.json").is_file():
        raise SavedModelError(f"{directory / 'tokenizer_config.json'} is missing (the tokenizer's settings); {fix}")


def read_meta(directory: Path, fix: str) -> dict:
    """``odllm.json``: the task settings and provenance (dataset, item tokens, compression) of a saved model."""
    path = directory / META_FILE
    if not path.is_file():
        raise SavedModelError(f"{path} is missing (the model's dataset and settings); {fix}")
    with reading(path, fix):
        meta = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(meta, dict):
        raise SavedModelError(f"{path} must hold a JSON object, found {type(meta).__name__}; {fix}")
    return meta


def check_dataset(meta: dict, model_dir: Path, dataset: str, allow_other_dataset: bool = False) -> None:
    """A model is compressed or evaluated on the dataset it was trained on (``dataset`` in its odllm.json), not on
    another one whose items happen to be a subset; ``allow_other_dataset`` (config key) is the explicit override.
    Models saved before odllm.json recorded the dataset pass here; the item-coverage check still applies."""
    if not isinstance(allow_other_dataset, bool):
        raise ValueError(f"allow_other_dataset must be true or false, got {allow_other_dataset!r}")
    trained_on = meta.get("dataset")
    if trained_on is None or trained_on == dataset or allow_other_dataset:
        return
    raise ValueError(
        f"the model at {model_dir} was trained on dataset {trained_on!r} (its {META_FILE} says so), not on "
        f"{dataset!r}: pass the dataset it was trained on (dataset.name={trained_on}), or model_dir=<a model trained "
        f"on {dataset}>. To use it on {dataset} anyway, add allow_other_dataset=true: results and a compressed model "
        f"are then named after {dataset}, and their {META_FILE} records trained_on_dataset={trained_on}."
    )


def load_hf_model(directory: Path) -> torch.nn.Module:
    """The plain Hugging Face model saved in ``directory``, in the dtype its config.json names (``dtype="auto"``:
    a bf16 checkpoint stays bf16; the small default model is float32); weights missing from its files are an
    error (never the random initialisation that transformers falls back to)."""
    if (directory / COMPRESSION_FILE).exists():
        raise ValueError(f"{directory} holds a compressed model: load it with odllm.compress.saved.load_recommender")
    model, info = AutoModelForCausalLM.from_pretrained(directory, dtype="auto", output_loading_info=True)
    missing = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
    if missing:  # e.g. a compressed model whose compression.json is lost: its factors are not the dense weights
        raise SavedModelError(
            f"{directory} lacks {len(missing)} weights (e.g. {missing[:3]}) or holds them in the wrong shape (a "
            f"compressed model needs its {COMPRESSION_FILE}); {rewrite_hint(directory)}"
        )
    return model


@dataclass
class Recommender:
    model: torch.nn.Module
    tokenizer: object
    item_codes: ItemCodes
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.encoder = SeqRecEncoder(self.tokenizer, self.item_codes)
        self._trie: ItemTrie | None = None

    @staticmethod
    def trie_for(encoder: SeqRecEncoder, vocab_size: int) -> ItemTrie:
        return ItemTrie(encoder.item_ids.values(), vocab_size)

    def trie(self) -> ItemTrie:
        """Built once per recommender: ``recommend`` is called per user."""
        if self._trie is None:
            self._trie = self.trie_for(self.encoder, self.model.get_output_embeddings().weight.shape[0])
        return self._trie

    def recommend(self, history: Sequence[str], k: int = 10, num_beams: int = 20) -> list[str]:
        """Top-``k`` items for one user's history (items sharing a recommended code are all listed)."""
        recs = recommend(self.model, [self.encoder.prompt(history)], [self.encoder.item(history[-1])], self.trie(),
                         num_beams=num_beams, batch_size=1, pad_id=self.tokenizer.pad_token_id, progress=False)
        by_ids = {tuple(ids): item for item, ids in self.encoder.item_ids.items()}
        codes = [self.item_codes.codes[by_ids[c]] for c in recs.top_codes[0][:k]]
        return [item for code in codes for item in self.item_codes.items_for(code)]

    def save(self, directory: str | Path, extra: Callable[[Path], None] | None = None) -> Path:
        def write(tmp: Path) -> None:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            self.item_codes.save(tmp)
            (tmp / META_FILE).write_text(json.dumps(self.meta, indent=2))
            if extra is not None:
                extra(tmp)

        return write_directory_atomically(directory, write)

    @classmethod
    def load(cls, directory: str | Path, load_model: Callable[[Path], torch.nn.Module] = load_hf_model,
             device: torch.device | str | None = None) -> Recommender:
        """The recommender saved in ``directory``; ``load_model`` builds its model (compressed models need
        ``odllm.compress.saved.load_recommender``, which passes the loader that rebuilds compressed modules).
        The model keeps its saved dtype and is moved to ``device`` (None: stays on the CPU)."""
        directory = Path(directory)
        unverified = recover_directory(directory)  # a save that a kill interrupted is finished or undone first
        if not (directory / "config.json").exists() and directory.is_dir() and any(directory.iterdir()):
            raise SavedModelError(f"{directory / 'config.json'} is missing (the model's architecture); "
                                  f"{rewrite_hint(directory)}")
        if not (directory / "config.json").exists():
            found = (f"; {', '.join(p.name for p in unverified)} beside it is a copy left by an interrupted save of "
                     f"an earlier odllm version: rename it to {directory.name} if it is complete") if unverified else ""
            raise FileNotFoundError(
                f"no saved model at {directory}: run `python train.py dataset=...` first, "
                f"or pass model_dir=<a directory written by train.py or compress.py>{found}"
            )
        fix = rewrite_hint(directory)
        check_saved_files(directory, fix)
        meta = read_meta(directory, fix)
        compressed = (directory / COMPRESSION_FILE).exists()
        if compressed and load_model is load_hf_model:
            load_hf_model(directory)  # its error: load a compressed model with load_recommender
        with reading(directory / (COMPRESSION_FILE if compressed else "config.json"), fix):
            model = load_model(directory)
        if device is not None:
            model.to(device)
        model.eval()
        with reading(directory / "tokenizer.json", fix):
            tokenizer = AutoTokenizer.from_pretrained(directory)
        if tokenizer.pad_token_id is None:
            raise SavedModelError(f"{directory / 'tokenizer_config.json'} names no padding token; {fix}")
        tokenizer.padding_side = "left"
        try:
            item_codes = ItemCodes.load(directory)
        except DataError as e:
            raise SavedModelError(str(e)) from None
        return cls(model, tokenizer, item_codes, meta)
