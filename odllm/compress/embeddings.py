"""The model's token embedding table and output head (lm_head) in int8: the weights that grow with the item tokens.

Compressing the decoder layers leaves both in float32, and at this model size they are a large share of the
bytes (19 % of the dense model on Instruments, 32 % on ml-100k). ``method.embeddings: int8`` (any method) stores
each as int8 rows, one min-max grid per row (uint8 codes + float16 scale + uint8 zero point, round-to-nearest
with the grid code of :mod:`odllm.compress.quant`), so a V x d table takes V (d + 3) bytes instead of 4 V d:

- the embedding table (:class:`QuantEmbedding`): a lookup gathers and dequantizes only the rows of its tokens;
- the lm_head (:class:`QuantHead`): dequantized in each forward into a temporary float32 matrix, as GPTQ's weights;
- tied embeddings (one matrix for both): quantized once; the head (:class:`TiedHead`) multiplies by the
  embedding's int8 table and holds nothing itself, so the table is stored and counted once.

Runs after the decoder layers are compressed (``odllm.runner.compress``); compression.json records the modules by
kind, so ``load_compressed`` / ``Recommender.load`` rebuild them.
"""

from __future__ import annotations

import torch
from torch import nn

from odllm.compress.quant import QuantLinear
from odllm.compress.storage import storage, totals

EMBEDDINGS = (None, "int8")  # the ``method.embeddings`` choices
BITS = 8
STORAGE = "int8 rows (uint8 codes + float16 scale and zero point per row)"


class QuantHead(QuantLinear):
    """An int8 output head. ``weight`` is a float32 copy for code that reads the head's weight (the vocabulary
    size: ``Recommender.trie``); the forward never builds it."""

    kind = "quant_head"

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized_weight()


class QuantEmbedding(QuantHead):
    """An int8 embedding table ``[num_embeddings, embedding_dim]``: ``forward(ids)`` dequantizes only the rows it
    gathers; :meth:`project` multiplies by the whole table (the output head of a tied model)."""

    kind = "quant_embedding"
    output_dtype = torch.float32  # the dtype of the rows a lookup returns: the dense table's (set where built)

    @classmethod
    def empty(cls, embedding: nn.Embedding, spec: dict) -> QuantEmbedding:
        module = cls(embedding.embedding_dim, embedding.num_embeddings, spec["bits"], spec["group_size"],
                     scale_dtype=spec.get("scale_dtype", "float16"))
        module.output_dtype = embedding.weight.dtype
        return module

    @property
    def num_embeddings(self) -> int:
        return self.out_features

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.dequantized_rows(ids).to(self.output_dtype)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


class TiedHead(nn.Module):
    """The output head of a model with tied embeddings: ``x @ E^T`` with the int8 table of the embedding module
    named ``embedding``. It holds no tensors (the table is stored and counted once, in the embedding); the
    embedding is found by :meth:`bind` once the model is rebuilt."""

    kind = "tied_head"

    def __init__(self, embedding: str, module: QuantEmbedding | None = None) -> None:
        super().__init__()
        self.embedding = embedding
        self._table = [module]  # a list: not registered as a submodule, so it is saved and counted once

    @classmethod
    def empty(cls, linear: nn.Linear, spec: dict) -> TiedHead:
        return cls(spec["embedding"])

    def bind(self, model: nn.Module) -> None:
        self._table[0] = model.get_submodule(self.embedding)

    def spec(self) -> dict:
        return {"kind": self.kind, "embedding": self.embedding}

    def storage(self) -> dict:
        return {"params": 0, "bytes": 0}

    @property
    def weight(self) -> torch.Tensor:
        return self._table[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._table[0].project(x)


def _entry(weight: torch.Tensor, before: int, module: nn.Module, table: QuantLinear) -> dict:
    """Bytes before and after, and the relative weight error ||W - W_hat|| / ||W|| of the int8 table."""
    error = ((table.dequantized_weight() - weight).norm() / weight.norm()).item()
    return {"bytes_before": before, "bytes_after": module.storage()["bytes"], "relative_error": error}


def check_embeddings(mode: str | None) -> str | None:
    if mode not in EMBEDDINGS:
        raise ValueError(f"method.embeddings={mode!r}; choose null (float32) or int8")
    return mode


@torch.no_grad()
def quantize_embeddings(model: nn.Module, mode: str | None) -> dict | None:
    """With ``mode="int8"``, stores the embedding table and lm_head of ``model`` as int8 in place and returns their
    report entries by module name; None does nothing and returns None."""
    if check_embeddings(mode) is None:
        return None
    names = {id(m): name for name, m in model.named_modules()}
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    table = QuantEmbedding.from_linear(embedding, BITS).to(embedding.weight.device)
    table.output_dtype = embedding.weight.dtype  # a bf16 model's hidden states stay bf16
    done = {names[id(embedding)]: _entry(embedding.weight, storage([embedding])["bytes"], table, table)}
    model.set_submodule(names[id(embedding)], table)
    if head is not None:
        quantized = (TiedHead(names[id(embedding)], table) if tied
                     else QuantHead.from_linear(head, BITS).to(head.weight.device))
        before = 0 if tied else storage([head])["bytes"]  # a tied head's weight is the embedding's
        done[names[id(head)]] = {**_entry(head.weight, before, quantized, table if tied else quantized), "tied": tied}
        model.set_submodule(names[id(head)], quantized)
    return done


def compress_embeddings(model: nn.Module, mode: str | None, report: dict) -> None:
    """:func:`quantize_embeddings`, recorded in ``report`` (that of ``compress_layers``): what was done and the whole
    model's new size."""
    done = quantize_embeddings(model, mode)
    if done is None:
        return
    whole = report["totals"]["model"]
    before = {"model": {"params": whole["params_before"], "bytes": whole["bytes_before"]}}
    report["totals"].update(totals(before, {"model": storage([model])}))
    report["settings"]["embeddings"] = STORAGE
    report["embeddings"] = done
