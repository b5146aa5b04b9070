"""HR/NDCG on hand cases, checked against closed forms and torchmetrics' functional API; merging the sums."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics.functional.retrieval import retrieval_hit_rate, retrieval_normalized_dcg

from odllm.eval.metrics import RankMetrics, format_metrics, ranking_metrics


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
    """Lightning's deterministic=True switched torchmetrics' retrieval classes to a bincount whose memory grew with
    users^2: one call for Games' 50k test users asked for 429 GB. Counts per rank take max(K) + 1 integers."""
    torch.manual_seed(0)
    ranks = torch.randint(0, 21, (13_000,))  # torchmetrics' retrieval classes in one call: 28 GB
    closed_form = torch.where((ranks > 0) & (ranks <= 10), 1 / torch.log2(ranks.double() + 1), 0.0).mean().item()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        m = ranking_metrics(ranks, list_length=20, ks=(10,))
    finally:
        torch.use_deterministic_algorithms(previous)
    assert m["ndcg@10"]["value"] == pytest.approx(closed_form, abs=1e-6)
    assert m["hr@10"]["value"] == pytest.approx(((ranks > 0) & (ranks <= 10)).double().mean().item(), abs=1e-6)


def test_no_test_cases_is_an_error():
    with pytest.raises(ValueError, match="no test cases to score"):
        ranking_metrics(torch.zeros(0, dtype=torch.long), list_length=20)


@pytest.mark.parametrize("seed", range(5))
def test_random_cases_match_torchmetrics_retrieval_functions(seed):
    """Each user as torchmetrics sees a query: a ranked list of distinct scores with one relevant entry (or none
    among the beams); the mean and standard error of its per-query values are what ranking_metrics reports."""
    g = torch.Generator().manual_seed(seed)
    beams = int(torch.randint(10, 41, (1,), generator=g))
    ks = (1, 5, 10, int(torch.randint(2, beams + 1, (1,), generator=g)))
    users = int(torch.randint(2, 300, (1,), generator=g))
    ranks = torch.randint(1, beams + 1, (users,), generator=g) * (torch.rand(users, generator=g) < 0.7)
    preds, targets = [], []
    for r in ranks.tolist():
        preds.append(torch.rand(beams, generator=g).sort(descending=True).values)  # beam scores, best first
        target = torch.zeros(beams, dtype=torch.bool)
        if r:
            target[r - 1] = True
        targets.append(target)
    m = ranking_metrics(ranks, list_length=beams, ks=ks)
    for k in ks:
        functions = {"hr": retrieval_hit_rate, "ndcg": retrieval_normalized_dcg}
        for name, fn in list(functions.items())[: 1 if k == 1 else 2]:  # NDCG@1 is HR@1
            per_user = torch.stack([fn(p, t, top_k=k) for p, t in zip(preds, targets, strict=True)]).double()
            expected = {"value": per_user.mean().item(), "stderr": per_user.std().item() / math.sqrt(users)}
            assert m[f"{name}@{k}"] == pytest.approx(expected, abs=1e-12), f"{name}@{k}"


def test_halves_merged_equal_one_metric_on_everything():
    """Processes (DDP) each count their own users; adding the counts (what torchmetrics' sync does with
    dist_reduce_fx="sum") gives exactly the numbers of one process that saw every user."""
    torch.manual_seed(1)
    ranks = torch.randint(0, 31, (1001,))
    whole = RankMetrics((1, 5, 10, 20))
    for batch in ranks.split(64):
        whole.update(batch)
    halves = [RankMetrics((1, 5, 10, 20)), RankMetrics((1, 5, 10, 20))]
    halves[0].update(ranks[::2])
    halves[1].update(ranks[1::2])
    synced_counts = halves[0].counts + halves[1].counts
    halves[0].merge_state(halves[1])
    assert torch.equal(halves[0].counts, synced_counts)
    assert halves[0].compute() == whole.compute()
    assert whole.compute().users == 1001
    assert whole.compute().metrics == ranking_metrics(ranks, list_length=30, ks=(1, 5, 10, 20))


def _score_share(rank: int, world: int, tmp: Path, ranks: torch.Tensor) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp / 'rendezvous'}", rank=rank, world_size=world)
    try:
        metric = RankMetrics((1, 5, 10))
        for batch in ranks[rank::world].split(8):
            metric.update(batch)
        summary = metric.compute()  # torchmetrics sums the counts of every process
        (tmp / f"rank{rank}.json").write_text(json.dumps(summary._asdict()))
    finally:
        dist.destroy_process_group()


def test_processes_sum_their_counts_into_the_one_process_metrics(tmp_path):
    """Two gloo processes (as under trainer=ddp), each with its own users, shares of unequal size: each computes
    the metrics of all users, equal to one process's to the last digit."""
    ranks = torch.randint(0, 21, (101,), generator=torch.Generator().manual_seed(0))
    # fork: the children inherit the imports (spawn would re-import torch in each, seconds on a loaded machine)
    mp.start_processes(_score_share, args=(2, tmp_path, ranks), nprocs=2, start_method="fork")
    expected = {"users": 101, "metrics": ranking_metrics(ranks, list_length=20)}
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected


def test_state_is_a_sum_of_counts():
    """No per-user lists: the state is max(K) + 1 counts reduced by summing, whatever the number of users."""
    metric = RankMetrics((1, 5, 10))
    metric.update(torch.tensor([1, 3, 0, 10, 11, 250]))  # beyond max K scores 0 for every K, like a miss
    assert metric.counts.tolist() == [3, 1, 0, 1, 0, 0, 0, 0, 0, 0, 1]
    metric.reset()
    assert int(metric.counts.sum()) == 0


def test_format_metrics():
    m = ranking_metrics(torch.tensor([1, 3, 0, 10, 11]), list_length=20, ks=(1, 5))
    assert format_metrics(m) == "hr@1 0.2000±0.2000  hr@5 0.4000±0.2449  ndcg@5 0.3000±0.2000"
