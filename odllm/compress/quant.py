"""Integer weights that really are small: the module that stores them (grids and packing: :mod:`odllm.compress.grid`).

Each b-bit row is cut into groups with their own min-max grid (the formulas are in :mod:`odllm.compress.grid`);
the grid's ``scale`` is rounded to its storage dtype before the codes are chosen, so the grid the algorithms
optimise against is exactly the one :class:`QuantLinear` stores and dequantizes.

Storage of an m x n matrix: 4-bit codes two per byte (low nibble first), 8-bit codes one per byte, plus per
group one scale (2 bytes) and one zero point (4 or 8 bits, packed like the codes). The weights are dequantized
in every forward into a temporary float32 matrix that is freed afterwards, so resident memory is the packed
size unless ``keep_dequantized`` is switched on (an explicit speed-for-memory trade that ``storage()`` counts).

Rows are independent (each has its own groups), so row blocks of codes, scales and zero points concatenate
into the matrix of stacked weights, and a lookup dequantizes only the rows it gathers (the int8 embedding
table, ``odllm.compress.embeddings``). :meth:`QuantLinear.from_linear` is round-to-nearest on this grid, the ``rtn``
kind: GPTQ's output-aware rounding matters at 4 bits, at 8 bits per row RTN's error is already ~0.1 % of
the weights' range.

Low-bit kernels (CPU): where the layout allows, ``forward`` multiplies by the codes with torch's own packed
kernels instead of dequantizing, ``aten._weight_int8pack_mm`` (8 bits, one grid per row) and
``aten._weight_int4pack_mm_for_cpu`` (4 bits, kernel groups of 32/64/128/256 columns). The stored format does not
change: the kernel layout is packed from the codes at the first forward into a non-persistent cache. The kernels
do not know odllm's integer zero points, so they are converted exactly: 8 bits run the signed codes ``c - 128``
and subtract the rank-one term ``sum(x) * scale * (zero - 128)`` (none on symmetric grids, where every zero is
128: two operations fewer per call); 4 bits use the kernel's
``(c - 8) * scale + offset`` with ``offset = (8 - zero) * scale``. In torch 2.13 the float32 kernels are 10-20x
slower than a dense float32 matmul and the bfloat16 ones faster than it, so float32 inputs run the kernel only
in mode ``bf16`` (inputs rounded to bfloat16, output cast back); see :data:`KERNEL_MODES`.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from odllm.compress.grid import (
    SCALE_DTYPES,
    check_bits,
    dequantize,
    effective_group_size,
    pack_int4,
    rtn_quantize,
    unpack_int4,
)

# Which kernel a float32 input runs (bfloat16/float16 inputs run it in their own dtype unless "off"):
# "auto" = dequantize (float32 results exactly as without kernels), "bf16" = the kernel on bfloat16-rounded inputs
# (fast; ~1e-3 relative error), "fp32" = the kernel in float32 (exact, slow on CPU), "off" = always dequantize.
KERNEL_MODES = ("auto", "bf16", "fp32", "off")
INT4_KERNEL_GROUPS = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts (torch 2.13)
INT8_KERNEL_COLUMNS = 16  # _weight_int8pack_mm (bf16) wants in_features in multiples of this (torch 2.13)
# Input rows per call up to which the kernel runs; above, the dequantization is shared by enough rows that
# dequantize + float32 matmul is faster (measured at widths 256/688 on one thread: docs/results.md, low-bit kernels).
KERNEL_MAX_ROWS = {8: 32, 4: 256}


def check_kernel_mode(mode: str) -> str:
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernel mode {mode!r} is not one of {KERNEL_MODES} (set ODLLM_KERNELS or set_kernels())")
    return mode


def default_kernel_mode() -> str:
    """``ODLLM_KERNELS`` (default ``auto``): so that worker processes such as the benchmark's inherit it."""
    return check_kernel_mode(os.environ.get("ODLLM_KERNELS", "auto"))


