"""HR/NDCG on hand cases, checked against closed forms and torchmetrics' functional API."""

import math

import pytest
import torch
from torchmetrics.functional.retrieval import retrieval_hit_rate, retrieval_normalized_dcg

from odllm.eval.metrics import ranking_metrics


def test_hand_case():
    ranks = torch.tensor([1, 3, 0, 10, 11])  # 0 = target not among the beams
    m = ranking_metrics(ranks, list_length=20, ks=(1, 5, 10))
    assert m["hr@1"]["value"] == pytest.approx(1 / 5)
    assert m["hr@5"]["value"] == pytest.approx(2 / 5)
    assert m["hr@10"]["value"] == pytest.approx(3 / 5)
    assert m["ndcg@5"]["value"] == pytest.approx((1 + 1 / math.log2(4)) / 5)
    assert m["ndcg@10"]["value"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(11)) / 5)
    assert "ndcg@1" not in m
    hits = torch.tensor([1.0, 1, 0, 1, 0])
    assert m["hr@10"]["stderr"] == pytest.approx(hits.std().item() / math.sqrt(5))


def test_agrees_with_torchmetrics_functional_per_query():
    torch.manual_seed(0)
    ranks = torch.randint(0, 21, (50,))
    m = ranking_metrics(ranks, list_length=20, ks=(5, 10))
    for k in (5, 10):
        ndcg, hr = [], []
        for r in ranks.tolist():
            preds = torch.arange(21, 0, -1).float()
            target = torch.zeros(21, dtype=torch.bool)
            target[r - 1 if r else 20] = True
            ndcg.append(retrieval_normalized_dcg(preds, target, top_k=k))
            hr.append(retrieval_hit_rate(preds, target, top_k=k))
        assert m[f"ndcg@{k}"]["value"] == pytest.approx(torch.stack(ndcg).mean().item(), abs=1e-6)
        assert m[f"hr@{k}"]["value"] == pytest.approx(torch.stack(hr).mean().item(), abs=1e-6)


def test_k_larger_than_beams_is_an_error():
    with pytest.raises(ValueError, match="num_beams"):
        ranking_metrics(torch.tensor([1]), list_length=5, ks=(10,))


def test_many_users_under_deterministic_algorithms():
    """Lightning's deterministic=True switched torchmetrics to a bincount whose memory grew with users^2: one
    call for Games' 50k test users asked for 429 GB. Chunked, it takes megabytes and agrees with the closed form."""
    torch.manual_seed(0)
    ranks = torch.randint(0, 21, (13_000,))  # unchunked: 28 GB, more than this machine has
    closed_form = torch.where((ranks > 0) & (ranks <= 10), 1 / torch.log2(ranks.double() + 1), 0.0).mean().item()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        m = ranking_metrics(ranks, list_length=20, ks=(10,))
    finally:
        torch.use_deterministic_algorithms(previous)
    assert m["ndcg@10"]["value"] == pytest.approx(closed_form, abs=1e-6)
    assert m["hr@10"]["value"] == pytest.approx(((ranks > 0) & (ranks <= 10)).double().mean().item(), abs=1e-6)
