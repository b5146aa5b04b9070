"""The ``method`` config group -> the per-layer algorithm that :func:`odllm.compression.compress_layers` runs.

- ``lowrank``: odllm, svd, svd_whiten, svd_align, asvd (whiten: true / false / asvd, align, ridge, alpha;
  the top-level ``ratio``);
- ``gptq``: gptq, gptq8 (bits, group_size, block_size, damp, scale_dtype, static_groups);
- ``sparsegpt``: sparsegpt, sparsegpt24 (sparsity, pattern: unstructured or n:m, block_size, damp);
- ``bnb``: bnb_int8, bnb_nf4 (quant_type, threshold, blocksize, double_quant).

A method config names its algorithm with ``algorithm:``; the names above need not (their algorithm is known).
Only ``lowrank`` reads the top-level ``ratio``; the others are set by their own settings.
"""

from __future__ import annotations

import dataclasses

from omegaconf import DictConfig, OmegaConf
from torch import nn

from odllm.compression import LayerAlgorithm, LowRank, compress_layers
from odllm.lowrank import check_ratio

ALGORITHMS = ("lowrank", "gptq", "sparsegpt", "bnb")
KNOWN_METHODS = {
    "odllm": "lowrank", "odllm_b": "lowrank", "svd": "lowrank", "svd_whiten": "lowrank", "svd_align": "lowrank",
    "asvd": "lowrank",
    "gptq": "gptq", "gptq8": "gptq", "sparsegpt": "sparsegpt", "sparsegpt24": "sparsegpt",
    "bnb_int8": "bnb", "bnb_nf4": "bnb",
}
NOT_SETTINGS = ("name", "algorithm", "heal")  # heal: odllm.heal, run by compress_job


def algorithm_name(method: DictConfig | dict) -> str:
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
        from odllm.gptq import GPTQ

        return GPTQ
    if algorithm == "sparsegpt":
        from odllm.sparsegpt import SparseGPT

        return SparseGPT
    from odllm.bnb import BitsAndBytes  # imports bitsandbytes, with a clear error when it is missing

    return BitsAndBytes


def uses_ratio(method: DictConfig | dict) -> bool:
    return algorithm_name(method) == "lowrank"


def build_algorithm(method: DictConfig | dict, ratio: float | None = None) -> LayerAlgorithm:
    """The algorithm object for ``method``; a setting the algorithm does not have is an error naming them all."""
    algorithm = algorithm_name(method)
    cls = _algorithm_class(algorithm)
    settings = OmegaConf.to_container(method, resolve=True) if isinstance(method, DictConfig) else dict(method)
    settings = {key: value for key, value in settings.items() if key not in NOT_SETTINGS}
    known = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("ratio", "spectra")]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ValueError(f"method {method.get('name')!r} ({algorithm}) has no setting {unknown}; its settings: {known}")
    if algorithm == "lowrank":
        if ratio is None:
            raise ValueError(f"method {method.get('name')!r} needs a ratio")
        settings["ratio"] = check_ratio(ratio)
    return cls(**settings)


def model_tag(method: DictConfig | dict, ratio: float | None) -> str:
    """What tells runs of one method apart in a directory name: r0.5, w4g128, w8row, s0.5, 2of4 (bnb: nothing)."""
    algorithm = algorithm_name(method)
    if algorithm == "lowrank":
        return f"r{ratio:g}"
    if algorithm == "gptq":
        group = method.get("group_size", 128)
        return f"w{method.get('bits', 4)}" + ("row" if group == -1 else f"g{group}")
    if algorithm == "sparsegpt":
        pattern = str(method.get("pattern", "unstructured"))
        return pattern.replace(":", "of") if ":" in pattern else f"s{method.get('sparsity', 0.5):g}"
    return ""


def compress_with(model: nn.Module, batches: list[dict], method: DictConfig | dict, ratio: float | None = None, *,
                  progress: bool = True) -> dict:
    """Compress ``model`` in place with the method's algorithm; the report of ``compress_layers``."""
    return compress_layers(model, batches, build_algorithm(method, ratio), progress=progress)
