"""What linear layers see on the calibration data, read by forward hooks without storing activations.

A linear receives ``[batch, time, features]`` and cannot tell pad tokens apart, so every hook reads a boolean
token mask ``[batch, time]`` (the batch's attention mask) and keeps only the real tokens.

Precision: sums live in float64 on the device of the activations. On the CPU each batch's product x^T x is
formed in float64 too; on a GPU (where float64 matmuls run at 1/2 to 1/64 of the float32 rate) it is formed in
float32, from activations of at most a few thousand tokens, and added to the float64 running sum: float32 within
a batch, a float64 reduction across batches (:func:`product`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass once it has what it came for."""


def real_tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x[mask]``: the ``[tokens, features]`` rows of the non-pad tokens."""
    if x.shape[:-1] != mask.shape:
        raise ValueError(f"activation {tuple(x.shape)} does not match the token mask {tuple(mask.shape)}")
    return x[mask]


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """The dtype of one batch's products: float64 on the CPU, float32 on accelerators (see the module note)."""
    return torch.float64 if device.type == "cpu" else torch.float32


def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^T b`` for ``[tokens, n]`` activations, formed in :func:`accumulation_dtype` and returned in float64."""
    dtype = accumulation_dtype(a.device)
    return (a.to(dtype).T @ b.to(dtype)).double()


ROWS = 512  # tokens converted to the accumulation dtype at a time: at width 8192, 32 MiB of float64, not a batch's


def accumulate(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``total += a^T b`` (float64 ``total``), :data:`ROWS` tokens at a time, so that the float64 copies of a
    batch's activations are never whole (a 16-prompt batch at width 8192 is 0.2 GiB of them). On the CPU each
    product goes straight into the sum (``addmm_``): no second n x n matrix (0.5 GiB at width 8192) beside it;
    elsewhere the float32 product of :func:`product` is added."""
    for r in range(0, a.shape[0], ROWS):
        a_rows = a[r : r + ROWS]
        b_rows = a_rows if b is a else b[r : r + ROWS]
        if accumulation_dtype(a.device) == torch.float64:
            a64 = a_rows.double()
            total.addmm_(a64.mT, a64 if b is a else b_rows.double())
        else:
            total += product(a_rows, b_rows)


def _device(module: nn.Module) -> torch.device:
    """Where a module's weights live: its parameters, or its buffers (a quantized linear holds only buffers)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    raise ValueError(f"{type(module).__name__} holds no tensors: cannot tell where its inputs arrive")


@dataclass
class LinearStatistics:
    """What one linear saw on the calibration data: C = sum x x^T (float64), mean |x| per channel, token count."""

    covariance: torch.Tensor
    abs_mean: torch.Tensor
    tokens: int


class InputCovariances:
    """Forward pre-hooks that sum C = sum x x^T and sum |x| (float64) and count tokens per named module.

    Memory is n x n per module whatever the calibration size (``abs_sum``, n per module, feeds ASVD). Modules
    that read the same tensor (q/k/v, gate/up) share its real tokens per forward, and ``groups`` records them in
    call order: the true-sequential order in which a layer's linears can be refit. Set ``mask`` before each
    forward.
    """

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = dict(modules)
        device = {name: _device(m) for name, m in self.modules.items()}  # where its inputs arrive
        self.covariance = {
            name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=device[name])
            for name, m in self.modules.items()
        }
        self.abs_sum = {
            name: torch.zeros(m.in_features, dtype=torch.float64, device=device[name])
            for name, m in self.modules.items()
        }
        self.tokens = dict.fromkeys(self.modules, 0)
        self.groups: list[list[str]] = []
        self.mask: torch.Tensor | None = None
        self._last: tuple = (None, None, None)
        self._handles: list = []

    def __enter__(self) -> InputCovariances:
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._last = (None, None, None)

    def abs_mean(self, name: str) -> torch.Tensor:
        """Mean |x| per input channel of ``name`` over the real tokens (zeros when it saw none)."""
        return self.abs_sum[name] / max(self.tokens[name], 1)

    def statistics(self, name: str) -> LinearStatistics:
        return LinearStatistics(self.covariance[name], self.abs_mean(name), self.tokens[name])

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            x = inputs[0]
            new_input = x is not self._last[0]
            if new_input:
                t = real_tokens(x, self.mask)
                self._last = (x, t, sum(rows.abs().double().sum(0) for rows in t.split(ROWS)))
            if not any(name in group for group in self.groups):
                if new_input:
                    self.groups.append([name])
                else:
                    self.groups[-1].append(name)
            accumulate(self.covariance[name], self._last[1], self._last[1])  # per module: no n x n temporary
            self.abs_sum[name] += self._last[2]
            self.tokens[name] += int(self.mask.sum())

        return hook


def capture_inputs(
    layer: nn.Module, x: torch.Tensor, kwargs: dict, modules: Mapping[str, nn.Module], mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The non-pad inputs ``[tokens, n]`` that each of ``modules`` receives in ``layer(x, **kwargs)``.

    The forward stops as soon as all have been seen, so the rest of the layer is not computed. Only one
    batch is held: callers reduce it to sums before the next.
    """
    seen: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            seen[name] = real_tokens(inputs[0], mask)
            if len(seen) == len(modules):
                raise StopForward

        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in modules.items()]
    try:
        layer(x, **kwargs)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if len(seen) != len(modules):
        raise RuntimeError(f"the forward never called {sorted(set(modules) - set(seen))}")
    return seen


def input_groups(
    layer: nn.Module, x: torch.Tensor, kwargs: dict, modules: Mapping[str, nn.Module]
) -> list[list[str]]:
    """``modules`` grouped by the input tensor they share, in call order, from one forward of ``layer``:
    ``[[q, k, v], [o], [gate, up], [down]]`` for a LLaMA layer, the order of a true-sequential refit. Modules the
    forward never calls form a last group."""
    groups: list[list[str]] = []
    last: list = [None]  # the last input seen (held, so that its identity cannot be reused)

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            if any(name in group for group in groups):
                return
            if inputs[0] is not last[0]:
                last[0] = inputs[0]
                groups.append([])
            groups[-1].append(name)

        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in modules.items()]
    try:
        layer(x, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in modules if not any(name in group for group in groups)]
    return groups + [missing] if missing else groups


MIRROR_BLOCK = 512  # rows per block when one triangle of a covariance is copied onto the other


def mirror(C: torch.Tensor, from_lower: bool, block: int = MIRROR_BLOCK) -> None:
    """Copies C's strict lower triangle onto its strict upper one (``from_lower``) or back, in place, one block of
    rows at a time (no n x n temporary)."""
    n = C.shape[0]
    for i in range(0, n, block):
        j = min(i + block, n)
        diagonal = C[i:j, i:j]
        if from_lower:
            C[i:j, j:] = C[j:, i:j].mT
            diagonal.copy_(diagonal.tril() + diagonal.tril(-1).mT)
        else:
            C[j:, i:j] = C[i:j, j:].mT
            diagonal.copy_(diagonal.triu() + diagonal.triu(1).mT)
