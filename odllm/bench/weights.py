"""What a saved model holds and what it weighs, in memory and on disk.

Read from the model's own files and modules, never assumed from its name, so a compression that only simulates
(dense float storage) shows as such. Worker processes import this module: it needs only torch and odllm's compress
code.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from odllm.bench.fusion import FusedMember
from odllm.compress.driver import decoder_layers
from odllm.compress.quant import KERNEL_MAX_ROWS, QuantLinear
from odllm.compress.storage import is_compressed, storage


def decoder_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(full name, module)`` of the weight modules in the decoder layers: each linear, compressed module or fused
    projection, not the linears inside them (a low-rank module's A and B are part of it)."""
    names = {id(m): n for n, m in model.named_modules()}
    found: list[tuple[str, nn.Module]] = []
    for layer in decoder_layers(model):
        for name, module in layer.named_modules(prefix=names[id(layer)]):
            inside = bool(found) and name.startswith(found[-1][0] + ".")  # pre-order: parts follow their module
            if not inside and (isinstance(module, nn.Linear | FusedMember) or is_compressed(module)):
                found.append((name, module))
    return found


def _dtypes(roots: list[nn.Module]) -> dict[str, int]:
    """Bytes per dtype of the tensors under ``roots`` (each once): what the storage really is."""
    held: Counter = Counter()
    for t in {id(t): t for root in roots for t in (*root.parameters(), *root.buffers())}.values():
        held[str(t.dtype).removeprefix("torch.")] += t.numel() * t.element_size()
    return dict(held)


def memory_bytes(model: nn.Module) -> dict:
    """Weight bytes in memory and their dtypes: the whole model and the decoder linears alone."""
    linears = [m for _, m in decoder_linears(model)]
    return {"model": {**storage([model]), "dtypes": _dtypes([model])},
            "decoder_linear": {**storage(linears), "dtypes": _dtypes(linears)}}


def safetensors_sizes(path: Path) -> dict[str, int]:
    """Bytes of every tensor in a safetensors file, from its header (the data is not read)."""
    with path.open("rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {name: info["data_offsets"][1] - info["data_offsets"][0] for name, info in header.items()
            if name != "__metadata__"}


def disk_bytes(directory: Path, linear_names: list[str]) -> dict:
    """The safetensors files of a saved model: total file bytes, and the tensors of the decoder linears."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} holds no *.safetensors weights")
    sizes = {name: size for file in files for name, size in safetensors_sizes(file).items()}
    prefixes = tuple(f"{name}." for name in linear_names)
    return {"model": {"bytes": sum(f.stat().st_size for f in files), "files": [f.name for f in files]},
            "decoder_linear": {"bytes": sum(b for name, b in sizes.items() if name.startswith(prefixes))}}


def kernels(model: nn.Module) -> dict[str, int]:
    """How many QuantLinears (decoder, factors, int8 head) run each matmul kernel for the model's float dtype."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None) or torch.float32
    return dict(Counter(m.planned_kernel(dtype) for m in model.modules() if isinstance(m, QuantLinear)))


def describe_model(directory: Path, model: nn.Module) -> dict:
    """What a saved model is, from its own files and modules (nothing is assumed from its name).

    ``simulated`` when the saved metadata says so, or when it claims compression while every decoder linear is
    still a plain float ``nn.Linear`` (e.g. fake-quantized or masked weights in dense storage): such a model saves
    neither bytes nor time, and every table says it.
    """
    meta, specs = ({} if not (directory / f).exists() else json.loads((directory / f).read_text())
                   for f in ("odllm.json", "compression.json"))
    kinds = Counter("lowrank" if isinstance(s, int) else s.get("kind", "?") for s in specs.values())
    linears = [m for _, m in decoder_linears(model)]
    compression = meta.get("compression")
    flagged = bool((compression or {}).get("simulated") or ((compression or {}).get("settings") or {}).get("simulated")
                   or any(isinstance(s, dict) and s.get("simulated") for s in specs.values()))
    plain = all(type(m) is nn.Linear and m.weight.is_floating_point() for m in linears)
    simulated = flagged or (compression is not None and plain)
    held = _dtypes(linears)
    storage = " + ".join(sorted(held, key=lambda d: -held[d]))
    if compression is None and not specs:
        label = f"dense ({storage})"
    else:
        ratio = (compression or {}).get("ratio")
        kind_text = ", ".join(f"{n}x {k}" for k, n in sorted(kinds.items())) or "no compressed modules"
        label = (f"{(compression or {}).get('method', '?')}{'' if ratio is None else f' r{ratio:g}'}: {kind_text}; "
                 f"decoder linears held as {storage}")
        ran = kernels(model)
        if ran:
            label += "; kernels: " + ", ".join(f"{n}x {k}" for k, n in sorted(ran.items()))
            if set(ran) - {"dequantize"}:
                label += f" (up to {'/'.join(map(str, KERNEL_MAX_ROWS.values()))} rows per call at 8/4 bits)"
        if simulated:
            label += "; SIMULATED: decoder linears are plain float linears (dense storage, no saving in bytes or time)"
    return {"compression": compression, "compression_kinds": dict(kinds),
            "decoder_linear_classes": dict(Counter(type(m).__name__ for m in linears)),
            "decoder_linear_dtypes": held, "kernels": kernels(model), "simulated": simulated, "label": label}
