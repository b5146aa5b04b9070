"""Reading a safetensors checkpoint piece by piece: the meta skeleton, the modules outside the decoder layers, one
layer at a time (used by :mod:`odllm.compress.streamed`)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from odllm.compress.driver import decoder_layers
from odllm.compress.saved import rebuild_computed_buffers, saved_dtype
from odllm.model.recommender import SHARD_INDEX, SavedModelError, reading, rewrite_hint


class ShardReader:
    """The tensors of a safetensors checkpoint (``model.safetensors.index.json`` + shards, or one
    ``model.safetensors``), read by name, one tensor at a time."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.fix = rewrite_hint(self.directory)
        index = self.directory / SHARD_INDEX
        if index.exists():
            with reading(index, self.fix):
                self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.directory / "model.safetensors").exists():
            with reading(self.directory / "model.safetensors", self.fix), self._open("model.safetensors") as f:
                self.weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise SavedModelError(f"{self.directory} holds neither {SHARD_INDEX} nor model.safetensors: streamed "
                                  f"compression reads safetensors checkpoints; {self.fix}")
        for file in sorted(set(self.weight_map.values())):
            if not (self.directory / file).is_file():
                raise SavedModelError(f"{self.directory / file} is missing (weights are saved as safetensors; "
                                      f"{SHARD_INDEX} names it); {self.fix}")

    def _open(self, file: str):
        return safe_open(self.directory / file, framework="pt")

    def read(self, names: list[str], dtype: dict[str, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
        """``names`` from their shards, each cast to ``dtype[name]`` when given (floating tensors only)."""
        missing = [name for name in names if name not in self.weight_map]
        if missing:
            raise SavedModelError(f"{self.directory} lacks {len(missing)} weights the model in config.json has "
                                  f"(e.g. {missing[:3]}); {self.fix}")
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        tensors = {}
        for file, wanted in by_file.items():
            with reading(self.directory / file, self.fix), self._open(file) as f:
                for name in wanted:
                    t = f.get_tensor(name)
                    want = (dtype or {}).get(name)
                    tensors[name] = t.to(want) if want is not None and t.is_floating_point() else t
        return tensors


def layers_prefix(model: nn.Module, layers: nn.ModuleList) -> str:
    return next(name for name, module in model.named_modules() if module is layers)


def outside_roots(module: nn.Module, layers: nn.ModuleList) -> Iterator[nn.Module]:
    """The outermost modules of ``module`` that do not hold the decoder layers (embeddings, norm, head, rotary)."""
    for child in module.children():
        if child is layers:
            continue
        if any(m is layers for m in child.modules()):
            yield from outside_roots(child, layers)
        else:
            yield child


def skeleton(directory: str | Path) -> nn.Module:
    """The model config.json describes, on the meta device (no memory), in the dtype config.json names."""
    directory = Path(directory)
    fix = rewrite_hint(directory)
    with reading(directory / "config.json", fix):
        config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=saved_dtype(config))
    return model.eval()


def _expected(module: nn.Module) -> dict[str, torch.dtype]:
    """Name -> dtype of every tensor ``module`` saves (tied ones under each name)."""
    return {name: t.dtype for name, t in module.state_dict(keep_vars=True).items()}


def materialise_outside(model: nn.Module, reader: ShardReader, device: torch.device) -> None:
    """Reads every tensor outside the decoder layers onto ``device``; a tied head shares the embedding again."""
    layers = decoder_layers(model)
    prefix = layers_prefix(model, layers) + "."
    wanted = {name: dtype for name, dtype in _expected(model).items() if not name.startswith(prefix)}
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    head_names = [n for n, m in model.named_modules() if m is head]
    head_key = f"{head_names[0]}.weight" if head_names else None
    tied = head is not None and (head.weight is embedding.weight or (
        getattr(model.config, "tie_word_embeddings", False) and head_key not in reader.weight_map))
    if tied and head_key not in reader.weight_map:
        wanted.pop(head_key, None)  # saved once, under the embedding's name
    state = {name: t.to(device) for name, t in reader.read(list(wanted), wanted).items()}
    model.load_state_dict(state, strict=False, assign=True)
    if tied and head_key not in state:
        head.weight = embedding.weight
    rebuild_computed_buffers(model, model.config, device)  # the rotary module's inv_freq (never saved)
    left = [n for root in outside_roots(model, layers) for n, t in root.state_dict(keep_vars=True).items()
            if t.is_meta]
    if left:
        raise SavedModelError(f"{reader.directory}: {left[:3]} are still unread after loading the modules outside "
                              f"the decoder layers; {reader.fix}")


def read_layer(meta_layer: nn.Module, prefix: str, reader: ShardReader, device: torch.device) -> nn.Module:
    """A real copy of the meta decoder layer ``prefix`` (``model.layers.3``) read from the shards."""
    layer = copy.deepcopy(meta_layer)
    wanted = {f"{prefix}.{name}": dtype for name, dtype in _expected(layer).items()}
    state = reader.read(list(wanted), wanted)
    layer.load_state_dict({name[len(prefix) + 1 :]: t.to(device) for name, t in state.items()}, assign=True)
    return layer.to(device).eval()  # computed buffers, rebuilt in the skeleton, follow


