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

import numpy as np
import torch
from scipy import linalg as scipy_linalg
from torch import nn

from odllm.compress.cholesky import CholeskyInPlace, cholesky_with_jitter
from odllm.compress.gptq import gptq_linear, hessian
from odllm.compress.grid import dequantize, rtn_quantize
from odllm.compress.quant import QuantLinear


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

    def quantize_factors(self, bits: int = 8, group_size: int = -1, symmetric: bool = False) -> None:
        """Stores A and B as ``bits``-bit integers rounded to nearest, one min-max grid per row (``group_size=-1``)
        or per group of columns (:func:`factor_group_size`): k(m+n) numbers in about a quarter (8 bits) or an
        eighth (4 bits) of the float32 bytes. Packed storage and its loading come from
        :class:`odllm.compress.quant.QuantLinear`; compression.json lists the factors under their own names.
        ``symmetric``: zero-centred grids (``odllm.compress.grid``), what the int8 kernel runs with fewest steps."""
        self.A = QuantLinear.from_linear(self.A, bits, factor_group_size(group_size, self.in_features), symmetric)
        self.B = QuantLinear.from_linear(self.B, bits, factor_group_size(group_size, self.rank), symmetric)

    @torch.no_grad()
    def gptq_factors(
        self, W: torch.Tensor, Cc: torch.Tensor, tokens: int, *, K: torch.Tensor | None = None,
        C: torch.Tensor | None = None, bits: int = 4, group_size: int = -1, damp: float = 0.01,
        act_order: bool = True, ridge: float = 1e-4, refit_b: bool = True, symmetric: bool = False,
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
        settings = {"bits": bits, "damp": damp, "act_order": act_order, "symmetric": symmetric}
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
        rtn = [dequantize(*rtn_quantize(F, bits, g, symmetric=symmetric), g).double()
               for F, g in ((A, ga), (self.B.weight.double(), gb))]
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


def factorize(
    W: torch.Tensor, S: torch.Tensor | CholeskyInPlace | None, k: int, method: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B [m,k], A [k,n], sigma)`` with B A the best rank-k fit of W in the norm ||(.) S||_F; sigma is the
    full spectrum of W S (of W when S is None), all in float64 whatever W's dtype (W is read a column block at a
    time where it can be: a bf16 W is not copied whole). ``S``: a lower-triangular
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
    return B, A, sigma


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
GRAM_BLOCK = 512  # columns of W converted to float64 at a time when A is formed


def top_eigenpairs(gram: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All eigenvalues of the symmetric ``gram`` and its top-k eigenvectors, both in descending order.

    On the CPU (float64), LAPACK's dsyevr (scipy) computes only the k vectors, in ``gram``'s own memory (it is
    overwritten): a full eigendecomposition holds all m vectors plus a 2 m^2 workspace beside it, 96 MiB at m =
    2048 (LLaMA-1B), the peak of a streamed layer's refit. Elsewhere ``torch.linalg.eigh``.
    """
    m = gram.shape[0]
    if gram.device.type == "cpu" and gram.dtype == torch.float64 and gram.is_contiguous():
        lam = torch.linalg.eigvalsh(gram)
        _, vectors = scipy_linalg.eigh(gram.numpy().T, subset_by_index=[m - k, m - 1], driver="evr",
                                       overwrite_a=True, check_finite=False)  # .T: the Fortran view (symmetric)
        return lam.flip(0), torch.from_numpy(np.ascontiguousarray(vectors[:, ::-1]))
    lam, Q = torch.linalg.eigh(gram)  # ascending
    return lam.flip(0), Q[:, m - k :].flip(1)


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
    lam, Qk = top_eigenpairs(gram, k)
    del gram
    sigma = lam.clamp(min=0).sqrt()
    top = sigma[:k]
    # a direction with sigma at rounding level carries no energy: zero it instead of dividing by ~0
    live = top > sigma[0] * (max(m, n) * torch.finfo(torch.float64).eps) ** 0.5
    inverse_root = torch.where(live, top.clamp(min=torch.finfo(torch.float64).tiny).rsqrt(), torch.zeros_like(top))
    if wide:
        B = Qk * top.sqrt()
        A = torch.empty(k, n, dtype=torch.float64, device=W.device)
        for j in range(0, n, GRAM_BLOCK):  # a column block of W in float64 at a time
            A[:, j : j + GRAM_BLOCK] = Qk.T @ W[:, j : j + GRAM_BLOCK].double()
        A.mul_(inverse_root[:, None])
    else:
        B = (M @ Qk) * inverse_root
        A = top.sqrt()[:, None] * Qk.T
        if S is not None:
            A = _unwhiten(A, S)  # A S^{-1}
    B = B * live  # the zeroed directions: no column in B either
    return B, A, sigma


def singular_values(M: torch.Tensor) -> torch.Tensor:
    """The singular values of M in float64: LAPACK's below :data:`GRAM_MIN_WIDTH`, the Gram eigenvalues' roots
    above (the tail below ~1e-8 sigma_max is rounding noise there, as in :func:`factorize_gram`)."""
    M = M.double()
    if min(M.shape) < GRAM_MIN_WIDTH:
        return torch.linalg.svdvals(M)
    gram = M @ M.T if M.shape[0] <= M.shape[1] else M.T @ M
    return torch.linalg.eigvalsh(gram).flip(0).clamp(min=0).sqrt()