class QuantLinear(nn.Module):
    """A linear whose weight is stored as packed b-bit codes plus per-group float16 scales and zero points.

    ``forward`` dequantizes into a temporary float32 weight (exact: an integer times a float16 scale is
    representable in float32) and calls ``F.linear``, or runs a packed low-bit kernel where ``kernel_mode``, the
    layout and the rows per call allow (``kernel`` names what the last call ran). ``keep_dequantized=True``
    caches the float32 matrix instead, trading the memory saving for speed; :meth:`storage` counts either cache.
    """

    kind = "gptq"  # how the codes were chosen: "gptq", or "rtn" (round-to-nearest); the storage is the same

    def __init__(
        self, in_features: int, out_features: int, bits: int = 4, group_size: int = 128, bias: bool = False,
        scale_dtype: str = "float16", kind: str | None = None, bias_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if kind is not None:
            self.kind = kind
        self.in_features, self.out_features = in_features, out_features
        self.bits = check_bits(bits)
        self.group_size = group_size
        self.scale_dtype = scale_dtype
        g = effective_group_size(group_size, in_features)
        groups = in_features // g
        per_byte = 8 // bits
        self.register_buffer("qweight", torch.zeros(out_features, math.ceil(in_features / per_byte), dtype=torch.uint8))
        self.register_buffer("qzeros", torch.zeros(out_features, math.ceil(groups / per_byte), dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=SCALE_DTYPES[scale_dtype]))
        # the bias stays in the model's dtype (``bias_dtype``), as the dense linear had it
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype), requires_grad=False) if bias else None
        self.keep_dequantized = False
        self._dequantized: torch.Tensor | None = None
        self.kernel_mode = default_kernel_mode()
        self.kernel: str | None = None  # what the last forward ran: "int8pack_mm", "int4pack_mm" or "dequantize"
        self._packed: dict = {}  # kernel dtype -> the kernel layout (not in the state dict): (dtype, tensors...)
        self._plans: dict = {}  # (input dtype, mode, keep_dequantized) -> (kernel dtype, kernel name)

    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *, bits: int, group_size: int,
        bias: torch.Tensor | None = None, scale_dtype: str = "float16", kind: str | None = None,
    ) -> QuantLinear:
        """The module storing ``codes [m, n]`` (integers in [0, 2^bits)), ``scales``/``zeros [m, groups]``."""
        m, n = codes.shape
        module = cls(n, m, bits, group_size, bias is not None, scale_dtype, kind,
                     bias_dtype=None if bias is None else bias.dtype)
        with torch.no_grad():
            module.qweight.copy_(module._pack(codes))
            module.qzeros.copy_(module._pack(zeros))
            module.scales.copy_(scales.to(module.scales.dtype))
            if bias is not None:
                module.bias.copy_(bias)
        return module

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, bits: int = 8, group_size: int = -1, symmetric: bool = False
    ) -> QuantLinear:
        """Round-to-nearest of ``linear``'s weight on the min-max grid (kind ``rtn``; subclasses keep theirs)."""
        codes, scales, zeros = rtn_quantize(linear.weight.detach().float(), bits, group_size, symmetric=symmetric)
        bias = None if getattr(linear, "bias", None) is None else linear.bias.detach()
        kind = "rtn" if cls is QuantLinear else None
        module = cls.from_codes(codes, scales, zeros, bits=bits, group_size=group_size, bias=bias, kind=kind)
        return module.to(linear.weight.device)  # where the dense weight was (its buffers are made on the CPU)

    @classmethod
    def empty(cls, linear: nn.Linear, spec: dict) -> QuantLinear:
        """The module ``spec`` describes, with zero buffers for ``load_state_dict`` to fill."""
        return cls(linear.in_features, linear.out_features, spec["bits"], spec["group_size"],
                   linear.bias is not None, spec.get("scale_dtype", "float16"), spec["kind"],
                   bias_dtype=None if linear.bias is None else linear.bias.dtype)

    @classmethod
    def stacked(cls, modules: list[QuantLinear]) -> QuantLinear:
        """One module whose rows are those of ``modules`` in order (same input, bits, groups; no bias)."""
        first = modules[0]
        settings = {(m.in_features, m.bits, m.group_size, m.scale_dtype) for m in modules}
        if len(settings) != 1 or any(m.bias is not None for m in modules):
            raise ValueError("only bias-free QuantLinears with the same input and grid settings stack")
        module = cls(first.in_features, sum(m.out_features for m in modules), first.bits, first.group_size,
                     False, first.scale_dtype, first.kind)
        for name in ("qweight", "qzeros", "scales"):
            getattr(module, name).copy_(torch.cat([getattr(m, name) for m in modules]))
        return module

    def spec(self) -> dict:
        return {"kind": self.kind, "bits": self.bits, "group_size": self.group_size, "scale_dtype": self.scale_dtype}

    def _pack(self, values: torch.Tensor) -> torch.Tensor:
        values = values.round().to(torch.uint8)
        return pack_int4(values) if self.bits == 4 else values

    def _unpack(self, packed: torch.Tensor, n: int) -> torch.Tensor:
        return unpack_int4(packed, n) if self.bits == 4 else packed

    def codes(self) -> torch.Tensor:
        return self._unpack(self.qweight, self.in_features)

    def zeros(self) -> torch.Tensor:
        return self._unpack(self.qzeros, self.scales.shape[1])

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 ``[out, in]`` weight the codes stand for."""
        return dequantize(self.codes(), self.scales, self.zeros(), self.group_size)

    def dequantized_rows(self, index: torch.Tensor) -> torch.Tensor:
        """Float32 rows ``index`` (any shape) of the weight, ``[*index.shape, in]``: only those are unpacked."""
        flat = index.reshape(-1)
        rows = dequantize(self._unpack(self.qweight[flat], self.in_features), self.scales[flat],
                          self._unpack(self.qzeros[flat], self.scales.shape[1]), self.group_size)
        return rows.view(*index.shape, self.in_features)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._packed = {}  # new codes: the kernel layout is packed again at the next forward
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse: bool = True):
        self._packed, self._plans = {}, {}  # another device or dtype: plan and pack again
        return super()._apply(fn, recurse)

    def kernel_group(self) -> int | None:
        """Columns per group of the int4 kernel: a supported size dividing the stored group (the same grid split
        in exact pieces; a row-wide grid pads the input columns), or None when none does (e.g. groups of 16)."""
        if self.bits != 4:
            return None
        if self.scales.shape[1] == 1:
            return next((g for g in INT4_KERNEL_GROUPS if self.in_features % g == 0), INT4_KERNEL_GROUPS[-1])
        g = self.in_features // self.scales.shape[1]
        return next((k for k in INT4_KERNEL_GROUPS if g % k == 0), None)

    def kernel_dtype(self, dtype: torch.dtype) -> torch.dtype | None:
        """The dtype the kernel would run in for inputs of ``dtype``, or None: dequantize."""
        if self.kernel_mode == "off" or self.qweight.device.type != "cpu" or self.keep_dequantized:
            return None
        if (self.bits == 8 and self.scales.shape[1] != 1) or (self.bits == 4 and self.kernel_group() is None):
            return None
        if dtype in (torch.bfloat16, torch.float16):
            return dtype
        return {"bf16": torch.bfloat16, "fp32": torch.float32}.get(self.kernel_mode) if dtype == torch.float32 else None

    def planned_kernel(self, dtype: torch.dtype = torch.float32) -> str:
        """What ``forward`` runs for inputs of ``dtype`` (without gradients) on the module's device."""
        if self.kernel_dtype(dtype) is None:
            return "dequantize"
        return "int8pack_mm" if self.bits == 8 else "int4pack_mm"

    def _kernel_layout(self, dtype: torch.dtype) -> tuple:
        """The cached kernel operands for ``dtype``, packed from the stored codes (exact conversion of the grid)."""
        if dtype in self._packed:
            return self._packed[dtype]
        scales, zeros = self.scales.float(), self.zeros().float()
        if self.bits == 8:  # (c - z) s = (c - 128) s - (z - 128) s: signed codes, and a rank-one correction
            signed = (self.codes().to(torch.int16) - 128).to(torch.int8)
            # torch 2.13's bf16 int8pack_mm crashes or returns garbage unless in_features is a multiple of 16
            # (low-rank B factors have any width): zero code columns against zero input columns, exact
            padded = -(-self.in_features // INT8_KERNEL_COLUMNS) * INT8_KERNEL_COLUMNS
            signed = F.pad(signed, (0, padded - self.in_features))
            symmetric = bool((zeros == 128).all())  # symmetric grids: no correction term, two ops fewer per call
            correction = None if symmetric else (scales * (128 - zeros)).T.contiguous()
            self._packed[dtype] = (dtype, signed, scales[:, 0].to(dtype), correction, padded)
        else:  # (c - z) s = (c - 8) s + (8 - z) s; the offset is exact in float32 (11-bit scale x 5-bit integer)
            g, n = self.kernel_group(), self.in_features
            padded = -(-n // g) * g
            rows = -(-self.out_features // 16) * 16 - self.out_features  # the packing wants rows in 16s: pad, slice
            codes = F.pad(self.codes().to(torch.int32), (0, padded - n, 0, rows), value=8)
            repeat = padded // g if scales.shape[1] == 1 else (n // scales.shape[1]) // g
            grid = torch.stack((scales, (8 - zeros) * scales), -1).repeat_interleave(repeat, 1)  # [out, groups, 2]
            grid = F.pad(grid, (0, 0, 0, 0, 0, rows))
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
            self._packed[dtype] = (dtype, packed, grid.transpose(0, 1).contiguous().to(dtype), g, padded)
        return self._packed[dtype]

    def _kernel_forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        layout = self._kernel_layout(dtype)
        flat = x.reshape(-1, self.in_features).to(dtype).contiguous()  # a slice of a fused product is strided: the
        if self.bits == 8:  # kernels read rows as contiguous (a strided input crashed int8pack_mm)
            _, signed, scales, correction, padded = layout
            product = F.pad(flat, (0, padded - self.in_features)) if padded != self.in_features else flat
            y = torch.ops.aten._weight_int8pack_mm(product, signed, scales)  # + sum(x) (128 - z) s: one addmm
            if correction is not None:
                y = torch.addmm(y.float(), flat.sum(-1, keepdim=True, dtype=torch.float32), correction)
        else:
            _, packed, grid, g, padded = layout
            if padded != self.in_features:
                flat = F.pad(flat, (0, padded - self.in_features))
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, g, grid)
            if y.shape[1] != self.out_features:
                y = y[:, : self.out_features]
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.dtype, self.kernel_mode, self.keep_dequantized)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = (self.kernel_dtype(x.dtype), self.planned_kernel(x.dtype))
        if (plan[0] is not None and x.numel() <= KERNEL_MAX_ROWS[self.bits] * self.in_features
                and not (x.requires_grad and torch.is_grad_enabled())):
            self.kernel = plan[1]
            return self._kernel_forward(x, plan[0])
        self.kernel = "dequantize"
        if self.keep_dequantized:
            if self._dequantized is None:
                self._dequantized = self.dequantized_weight()
            weight = self._dequantized
        else:
            self._dequantized = None
            weight = self.dequantized_weight()
        return F.linear(x, weight.to(x.dtype), self.bias)

    def storage(self) -> dict:
        """Numbers represented and bytes held: packed codes, zeros, scales, bias (+ the cache when kept)."""
        tensors = [self.qweight, self.qzeros, self.scales, *([self.bias] if self.bias is not None else [])]
        held = sum(t.numel() * t.element_size() for t in tensors)
        if self._dequantized is not None:
            held += self._dequantized.numel() * self._dequantized.element_size()
        for layout in self._packed.values():  # the kernel layout is a second copy of the codes beside the stored ones
            held += sum(t.numel() * t.element_size() for t in layout[1:] if isinstance(t, torch.Tensor))
        return {"params": self.out_features * self.in_features + (self.out_features if self.bias is not None else 0),
                "bytes": held}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, kind={self.kind}, keep_dequantized={self.keep_dequantized}, "
                f"kernel_mode={self.kernel_mode}")


def keep_dequantized(model: nn.Module, enabled: bool = True) -> int:
    """Switch the float32 weight cache of every QuantLinear in ``model``; returns how many were switched."""
    count = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.keep_dequantized = enabled
            module._dequantized = None
            count += 1
    return count


def set_kernels(model: nn.Module, mode: str) -> dict[str, int]:
    """Set the kernel mode (:data:`KERNEL_MODES`) of every QuantLinear in ``model``; returns how many modules now
    plan each kernel for float32 inputs."""
    check_kernel_mode(mode)
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.kernel_mode, module._packed = mode, {}
            kernel = module.planned_kernel()
            counts[kernel] = counts.get(kernel, 0) + 1
    return counts
