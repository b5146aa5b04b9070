"""Cholesky factors of an input covariance C = S S^T: with logged jitter when C is singular, and in C's own
memory (LAPACK) where one n x n float64 matrix is all the budget allows."""

from __future__ import annotations

import torch
from scipy.linalg import lapack

from odllm.compress.statistics import MIRROR_BLOCK, mirror

# Jitter levels tried by cholesky_with_jitter, relative to the mean eigenvalue trace(C)/n.
JITTERS = (0.0, *(10.0**e for e in range(-8, 1)))
# A pivot below this (relative to trace(C)/n) exists only by rounding: S^{-1} would amplify noise by > 1e6.
MIN_PIVOT = 1e-12


def check_finite(C: torch.Tensor) -> None:
    """Refuses a covariance with NaN or inf, a block of rows at a time (``isfinite(C)`` holds an n x n float
    temporary: 0.5 GiB at width 8192)."""
    if not all(torch.isfinite(rows).all() for rows in C.split(MIRROR_BLOCK)):
        raise ValueError("the input covariance holds NaN or inf; check the calibration activations")


def cholesky_with_jitter(C: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Lower S with S S^T = C + jitter * trace(C)/n * I, and the absolute jitter added (0.0 when none).

    C is singular when input channels are dead or there are fewer tokens than channels; growing jitter makes
    it positive definite. An all-zero C (a layer that never sees input) uses an absolute scale of 1, which
    turns whitening into plain SVD for that matrix.
    """
    check_finite(C)
    n = C.shape[0]
    scale = C.diagonal().sum().item() / n
    scale = scale if scale > 0 else 1.0
    for eps in JITTERS:
        shifted = C  # C + eps scale I without n x n identities (1 GB each at width 11008): the same numbers
        if eps:
            shifted = C.clone()
            shifted.diagonal().add_(eps * scale)
        S, info = torch.linalg.cholesky_ex(shifted)
        del shifted
        if info == 0 and S.diagonal().square().min() >= MIN_PIVOT * scale:
            return S, eps * scale
    raise RuntimeError(f"Cholesky failed even with jitter {JITTERS[-1]} * trace/n; the covariance is not PSD")


# ------------------------------------------------------------------------------- Cholesky in the covariance's memory
class CholeskyInPlace:
    """S with S S^T = C + jitter I (lower), computed in C's own memory, and C given back by :meth:`restore`.

    At width 8192 (LLaMA-1B's down_proj) an n x n float64 matrix is 0.5 GiB, and a layer-streamed run cannot afford
    a second one beside C. torch's in-place Cholesky (``cholesky_ex(C.mT, upper=True, out=...)``) zeroes the other
    triangle, so a failed attempt could not be retried with jitter and C would be lost; its row-major form and
    ``cholesky_inverse`` copy the matrix. LAPACK's dpotrf (scipy) on the Fortran-order view of C overwrites only
    C's lower triangle (the one torch reads) with S and leaves the strict upper triangle, first made a copy of the
    lower one (:func:`mirror`), untouched: a failed attempt and :meth:`restore` rebuild C exactly from it and the
    saved diagonal. While factored, C's strict upper triangle is not zero: use S through the methods (they read the
    lower triangle only), not as a tensor. Off the CPU (or for another dtype) S is a separate tensor
    (:func:`cholesky_with_jitter`) and ``restore`` does nothing.
    """

    def __init__(self, C: torch.Tensor) -> None:
        self.C = C
        self.in_place = C.device.type == "cpu" and C.dtype == torch.float64 and C.is_contiguous()
        if not self.in_place:
            self.S, self.jitter = cholesky_with_jitter(C)
            return
        check_finite(C)
        mirror(C, from_lower=True)
        self.diagonal = C.diagonal().clone()
        n = C.shape[0]
        scale = C.diagonal().sum().item() / n  # as cholesky_with_jitter sums it
        scale = scale if scale > 0 else 1.0
        fortran = C.numpy().T  # the same memory; its upper triangle is C's lower one
        for eps in JITTERS:
            if eps:
                C.diagonal().add_(eps * scale)
            factor, info = lapack.dpotrf(fortran, lower=0, clean=0, overwrite_a=1)
            if factor.ctypes.data != fortran.ctypes.data:
                raise RuntimeError("scipy's dpotrf copied the covariance instead of factoring it in place")
            if info == 0 and C.diagonal().square().min() >= MIN_PIVOT * scale:
                self.S, self.jitter = C, eps * scale  # the lower triangle of C
                return
            self.restore()
        raise RuntimeError(f"Cholesky failed even with jitter {JITTERS[-1]} * trace/n; the covariance is not PSD")

    def restore(self) -> torch.Tensor:
        """C again, exactly (from the untouched triangle and the saved diagonal); S is gone after this."""
        if self.in_place:
            mirror(self.C, from_lower=False)
            self.C.diagonal().copy_(self.diagonal)
        return self.C

    def _blocks(self, M: torch.Tensor, block: int = MIRROR_BLOCK):
        """Column blocks ``(j0, j1, (M S)[:, j0:j1])`` in float64, from S's lower triangle only. M may be in any dtype:
        a column block of it is converted at a time (a float64 copy of LLaMA-1B's down_proj is 128 MiB)."""
        S, n = self.S, self.S.shape[0]
        for j0 in range(0, n, block):
            j1 = min(j0 + block, n)
            part = M[:, j0:j1].double() @ S[j0:j1, j0:j1].tril()
            for i0 in range(j1, n, block):  # (M S)_j = sum over i >= j of M_i S_ij (S is lower triangular)
                part.addmm_(M[:, i0 : i0 + block].double(), S[i0 : i0 + block, j0:j1])
            yield j0, j1, part

    def right(self, M: torch.Tensor) -> torch.Tensor:
        """M S ([rows, n], float64)."""
        out = torch.empty(M.shape[0], self.S.shape[0], dtype=torch.float64, device=M.device)
        for j0, j1, part in self._blocks(M):
            out[:, j0:j1] = part
        return out

    def gram(self, M: torch.Tensor) -> torch.Tensor:
        """(M S)(M S)^T ([rows, rows]) without holding M S."""
        out = torch.zeros(M.shape[0], M.shape[0], dtype=torch.float64, device=M.device)
        for _, _, part in self._blocks(M):
            out.addmm_(part, part.mT)
        return out

    def quadratic(self, M: torch.Tensor) -> float:
        """tr(M C M^T) for the C given: ||M S||_F^2 - jitter ||M||_F^2, without holding M S or M in float64."""
        total = 0.0
        for j0, j1, part in self._blocks(M):
            total += part.square().sum().item() - self.jitter * M[:, j0:j1].double().square().sum().item()
        return total

    def solve_right(self, A: torch.Tensor) -> torch.Tensor:
        """A S^{-1} (the triangular solve reads S's lower triangle only)."""
        return torch.linalg.solve_triangular(self.S, A.double(), upper=False, left=False)
