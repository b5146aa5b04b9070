"""The math of one matrix: the whitened-SVD loss identity, ranks from ratios, singular covariances."""

import json
import math

import pytest
import torch
from torch import nn

from odllm.compress.cholesky import cholesky_with_jitter
from odllm.compress.lowrank import LowRankLinear, factorize, rank_for_ratio
from odllm.compress.lowrank_method import factorise_linear
from odllm.config import load_method


def correlated_inputs(n: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """``[n, tokens]`` activations with a few strong directions and per-channel scales, like real ones."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -3, n, dtype=torch.float64)
    mixing = torch.randn(n, n, generator=g, dtype=torch.float64) * scales
    return mixing @ torch.randn(n, tokens, generator=g, dtype=torch.float64) + 3.0


def output_error(W, B, A, X) -> float:
    return ((W - B @ A) @ X).square().sum().item()


@pytest.mark.parametrize(("m", "n", "k"), [(24, 16, 5), (16, 24, 7), (20, 20, 1)])
def test_whitened_truncation_loss_equals_dropped_singular_values(m, n, k):
    X = correlated_inputs(n, 200)
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    S, jitter = cholesky_with_jitter(X @ X.T)
    B, A, sigma = factorize(W, S, k)
    assert jitter == 0.0
    assert B.shape == (m, k) and A.shape == (k, n) and sigma.shape == (min(m, n),)
    assert output_error(W, B, A, X) == pytest.approx(sigma[k:].square().sum().item(), rel=1e-6)
    torch.testing.assert_close(sigma, torch.linalg.svdvals(W @ S))


def test_whitened_svd_beats_plain_svd_on_correlated_inputs():
    X = correlated_inputs(32, 400)
    W = torch.randn(48, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    S, _ = cholesky_with_jitter(X @ X.T)
    for k in (2, 8, 16):
        whitened = output_error(W, *factorize(W, S, k)[:2], X)
        plain = output_error(W, *factorize(W, None, k)[:2], X)
        assert whitened < plain


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_factors_in_float64_and_the_module_in_the_weight_dtype(dtype):
    W = torch.randn(12, 8).to(dtype)
    B, A, sigma = factorize(W, torch.eye(8, dtype=torch.float64), 3)
    assert B.dtype == A.dtype == sigma.dtype == torch.float64
    torch.testing.assert_close(sigma, torch.linalg.svdvals(W.double()), rtol=1e-12, atol=0)
    linear = nn.Linear(8, 12, bias=False).to(dtype)
    module, _, _ = factorise_linear("x", linear, torch.eye(8, dtype=torch.float64), 0.5, whiten=True)
    assert module.A.weight.dtype == module.B.weight.dtype == dtype


@pytest.mark.parametrize(
    ("m", "n", "ratio", "rank"),
    [
        (4096, 4096, 0.5, 1024),  # q/o of LLaMA-7B
        (1024, 4096, 0.5, 409),  # k/v under GQA (8 kv heads of 128)
        (11008, 4096, 0.5, 1492),  # gate/up
        (4096, 11008, 0.3, 895),  # down
        (16, 32, 0.5, 5),  # tiny GQA k_proj
    ],
)
def test_rank_for_ratio_and_parameter_counts(m, n, ratio, rank):
    assert rank_for_ratio(m, n, ratio) == rank
    with torch.device("meta"):
        module = LowRankLinear(n, m, rank)
    params = sum(p.numel() for p in module.parameters())
    assert params == rank * (m + n) <= ratio * m * n
    assert (rank + 1) * (m + n) > ratio * m * n  # the largest rank that fits


@pytest.mark.parametrize(("m", "n"), [(4096, 4096), (1024, 4096), (11008, 4096), (16, 32)])
def test_ratio_one_keeps_every_matrix_dense(m, n):
    assert rank_for_ratio(m, n, 1.0) is None


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, math.nan])
def test_ratio_outside_range_is_refused(ratio):
    with pytest.raises(ValueError, match=r"allowed range \(0, 1\]"):
        rank_for_ratio(64, 64, ratio)


def test_ratio_too_small_for_the_shape_names_the_minimum():
    with pytest.raises(ValueError, match="smallest ratio for this shape is 0.0938"):
        rank_for_ratio(16, 32, 0.05)


def test_low_rank_linear_computes_b_a_x_plus_bias():
    g = torch.Generator().manual_seed(0)
    B, A, bias, x = (torch.randn(*shape, generator=g) for shape in [(6, 3), (3, 5), (6,), (2, 4, 5)])
    module = LowRankLinear.from_factors(B, A, bias)
    assert (module.rank, module.in_features, module.out_features) == (3, 5, 6)
    torch.testing.assert_close(module(x), x @ (B @ A).T + bias)
    assert LowRankLinear.from_factors(B, A).B.bias is None


@pytest.mark.parametrize("case", ["dead channels", "fewer tokens than channels"])
def test_singular_covariance_recovers_with_jitter(case):
    n, k = 16, 4
    if case == "dead channels":
        X = correlated_inputs(n, 200)
        X[[0, 5, 9]] = 0.0
    else:
        X = correlated_inputs(n, 6)
    W = torch.randn(12, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    S, jitter = cholesky_with_jitter(X @ X.T)
    B, A, sigma = factorize(W, S, k)
    assert jitter > 0
    assert all(torch.isfinite(t).all() for t in (S, B, A, sigma))
    # the best rank-k output error any W' can reach on X is that of the best rank-k fit of W X
    best = torch.linalg.svdvals(W @ X)[k:].square().sum().item()
    assert output_error(W, B, A, X) == pytest.approx(best, rel=1e-3, abs=1e-6 * (W @ X).square().sum().item())


def test_all_zero_covariance_falls_back_to_plain_svd():
    W = torch.randn(10, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    S, jitter = cholesky_with_jitter(torch.zeros(8, 8, dtype=torch.float64))
    B, A, _ = factorize(W, S, 3)
    B0, A0, _ = factorize(W, None, 3)
    assert jitter > 0 and torch.isfinite(S).all()
    torch.testing.assert_close(B @ A, B0 @ A0)


def test_non_finite_covariance_is_an_error():
    C = torch.eye(4, dtype=torch.float64)
    C[1, 2] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        cholesky_with_jitter(C)


def test_int8_factors_round_trip_through_their_packed_storage():
    g = torch.Generator().manual_seed(5)
    B, A, x = torch.randn(24, 6, generator=g), torch.randn(6, 40, generator=g), torch.randn(3, 40, generator=g)
    module = LowRankLinear.from_factors(B, A)
    float_out = module(x)
    module.quantize_factors(8)
    assert module.rank == 6 and (module.in_features, module.out_features) == (40, 24)
    assert [f.storage()["bytes"] for f in (module.A, module.B)] == [6 * (40 + 3), 24 * (6 + 3)]
    for factor, weight in ((module.A, A), (module.B, B)):  # per row: half a step of its grid (+ float16 scale)
        step = (weight.clamp(min=0).amax(1) - weight.clamp(max=0).amin(1)) / 255  # the grid always holds 0
        assert ((factor.dequantized_weight() - weight).abs().amax(1) <= 0.6 * step).all()
    torch.testing.assert_close(module(x), float_out, rtol=0, atol=0.02 * float_out.abs().max().item())


@pytest.mark.parametrize("method", ["dense", "svd", "odllm_int8", "gptq"])
def test_fused_projections_keep_the_logits(method):
    """q/k/v and gate/up share one matmul (the A factors, or the weights) and compute the same function."""
    from test_compression import batches, logits, sequences, tiny_model

    from odllm.bench.fusion import FusedMember, fuse_projections
    from odllm.compress.registry import compress_with

    data = batches(sequences())
    model = tiny_model(seed=6)
    if method != "dense":
        compress_with(model, data, load_method(method), 0.5, progress=False)
    before = [logits(model, batch) for batch in data]
    assert fuse_projections(model) == 2 * 2  # two groups per layer, two layers
    assert all(isinstance(m, FusedMember) for layer in model.model.layers
               for m in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.mlp.up_proj))
    for batch, expected in zip(data, before, strict=True):
        torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5)
    shared = model.model.layers[0].self_attn.q_proj.shared
    assert shared._input is None and shared._output is None  # no activation is held between calls


# ---- the Gram-eigendecomposition path of factorize (fast SVD at LLaMA widths) ---------------------------------------


def whitened_problem(m: int, n: int, decades: float = 3.0, seed: int = 0):
    X = correlated_inputs(n, 3 * n, seed)
    X *= torch.logspace(0, -decades, n, dtype=torch.float64)[:, None]  # ill-conditioned inputs
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    S, _ = cholesky_with_jitter(X @ X.T)
    return W, S


@pytest.mark.parametrize(("m", "n", "decades", "whiten"),
                         [(64, 112, 3, True), (112, 64, 3, True), (96, 96, 6, True), (96, 160, 0, False),
                          (160, 96, 0, False)])
def test_gram_path_gives_the_exact_svd_factors(m, n, decades, whiten):
    """Both orientations (Gram on the smaller side), whitened and plain: the dropped sigma^2, the error the factors
    really leave and the product B A agree with LAPACK's SVD to 1e-9 relative (the documented bound is 1e-6)."""
    W, S = whitened_problem(m, n, decades)
    S = S if whiten else None
    k = rank_for_ratio(m, n, 0.5)
    (Be, Ae, se), (Bg, Ag, sg) = factorize(W, S, k, "exact"), factorize(W, S, k, "gram")
    dropped = se[k:].square().sum().item()
    assert sg[k:].square().sum().item() == pytest.approx(dropped, rel=1e-9)
    for B, A in ((Be, Ae), (Bg, Ag)):
        leaves = ((W - B @ A) @ (S if S is not None else torch.eye(n, dtype=W.dtype))).square().sum().item()
        assert leaves == pytest.approx(dropped, rel=1e-9)
    assert ((Bg @ Ag - Be @ Ae).norm() / (Be @ Ae).norm()).item() < 1e-9
    torch.testing.assert_close(sg[:k], se[:k], rtol=1e-9, atol=0)
    assert Bg.shape == (m, k) and Ag.shape == (k, n) and sg.shape == (min(m, n),)
    assert not torch.equal(Bg @ Ag, Be @ Ae)  # a different computation, not the exact path again


@pytest.mark.parametrize(("m", "n"), [(40, 60), (60, 40)])
def test_gram_path_on_a_matrix_of_lower_rank_than_kept_stays_finite_and_exact(m, n):
    g = torch.Generator().manual_seed(7)
    W = torch.randn(m, 3, generator=g, dtype=torch.float64) @ torch.randn(3, n, generator=g, dtype=torch.float64)
    B, A, sigma = factorize(W, None, 10, "gram")
    assert all(torch.isfinite(t).all() for t in (B, A, sigma))
    assert (sigma >= 0).all() and sigma[3:].max() < 1e-6 * sigma[0]
    assert (W - B @ A).norm() < 1e-10 * W.norm()


def test_auto_keeps_the_exact_svd_below_the_width_threshold_and_switches_above(monkeypatch):
    import odllm.compress.lowrank as lowrank

    W, S = whitened_problem(48, 64)
    exact = factorize(W, S, 10, "exact")
    assert min(256, 688) < lowrank.GRAM_MIN_WIDTH <= 4096  # the small default model keeps LAPACK's SVD
    assert all(torch.equal(a, b) for a, b in zip(factorize(W, S, 10), exact, strict=True))
    assert torch.equal(lowrank.singular_values(W @ S), torch.linalg.svdvals(W @ S))
    monkeypatch.setattr(lowrank, "GRAM_MIN_WIDTH", 48)
    gram = factorize(W, S, 10, "gram")
    assert all(torch.equal(a, b) for a, b in zip(factorize(W, S, 10), gram, strict=True))
    torch.testing.assert_close(lowrank.singular_values(W @ S)[:10], exact[2][:10], rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match="choose 'auto', 'exact' or 'gram'"):
        factorize(W, S, 10, "randomized")


def test_svd_speed_benchmark_writes_its_json(tmp_path):
    from odllm.bench.svd_speed import main

    main(["--shapes", "40x72", "72x40", "--out", str(tmp_path)])
    records = json.loads((tmp_path / "svd_speed.json").read_text())["records"]
    assert [(r["m"], r["n"], r["rank"]) for r in records] == [(40, 72, 12), (72, 40, 12)]
    assert all(r["dropped_sigma2_rel_diff"] < 1e-9 and r["achieved_error_rel_diff"] < 1e-9 for r in records)
    assert all(r["exact"]["seconds"] > 0 and r["gram"]["seconds"] > 0 for r in records)
