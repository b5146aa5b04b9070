"""GPTQ (Frantar et al., 2023): quantize a linear's weights column by column, compensating each rounding error.

For a linear with calibration inputs X (n x tokens) the layer-wise objective is ||W X - Q X||_F^2, whose Hessian
per row is H = 2 X X^T / tokens (float64, from the covariance hooks). The reference algorithm:

    dead columns (H_jj == 0): H_jj = 1, W[:, j] = 0           (inputs that are always 0 carry no information)
    H += damp * mean(diag H) * I;   U = chol(H^-1), upper      (H^-1 = U^T U: row i of U is what OBS needs)
    for each block of ``block_size`` columns:
        for column j of the block:
            at the first column of a group: its min-max grid, from the columns as updated so far
            q_j = grid(w_j);   e_j = (w_j - q_j) / U_jj
            W[:, j:block end] -= e_j U[j, j:block end]        (update inside the block now)
        W[:, block end:] -= E_block U[block, block end:]       (lazy batch update of the rest, one matmul)

The loss sum_j e_j^2 / 2 is the increase of the objective. One deliberate difference from the reference code:
a group's grid is read from the block's updated columns, where the reference reads the not yet updated copy
of W for groups starting inside a block (identical when ``group_size`` is a multiple of ``block_size``; on 20
random 64 x 256 problems at 4 bits, group 16, the updated read gave 2.7 % lower output error on average).
With ``static_groups`` (all grids from the original W) the result matches llm-compressor's GPTQ code for
code (``tests/test_crosscheck_llmcompressor.py``).

``act_order`` (the reference's ``--act-order``, llm-compressor's ``actorder="weight"``): columns are processed in
order of decreasing H_jj, so the inputs with the most energy are rounded first, while every later column can
still absorb their error. Groups stay runs of contiguous *original* columns with grids fixed up front (the
reference's ``--static-groups``): the stored format needs no permutation index (no ``g_idx``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from scipy.linalg import lapack
from torch import nn

from odllm.compress.grid import (
    SCALE_DTYPES,
    check_bits,
    effective_group_size,
    minmax_grid,
    quantize_codes,
    rtn_quantize,
)
from odllm.compress.quant import QuantLinear
from odllm.compress.statistics import mirror

log = logging.getLogger(__name__)

DAMP_RETRIES = 6  # damping grows tenfold up to this many times when H + damp I is not positive definite


def hessian(covariance: torch.Tensor, tokens: int) -> torch.Tensor:
    """H = 2 X X^T / tokens from the hooks' sum of x x^T (float64), in one new buffer (the same numbers as
    ``2 * C / tokens``, without its intermediate n x n matrix)."""
    return covariance.to(torch.float64, copy=True).mul_(2).div_(max(tokens, 1))


def inverse_hessian_factor(
    H: torch.Tensor, W: torch.Tensor, damp: float, overwrite: bool = False
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The reference preamble shared by GPTQ and SparseGPT: ``(U, dead, damp_used)`` with U upper triangular,
    U^T U = (H + damp mean(diag H) I)^-1. Zeroes W's dead columns in place.

    When Cholesky fails (H not positive definite even after damping), the damping grows tenfold and the
    retry is logged; ``damp_used`` says what was finally added (relative to the mean diagonal).

    ``overwrite``: H's own memory becomes U (H is lost), as in the reference, which overwrites H step by step;
    else a copy of H does. On the CPU (float64) the three steps, Cholesky, inverse from the factor, Cholesky of the
    inverse, are LAPACK's dpotrf / dpotri / dpotrf on one triangle of that one buffer (:func:`_factor_in_place`):
    one n x n matrix instead of the four torch's out-of-place calls hold (0.5 GiB each at width 8192).
    """
    H = H if overwrite else H.clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    mean = H.diagonal().mean()
    in_place = H.device.type == "cpu" and H.dtype == torch.float64 and H.is_contiguous()
    if in_place:
        mirror(H, from_lower=True)  # the strict upper triangle: an exact copy to start again from
        diagonal = H.diagonal().clone()
    for attempt in range(DAMP_RETRIES + 1):
        used = damp * 10**attempt
        if in_place:
            H.diagonal().copy_(diagonal + used * mean)
            U = _factor_in_place(H)
            if U is None:
                mirror(H, from_lower=False)
        else:
            U = _factor(H + used * mean * torch.eye(len(H), dtype=H.dtype, device=H.device))
        if U is not None:
            if attempt:
                log.info("Hessian not positive definite with damp=%g; used damp=%g", damp, used)
            return U, dead, used
    raise RuntimeError(f"the Hessian is not positive definite even with damp={used}; check the calibration data")


def _factor(H: torch.Tensor) -> torch.Tensor | None:
    """U upper with U^T U = H^-1 (torch, out of place), or None when H is not positive definite."""
    L, info = torch.linalg.cholesky_ex(H)
    if info != 0:
        return None
    U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    return U if info == 0 else None


