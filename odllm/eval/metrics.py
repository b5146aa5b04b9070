"""HR@K and NDCG@K from the rank of each user's single target among the ranked beams, as a torchmetrics ``Metric``.

The state is a count of users per target rank (a sum, ``dist_reduce_fx="sum"``). With one relevant item a
user's HR@K and NDCG@K depend on nothing but that rank, so the counts give every metric's number of users,
sum and sum of squares, hence its mean and standard error. Why counts: processes (DDP) merge by adding them,
with no padded all-gather of per-user lists; memory stays max(K) + 1 integers however many users are scored
(torchmetrics' retrieval classes keep every prediction, and under ``deterministic=True`` grouped them with a
bincount that needed 429 GB for Games' 50k users); integers add up exactly in any order and are left alone when
a module is cast to half precision, so one process and N processes give the same numbers to the last digit.

Per-rank values: HR@K = 1 when 0 < rank <= K. NDCG@K is torchmetrics' own ``retrieval_normalized_dcg`` of a
list whose one relevant item sits at that rank: 1/log2(rank+1) as torchmetrics computes it in float32 (through a
cumulative sum of discounts; within 2e-7 of the double closed form at K = 10), so results equal torchmetrics' and
earlier runs' exactly. Rank 0 (target not among the beams) and ranks beyond K score 0.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torchmetrics import Metric
from torchmetrics.functional.retrieval import retrieval_normalized_dcg


class RankSummary(NamedTuple):
    """What :class:`RankMetrics` computes: the users scored and ``{"hr@K"/"ndcg@K": {"value", "stderr"}}``."""

    users: int
    metrics: dict[str, dict[str, float]]


class RankMetrics(Metric):
    """HR@K and NDCG@K for every K in ``ks`` (NDCG@1 left out: it equals HR@1 with one relevant item).

    ``update(ranks)``: 1-based rank of each user's target, 0 when it is not among the beams.
    ``compute()``: a :class:`RankSummary` over the users of every process (torchmetrics sums the counts first).
    """

    is_differentiable = False
    full_state_update = False
    counts: torch.Tensor

    def __init__(self, ks: Sequence[int] = (1, 5, 10), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not ks or min(ks) < 1:
            raise ValueError(f"ks={tuple(ks)}: every K must be a positive integer")
        self.ks = tuple(int(k) for k in ks)
        self.max_k = max(self.ks)
        # counts[r]: users whose target sits at rank r <= max K; counts[0]: absent or ranked below max K (scores 0)
        self.add_state("counts", torch.zeros(self.max_k + 1, dtype=torch.long), dist_reduce_fx="sum")
        self._values = per_rank_values(self.ks)

    def update(self, ranks: torch.Tensor) -> None:
        ranks = torch.as_tensor(ranks, device=self.counts.device).reshape(-1).long()
        slot = torch.where((ranks > 0) & (ranks <= self.max_k), ranks, 0)
        # a one-hot sum rather than bincount, which has no deterministic CUDA kernel under deterministic=True
        self.counts += (slot.unsqueeze(1) == torch.arange(self.max_k + 1, device=slot.device)).sum(0)

    def compute(self) -> RankSummary:
        counts = self.counts.cpu()
        return RankSummary(int(counts.sum()), {name: mean_and_stderr(counts, v) for name, v in self._values.items()})


def per_rank_values(ks: Sequence[int]) -> dict[str, torch.Tensor]:
    """Each metric's value (float64, indexed by rank 0..max K) for a user whose target sits at that rank."""
    ranks = torch.arange(max(ks) + 1)
    gains = torch.tensor(_ndcg_gains(max(ks)), dtype=torch.float64)
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        hit = (ranks > 0) & (ranks <= k)
        out[f"hr@{k}"] = hit.double()
        if k > 1:  # NDCG@1 is HR@1
            out[f"ndcg@{k}"] = torch.where(hit, gains, 0.0)
    return out


@functools.cache
def _ndcg_gains(max_rank: int) -> tuple[float, ...]:
    """torchmetrics' NDCG of a list whose one relevant item is at rank r (index r; index 0, a miss, scores 0)."""
    gains = [0.0]
    for r in range(1, max_rank + 1):
        target = torch.zeros(r, dtype=torch.long)
        target[-1] = 1
        gains.append(retrieval_normalized_dcg(torch.arange(r, 0, -1, dtype=torch.float), target, top_k=r).item())
    return tuple(gains)


def mean_and_stderr(counts: torch.Tensor, values: torch.Tensor) -> dict[str, float]:
    """Mean and standard error of the mean over users, from users per rank and the value at each rank."""
    n = int(counts.sum())
    weights = counts.double()
    mean = float((weights * values).sum()) / n if n else float("nan")
    if n < 2:
        return {"value": mean, "stderr": float("nan")}
    variance = float((weights * (values - mean) ** 2).sum()) / (n - 1)  # unbiased, as torch.std
    return {"value": mean, "stderr": math.sqrt(variance) / math.sqrt(n)}


def check_list_length(ks: Sequence[int], list_length: int) -> None:
    """HR@K needs K ranked beams; fewer would silently count K-beam hits on a shorter list."""
    if max(ks) > list_length:
        raise ValueError(f"K={max(ks)} exceeds the {list_length} ranked beams; use num_beams >= {max(ks)}")


def ranking_metrics(
    ranks: torch.Tensor, list_length: int, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, dict[str, float]]:
    """``ranks``: 1-based rank of each target, 0 when it is not among the ``list_length`` beams."""
    if ranks.numel() == 0:
        raise ValueError("no test cases to score")
    check_list_length(ks, list_length)
    # this process's users only: after a DDP fit rank 0 scores the test set alone, so a sync would wait forever
    metric = RankMetrics(ks, sync_on_compute=False)
    metric.update(ranks)
    return metric.compute().metrics


def format_metrics(metrics: dict[str, dict[str, float]]) -> str:
    """One line for the log: ``hr@5 0.1234±0.0056 ...``."""
    return "  ".join(f"{k} {v['value']:.4f}±{v['stderr']:.4f}" for k, v in metrics.items())
