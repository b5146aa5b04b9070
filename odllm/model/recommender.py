"""A recommender on disk: model + tokenizer + item index + task settings, in one directory.

train.py writes it, compress.py and evaluate.py read it. The directory is written atomically: a killed
run never leaves a half-written model where a good one was.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from odllm.data.items import ItemCodes
from odllm.data.prompts import SeqRecEncoder
from odllm.eval.generation import ItemTrie, recommend
from odllm.files import write_directory_atomically

META_FILE = "odllm.json"
COMPRESSION_FILE = "compression.json"  # written beside the weights by odllm.compress.saved


def load_hf_model(directory: Path) -> torch.nn.Module:
    """The plain Hugging Face model saved in ``directory``."""
    if (directory / COMPRESSION_FILE).exists():
        raise ValueError(f"{directory} holds a compressed model: load it with odllm.compress.saved.load_recommender")
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)


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
    def load(cls, directory: str | Path, load_model: Callable[[Path], torch.nn.Module] = load_hf_model) -> Recommender:
        """The recommender saved in ``directory``; ``load_model`` builds its model (compressed models need
        ``odllm.compress.saved.load_recommender``, which passes the loader that rebuilds compressed modules)."""
        directory = Path(directory)
        if not (directory / "config.json").exists():
            raise FileNotFoundError(
                f"no saved model at {directory}: run `python train.py dataset=...` first, "
                "or pass model_dir=<a directory written by train.py or compress.py>"
            )
        model = load_model(directory)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(directory)
        tokenizer.padding_side = "left"
        meta = json.loads((directory / META_FILE).read_text()) if (directory / META_FILE).exists() else {}
        return cls(model, tokenizer, ItemCodes.load(directory), meta)
