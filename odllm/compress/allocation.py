"""Rank allocation under one parameter budget (``method.allocation: loss``; SVD-LLM V2 / ZS-SVD's idea).

The uniform ratio gives every m x n decoder linear rank k = floor(ratio mn/(m+n)). Here the same total is shared
out by the loss each rank buys. With W_j S_j = U Sigma V^T (S_j S_j^T = C_j, the whitened weight of matrix j),
truncating j at rank r costs r (m_j + n_j) parameters and leaves the calibration output error
L_j(r) = sum_{i > r} sigma_{j,i}^2, so we solve

    min_r  sum_j w_j L_j(r_j)   s.t.   sum_j cost_j(r_j) <= budget = the uniform ratio's total,

cost_j(r) = r (m_j + n_j), or m_j n_j once r (m_j + n_j) >= m_j n_j (the matrix stays dense, L_j = 0).
Greedy on a heap: start every matrix at rank 1 and repeatedly buy the step with the largest loss drop per
parameter, w_j sigma_{j,r+1}^2 / (m_j + n_j) (the last step of a matrix buys "dense": the rest of its loss at the
cost that is left to m_j n_j); a step that no longer fits retires its matrix and the others go on filling the
budget. As sigma^2 falls with r, every matrix's gains are concave, so up to the first step that does not fit this
is a Lagrangian solution, exactly optimal for the parameters it spends (Everett): the result is never worse than
the exact optimum with one step (max m_j + n_j) less budget, and never above the budget.

Weights w_j (``importance``; docs/results.md, rank allocation on ml-100k and Instruments):
- ``kl``: KL(dense || model with only W_j truncated at the uniform rank) on ``sensitivity_prompts`` calibration
  prompts, divided by L_j(uniform rank): next-token KL per unit of whitened loss, so sum_j w_j L_j(r_j) is a
  first-order (additive) estimate of the model's KL to dense;
- ``energy``: 1 / tr(W_j C_j W_j^T): every matrix's relative output error counts the same;
- ``kl_energy`` (default): sqrt(w_kl w_energy), between the two: on Instruments (valid users) ``kl`` cut the KL to
  dense most but lowered HR@1, ``energy`` kept HR@1 and NDCG@10 but cut the KL least (docs/results.md);
- ``none``: w_j = 1, the absolute output errors summed.
"""

from __future__ import annotations

import heapq
import logging

import torch
from torch import nn

from odllm.compress.cholesky import cholesky_with_jitter
from odllm.compress.driver import decoder_layers, forward_layer, layer_inputs
from odllm.compress.lowrank import factorize, rank_for_ratio, singular_values
from odllm.compress.statistics import InputCovariances

log = logging.getLogger(__name__)

IMPORTANCE = ("kl", "energy", "kl_energy", "none")
MEASURED_KL = ("kl", "kl_energy")  # the importances that need each matrix's KL probe


def params(shape: tuple[int, int], rank: int | None) -> int:
    """Numbers a matrix stores at ``rank`` (None = dense)."""
    m, n = shape
    return m * n if rank is None else rank * (m + n)


def uniform_ranks(shapes: dict[str, tuple[int, int]], ratio: float) -> dict[str, int | None]:
    """The uniform ratio's rank per matrix (None = kept dense), as ``LowRank`` without allocation chooses."""
    return {name: rank_for_ratio(m, n, ratio) for name, (m, n) in shapes.items()}


def allocate(
    spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], weights: dict[str, float], budget: int,
    min_rank: int = 1,
) -> dict[str, int | None]:
    """Ranks (None = dense) minimising sum_j w_j sum_{i>r_j} sigma_{j,i}^2 with total parameters <= ``budget``."""
    ranks = dict.fromkeys(spectra, min_rank)
    spent = sum(params(shapes[j], min_rank) for j in spectra)
    if spent > budget:
        raise ValueError(f"the budget of {budget} parameters is below rank {min_rank} for every matrix ({spent})")
    sq = {j: spectra[j].double().square() for j in spectra}
    order = {j: i for i, j in enumerate(spectra)}

    def step(j: str) -> tuple[int, float] | None:  # (cost, weighted loss drop) of matrix j's next step
        (m, n), r = shapes[j], ranks[j]
        if r is None:
            return None
        if (r + 1) * (m + n) >= m * n:  # the next rank stores no less than the dense matrix: go dense
            return m * n - r * (m + n), weights[j] * sq[j][r:].sum().item()
        return m + n, weights[j] * sq[j][r].item()

    heap = []

    def push(j: str) -> None:
        nxt = step(j)
        if nxt is not None:  # ties: the matrix with the lower rank first, then the first matrix (round robin)
            heapq.heappush(heap, (-nxt[1] / nxt[0], ranks[j], order[j], j))

    for j in spectra:
        push(j)
    while heap:
        *_, j = heapq.heappop(heap)
        cost, _ = step(j)
        if spent + cost > budget:
            continue  # this matrix cannot grow any more: drop it
        spent += cost
        m, n = shapes[j]
        ranks[j] = None if (ranks[j] + 1) * (m + n) >= m * n else ranks[j] + 1
        push(j)
    return ranks


def _positions(batch: dict) -> torch.Tensor:
    return batch.get("statistics_mask", batch["attention_mask"]).bool()


def _log_probs(model: nn.Module, batch: dict) -> torch.Tensor:
    """Next-token log-probabilities at the statistics positions, ``[tokens, vocab]`` (float64)."""
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, use_cache=False).logits
    return torch.log_softmax(logits[_positions(batch)].double(), -1)


