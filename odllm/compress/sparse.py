"""Pruned weights stored sparse: the kept values plus a one-bit-per-weight mask.

An m x n matrix with nnz kept weights holds ``nnz`` values in the model's dtype (row-major) and an
m x ceil(n/8) byte mask: for a float32 model 4 nnz + mn/8 bytes, i.e. 53 % of float32 at 50 % sparsity. For 2:4
sparsity this costs the same as the usual compressed format (two 2-bit indices per group of four = 4 bits per 4
weights) and needs no second layout.

The storage is real (the bytes on disk and in memory are those), the compute is not sparse: ``forward``
scatters the values into a temporary dense matrix (in the values' dtype) and multiplies densely, so pruning saves
memory and disk here, not time. Tables label it "sparse storage, dense compute".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from odllm.compress.grid import pack_bits, unpack_bits

STORAGE_NOTE = "sparse storage (values in the model's dtype + 1-bit mask), dense compute"


class SparseLinear(nn.Module):
    """A linear whose zeroed weights are not stored: ``values`` of the kept ones and a packed ``mask``."""

    kind = "sparse"

    def __init__(self, in_features: int, out_features: int, nnz: int, bias: bool = False, pattern: str = "",
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.pattern = in_features, out_features, pattern
        self.register_buffer("values", torch.zeros(nnz, dtype=dtype))  # the dense weight's dtype
        self.register_buffer("mask", torch.zeros(out_features, -(-in_features // 8), dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_dense(
        cls, weight: torch.Tensor, kept: torch.Tensor, bias: torch.Tensor | None = None, pattern: str = ""
    ) -> SparseLinear:
        """The module holding ``weight[kept]`` in ``weight``'s dtype; weights outside ``kept`` are dropped."""
        m, n = weight.shape
        module = cls(n, m, int(kept.sum()), bias is not None, pattern, dtype=weight.dtype)
        with torch.no_grad():
            module.values.copy_(weight[kept])
            module.mask.copy_(pack_bits(kept))
            if bias is not None:
                module.bias.copy_(bias)
        return module

    @classmethod
    def empty(cls, linear: nn.Linear, spec: dict) -> SparseLinear:
        return cls(linear.in_features, linear.out_features, spec["nnz"], linear.bias is not None,
                   spec.get("pattern", ""), dtype=linear.weight.dtype)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def spec(self) -> dict:
        return {"kind": self.kind, "nnz": self.nnz, "pattern": self.pattern}

    def kept(self) -> torch.Tensor:
        return unpack_bits(self.mask, self.in_features)

    def dense_weight(self) -> torch.Tensor:
        weight = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype, device=self.values.device)
        return weight.masked_scatter_(self.kept(), self.values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight().to(x.dtype), self.bias)

    def storage(self) -> dict:
        tensors = [self.values, self.mask, *([self.bias] if self.bias is not None else [])]
        return {"params": self.nnz + (self.out_features if self.bias is not None else 0),
                "bytes": sum(t.numel() * t.element_size() for t in tensors)}

    def extra_repr(self) -> str:
        density = self.nnz / (self.out_features * self.in_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.pattern!r}, "
                f"density={density:.3f}")
