"""Fused projections for inference: the linears that read one input (q/k/v, gate/up) share one matmul.

At batch 1 a decoding step multiplies 20 rows (one per beam), so every matmul call has a fixed cost next to its
arithmetic, and a low-rank model makes two calls per linear. Stacking the A factors of [q, k, v] into one
[k_q + k_k + k_v, n] matrix (and of [gate, up]) turns three calls into one; a dense or GPTQ group stacks its
weights the same way. Rows are independent, so the stacked matrix computes exactly the rows it stacks.

The model's own code is untouched: Hugging Face attention calls q_proj, k_proj and v_proj one after the other on
the same tensor, and each projection is replaced by a :class:`FusedMember` that asks its group's
:class:`SharedProduct` for its slice. The group computes the stacked product on the first call for a tensor and
hands out slices until each member has had its own, then drops it.

For inference only (the benchmark's ``fuse=true``): save a model before fusing it, never after.
"""

from __future__ import annotations

import torch
from torch import nn

from odllm.compress.lowrank import LowRankLinear
from odllm.compress.quant import QuantLinear

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # attributes of one module sharing an input


class SharedProduct(nn.Module):
    """``linear(x)`` computed once per input tensor for the ``members`` modules that each read a slice of it."""

    def __init__(self, linear: nn.Module, members: int) -> None:
        super().__init__()
        self.linear, self.members = linear, members
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._pending = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self._input:  # a new input (or an unfinished round left behind by an error): compute
            self._input, self._output, self._pending = x, self.linear(x), self.members
        output = self._output
        self._pending -= 1
        if self._pending == 0:  # every member has its slice: hold no activations between calls
            self._input = self._output = None
        return output


class FusedMember(nn.Module):
    """One projection of a fused group: columns ``[start, stop)`` of the shared product, then its own B factor
    (a low-rank member) or nothing (a dense member)."""

    def __init__(self, shared: SharedProduct, start: int, stop: int, B: nn.Module | None, out_features: int) -> None:
        super().__init__()
        self.shared, self.start, self.stop, self.B = shared, start, stop, B
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.shared.forward(x)[..., self.start : self.stop]  # .forward: no hooks to run, a call's overhead saved
        return h if self.B is None else self.B.forward(h)


def _stack(modules: list[nn.Module]) -> nn.Module | None:
    """One module computing the outputs of ``modules`` (same input) side by side, or None when they differ."""
    if all(type(m) is nn.Linear for m in modules):
        biases = [m.bias for m in modules]
        if len({b is None for b in biases}) > 1:
            return None
        stacked = nn.Linear(modules[0].in_features, sum(m.out_features for m in modules), bias=biases[0] is not None,
                            dtype=modules[0].weight.dtype)
        stacked.weight.copy_(torch.cat([m.weight for m in modules]))
        if stacked.bias is not None:
            stacked.bias.copy_(torch.cat(biases))
        return stacked
    if all(type(m) is QuantLinear and m.bias is None for m in modules):
        return QuantLinear.stacked(modules)
    return None


@torch.no_grad()
def fuse_projections(model: nn.Module) -> int:
    """Fuses every group of :data:`GROUPS` in ``model`` in place: the A factors of low-rank members, the weights
    of dense or quantized ones (a group whose members differ in kind stays as it is). Returns the groups fused."""
    fused = 0
    for parent in list(model.modules()):
        for names in GROUPS:
            members = [getattr(parent, name, None) for name in names]
            if any(m is None for m in members):
                continue
            lowrank = all(isinstance(m, LowRankLinear) for m in members)
            stacked = _stack([m.A for m in members] if lowrank else members)
            if stacked is None:
                continue
            shared, start = SharedProduct(stacked, len(members)), 0
            for name, member in zip(names, members, strict=True):
                width = member.rank if lowrank else member.out_features
                B = member.B if lowrank else None
                setattr(parent, name, FusedMember(shared, start, start + width, B, member.out_features))
                start += width
            fused += 1
    return fused