def _kl(model: nn.Module, probe: list[dict], reference: list[torch.Tensor]) -> float:
    total = count = 0
    for batch, p in zip(probe, reference, strict=True):
        q = _log_probs(model, batch)
        total += (p.exp() * (p - q)).sum().item()
        count += len(p)
    return total / max(count, 1)


@torch.no_grad()
def measure(
    model: nn.Module, batches: list[dict], ratio: float, importance: str, sensitivity_prompts: int = 64,
) -> dict[str, dict]:
    """Per decoder linear (full name): shape, whitened spectrum, output energy tr(W C W^T), probe rank, its
    truncation loss and (``importance="kl"``) the KL to dense when only it is truncated at that rank.

    One pass over the dense model on the original stream, layer by layer, with the statistics ``LowRank`` takes
    (same masks, same jitter), so the spectra are those the factorisation will see. Holds spectra, not factors.
    """
    if importance not in IMPORTANCE:
        raise ValueError(f"importance={importance!r}; choose one of {list(IMPORTANCE)}")
    layers = decoder_layers(model)
    names = {module: name for name, module in model.named_modules()}
    masks = [_positions(batch) for batch in batches]
    probe, reference = [], []
    if importance in MEASURED_KL:  # a spread of the calibration batches (they are sorted by length)
        wanted, taken = max(1, sensitivity_prompts), 0
        stride = max(1, len(batches) * len(batches[0]["input_ids"]) // wanted)
        for batch in batches[::stride]:
            if taken >= wanted:
                break
            probe.append(batch)
            taken += len(batch["input_ids"])
        reference = [_log_probs(model, batch) for batch in probe]
    X, kwargs = layer_inputs(model, layers, batches)
    found = {}
    for layer in layers:
        linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        with InputCovariances(linears) as stats:
            for x, kw, mask in zip(X, kwargs, masks, strict=True):
                stats.mask = mask
                forward_layer(layer, x, kw)
        for name, linear in linears.items():
            W, C = linear.weight.double(), stats.covariance[name]
            m, n = W.shape
            S, _ = cholesky_with_jitter(C)
            sigma = singular_values(W @ S)
            k = rank_for_ratio(m, n, ratio) or max(1, (m * n) // (m + n) - 1)  # probe: the uniform rank
            info = {"shape": (m, n), "sigma": sigma, "energy": ((W @ C) * W).sum().item(), "probe_rank": k,
                    "probe_loss": sigma[k:].square().sum().item()}
            if importance in MEASURED_KL:
                B, A, _ = factorize(W, S, k)
                dense = linear.weight.detach().clone()
                linear.weight.copy_((B @ A).to(dense.dtype))
                try:
                    info["kl"] = _kl(model, probe, reference)
                finally:
                    linear.weight.copy_(dense)
            found[f"{names[layer]}.{name}"] = info
        X = [forward_layer(layer, x, kw) for x, kw in zip(X, kwargs, strict=True)]
    return found


def weight(info: dict, importance: str) -> float:
    """w_j of the objective (see the module docstring)."""
    if importance == "none":
        return 1.0
    if importance == "energy":
        return 1.0 / info["energy"] if info["energy"] > 0 else 0.0
    if importance == "kl_energy":
        return (max(weight(info, "kl"), 0.0) * weight(info, "energy")) ** 0.5  # a KL can round below 0
    return info["kl"] / info["probe_loss"] if info["probe_loss"] > 0 else 0.0


def choose_ranks(
    model: nn.Module, batches: list[dict], ratio: float, importance: str = "kl_energy", sensitivity_prompts: int = 64,
) -> tuple[dict[str, int | None], dict]:
    """Ranks per decoder linear (None = dense) at the uniform ratio's parameter total, and the report of it."""
    found = measure(model, batches, ratio, importance, sensitivity_prompts)
    shapes = {name: info["shape"] for name, info in found.items()}
    uniform = uniform_ranks(shapes, ratio)
    budget = sum(params(shapes[j], uniform[j]) for j in shapes)
    weights = {j: weight(info, importance) for j, info in found.items()}
    ranks = allocate({j: info["sigma"] for j, info in found.items()}, shapes, weights, budget)
    allocated = sum(params(shapes[j], ranks[j]) for j in shapes)

    def loss(ranks: dict) -> float:
        return sum(weights[j] * found[j]["sigma"][r:].square().sum().item() for j, r in ranks.items() if r)

    kl = importance in MEASURED_KL
    report = {
        "rule": "loss", "importance": importance, "sensitivity_prompts": sensitivity_prompts if kl else None,
        "budget_params": budget, "allocated_params": allocated, "left_over_params": budget - allocated,
        "dense_params": sum(m * n for m, n in shapes.values()),
        "weighted_loss": {"uniform": loss(uniform), "allocated": loss(ranks)},
        "ranks": {j: ranks[j] or "dense" for j in shapes},
        "uniform_ranks": {j: uniform[j] or "dense" for j in shapes},
        "weights": weights,
        "kl_probe": {j: info["kl"] for j, info in found.items()} if kl else None,
    }
    log.info("rank allocation (%s): %d of %d parameters (uniform total), weighted loss %.4g -> %.4g",
             importance, allocated, budget, report["weighted_loss"]["uniform"], report["weighted_loss"]["allocated"])
    return ranks, report
