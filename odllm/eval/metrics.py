"""HR@K and NDCG@K from the rank of each user's single target among the ranked beams.

torchmetrics computes the per-user values (its aggregation hook returns them unreduced, so we can also
report standard errors). Each user's list is given as distinct, strictly decreasing scores — one entry
per beam plus one for "not retrieved" — so torchmetrics' tie averaging never applies and no item appears
twice; a target outside the beams sits below every beam and scores 0 for all K <= beams.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchmetrics.retrieval import RetrievalHitRate, RetrievalNormalizedDCG

CHUNK_USERS = 128  # users per torchmetrics call; see _per_user


def _per_user(metric_cls, ranks: torch.Tensor, list_length: int, k: int) -> torch.Tensor:
    """Per-user values, a chunk of users at a time: under ``torch.use_deterministic_algorithms`` (Lightning's
    ``deterministic=True``) torchmetrics groups by query with a bincount fallback whose memory grows with
    entries x queries (429 GB for Games' 50k test users in one call)."""
    return torch.cat([_per_user_chunk(metric_cls, chunk, list_length, k) for chunk in ranks.split(CHUNK_USERS)])


def _per_user_chunk(metric_cls, ranks: torch.Tensor, list_length: int, k: int) -> torch.Tensor:
    n = ranks.numel()
    width = list_length + 1
    preds = torch.arange(width, 0, -1, dtype=torch.float).repeat(n)
    slot = torch.where(ranks > 0, ranks - 1, torch.full_like(ranks, list_length))
    target = torch.zeros(n, width, dtype=torch.long)
    target[torch.arange(n), slot] = 1
    indexes = torch.arange(n).repeat_interleave(width)
    metric = metric_cls(top_k=k, aggregation=lambda x, dim: x)
    return metric(preds, target.reshape(-1), indexes=indexes)


def ranking_metrics(
    ranks: torch.Tensor, list_length: int, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, dict[str, float]]:
    """``ranks``: 1-based rank of each target, 0 when it is not among the ``list_length`` beams."""
    if ranks.numel() == 0:
        raise ValueError("no test cases to score")
    if max(ks) > list_length:
        raise ValueError(f"K={max(ks)} exceeds the {list_length} ranked beams; use num_beams >= {max(ks)}")
    out: dict[str, dict[str, float]] = {}
    for k in ks:
        for name, cls in (("hr", RetrievalHitRate), ("ndcg", RetrievalNormalizedDCG)):
            if name == "ndcg" and k == 1:
                continue  # identical to HR@1 with one relevant item
            values = _per_user(cls, ranks, list_length, k).double()
            out[f"{name}@{k}"] = {"value": values.mean().item(), "stderr": standard_error(values)}
    return out


def standard_error(values: torch.Tensor) -> float:
    n = values.numel()
    return values.std(unbiased=True).item() / math.sqrt(n) if n > 1 else float("nan")


def format_metrics(metrics: dict[str, dict[str, float]]) -> str:
    return "  ".join(f"{k} {v['value']:.4f}±{v['stderr']:.4f}" for k, v in metrics.items())
