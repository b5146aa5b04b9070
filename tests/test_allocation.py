"""Rank allocation under one budget (odllm.compress.allocation): budget, optimality, uniform case, end to end."""

import itertools
import json

import pytest
import torch
from test_compression import batches, compressed, kl_to, sequences, tiny_model

from odllm.compress.allocation import allocate, params, uniform_ranks
from odllm.compress.lowrank import LowRankLinear
from odllm.compress.registry import build_algorithm, compress_with
from odllm.compress.saved import load_compressed, save_compression_config
from odllm.compress.spectra import plot_ranks

pytestmark = pytest.mark.usefixtures("one_thread")


def loss(spectra, weights, ranks) -> float:
    return sum(weights[j] * spectra[j][r:].square().sum().item() for j, r in ranks.items() if r is not None)


def spent(shapes, ranks) -> int:
    return sum(params(shapes[j], r) for j, r in ranks.items())


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_the_allocation_meets_the_uniform_budget_within_one_step(ratio):
    g = torch.Generator().manual_seed(1)
    shapes = {f"m{i}": shape for i, shape in enumerate([(64, 64), (32, 64), (96, 64), (64, 96), (48, 80)] * 2)}
    spectra = {j: torch.rand(min(s), generator=g).sort(descending=True).values * (1 + 5 * torch.rand(1, generator=g))
               for j, s in shapes.items()}
    weights = {j: float(torch.rand(1, generator=g)) + 0.1 for j in shapes}
    uniform = uniform_ranks(shapes, ratio)
    budget = spent(shapes, uniform)
    ranks = allocate(spectra, shapes, weights, budget)
    total = spent(shapes, ranks)
    assert total <= budget
    assert budget - total < max(m + n for m, n in shapes.values())
    assert all(r is None or 1 <= r < min(shapes[j]) for j, r in ranks.items())
    assert loss(spectra, weights, ranks) < loss(spectra, weights, uniform)  # it can only do better than uniform


def test_greedy_buys_the_largest_loss_drop_per_parameter_and_is_optimal_on_a_hand_case():
    # a: 10x10 (a step costs 20), b: 10x30 (a step costs 40); sigma^2 / cost: a 5, 2, 0.5, ...; b 4, 3, 1, ...
    shapes = {"a": (10, 10), "b": (10, 30)}
    spectra = {"a": torch.tensor([100.0, 100, 40, 10, 1, 1, 1, 1, 1, 1]).sqrt(),
               "b": torch.tensor([160.0, 160, 120, 40, 1, 1, 1, 1, 1, 1]).sqrt()}
    weights = {"a": 1.0, "b": 1.0}
    # rank 1 each (60) is the floor; the next steps by loss drop per parameter: a2 (5), b2 (4), b3 (3), a3 (2)
    assert allocate(spectra, shapes, weights, 60 + 20) == {"a": 2, "b": 1}  # a's 2nd step: 100/20 = 5
    assert allocate(spectra, shapes, weights, 60 + 20 + 40) == {"a": 2, "b": 2}  # then b's: 160/40 = 4
    assert allocate(spectra, shapes, weights, 60 + 20 + 80) == {"a": 2, "b": 3}  # 120/40 = 3 beats a's 40/20 = 2
    def optimum(budget):  # brute force over every rank pair (and dense) that fits
        options = [dict(zip(shapes, c, strict=True)) for c in itertools.product(*([*range(1, 10), None],) * 2)]
        return min(loss(spectra, weights, r) for r in options if spent(shapes, r) <= budget)

    for budget in range(80, 301, 20):
        ranks = allocate(spectra, shapes, weights, budget)
        assert spent(shapes, ranks) <= budget
        # greedy is exact for what it spends up to the first step that does not fit (> budget - 40 here), so it
        # is never worse than the exact optimum with one step (20) less; where steps fill the budget, exact
        assert loss(spectra, weights, ranks) <= optimum(budget - 20) + 1e-9, budget
        if budget in (80, 120, 160, 240):
            assert loss(spectra, weights, ranks) == pytest.approx(optimum(budget)), budget


def test_a_matrix_whose_next_rank_stores_its_dense_size_goes_dense():
    shapes = {"a": (8, 8), "b": (8, 8)}  # rank 4 stores 64 = 8*8: from rank 3 the next step is "dense"
    spectra = {"a": torch.ones(8) * 10, "b": torch.tensor([1.0, 0.1, 0.01, 0, 0, 0, 0, 0])}
    ranks = allocate(spectra, shapes, {"a": 1.0, "b": 1.0}, 64 + 16)
    assert ranks == {"a": None, "b": 1}
    assert spent(shapes, ranks) == 80


