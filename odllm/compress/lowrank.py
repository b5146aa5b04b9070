"""One matrix: rank from a parameter budget, whitened truncated SVD, and the two-linear module that stores it.

For a linear ``y = W x`` (W is m x n) with calibration inputs X and covariance C = X X^T = S S^T:

    W S = U Sigma V^T                                      (SVD of the whitened weight)
    B = U_k Sigma_k^{1/2}                      (m x k)
    A = Sigma_k^{1/2} V_k^T S^{-1}             (k x n, by a triangular solve)

so ``(W - B A) S = U_rest Sigma_rest V_rest^T`` and ||(W - B A) X||_F^2 = sum of the dropped sigma_i^2: the
truncation minimises the output error on the calibration data, not the weight error. Without whitening S = I
and this is plain truncated SVD.
"""

from __future__ import annotations

import math

import torch
from scipy.linalg import blas, lapack
from torch import nn

from odllm.compress.gptq import gptq_linear, hessian
from odllm.compress.grid import dequantize, rtn_quantize
from odllm.compress.quant import QuantLinear
from odllm.compress.statistics import MIRROR_BLOCK, mirror

# Jitter levels tried by cholesky_with_jitter, relative to the mean eigenvalue trace(C)/n.
JITTERS = (0.0, *(10.0**e for e in range(-8, 1)))
# A pivot below this (relative to trace(C)/n) exists only by rounding: S^{-1} would amplify noise by > 1e6.
MIN_PIVOT = 1e-12