def _factor_in_place(H: torch.Tensor) -> torch.Tensor | None:
    """U upper with U^T U = H^-1 in H's memory (a view of it), or None when H is not positive definite. LAPACK works
    on the upper triangle of H's Fortran-order view, i.e. H's lower triangle, and leaves the strict upper one."""
    fortran = H.numpy().T
    for step in (lambda: lapack.dpotrf(fortran, lower=0, clean=0, overwrite_a=1),   # H = R^T R
                 lambda: lapack.dpotri(fortran, lower=0, overwrite_c=1),             # H^-1 from R
                 lambda: lapack.dpotrf(fortran, lower=0, clean=0, overwrite_a=1)):   # H^-1 = U^T U
        out, info = step()
        if out.ctypes.data != fortran.ctypes.data:
            raise RuntimeError("scipy's LAPACK copied the Hessian instead of working in place")
        if info != 0:
            return None
    H.tril_()  # the factor alone: H's lower triangle holds U^T
    return H.mT


def permute_symmetric_(H: torch.Tensor, perm: torch.Tensor) -> None:
    """``H[perm][:, perm]`` in place, row by row along the permutation's cycles, then column by column (one row
    held at a time instead of two n x n copies)."""
    order = perm.tolist()
    for view in (H, H.mT):
        seen = [False] * len(order)
        for start in range(len(order)):
            if seen[start] or order[start] == start:
                continue
            saved, i = view[start].clone(), start
            seen[start] = True
            while order[i] != start:
                view[i] = view[order[i]]
                i = order[i]
                seen[i] = True
            view[i] = saved


@dataclass
class GPTQResult:
    codes: torch.Tensor  # [m, n] integers in [0, 2^bits) (float64)
    scales: torch.Tensor  # [m, groups], values of the storage dtype
    zeros: torch.Tensor  # [m, groups]
    weight: torch.Tensor  # [m, n] the dequantized weight, scale * (code - zero)
    loss: float  # sum of e^2 / 2: the objective's increase predicted by the algorithm
    damp: float
    dead_columns: int


