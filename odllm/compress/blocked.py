"""A symmetric n x n float64 matrix kept as its lower blocks only, and factored in them.

The alignment's compressed-stream covariance C' = sum x' x'^T is the largest array of a streamed layer (0.5 GiB at
LLaMA-1B's down_proj width 8192, 0.9 GiB at LLaMA-7B's 11008) and the refit needs only its Cholesky factor S
(C' + lambda I = S S^T) and A C' A^T. Stored as the (i >= j) blocks of 512 x 512 it takes about half of that (0.27
instead of 0.5 GiB at width 8192), is summed with half the flops, and is factored block by block in its own memory
(right-looking blocked Cholesky); the triangular solves the refit needs then run a column block at a time, in the
memory of their right-hand side.
"""

from __future__ import annotations

import torch

from odllm.compress.statistics import ROWS, accumulation_dtype, product

BLOCK = 512  # block side: 2 MiB of float64 per block


class LowerBlocks:
    """C (symmetric, float64) as its lower blocks ``blocks[(i, j)]``, i >= j, on ``device``."""

    def __init__(self, n: int, device: torch.device | str, block: int = BLOCK) -> None:
        self.n = n
        self.edges = [*range(0, n, block), n]
        count = len(self.edges) - 1
        self.blocks = {(i, j): torch.zeros(self._size(i), self._size(j), dtype=torch.float64, device=device)
                       for i in range(count) for j in range(i + 1)}
        self.count = count
        self.factored = False

    def _size(self, i: int) -> int:
        return self.edges[i + 1] - self.edges[i]

    def span(self, i: int) -> slice:
        return slice(self.edges[i], self.edges[i + 1])

    def add_gram(self, x: torch.Tensor) -> None:
        """C += x^T x for activations ``x [tokens, n]``, :data:`ROWS` tokens at a time (float64 products on the CPU,
        float32 products added to the float64 sum elsewhere, as ``odllm.compress.statistics.accumulate``)."""
        dtype = accumulation_dtype(x.device)
        for r in range(0, x.shape[0], ROWS):
            rows = x[r : r + ROWS].to(dtype)  # converted once for all the blocks
            for (i, j), block in self.blocks.items():
                left, right = rows[:, self.span(i)], rows[:, self.span(j)]
                if dtype == torch.float64:
                    block.addmm_(left.mT, right)
                else:
                    block += product(left, right)

    def trace(self) -> float:
        return sum(self.blocks[(i, i)].diagonal().sum().item() for i in range(self.count))

    def add_to_diagonal(self, value: float) -> None:
        for i in range(self.count):
            self.blocks[(i, i)].diagonal().add_(value)

    def quadratic(self, A: torch.Tensor) -> torch.Tensor:
        """A C A^T ([k, k], float64) for ``A [k, n]`` in any dtype, with float64 copies of column blocks of A."""
        if self.factored:
            raise RuntimeError("C was overwritten by its Cholesky factor")
        G = torch.zeros(A.shape[0], A.shape[0], dtype=torch.float64, device=A.device)
        for (i, j), block in self.blocks.items():
            part = (A[:, self.span(i)].double() @ block) @ A[:, self.span(j)].double().mT
            G += part
            if i != j:
                G += part.mT
        return G

    def cholesky_(self, min_pivot: float) -> bool:
        """Overwrites the blocks with S, lower, S S^T = C (right-looking blocked Cholesky). False when a pivot is
        not positive or below ``min_pivot`` (C is then lost: the caller sums it again, with jitter)."""
        if self.factored:
            raise RuntimeError("C is already factored")
        self.factored = True
        for k in range(self.count):
            L, info = torch.linalg.cholesky_ex(self.blocks[(k, k)])
            if info != 0 or L.diagonal().square().min().item() < min_pivot:
                return False
            self.blocks[(k, k)] = L
            for i in range(k + 1, self.count):  # S_ik = C_ik S_kk^{-T}
                self.blocks[(i, k)] = torch.linalg.solve_triangular(L.mT, self.blocks[(i, k)], upper=True, left=False)
            for i in range(k + 1, self.count):  # the trailing blocks: C_ij -= S_ik S_jk^T
                for j in range(k + 1, i + 1):
                    self.blocks[(i, j)].addmm_(self.blocks[(i, k)], self.blocks[(j, k)].mT, alpha=-1)
        return True

    def solve_left_transposed_(self, P: torch.Tensor) -> torch.Tensor:
        """P S^{-T} in P's memory (``P [m, n]`` float64): X S^T = P, solved a column block at a time, forward."""
        self._check_factored()
        for j in range(self.count):
            target = P[:, self.span(j)]
            for i in range(j):
                target.addmm_(P[:, self.span(i)], self.blocks[(j, i)].mT, alpha=-1)
            target.copy_(torch.linalg.solve_triangular(self.blocks[(j, j)].mT, target, upper=True, left=False))
        return P

    def solve_right_(self, Y: torch.Tensor) -> torch.Tensor:
        """Y S^{-1} in Y's memory (``Y [k, n]`` float64): A S = Y, solved a column block at a time, backward."""
        self._check_factored()
        for j in reversed(range(self.count)):
            target = Y[:, self.span(j)]
            for i in range(j + 1, self.count):
                target.addmm_(Y[:, self.span(i)], self.blocks[(i, j)], alpha=-1)
            target.copy_(torch.linalg.solve_triangular(self.blocks[(j, j)], target, upper=False, left=False))
        return Y

    def _check_factored(self) -> None:
        if not self.factored:
            raise RuntimeError("factor C first (cholesky_)")

    def nbytes(self) -> int:
        return sum(block.numel() * block.element_size() for block in self.blocks.values())
