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
import logging

import torch

from odllm.compress.blocked import LowerBlocks
from odllm.compress.cholesky import JITTERS, MIN_PIVOT, cholesky_with_jitter
from odllm.compress.driver import Streams, compare_layers
from odllm.compress.lowrank import LowRankLinear, factorize
from odllm.compress.statistics import ROWS, accumulate, accumulation_dtype, capture_inputs

log = logging.getLogger(__name__)

BLOCK = 512  # rows of W converted to float64 at a time, columns per block of the error's cross term


def _outputs(a: torch.Tensor, W: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a W^T`` in ``dtype`` with W converted a block of rows at a time (no float64 copy of all of W)."""
    return torch.cat([a @ W[r : r + BLOCK].to(dtype).mT for r in range(0, W.shape[0], BLOCK)], dim=1)


def _cross(B: torch.Tensor, A: torch.Tensor, P: torch.Tensor) -> float:
    """tr(B A P^T) = <B^T P, A>, a column block at a time."""
    B = B.double()
    return sum(((B.mT @ P[:, j : j + BLOCK]) * A[:, j : j + BLOCK].double()).sum().item()
               for j in range(0, P.shape[1], BLOCK))


def _error(B: torch.Tensor, quadratic: torch.Tensor, cross: float, energy: float) -> float:
    """E(B A) = tr(M C' M^T) - 2 tr(M P^T) + tr(W C W^T) with tr(M C' M^T) = <B^T B, A C' A^T> (``quadratic``)."""
    B = B.double()
    return ((B.mT @ B) * quadratic).sum().item() - 2 * cross + energy


def _compressed_covariance(layer, linear, device: torch.device, streams: Streams) -> LowerBlocks:
    """C' = sum x' x'^T of ``linear``'s inputs in ``layer`` on the compressed stream (summed again for a retry)."""
    Cc = LowerBlocks(linear.in_features, device)
    for _, xc, kw, mask in streams:
        Cc.add_gram(next(iter(capture_inputs(layer, xc, kw, {"linear": linear}, mask).values())))
    return Cc


def _factor(Cc: LowerBlocks, shift: float, scale: float, again) -> tuple[LowerBlocks, float]:
    """C' + (shift + jitter) I factored in place, and the jitter: 0 unless it fails (ridge 0 on a singular C'),
    then C' is summed again (``again()``) with growing jitter, as :func:`odllm.compress.cholesky.cholesky_with_jitter`
    grows it, and the jitter is logged."""
    for eps in JITTERS:
        if eps:
            Cc = again()
            log.info("alignment: C' + lambda I is singular; summed again with jitter %.3g * I", eps * scale)
        Cc.add_to_diagonal(shift + eps * scale)
        if Cc.cholesky_(MIN_PIVOT * scale):
            return Cc, eps * scale
    raise RuntimeError(f"Cholesky of C' failed even with jitter {JITTERS[-1]} * trace/n; it is not PSD")


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
      C' (kept as its lower blocks, :class:`odllm.compress.blocked.LowerBlocks`) + lambda I is overwritten by its
      Cholesky factor S, and the whitened target is W* S = P S^{-T}: its truncated SVD B A' gives A = A' S^{-1}.

    A refit is kept only where E falls. Returns per linear the relative errors and the decision.
    """
    dense = {name: original.get_submodule(name) for name in group}
    n = next(iter(group.values())).in_features
    first = next(iter(group))
    device = dense[first].weight.device
    Cc = LowerBlocks(n, device)  # C', its lower blocks only (half of an n x n matrix)
    P = {name: torch.zeros(m.out_features, n, dtype=torch.float64, device=device) for name, m in dense.items()}
    energies = dict.fromkeys(group, 0.0)
    dtype = accumulation_dtype(device)
    for x, xc, kw, mask in streams:
        a = capture_inputs(original, x, kw, {first: dense[first]}, mask)[first]
        b = capture_inputs(layer, xc, kw, {first: group[first]}, mask)[first]
        Cc.add_gram(b)
        for a_rows, b_rows in zip(a.split(ROWS), b.split(ROWS), strict=True):  # float64 copies of ROWS tokens
            a_rows = a_rows.to(dtype)
            for name, module in dense.items():
                y = _outputs(a_rows, module.weight, dtype)  # W x per token, the dense output the refit aims at
                accumulate(P[name], y, b_rows)
                energies[name] += y.double().square().sum().item()
    # E of the current factors, from C' and P before either is overwritten (float64 copies of blocks only)
    errors_before = {name: _error(module.B.weight, Cc.quadratic(module.A.weight),
                                  _cross(module.B.weight, module.A.weight, P[name]), energies[name])
                     for name, module in group.items()}
    S, shift, jitter = None, 0.0, 0.0
    if factors != "B":  # C' + lambda I overwritten by its factor, the same for every linear of the group
        trace = Cc.trace()
        shift = ridge * trace / n  # lambda
        S, jitter = _factor(Cc, shift, trace / n or 1.0,
                            lambda: _compressed_covariance(layer, group[first], device, streams))
    results = {}
    for name, module in group.items():
        k, energy, target = module.rank, energies[name], P.pop(name)
        if factors == "B":
            A = module.A.weight.double()
            G = Cc.quadratic(A)
            L, _ = cholesky_with_jitter(G + ridge * G.trace() / k * torch.eye(k, dtype=G.dtype, device=G.device))
            B = torch.cholesky_solve((target @ A.mT).mT, L).mT
            after = _error(B, G, _cross(B, A, target), energy)
            del target
        else:
            # at width 8192 (down_proj) memory holds C' (n x n, now S), target (m x n) and at most two k x n
            # factors: A S is read in column blocks, and target goes before A = (A S) S^{-1} is solved
            target = S.solve_left_transposed_(target)  # W* S = P S^{-T}, [m, n], in P's memory
            B, AS, _ = factorize(target, None, k)  # its truncated SVD: B A S with A S = AS
            cross = _cross(B, AS, target)  # tr(B A S target^T) = tr(M P^T)
            del target
            gram = AS @ AS.mT
            A = S.solve_right_(AS)  # A = (A S) S^{-1}, in A S's memory
            # A C' A^T = (A S)(A S)^T - (lambda + jitter) A A^T, as C' = S S^T - (lambda + jitter) I
            after = _error(B, gram - (shift + jitter) * (A @ A.mT), cross, energy)
        before = errors_before[name]
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
