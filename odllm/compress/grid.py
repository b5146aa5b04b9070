"""Integer grids: GPTQ's min-max grid, codes, and bit packing (the format :class:`odllm.compress.quant.QuantLinear`
stores; the GPTQ, SparseGPT, int8-factor and int8-embedding code all quantize against it).


A b-bit weight row is cut into groups of ``group_size`` input columns; each group has its own grid

    scale = (max(w, 0) - min(w, 0)) / (2^b - 1),   zero = round(-min(w, 0) / scale),
    code  = clamp(round(w / scale) + zero, 0, 2^b - 1),   w_hat = scale * (code - zero),

asymmetric and always containing 0, as in the reference GPTQ code (a group of zeros gets the range [-1, 1]).
The ``symmetric`` grid (the reference's ``sym``) centres the codes instead,

    scale = max|w| / (2^(b-1) - 1),   zero = 2^(b-1),

one step of resolution less where a group's weights are one-sided, but what the packed CPU kernels multiply by
without a correction term (:class:`odllm.compress.quant.QuantLinear`: fewer operations per call).
``scale`` is rounded to its storage dtype (float16 by default) *before* the codes are chosen, so the grid the
algorithms optimise against is exactly the one :class:`QuantLinear` stores and dequantizes.

Storage of an m x n matrix: 4-bit codes two per byte (low nibble first), 8-bit codes one per byte, plus per
group one scale (2 bytes) and one zero point (4 or 8 bits, packed like the codes). The weights are dequantized
in every forward into a temporary float32 matrix that is freed afterwards, so resident memory is the packed
size unless ``keep_dequantized`` is switched on (an explicit speed-for-memory trade that ``storage()`` counts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BITS = (4, 8)


SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes in [0, 15] ``[..., n]`` -> uint8 ``[..., ceil(n / 2)]``, two per byte (low nibble first)."""
    codes = codes.to(torch.uint8)
    if codes.shape[-1] % 2:
        codes = F.pad(codes, (0, 1))
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``[..., ceil(n / 2)]`` -> codes ``[..., n]`` (uint8)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)[..., :n]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Boolean ``[..., n]`` -> uint8 ``[..., ceil(n / 8)]``, eight flags per byte (lowest bit first)."""
    mask = mask.to(torch.uint8)
    if mask.shape[-1] % 8:
        mask = F.pad(mask, (0, 8 - mask.shape[-1] % 8))
    weights = 2 ** torch.arange(8, dtype=torch.uint8, device=mask.device)
    return (mask.unflatten(-1, (-1, 8)) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[..., ceil(n / 8)]`` -> boolean ``[..., n]``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., :n].bool()


def check_bits(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"bits={bits} is not supported; choose one of {BITS}")
    return bits


def effective_group_size(group_size: int, in_features: int, name: str = "the layer") -> int:
    """``group_size`` input columns per grid (-1 = the whole row), checked against ``in_features``."""
    if group_size == -1:
        return in_features
    if group_size < 1 or in_features % group_size:
        divisors = [d for d in range(min(group_size, in_features), 0, -1) if in_features % d == 0][:3]
        raise ValueError(
            f"group_size={group_size} does not divide in_features={in_features} of {name}: every group must "
            f"have the same number of columns; use method.group_size=<a divisor of {in_features}> "
            f"(e.g. {', '.join(map(str, divisors))}) or method.group_size=-1 (one group per row)"
        )
    return group_size


def minmax_grid(
    W: torch.Tensor, bits: int, scale_dtype: torch.dtype = torch.float16, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``W [m, g]`` (one group): the min-max ``(scale, zero)`` in W's dtype, asymmetric or ``symmetric``.

    The scale is rounded to ``scale_dtype`` (what is stored); it is kept above 0 there so that a group of
    tiny weights cannot divide by zero.
    """
    maxq = 2**bits - 1
    if symmetric:  # codes zero +- (2^(b-1) - 1): [1, maxq]
        xmax = W.abs().max(1).values
        xmax[xmax == 0] = 1.0
        span, steps = xmax, 2 ** (bits - 1) - 1
    else:
        xmin = W.min(1).values.clamp(max=0)
        xmax = W.max(1).values.clamp(min=0)
        empty = (xmin == 0) & (xmax == 0)
        xmin[empty], xmax[empty] = -1.0, 1.0
        span, steps = xmax - xmin, maxq
    stored = (span / steps).to(scale_dtype)
    if not torch.isfinite(stored).all():
        raise ValueError(f"a weight group's range overflows {scale_dtype}; use method.scale_dtype=float32")
    tiny = torch.finfo(scale_dtype).smallest_normal * torch.finfo(scale_dtype).eps  # smallest subnormal
    scale = stored.clamp(min=tiny).to(W.dtype)
    if symmetric:
        return scale, torch.full_like(scale, 2 ** (bits - 1))
    zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Grid codes of ``w`` (same shape as scale and zero, or broadcastable), as floats in [0, 2^bits - 1]."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def rtn_quantize(
    W: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype = torch.float16, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest on the same groups and grid as GPTQ: ``(codes, scales, zeros)``, codes ``[m, n]``.

    The baseline GPTQ must beat: each weight rounded alone, no error compensation.
    """
    m, n = W.shape
    g = effective_group_size(group_size, n)
    groups = W.reshape(m, n // g, g).transpose(0, 1)  # [groups, m, g]
    params = [minmax_grid(block, bits, scale_dtype, symmetric) for block in groups]
    scales = torch.stack([s for s, _ in params], 1)
    zeros = torch.stack([z for _, z in params], 1)
    codes = quantize_codes(W, scales.repeat_interleave(g, 1), zeros.repeat_interleave(g, 1), bits)
    return codes, scales, zeros


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """``scale * (code - zero)`` per group, in the scales' dtype promoted to at least float32. Few, in-place
    operations: at batch 1 a forward's dequantization costs more dispatches than arithmetic."""
    m, n = codes.shape
    groups = scales.shape[1]
    dtype = torch.promote_types(scales.dtype, torch.float32)
    if groups == 1:  # one grid per row
        return (codes.to(dtype) - zeros.to(dtype)).mul_(scales.to(dtype))
    grouped = codes.view(m, groups, n // groups).to(dtype) - zeros.to(dtype).unsqueeze(-1)
    return grouped.mul_(scales.to(dtype).unsqueeze(-1)).view(m, n)
