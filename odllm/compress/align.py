"""Progressive alignment (OD-LLM step 5): refit a layer's low-rank factors on the stream it really sees.

On the compressed stream X'_i (what layer i gets after the compressed layers 0..i-1), refit the factors so
that B A x' matches W x, from the sums C' = sum x'x'^T, P = W K = sum (W x) x'^T and tr(W C W^T) = sum ||W x||^2
(float64; K = sum x x'^T and C = sum x x^T are never built):

- ``align: B`` (the paper) keeps A and solves ridge least squares for B,
  B = W K A^T (A C' A^T + lambda I)^{-1},  lambda = ridge tr(A C' A^T)/k;
- ``align: BA`` (default) refits both: the best rank-k map from x' to W x (reduced-rank regression) is
  W* = W K C'^{-1} truncated by whitened SVD in the C' norm (the truncation step again, on the stream the layer
  sees).

One group of linears sharing an input at a time ([q,k,v], [o], [gate,up], [down]), so o_proj and down_proj are
fitted to the inputs they will really get. A refit is kept only where it lowers that linear's error, and the
whole layer's refit is undone if it raised the layer's output error.
"""

from __future__ import annotations

import copy

import torch

from odllm.compress.cholesky import CholeskyInPlace, cholesky_with_jitter
from odllm.compress.driver import Streams, compare_layers
from odllm.compress.lowrank import LowRankLinear, factorize
from odllm.compress.statistics import ROWS, accumulate, accumulation_dtype, capture_inputs

BLOCK = 512  # rows of W converted to float64 at a time, columns per block of the error's cross term


