"""Progressive alignment (OD-LLM step 5): refit a layer's low-rank factors on the stream it really sees.

On the compressed stream X'_i (what layer i gets after the compressed layers 0..i-1), refit the factors so
that B A x' matches W x, from the sums C' = sum x'x'^T, K = sum x x'^T, C = sum x x^T (float64):

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

from odllm.compress.driver import Streams, compare_layers
from odllm.compress.lowrank import LowRankLinear, cholesky_with_jitter, factorize
from odllm.compress.statistics import capture_inputs, product


def refit_group(
    original, layer, group: dict[str, LowRankLinear], streams: Streams, ridge: float, factors: str
) -> dict:
    """Refits the factors of each linear in ``group`` (they share one input) so that B A x' ~ W x.

    Input statistics on the two streams, summed once for the group: C' = sum x' x'^T, K = sum x x'^T,
    C = sum x x^T. Any M = B A then has the exact error E(M) = tr(M C' M^T) - 2 tr(M K^T W^T) + tr(W C W^T).

    - ``factors="B"`` (the paper): A stays, B = W K A^T (A C' A^T + lambda I)^{-1} (ridge least squares);
    - ``factors="BA"``: the best rank-k M for the compressed stream (reduced-rank regression): the
      unconstrained fit W* = W K C'^{-1}, truncated in the C' norm, i.e. ``factorize(W*, chol(C'), k)``,
      the whitened SVD of step 2 again, now on what the layer really sees and aimed at the original output.

    A refit is kept only where E falls. Returns per linear the relative errors and the decision. The sums are
    float64 on the layer's device, each batch's products formed as :func:`odllm.compress.statistics.product` does.
    """
    dense = {name: original.get_submodule(name) for name in group}
    n = next(iter(group.values())).in_features
    device = dense[next(iter(group))].weight.device
    Cc, K, C = (torch.zeros(n, n, dtype=torch.float64, device=device) for _ in range(3))
    first = next(iter(group))
    for x, xc, kw, mask in streams:
        a = capture_inputs(original, x, kw, {first: dense[first]}, mask)[first]
        b = capture_inputs(layer, xc, kw, {first: group[first]}, mask)[first]
        Cc += product(b, b)
        K += product(a, b)
        C += product(a, a)
    # memory: C is needed only for each linear's energy tr(W C W^T), so it goes before the n x n solves, and
    # chol(C' + lambda I) and C'^{-1} K^T, the same for every linear of the group, are formed once
    energies = {name: ((dense[name].weight.double() @ C) * dense[name].weight.double()).sum().item()
                for name in group}
    del C
    S = solved = None
    results = {}
    for name, module in group.items():
        W, k = dense[name].weight.double(), module.rank
        energy = energies[name]
        A = module.A.weight.double()
        if factors == "B":
            G = A @ Cc @ A.T
            L, _ = cholesky_with_jitter(G + ridge * G.trace() / k * torch.eye(k, dtype=G.dtype, device=G.device))
            B = torch.cholesky_solve((W @ K @ A.T).T, L).T
        else:
            if S is None:
                shifted = Cc.clone()  # C' + lambda I without an n x n identity: the same numbers
                shifted.diagonal().add_(ridge * Cc.trace() / n)
                S, _ = cholesky_with_jitter(shifted)
                del shifted
                solved = torch.cholesky_solve(K.T, S).T
            B, A, _ = factorize(W @ solved, S, k)
        before, after = (
            ((M @ Cc) * M).sum().item() - 2 * ((M @ K.T) * W).sum().item() + energy
            for M in (module.B.weight.double() @ module.A.weight.double(), B @ A)
        )
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
