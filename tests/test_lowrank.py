"""The math of one matrix: the whitened-SVD loss identity, ranks from ratios, singular covariances."""

import math

import pytest
import torch

from odllm.lowrank import LowRankLinear, cholesky_with_jitter, factorize, rank_for_ratio


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


def test_factors_keep_the_weight_dtype():
    W = torch.randn(12, 8)
    B, A, sigma = factorize(W, torch.eye(8, dtype=torch.float64), 3)
    assert B.dtype == A.dtype == sigma.dtype == torch.float32


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