def _outputs(a: torch.Tensor, W: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a W^T`` in ``dtype`` with W converted a block of rows at a time (no float64 copy of all of W)."""
    return torch.cat([a @ W[r : r + BLOCK].to(dtype).mT for r in range(0, W.shape[0], BLOCK)], dim=1)


def refit_group(
    original, layer, group: dict[str, LowRankLinear], streams: Streams, ridge: float, factors: str
) -> dict:
    """Refits the factors of each linear in ``group`` (they share one input) so that B A x' ~ W x.

    Sums over the calibration tokens (float64, CPU products in float64): C' = sum x' x'^T for the group, and per
    linear P = W K = sum (W x) x'^T ([m, n]) and its energy tr(W C W^T) = sum ||W x||^2, where K = sum x x'^T and
    C = sum x x^T appear only in these products: neither n x n matrix is built (at LLaMA-1B's down_proj, n = 8192 >
    m = 2048, each is 0.5 GiB). Any M = B A then has the exact error
    E(M) = tr(M C' M^T) - 2 tr(M P^T) + tr(W C W^T).

    - ``factors="B"`` (the paper): A stays, B = P A^T (A C' A^T + lambda I)^{-1} (ridge least squares);
    - ``factors="BA"``: the best rank-k M for the compressed stream (reduced-rank regression): the
      unconstrained fit W* = P C'^{-1}, truncated in the C' norm, i.e. ``factorize(W*, chol(C'), k)``,
      the whitened SVD of step 2 again, now on what the layer really sees and aimed at the original output.
      C' + lambda I is overwritten by its Cholesky factor S (:class:`odllm.compress.cholesky.CholeskyInPlace`), and
      the whitened target is W* S = P S^{-T}: its truncated SVD B A' gives A = A' S^{-1}.

    A refit is kept only where E falls. Returns per linear the relative errors and the decision.
    """
    dense = {name: original.get_submodule(name) for name in group}
    n = next(iter(group.values())).in_features
    first = next(iter(group))
    device = dense[first].weight.device
    Cc = torch.zeros(n, n, dtype=torch.float64, device=device)
    P = {name: torch.zeros(m.out_features, n, dtype=torch.float64, device=device) for name, m in dense.items()}
    energies = dict.fromkeys(group, 0.0)
    dtype = accumulation_dtype(device)
    for x, xc, kw, mask in streams:
        a = capture_inputs(original, x, kw, {first: dense[first]}, mask)[first]
        b = capture_inputs(layer, xc, kw, {first: group[first]}, mask)[first]
        accumulate(Cc, b, b)
        for a_rows, b_rows in zip(a.split(ROWS), b.split(ROWS), strict=True):  # float64 copies of ROWS tokens
            a_rows = a_rows.to(dtype)
            for name, module in dense.items():
                y = _outputs(a_rows, module.weight, dtype)  # W x per token, the dense output the refit aims at
                accumulate(P[name], y, b_rows)
                energies[name] += y.double().square().sum().item()
    S, shift = None, 0.0
    if factors != "B":  # C' + lambda I and its factor, the same for every linear of the group, in C''s memory
        shift = ridge * Cc.trace().item() / n  # lambda
        Cc.diagonal().add_(shift)
        S = CholeskyInPlace(Cc)

    def fit_terms(B: torch.Tensor, AS_blocks, target: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(A S)(A S)^T and tr(B A S target^T) = <B^T target, A S>, from column blocks ``(j0, j1, (A S)[:, j0:j1])``:
        with S, P = target S^T, so the second is tr(M P^T); A S is never needed whole."""
        gram = torch.zeros(B.shape[1], B.shape[1], dtype=torch.float64, device=B.device)
        cross = 0.0
        for j0, j1, part in AS_blocks:
            gram.addmm_(part, part.mT)
            cross += ((B.mT @ target[:, j0:j1]) * part).sum().item()
        return gram, cross

    def error(B: torch.Tensor, A: torch.Tensor, gram: torch.Tensor, cross: float, energy: float) -> float:
        """E(B A) = tr(M C' M^T) - 2 tr(M P^T) + energy with tr(M C' M^T) = <B^T B, A C' A^T>; with S,
        A C' A^T = (A S)(A S)^T - (lambda + jitter) A A^T (C' = S S^T - (lambda + jitter) I), and ``gram`` and
        ``cross`` are :func:`fit_terms`; without, ``gram`` = A C' A^T."""
        BtB = B.mT @ B
        quadratic = (BtB * gram).sum().item()
        if S is not None:
            quadratic -= (shift + S.jitter) * (BtB * (A @ A.mT)).sum().item()
        return quadratic - 2 * cross + energy

    def columns(M: torch.Tensor):
        return ((j, j + BLOCK, M[:, j : j + BLOCK]) for j in range(0, M.shape[1], BLOCK))

    results = {}
    for name, module in group.items():
        k, energy = module.rank, energies[name]
        A0, B0 = module.A.weight.double(), module.B.weight.double()
        if factors == "B":
            target = P.pop(name)
            G = A0 @ Cc @ A0.mT
            before = error(B0, A0, G, fit_terms(B0, columns(A0), target)[1], energy)
            L, _ = cholesky_with_jitter(G + ridge * G.trace() / k * torch.eye(k, dtype=G.dtype, device=G.device))
            B, A = torch.cholesky_solve((target @ A0.mT).mT, L).mT, A0
            after = error(B, A, A @ Cc @ A.mT, fit_terms(B, columns(A), target)[1], energy)
            del target
        else:
            # memory at width 8192 (down_proj): besides C' (n x n) only target (m x n) and k x n factors, one or
            # two at a time; A S comes block by block, and target goes before A = (A S) S^{-1} is solved
            target = S.solve_left_transposed(P.pop(name))  # W* S = P S^{-T}, [m, n], in P's memory
            before = error(B0, A0, *fit_terms(B0, S.blocks(A0), target), energy)
            del A0, B0  # the module keeps its factors; their float64 copies go before the SVD
            B, AS, _ = factorize(target, None, k)  # its truncated SVD: B A S with A S = AS
            gram, cross = fit_terms(B, columns(AS), target)
            del target
            A = S.solve_right(AS)
            del AS
            after = error(B, A, gram, cross, energy)
        if after < before:
            module.B.weight.copy_(B)
            module.A.weight.copy_(A)
        scale = energy or 1.0
        results[name] = {"error_before": before / scale, "error_refit": after / scale, "refit_kept": after < before}
    return results


def align_layer(
    original, layer, factorised: dict, groups, entries: dict, streams: Streams, ridge: float, factors: str
) -> dict:
    """Refits the layer's factorised linears group by group on the compressed stream, undoes them all if the
    layer's output error rose, and advances both streams. Returns the layer's errors and the decision."""
    before = compare_layers(original, layer, streams)
    saved = {name: copy.deepcopy(module.state_dict()) for name, module in factorised.items()}
    for group in groups:
        members = {name: factorised[name] for name in group if name in factorised}
        if members:
            for name, result in refit_group(original, layer, members, streams, ridge, factors).items():
                entries[name]["alignment"] = result
    # the original stream moves on here: the decision below does not touch it
    with_refit = compare_layers(original, layer, streams, advance_original=True)
    kept = with_refit <= before
    if not kept:
        for name, module in factorised.items():
            module.load_state_dict(saved[name])
            entries[name]["alignment"]["refit_kept"] = False
    return {
        "error_before_alignment": before,
        "error_with_refit": with_refit,
        "alignment_kept": kept,
        "output_error": compare_layers(None, layer, streams, advance_compressed=True),
    }
