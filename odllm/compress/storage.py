"""Numbers represented and bytes really held by a model's modules, before and after compression."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from torch import nn


def is_compressed(module: nn.Module) -> bool:
    """A module written by a compression method (it records its ``kind`` in compression.json)."""
    return hasattr(module, "kind") and callable(getattr(module, "spec", None))


def storage(roots: Iterable[nn.Module]) -> dict:
    """Numbers represented and bytes really held by the modules under ``roots``; shared tensors count once.

    A compressed module reports its own (``storage()``: packed codes, scales, masks ...), every other module
    its parameters and persistent buffers.
    """
    seen: set[int] = set()
    total = {"params": 0, "bytes": 0}

    def visit(module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if callable(getattr(module, "storage", None)):
            for key, value in module.storage().items():
                total[key] += value
            return
        tensors = [*module.parameters(recurse=False)]
        persistent = [b for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]
        tensors += persistent
        for t in tensors:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total["params"] += t.numel() if isinstance(t, nn.Parameter) else 0
                total["bytes"] += t.numel() * t.element_size()
        for child in module.children():
            visit(child)

    for root in roots:
        visit(root)
    return total


def _weight_modules(root: nn.Module) -> Iterator[nn.Module]:
    """The outermost linears and compressed modules under ``root``."""
    for child in root.children():
        if is_compressed(child) or isinstance(child, nn.Linear):
            yield child
        else:
            yield from _weight_modules(child)


def sizes(model: nn.Module, layers: nn.ModuleList) -> dict:
    """Storage of the decoder layers' linears and of the whole model."""
    return {
        "decoder_linear": storage(_weight_modules(layers)),
        "model": storage([model]),
    }


def totals(before: dict, after: dict) -> dict:
    """Per part, numbers and bytes before and after and the kept fractions."""
    return {
        part: {
            "params_before": before[part]["params"],
            "params_after": after[part]["params"],
            "bytes_before": before[part]["bytes"],
            "bytes_after": after[part]["bytes"],
            "params_kept": after[part]["params"] / before[part]["params"],
            "bytes_kept": after[part]["bytes"] / before[part]["bytes"],
        }
        for part in before
    }
