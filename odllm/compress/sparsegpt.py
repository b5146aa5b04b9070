"""SparseGPT (Frantar & Alistarh, 2023): prune a linear's weights column by column, compensating each removal.

The same machinery as GPTQ (``odllm.compress.gptq``: H = 2 X X^T / tokens, dead columns, damping, U = chol(H^-1)
upper, column blocks with lazy batch updates), with "set to zero" in place of "round to the grid":

    for each block of ``block_size`` columns:
        unstructured: in the block (all rows x block columns) prune exactly floor(sparsity * size) weights
                      with the smallest w^2 / U_jj^2 (the OBS saliency), chosen at the block's start
        for column j of the block:
            n:m pattern:  at every m-th column, in each row prune the n of the next m columns with the
                          smallest w^2 / U_jj^2 (chosen from the columns as updated so far)
            q_j = w_j with the pruned entries set to 0;   e_j = (w_j - q_j) / U_jj
            W[:, j:block end] -= e_j U[j, j:block end]
        W[:, block end:] -= E_block U[block, block end:]

The reference thresholds the saliency (``<= sorted[int(size * sparsity)]``), which prunes one weight more
than asked, and more on ties; here the k smallest are taken, so the requested sparsity is met exactly in
every block (and hence in the matrix when sparsity * size is an integer per block, e.g. 50 % of an even count).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from odllm.compress.gptq import hessian, inverse_hessian_factor, weighted_error
from odllm.compress.sparse import STORAGE_NOTE, SparseLinear


def parse_pattern(pattern: str | None) -> tuple[int, int]:
    """``"2:4"`` -> (2, 4): prune n of every m consecutive input weights per row; ``"unstructured"`` -> (0, 0)."""
    if pattern in (None, "", "unstructured"):
        return 0, 0
    try:
        n, m = (int(part) for part in str(pattern).split(":"))
    except ValueError:
        raise ValueError(f"pattern={pattern!r}; use 'unstructured' or 'n:m' such as '2:4'") from None
    if not 0 < n < m:
        raise ValueError(f"pattern={pattern!r} must prune 0 < n < m weights of every m")
    return n, m


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  # [m, n] float64, zero where pruned
    kept: torch.Tensor  # [m, n] bool
    loss: float
    damp: float
    dead_columns: int


@torch.no_grad()
def sparsegpt_prune(
    W: torch.Tensor, H: torch.Tensor, *, sparsity: float = 0.5, prune_n: int = 0, prune_m: int = 0,
    block_size: int = 128, damp: float = 0.01, overwrite_h: bool = False,
) -> SparseGPTResult:
    """SparseGPT of ``W [m, n]`` against ``H [n, n]`` (float64): unstructured at ``sparsity``, or n:m.
    ``overwrite_h``: H's memory becomes U (H is lost; one n x n matrix, as in GPTQ)."""
    W = W.double().clone()
    rows, cols = W.shape
    U, dead, damp_used = inverse_hessian_factor(H.to(W.device, torch.float64), W, damp, overwrite=overwrite_h)
    del H
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    losses = torch.zeros(rows, dtype=torch.float64, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if prune_n == 0:
            saliency = (W1.square() / d.square()[None, :]).flatten()
            k = int(saliency.numel() * sparsity)
            mask1.view(-1)[torch.topk(saliency, k, largest=False).indices] = True
        for i in range(i2 - i1):
            if prune_n and i % prune_m == 0:
                saliency = W1[:, i : i + prune_m].square() / d[i : i + prune_m].square()[None, :]
                mask1.scatter_(1, i + torch.topk(saliency, prune_n, dim=1, largest=False).indices, True)
            w = W1[:, i]
            q = torch.where(mask1[:, i], 0.0, w)
            Q1[:, i] = q
            err = (w - q) / d[i]
            losses += err.square() / 2
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return SparseGPTResult(W, ~pruned, losses.sum().item(), damp_used, int(dead.sum()))


@dataclass
class SparseGPT:
    """The per-layer algorithm for ``odllm.compress.driver.compress_layers``: statistics from the pruned stream,
    with ``true_sequential`` also inside a layer (each group of linears sees the already pruned ones before it)."""

    sparsity: float = 0.5
    pattern: str = "unstructured"
    block_size: int = 128
    damp: float = 0.01
    true_sequential: bool = True

    statistics = "compressed"
    sequential = True

    def settings(self) -> dict:
        return {"algorithm": "sparsegpt", **asdict(self), "storage": STORAGE_NOTE}

    def validate(self, name: str, linear: nn.Linear) -> None:
        n, m = parse_pattern(self.pattern)
        if m:
            if linear.in_features % m or self.block_size % m:
                raise ValueError(
                    f"pattern={self.pattern!r} needs in_features ({linear.in_features} in {name}) and "
                    f"block_size ({self.block_size}) to be multiples of {m}"
                )
        elif not 0 < self.sparsity < 1:
            raise ValueError(f"sparsity={self.sparsity} must lie in (0, 1)")

    def compress_linear(self, name: str, linear: nn.Linear, stats) -> tuple[nn.Module, dict]:
        n, m = parse_pattern(self.pattern)
        W = linear.weight.detach()
        result = sparsegpt_prune(
            W, hessian(stats.covariance, stats.tokens), sparsity=self.sparsity, prune_n=n, prune_m=m,
            block_size=self.block_size, damp=self.damp, overwrite_h=True,  # H is ours
        )
        pattern = f"{n}:{m}" if m else "unstructured"
        module = SparseLinear.from_dense(result.weight.to(W.dtype), result.kept, linear.bias, pattern).to(W.device)
        C = stats.covariance
        energy = weighted_error(W, C) or 1.0
        error = weighted_error(W.double() - module.dense_weight().double(), C)
        return module, {
            "kind": "sparse", "pattern": pattern, "sparsity": 1 - module.nnz / W.numel(),
            "output_error": error, "relative_output_error": error / energy,
            "sparsegpt_loss": result.loss * stats.tokens, "damp": result.damp, "dead_columns": result.dead_columns,
        }

    def refine(self, *args) -> None:
        return None