@torch.no_grad()
def gptq_quantize(
    W: torch.Tensor, H: torch.Tensor, *, bits: int = 4, group_size: int = 128, block_size: int = 128,
    damp: float = 0.01, scale_dtype: torch.dtype = torch.float16, static_groups: bool = False,
    act_order: bool = False, overwrite_h: bool = False, symmetric: bool = False,
) -> GPTQResult:
    """GPTQ of ``W [m, n]`` against the Hessian ``H [n, n]`` (computed in float64).

    ``static_groups`` takes every group's grid from the original weights before any update (the reference's
    ``--static-groups``, also what llm-compressor does); by default a grid is chosen when its group is reached.
    ``act_order`` visits the columns by decreasing ``diag(H)`` and implies static groups (a group's columns are
    then not visited together, so its grid cannot be read from "the columns as updated so far").
    ``overwrite_h``: H's memory is used as work space (permuted in place, then holding U), H is lost: one n x n
    matrix for the whole computation. ``symmetric``: zero-centred grids (``odllm.compress.grid``).
    """
    W = W.double().clone()
    m, n = W.shape
    g = effective_group_size(group_size, n)
    check_bits(bits)
    static = group_size == -1 or static_groups or act_order
    scales = torch.zeros(m, n // g, dtype=torch.float64, device=W.device)
    zeros = torch.zeros_like(scales)
    if static:  # grids from the original weights, as the reference does
        for k in range(n // g):
            scales[:, k], zeros[:, k] = minmax_grid(W[:, k * g : (k + 1) * g], bits, scale_dtype, symmetric)
    H = H.to(W.device, torch.float64)
    perm = torch.arange(n, device=W.device)
    if act_order:  # as the reference and llm-compressor: by the raw diagonal (dead columns, H_jj = 0, go last)
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        W = W[:, perm]
        if overwrite_h:
            permute_symmetric_(H, perm)
        else:
            H, overwrite_h = H[perm][:, perm], True  # a copy of ours
    group_of = perm // g  # the (original, contiguous) group of the column visited at each position
    U, dead, damp_used = inverse_hessian_factor(H, W, damp, overwrite=overwrite_h)
    del H

    codes = torch.zeros_like(W)
    Q = torch.zeros_like(W)
    losses = torch.zeros(m, dtype=torch.float64, device=W.device)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            k = int(group_of[j])
            if j % g == 0 and not static:
                group = torch.cat((W1[:, i:], W[:, i2:]), 1)[:, :g]  # the columns as updated so far
                scales[:, k], zeros[:, k] = minmax_grid(group, bits, scale_dtype, symmetric)
            w = W1[:, i]
            c = quantize_codes(w, scales[:, k], zeros[:, k], bits)
            q = scales[:, k] * (c - zeros[:, k])
            codes[:, j], Q[:, j] = c, q
            err = (w - q) / U1[i, i]
            losses += err.square() / 2
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    if act_order:  # back to the original column order
        inverse = torch.argsort(perm)
        codes, Q = codes[:, inverse], Q[:, inverse]
    return GPTQResult(codes, scales, zeros, Q, losses.sum().item(), damp_used, int(dead.sum()))


def gptq_linear(
    W: torch.Tensor, H: torch.Tensor, *, bits: int, group_size: int, bias: torch.Tensor | None = None,
    block_size: int = 128, damp: float = 0.01, scale_dtype: str = "float16", static_groups: bool = False,
    act_order: bool = False, overwrite_h: bool = False, symmetric: bool = False,
) -> tuple[QuantLinear, GPTQResult]:
    """GPTQ of ``W`` against ``H`` stored as the :class:`QuantLinear` holding exactly the codes and grids chosen (on
    W's device), and the :class:`GPTQResult`. Shared by :class:`GPTQ` and the GPTQ-quantized low-rank factors
    (``LowRankLinear.gptq_factors``)."""
    result = gptq_quantize(
        W, H, bits=bits, group_size=group_size, block_size=block_size, damp=damp,
        scale_dtype=SCALE_DTYPES[scale_dtype], static_groups=static_groups, act_order=act_order,
        overwrite_h=overwrite_h, symmetric=symmetric,
    )
    module = QuantLinear.from_codes(
        result.codes, result.scales, result.zeros, bits=bits, group_size=group_size, bias=bias,
        scale_dtype=scale_dtype,
    ).to(W.device)
    return module, result


def weighted_error(D: torch.Tensor, C: torch.Tensor) -> float:
    """||D X||_F^2 = tr(D C D^T) for C = X X^T: a weight change's output error on the calibration data."""
    D = D.double()
    return ((D @ C.double()) * D).sum().item()


@dataclass
class GPTQ:
    """The per-layer algorithm the layer-by-layer driver calls (``odllm.compress.driver.compress_layers``).

    Statistics come from the quantized stream (each layer sees the inputs the quantized layers before it
    produce), as in the reference's sequential loop; with ``true_sequential`` also inside a layer (o_proj's
    from the quantized attention, gate/up's after it, down_proj's from the quantized gate/up: the driver collects
    them group by group). ``act_order``: see the module note.
    """

    bits: int = 4
    group_size: int = 128
    block_size: int = 128
    damp: float = 0.01
    scale_dtype: str = "float16"
    static_groups: bool = False
    act_order: bool = True
    true_sequential: bool = True
    symmetric: bool = False

    statistics = "compressed"
    sequential = True

    def settings(self) -> dict:
        return {"algorithm": "gptq", **asdict(self), "storage": "packed integer codes + per-group scales/zeros"}

    def validate(self, name: str, linear: nn.Linear) -> None:
        check_bits(self.bits)
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype={self.scale_dtype!r}; choose one of {sorted(SCALE_DTYPES)}")
        effective_group_size(self.group_size, linear.in_features, name)
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size} must be positive")

    def compress_linear(self, name: str, linear: nn.Linear, stats) -> tuple[nn.Module, dict]:
        W = linear.weight.detach()
        scale_dtype = SCALE_DTYPES[self.scale_dtype]
        module, result = gptq_linear(
            W, hessian(stats.covariance, stats.tokens), bits=self.bits, group_size=self.group_size,
            bias=linear.bias, block_size=self.block_size, damp=self.damp, scale_dtype=self.scale_dtype,
            static_groups=self.static_groups, act_order=self.act_order, overwrite_h=True,  # H is ours
            symmetric=self.symmetric,
        )
        codes, scales, zeros = rtn_quantize(W.double(), self.bits, self.group_size, scale_dtype, self.symmetric)
        g = W.shape[1] // scales.shape[1]
        rtn = scales.repeat_interleave(g, 1) * (codes - zeros.repeat_interleave(g, 1))
        C = stats.covariance
        energy = weighted_error(W, C) or 1.0
        error = weighted_error(W.double() - module.dequantized_weight().double(), C)
        rtn_error = weighted_error(W.double() - rtn, C)
        return module, {
            "kind": "gptq", "bits": self.bits, "group_size": self.group_size,
            "output_error": error, "relative_output_error": error / energy,
            "rtn_output_error": rtn_error, "rtn_relative_output_error": rtn_error / energy,
            "gptq_loss": result.loss * stats.tokens,  # the loss is on H = 2C/tokens: rescaled to output_error
            "damp": result.damp, "dead_columns": result.dead_columns,
        }

    def refine(self, *args) -> None:
        return None