class LowRankLinear(nn.Module):
    """``B(A(x))`` in place of a dense linear: k(m+n) weights instead of mn, and two thinner matmuls."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, bias: bool = False, device=None, dtype=None
    ) -> None:
        super().__init__()
        self.A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.B = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(
        cls, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None = None
    ) -> LowRankLinear:
        """The module computing ``B A x + bias``."""
        module = cls(A.shape[1], B.shape[0], A.shape[0], bias is not None, device=B.device, dtype=B.dtype)
        with torch.no_grad():
            module.A.weight.copy_(A)
            module.B.weight.copy_(B)
            if bias is not None:
                module.B.bias.copy_(bias)
        return module

    @classmethod
    def empty(cls, linear: nn.Linear, spec: dict) -> LowRankLinear:
        """The module ``spec`` describes (shapes only), for ``load_state_dict`` to fill."""
        return cls(linear.in_features, linear.out_features, spec["rank"], bias=linear.bias is not None,
                   device=linear.weight.device, dtype=linear.weight.dtype)  # factors in the model's dtype

    kind = "lowrank"

    def spec(self) -> dict:
        return {"kind": self.kind, "rank": self.rank}

    @property
    def rank(self) -> int:
        return self.A.out_features

    @property
    def in_features(self) -> int:
        return self.A.in_features

    @property
    def out_features(self) -> int:
        return self.B.out_features

    def quantize_factors(self, bits: int = 8, group_size: int = -1) -> None:
        """Stores A and B as ``bits``-bit integers rounded to nearest, one min-max grid per row (``group_size=-1``)
        or per group of columns (:func:`factor_group_size`): k(m+n) numbers in about a quarter (8 bits) or an
        eighth (4 bits) of the float32 bytes. Packed storage and its loading come from
        :class:`odllm.compress.quant.QuantLinear`; compression.json lists the factors under their own names."""
        self.A = QuantLinear.from_linear(self.A, bits, factor_group_size(group_size, self.in_features))
        self.B = QuantLinear.from_linear(self.B, bits, factor_group_size(group_size, self.rank))

    @torch.no_grad()
    def gptq_factors(
        self, W: torch.Tensor, Cc: torch.Tensor, tokens: int, *, K: torch.Tensor | None = None,
        C: torch.Tensor | None = None, bits: int = 4, group_size: int = -1, damp: float = 0.01,
        act_order: bool = True, ridge: float = 1e-4, refit_b: bool = True,
    ) -> dict:
        """Stores A and B as ``bits``-bit GPTQ codes (``odllm.compress.gptq``), aimed at the dense output W x.

        ``Cc`` = sum x'x'^T of the inputs x' the module gets (the compressed stream after alignment), ``K`` = sum
        x x'^T with the dense linear's inputs x and ``C`` = sum x x^T (both default to ``Cc``: one stream).
        1. A by GPTQ against H_A = 2 Cc / tokens (exact for the output error when B^T B is diagonal, as the SVD
           factors' B = U Sigma^1/2 is: the rows of A are then independent problems);
        2. ``refit_b``: B absorbs A's rounding by ridge least squares on Â, B = W K Â^T (Â Cc Â^T + lambda I)^-1
           (alignment's B step with Â), kept only if it lowers the error;
        3. B by GPTQ against its own input's H_B = 2 Â Cc Â^T / tokens.
        Returns the relative output errors E(M)/tr(W C W^T), E(M) = ||W X - M X'||^2, of the float factors, these
        integer ones and round-to-nearest on the same grids (the ``quantize_factors`` way).
        """
        A, B = self.A.weight.double(), self.B.weight.double()
        W, Cc = W.double(), Cc.double()
        K = Cc if K is None else K.double()
        C = Cc if C is None else C.double()
        energy = ((W @ C) * W).sum().item() or 1.0
        cross = W @ K  # [m, n]: E(M) = tr(M Cc M^T) - 2 tr(M K^T W^T) + tr(W C W^T)

        def error(M: torch.Tensor) -> float:
            return (((M @ Cc) * M).sum().item() - 2 * (M * cross).sum().item() + energy) / energy

        k, n = A.shape
        ga, gb = factor_group_size(group_size, n), factor_group_size(group_size, k)
        settings = {"bits": bits, "damp": damp, "act_order": act_order}
        qa, _ = gptq_linear(A, hessian(Cc, tokens), group_size=ga, **settings)
        Aq = qa.dequantized_weight().double()
        G = Aq @ Cc @ Aq.T  # sum of (Â x')(Â x')^T: B's input covariance
        refit = False
        if refit_b:
            L, _ = cholesky_with_jitter(G + ridge * G.trace() / k * torch.eye(k, dtype=G.dtype, device=G.device))
            B_refit = torch.cholesky_solve((cross @ Aq.T).T, L).T
            refit = error(B_refit @ Aq) < error(B @ Aq)
            B = B_refit if refit else B
        bias = self.B.bias
        qb, _ = gptq_linear(B, hessian(G, tokens), group_size=gb, bias=bias, **settings)
        rtn = [dequantize(*rtn_quantize(F, bits, g), g).double() for F, g in ((A, ga), (self.B.weight.double(), gb))]
        report = {
            "quantizer": "gptq", "bits": bits, "group_size_A": ga, "group_size_B": gb, "b_refit_kept": refit,
            "error_float_factors": error(self.B.weight.double() @ A),
            "error": error(qb.dequantized_weight().double() @ Aq),
            "error_rtn": error(rtn[1] @ rtn[0]),
        }
        self.A, self.B = qa.to(self.B.weight.device), qb.to(self.B.weight.device)
        return report

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def factor_group_size(group_size: int, width: int) -> int:
    """The group a factor of ``width`` input columns is quantized in for a requested ``group_size``: -1 (one grid per
    row) when asked or when the row fits in one group; else the largest divisor of ``width`` in
    [group_size / 2, group_size], or failing that the smallest divisor above it (a rank such as 93 = 3 x 31 gets
    31 for 32; a prime rank one grid per row). Ranks are arbitrary, so a fixed size rarely divides them."""
    if group_size == -1 or group_size >= width:
        return -1
    if group_size < 1:
        raise ValueError(f"factor group_size={group_size}; use a positive number of columns or -1 (one per row)")
    below = [d for d in range(group_size, (group_size + 1) // 2 - 1, -1) if d >= 1 and width % d == 0]
    if below:
        return below[0]
    above = next(d for d in range(group_size + 1, width + 1) if width % d == 0)
    return -1 if above == width else above


def check_ratio(ratio: float) -> float:
    """``ratio`` is the fraction of decoder-linear parameters kept, so it must lie in (0, 1]."""
    if not 0 < ratio <= 1:
        raise ValueError(
            f"ratio={ratio} is outside (0, 1]: ratio is the fraction of decoder-linear parameters kept, "
            "so its allowed range (0, 1] excludes 0 and values above 1"
        )
    return float(ratio)


def rank_for_ratio(m: int, n: int, ratio: float) -> int | None:
    """Rank k whose k(m+n) parameters fit ``ratio`` of the dense mn, or None to keep the matrix dense.

    Dense when factorising saves nothing (k(m+n) >= mn) and when ratio == 1: the dense matrix then fits the
    budget and is exact, so ratio=1 leaves every matrix untouched.
    """
    check_ratio(ratio)
    if ratio == 1:
        return None
    k = math.floor(ratio * m * n / (m + n))
    if k < 1:
        raise ValueError(
            f"ratio={ratio} leaves less than rank 1 for a {m}x{n} matrix; "
            f"the smallest ratio for this shape is {(m + n) / (m * n):.3g}"
        )
    return None if k * (m + n) >= m * n else k


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


def factorize(
    W: torch.Tensor, S: torch.Tensor | CholeskyInPlace | None, k: int, method: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B [m,k], A [k,n], sigma)`` with B A the best rank-k fit of W in the norm ||(.) S||_F; sigma is the
    full spectrum of W S (of W when S is None), in W's dtype. Computed in float64. ``S``: a lower-triangular
    tensor, a :class:`CholeskyInPlace` (the factor in its covariance's memory) or None.

    ``method``: "exact" (LAPACK SVD of W S), "gram" (:func:`factorize_gram`, about 5x faster at width >= 1024)
    or "auto": gram when min(m, n) >= :data:`GRAM_MIN_WIDTH`, so the small default models keep the exact SVD.
    """
    if method not in ("auto", "exact", "gram"):
        raise ValueError(f"factorize method={method!r}; choose 'auto', 'exact' or 'gram'")
    if method == "gram" or (method == "auto" and min(W.shape) >= GRAM_MIN_WIDTH):
        return factorize_gram(W, S, k)
    Ws = _whitened(W, S)
    U, sigma, Vh = torch.linalg.svd(Ws, full_matrices=False)
    root = sigma[:k].sqrt()
    B = U[:, :k] * root
    A = root[:, None] * Vh[:k]
    if S is not None:
        A = _unwhiten(A, S)  # A S^{-1}
    return B.to(W.dtype), A.to(W.dtype), sigma.to(W.dtype)


def _whitened(W: torch.Tensor, S: torch.Tensor | CholeskyInPlace | None) -> torch.Tensor:
    """W S in float64."""
    if S is None:
        return W.double()
    return S.right(W) if isinstance(S, CholeskyInPlace) else W.double() @ S.double()


def _unwhiten(A: torch.Tensor, S: torch.Tensor | CholeskyInPlace) -> torch.Tensor:
    """A S^{-1} (a triangular solve)."""
    if isinstance(S, CholeskyInPlace):
        return S.solve_right(A)
    return torch.linalg.solve_triangular(S.double(), A, upper=False, left=False)


# factorize(method="auto") uses the Gram path when the smaller side of W is at least this wide: LLaMA-1B/7B widths
# (2048, 4096) and up; every matrix of the small default model (256 / 688) and of the cost benchmark's "large"
# shape (1024 / 2752) keeps the exact SVD, so their factors and metrics are unchanged.
GRAM_MIN_WIDTH = 2048


def factorize_gram(W: torch.Tensor, S: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`factorize` from the eigendecomposition of the Gram matrix of M = W S on its smaller side.

    m <= n: M M^T = U Sigma^2 U^T (m x m), so B = U_k Sigma_k^{1/2} and A = Sigma_k^{-1/2} U_k^T W (M S^{-1} = W:
    no triangular solve). m > n: M^T M = V Sigma^2 V^T (n x n), B = M V_k Sigma_k^{-1/2} and
    A = Sigma_k^{1/2} V_k^T S^{-1}.
    Either way B A projects W onto the top-k singular subspace of M, with orthonormal eigenvectors, so the error
    ||(W - B A) S||^2 is the sum of the dropped eigenvalues (= sigma^2) up to rounding in lambda_max * eps.
    Forming the Gram matrix squares the condition number, so singular values below sqrt(max(m, n) eps) sigma_max
    (~1e-6 sigma_max at width 4096) are rounding noise: they are clamped at 0 and such directions get zero
    factors, costing at most their sigma^2 < 1e-12 sigma_max^2 each.
    """
    m, n = W.shape
    wide = m <= n
    if wide and isinstance(S, CholeskyInPlace):
        M, gram = None, S.gram(W)  # M M^T block by block: no m x n product held
    else:
        M = _whitened(W, S)
        gram = M @ M.T if wide else M.T @ M
    lam, Q = torch.linalg.eigh(gram)  # ascending
    del gram
    lam, Q = lam.flip(0).clamp(min=0), Q.flip(1)
    sigma = lam.sqrt()
    top, Qk = sigma[:k], Q[:, :k]
    # a direction with sigma at rounding level carries no energy: zero it instead of dividing by ~0
    live = top > sigma[0] * (max(m, n) * torch.finfo(torch.float64).eps) ** 0.5
    inverse_root = torch.where(live, top.clamp(min=torch.finfo(torch.float64).tiny).rsqrt(), torch.zeros_like(top))
    if wide:
        B = Qk * top.sqrt()
        A = inverse_root[:, None] * (Qk.T @ W.double())
    else:
        B = (M @ Qk) * inverse_root
        A = top.sqrt()[:, None] * Qk.T
        if S is not None:
            A = _unwhiten(A, S)  # A S^{-1}
    B = B * live  # the zeroed directions: no column in B either
    return B.to(W.dtype), A.to(W.dtype), sigma.to(W.dtype)


def singular_values(M: torch.Tensor) -> torch.Tensor:
    """The singular values of M in float64: LAPACK's below :data:`GRAM_MIN_WIDTH`, the Gram eigenvalues' roots
    above (the tail below ~1e-8 sigma_max is rounding noise there, as in :func:`factorize_gram`)."""
    M = M.double()
    if min(M.shape) < GRAM_MIN_WIDTH:
        return torch.linalg.svdvals(M)
    gram = M @ M.T if M.shape[0] <= M.shape[1] else M.T @ M
    return torch.linalg.eigvalsh(gram).flip(0).clamp(min=0).sqrt()


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
        """Column blocks ``(j0, j1, (M S)[:, j0:j1])``: S's lower triangle only, one block at a time."""
        M, S, n = M.double(), self.S, self.S.shape[0]
        for j0 in range(0, n, block):
            j1 = min(j0 + block, n)
            if not self.in_place:
                yield j0, j1, M @ S[:, j0:j1]
            else:
                yield j0, j1, M[:, j0:j1] @ S[j0:j1, j0:j1].tril() + M[:, j1:] @ S[j1:, j0:j1]

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

    def square_norm(self, M: torch.Tensor) -> float:
        """||M S||_F^2 = tr(M (C + jitter I) M^T) without holding M S."""
        return sum(part.square().sum().item() for _, _, part in self._blocks(M))

    def solve_right(self, A: torch.Tensor) -> torch.Tensor:
        """A S^{-1} (the triangular solve reads S's lower triangle only)."""
        return torch.linalg.solve_triangular(self.S, A.double(), upper=False, left=False)

    def solve_left_transposed(self, P: torch.Tensor) -> torch.Tensor:
        """P S^{-T} = (S^{-1} P^T)^T, in P's own memory when P is a contiguous float64 CPU matrix (BLAS dtrsm on
        its Fortran-order view P^T, with S^T from the upper triangle of C's), else a new matrix."""
        if not (self.in_place and P.dtype == torch.float64 and P.is_contiguous() and P.device.type == "cpu"):
            return torch.linalg.solve_triangular(self.S, P.double().mT, upper=False, left=True).mT
        target = P.numpy().T
        out = blas.dtrsm(1.0, self.C.numpy().T, target, side=0, lower=0, trans_a=1, overwrite_b=1)
        if out.ctypes.data != target.ctypes.data:
            raise RuntimeError("scipy's dtrsm copied the matrix instead of solving in place")
        return P

    def cholesky_solve(self, B: torch.Tensor) -> torch.Tensor:
        """(S S^T)^{-1} B."""
        return torch.cholesky_solve(B.double(), self.S, upper=False)