def test_identical_matrices_get_the_uniform_ranks():
    shapes = {f"m{i}": (48, 80) for i in range(6)}
    sigma = torch.linspace(3, 0.1, 48)
    for ratio in (0.2, 0.5, 0.8):
        uniform = uniform_ranks(shapes, ratio)
        ranks = allocate(dict.fromkeys(shapes, sigma), shapes, dict.fromkeys(shapes, 2.0), spent(shapes, uniform))
        assert ranks == uniform


def test_a_budget_below_rank_one_everywhere_is_an_error():
    with pytest.raises(ValueError, match="below rank 1"):
        allocate({"a": torch.ones(4)}, {"a": (4, 4)}, {"a": 1.0}, 7)


@pytest.fixture(scope="module")
def dense():
    return tiny_model(seed=3)


@pytest.fixture(scope="module")
def data():
    return batches(sequences(32, seed=5))


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("importance", ["kl", "energy", "kl_energy"])
def test_end_to_end_the_allocation_is_closer_to_dense_at_the_same_budget(dense, data, ratio, importance):
    settings = {"ratio": ratio, "whiten": True, "align": "BA"}
    uniform, uniform_report = compressed(dense, data, **settings)
    allocated, report = compressed(dense, data, allocation="loss", importance=importance, **settings)
    allocation = report["settings"]["allocation"]
    uniform_params = sum(e["params_after"] for e in uniform_report["matrices"])
    allocated_params = sum(e["params_after"] for e in report["matrices"])
    assert allocation["budget_params"] == uniform_params
    assert allocation["allocated_params"] == allocated_params <= uniform_params
    assert uniform_params - allocated_params < max(m + n for m, n in (e["shape"] for e in report["matrices"]))
    ranks = {e["name"]: e["rank"] for e in report["matrices"]}
    assert ranks == allocation["ranks"] and len(set(ranks.values())) > 3  # really per matrix
    assert kl_to(dense, allocated, data) < kl_to(dense, uniform, data)
    assert allocation["weighted_loss"]["allocated"] < allocation["weighted_loss"]["uniform"]


def test_allocated_int8_factors_save_load_and_plot(tmp_path, dense, data):
    model = tiny_model(seed=3)
    model.load_state_dict(dense.state_dict())
    method = {"name": "odllm_alloc", "algorithm": "lowrank", "whiten": True, "align": "BA", "allocation": "loss",
              "importance": "energy", "factor_bits": 8}
    report = compress_with(model, data, method, ratio=0.4, progress=False)
    path = plot_ranks(report, tmp_path / "ranks.png")
    assert path.stat().st_size > 1000
    json.dumps(report["settings"])  # the report (with the allocation) is JSON
    model.save_pretrained(tmp_path)
    save_compression_config(model, tmp_path)
    loaded = load_compressed(tmp_path)
    ranks = {n: m.rank for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)}
    assert ranks == {n: r for n, r in report["settings"]["allocation"]["ranks"].items() if r != "dense"}
    probe = data[0]
    for m in (model, loaded):
        m.eval()
    with torch.no_grad():
        a, b = (m(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits for m in (model, loaded))
    torch.testing.assert_close(a, b)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="importance"):
        build_algorithm({"name": "x", "algorithm": "lowrank", "allocation": "loss", "importance": "bogus"}, 0.5)
    with pytest.raises(ValueError, match="allocation"):
        build_algorithm({"name": "x", "algorithm": "lowrank", "allocation": "greedy"}, 0.5)
    with pytest.raises(ValueError, match="whiten=true"):
        build_algorithm({"name": "x", "algorithm": "lowrank", "allocation": "loss", "whiten": False}, 0.5)
    with pytest.raises(ValueError, match="no setting"):
        build_algorithm({"name": "x", "algorithm": "lowrank", "ranks": {}}, 0.5)
    assert build_algorithm({"name": "odllm", "algorithm": "lowrank"}, 0.5).settings().get("allocation") is None


def test_compress_job_with_odllm_alloc_writes_ranks_and_the_budget_check(tmp_path, tiny_run_overrides):
    from conftest import compose_config

    from odllm.runner.compress import compress
    from odllm.runner.train import train

    overrides = [*tiny_run_overrides, "trainer.max_epochs=1", "calibration.size=32", "calibration.batch_size=8"]
    train(compose_config(overrides), tmp_path / "train")
    result = compress(compose_config([*overrides, "ratio=0.5", "method=odllm_alloc"]), tmp_path / "run")
    report = json.loads((tmp_path / "run" / "compression_report.json").read_text())
    allocation = report["settings"]["allocation"]
    assert allocation["importance"] == "kl_energy" and 0 <= allocation["left_over_params"] < allocation["budget_params"]
    assert sum(e["params_after"] for e in report["matrices"]) == allocation["allocated_params"]
    assert (tmp_path / "run" / "ranks.png").stat().st_size > 1000
    assert result["model_dir"].endswith("-odllm_alloc-r0.5")
