"""A compressed model on disk: ``compression.json`` beside the safetensors, and loading it back.

``compression.json`` records every replaced module by name: a bare integer is a LowRankLinear's rank (the
original format, still written for low-rank modules), an object names its kind and settings
(``{"kind": "gptq", "bits": 4, "group_size": 128, ...}``, ``{"kind": "sparse", "nnz": ...}``, ``bnb_*``).
:func:`load_recommender` loads any saved recommender, dense or compressed, without the calibration data.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from odllm.compress.embeddings import QuantEmbedding, QuantHead, TiedHead
from odllm.compress.lowrank import LowRankLinear
from odllm.compress.quant import QuantLinear
from odllm.compress.sparse import SparseLinear
from odllm.compress.storage import is_compressed
from odllm.model.recommender import COMPRESSION_FILE, Recommender, SavedModelError, load_hf_model, reading, rewrite_hint


def compression_specs(model: nn.Module) -> dict[str, dict]:
    """Every compressed module's spec (its kind and what rebuilding its shapes needs), keyed by module name."""
    return {name: m.spec() for name, m in model.named_modules() if is_compressed(m)}


def save_compression_config(model: nn.Module, directory: str | Path) -> Path:
    """Writes ``compression.json``: per compressed module its spec; a low-rank module as its bare rank."""
    return write_compression_config(compression_specs(model), directory)


def write_compression_config(specs: dict[str, dict], directory: str | Path) -> Path:
    """``compression.json`` from module specs (:func:`compression_specs`, gathered layer by layer when streamed)."""
    specs = {name: spec["rank"] if spec["kind"] == "lowrank" else spec for name, spec in specs.items()}
    path = Path(directory) / COMPRESSION_FILE
    path.write_text(json.dumps(specs, indent=2))
    return path

MODULE_KINDS = ("lowrank", "gptq", "rtn", "sparse", "bnb_int8", "bnb_nf4", "quant_embedding", "quant_head",
                "tied_head")


def module_class(kind: str) -> type:
    """The module class of a compression.json ``kind``; it rebuilds empty shapes with ``empty(linear, spec)``.
    bitsandbytes is imported only when a saved model uses it."""
    if kind == "lowrank":
        return LowRankLinear
    if kind in ("gptq", "rtn"):
        return QuantLinear
    if kind in ("quant_embedding", "quant_head", "tied_head"):
        return {"quant_embedding": QuantEmbedding, "quant_head": QuantHead, "tied_head": TiedHead}[kind]
    if kind == "sparse":
        return SparseLinear
    if kind in ("bnb_int8", "bnb_nf4"):
        from odllm.compress.bnb import Int8Linear, NF4Linear

        return Int8Linear if kind == "bnb_int8" else NF4Linear
    raise ValueError(f"{COMPRESSION_FILE} names an unknown module kind {kind!r}; known kinds: {list(MODULE_KINDS)}")


