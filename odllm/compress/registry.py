"""The ``method`` config group -> the per-layer algorithm that :func:`odllm.compress.driver.compress_layers` runs.

- ``lowrank``: odllm, svd, svd_whiten, svd_align, asvd (whiten: true / false / asvd, align, ridge, alpha;
  the top-level ``ratio``); with ``factor_bits`` (odllm_int8, odllm_gptq4, odllm_gptq8) the factors are then
  stored as integers (``factor_quantizer``: rtn or gptq, ``factor_group_size``);
  ``allocation: loss`` (odllm_alloc; importance, sensitivity_prompts) shares the ratio's parameter total out by
  loss per parameter (``LowRank.allocate`` runs before the layer loop);
- ``gptq``: gptq, gptq8 (bits, group_size, block_size, damp, scale_dtype, static_groups, act_order,
  true_sequential);
- ``sparsegpt``: sparsegpt, sparsegpt24 (sparsity, pattern: unstructured or n:m, block_size, damp,
  true_sequential);
- ``bnb``: bnb_int8, bnb_nf4 (quant_type, threshold, blocksize, double_quant).

A method config names its algorithm with ``algorithm:``; the names above need not (their algorithm is known).
Only ``lowrank`` reads the top-level ``ratio``; the others are set by their own settings. Every method may
also set ``embeddings`` (null or int8: the embedding table and lm_head, ``odllm.compress.embeddings``), which acts after
the decoder layers and is not a setting of the per-layer algorithm.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from torch import nn

from odllm.compress.driver import LayerAlgorithm, compress_layers
from odllm.compress.embeddings import check_embeddings
from odllm.compress.gptq import GPTQ
from odllm.compress.lowrank import check_ratio
from odllm.compress.lowrank_method import LowRank, QuantizedLowRank
from odllm.compress.sparsegpt import SparseGPT

ALGORITHMS = ("lowrank", "gptq", "sparsegpt", "bnb")
KNOWN_METHODS = {
    "odllm": "lowrank", "odllm_b": "lowrank", "svd": "lowrank", "svd_whiten": "lowrank", "svd_align": "lowrank",
    "asvd": "lowrank", "odllm_int8": "lowrank", "odllm_alloc": "lowrank", "odllm_gptq4": "lowrank",
    "odllm_gptq8": "lowrank",
    "gptq": "gptq", "gptq8": "gptq", "sparsegpt": "sparsegpt", "sparsegpt24": "sparsegpt",
    "bnb_int8": "bnb", "bnb_nf4": "bnb",
}
# The integer factors (quantizer, bits, group size, symmetric) a method's name already stands for: its directory
# name then carries no factor tag (odllm_int8 keeps ``r0.5``); other factor settings add one (``r0.5-rtn4row``).
NAMED_FACTORS = {"odllm_int8": ("rtn", 8, -1, True), "odllm_gptq4": ("gptq", 4, 128, False),
                 "odllm_gptq8": ("gptq", 8, -1, False)}
# run by odllm.compress.pipeline (heal, embeddings), not settings of the per-layer algorithm
NOT_SETTINGS = ("name", "algorithm", "heal", "embeddings")


def algorithm_name(method: Mapping) -> str:
    """The algorithm a method config runs: its ``algorithm`` key, else the one its name is known by."""
    name = method.get("name")
    algorithm = method.get("algorithm") or KNOWN_METHODS.get(name)
    if algorithm not in ALGORITHMS:
        raise ValueError(
            f"unknown compression method {name!r} (algorithm {algorithm!r}); choose method= one of "
            f"{sorted(KNOWN_METHODS)}, or give a new method config algorithm: one of {list(ALGORITHMS)}"
        )
    return algorithm


def _algorithm_class(algorithm: str) -> type:
    if algorithm == "lowrank":
        return LowRank
    if algorithm == "gptq":
        return GPTQ
    if algorithm == "sparsegpt":
        return SparseGPT
    # bitsandbytes is an optional dependency: imported when asked for, with a clear error when it is missing
    from odllm.compress.bnb import BitsAndBytes

    return BitsAndBytes


def uses_ratio(method: Mapping) -> bool:
    return algorithm_name(method) == "lowrank"


def build_algorithm(method: Mapping, ratio: float | None = None) -> LayerAlgorithm:
    """The algorithm object for ``method``; a setting the algorithm does not have is an error naming them all."""
    algorithm = algorithm_name(method)
    check_embeddings(method.get("embeddings"))
    settings = dict(method)
    settings = {key: value for key, value in settings.items() if key not in NOT_SETTINGS}
    cls = QuantizedLowRank if algorithm == "lowrank" and "factor_bits" in settings else _algorithm_class(algorithm)
    if cls is QuantizedLowRank and method.get("heal"):
        raise ValueError(f"method {method.get('name')!r}: heal trains float factors, factor_bits stores them as "
                         "integers before it; use one of the two")
    known = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("ratio", "spectra", "ranks")]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ValueError(f"method {method.get('name')!r} ({algorithm}) has no setting {unknown}; its settings: {known}")
    if algorithm == "lowrank":
        if ratio is None:
            raise ValueError(f"method {method.get('name')!r} needs a ratio")
        settings["ratio"] = check_ratio(ratio)
    return cls(**settings)


def factor_tag(method: Mapping) -> str:
    """Integer low-rank factors in a directory name: ``<rtn|gptq><bits><row|g<size>>[sym]`` (rtn8row, gptq4g128,
    rtn8rowsym), or nothing for float factors and for the factor settings the method's name stands for
    (:data:`NAMED_FACTORS`)."""
    if method.get("factor_bits") is None:
        return ""
    group = method.get("factor_group_size", -1)
    factors = (method.get("factor_quantizer", "rtn"), method["factor_bits"], group,
               bool(method.get("factor_symmetric", False)))
    if NAMED_FACTORS.get(method.get("name")) == factors:
        return ""
    return f"{factors[0]}{factors[1]}{grid_tag(group, factors[3])}"


def grid_tag(group_size: int, symmetric: bool) -> str:
    """The grid part of a tag: ``row`` or ``g<size>``, then ``sym`` for zero-centred grids."""
    return ("row" if group_size == -1 else f"g{group_size}") + ("sym" if symmetric else "")


def model_tag(method: Mapping, ratio: float | None) -> str:
    """What tells runs of one method apart in a directory name: r0.5, w4g128, w8row, s0.5, 2of4 (bnb: nothing),
    then the integer factors of a low-rank method when its name does not say them (r0.5-rtn4row,
    r0.5-gptq4g32: :func:`factor_tag`), and ``emb8`` when the embeddings are int8 (r0.5-emb8, emb8)."""
    algorithm = algorithm_name(method)
    if algorithm == "lowrank":
        tag = "-".join(filter(None, [f"r{ratio:g}", factor_tag(method)]))
    elif algorithm == "gptq":
        group = method.get("group_size", 128)
        tag = f"w{method.get('bits', 4)}" + grid_tag(group, bool(method.get("symmetric", False)))
    elif algorithm == "sparsegpt":
        pattern = str(method.get("pattern", "unstructured"))
        tag = pattern.replace(":", "of") if ":" in pattern else f"s{method.get('sparsity', 0.5):g}"
    else:
        tag = ""
    return "-".join(filter(None, [tag, "emb8" if method.get("embeddings") == "int8" else ""]))


def compress_with(model: nn.Module, batches: list[dict], method: Mapping, ratio: float | None = None, *,
                  progress: bool = True) -> dict:
    """Compress ``model`` in place with the method's algorithm; the report of ``compress_layers``."""
    algorithm = build_algorithm(method, ratio)
    if isinstance(algorithm, LowRank):
        algorithm.allocate(model, batches)  # allocation=loss: ranks from the dense model; uniform: nothing
    return compress_layers(model, batches, algorithm, progress=progress)