def _shard_files(directory: Path, fix: str) -> list[str]:
    """The weight files of a saved model: those its shard index names, else ``model.safetensors``."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        with reading(index, fix):
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    for file in files:
        if not (directory / file).exists():
            raise SavedModelError(f"{directory / file} is missing (weights are saved as safetensors); {fix}")
    return files


def read_compression_config(directory: Path, fix: str) -> dict[str, dict]:
    """``compression.json`` checked: module name -> spec with a known kind (a bare positive int: a rank)."""
    path = directory / COMPRESSION_FILE
    with reading(path, fix):
        entries = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(entries, dict):
        raise SavedModelError(f"{path} must map module names to specs, found {type(entries).__name__}; {fix}")
    specs = {}
    for name, spec in entries.items():
        if isinstance(spec, int) and not isinstance(spec, bool) and spec > 0:
            spec = {"kind": "lowrank", "rank": spec}
        if not isinstance(spec, dict) or spec.get("kind") not in MODULE_KINDS:
            raise SavedModelError(f"{path}: the entry of {name!r} is {spec!r}, neither a rank nor a spec with a kind "
                                  f"of {list(MODULE_KINDS)}; {fix}")
        specs[name] = spec
    return specs


def saved_dtype(config) -> torch.dtype:
    """The dtype a saved model's config.json names (``dtype``, formerly ``torch_dtype``); float32 when none."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_compressed(directory: str | Path) -> nn.Module:
    """The model saved in ``directory``: compressed modules where compression.json says, else a plain HF model.
    Built in the dtype config.json names, so the modules that keep dense weights (norms, embeddings, factors)
    load in the dtype they were saved in."""
    directory = Path(directory)
    if not (directory / COMPRESSION_FILE).exists():
        return load_hf_model(directory)
    fix = rewrite_hint(directory)
    entries = read_compression_config(directory, fix)
    with reading(directory / "config.json", fix):
        config = AutoConfig.from_pretrained(directory)
        with torch.device("meta"):  # no memory until a shard's tensors are assigned
            model = AutoModelForCausalLM.from_config(config, dtype=saved_dtype(config))
    # parents are rebuilt before modules nested in them
    for name, spec in sorted(entries.items(), key=lambda item: item[0].count(".")):
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise SavedModelError(f"{directory / COMPRESSION_FILE} names {name!r}, which the model in config.json "
                                  f"does not have; {fix}") from None
        if not isinstance(linear, nn.Linear | nn.Embedding):
            raise SavedModelError(f"{directory / COMPRESSION_FILE} names {name}, a {type(linear).__name__}, not a "
                                  f"Linear or Embedding; {fix}")
        with reading(directory / COMPRESSION_FILE, fix):
            model.set_submodule(name, module_class(spec["kind"]).empty(linear, spec))
    aliases = defaultdict(list)  # tied weights are saved once, under one of their names
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases[id(p)].append(name)
    missing, unexpected = None, []
    for file in _shard_files(directory, fix):  # one shard in memory at a time, assigned (no copy) to the skeleton
        with reading(directory / file, fix):
            state = load_file(directory / file)
        result = model.load_state_dict(state, strict=False, assign=True)
        unexpected += result.unexpected_keys
        missing = set(result.missing_keys) if missing is None else missing & set(result.missing_keys)
        del state
    for names in aliases.values():  # assign=True replaced the loaded name's parameter: tie the others to it
        found = [n for n in names if n not in missing]
        if found and len(names) > 1:
            shared = model.get_parameter(found[0])
            for other in names:
                if other in missing:
                    owner, _, short = other.rpartition(".")
                    setattr(model.get_submodule(owner), short, shared)
                    missing.discard(other)
    missing = sorted(missing)
    if missing or unexpected:
        raise SavedModelError(
            f"{directory} does not match {COMPRESSION_FILE}: missing {missing[:5]}, unexpected {unexpected[:5]}; {fix}"
        )
    rebuild_computed_buffers(model, config)
    for module in model.modules():  # a module that uses another one (the tied int8 head) finds it now
        if callable(getattr(module, "bind", None)):
            module.bind(model)
    if (directory / "generation_config.json").exists():  # as from_pretrained would
        with reading(directory / "generation_config.json", fix):
            model.generation_config = GenerationConfig.from_pretrained(directory)
    return model.eval()


def rebuild_computed_buffers(model: nn.Module, config, device: torch.device | str = "cpu") -> None:
    """Modules whose buffers are computed, not saved (a rotary module's ``inv_freq``), built again from the
    config on ``device``: a skeleton made on the meta device left them empty."""
    for name, module in list(model.named_modules()):
        if name and any(b.is_meta for b in module.buffers(recurse=False)):
            try:
                with torch.device(device):
                    fresh = type(module)(config=getattr(module, "config", config))
            except Exception as e:
                raise SavedModelError(f"{name} ({type(module).__name__}) holds buffers that are neither saved nor "
                                      f"computable from config.json ({e}); load or compress it with the whole-model "
                                      "path (stream=false)") from e
            model.set_submodule(name, fresh)
    left = [name for name, b in model.named_buffers() if b.is_meta]
    if left:
        raise SavedModelError(f"buffers {left[:3]} were neither saved nor rebuilt from config.json")


def load_recommender(directory: str | Path, device: torch.device | str | None = None) -> Recommender:
    """The recommender saved in ``directory`` by train.py (dense) or compress.py (compressed), on ``device``."""
    return Recommender.load(directory, load_model=load_compressed, device=device)
