"""The alignment's C' kept as lower blocks (odllm.compress.blocked): the same sums, factor and solves as full
matrices, at half the memory; a singular C' is summed again with jitter."""

import logging

import pytest
import torch

from odllm.compress import align
from odllm.compress.blocked import LowerBlocks


def full(C: LowerBlocks) -> torch.Tensor:
    """The lower blocks as one lower-triangular-by-blocks n x n matrix (the upper blocks zero)."""
    out = torch.zeros(C.n, C.n, dtype=torch.float64)
    for (i, j), block in C.blocks.items():
        out[C.span(i), C.span(j)] = block
    return out


def summed(X: torch.Tensor, block: int) -> LowerBlocks:
    C = LowerBlocks(X.shape[1], "cpu", block=block)
    for part in X.split(700):  # two calls, one of them longer than statistics.ROWS
        C.add_gram(part)
    return C


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def X():
    torch.manual_seed(0)
    return torch.randn(1200, 300, dtype=torch.float64) * torch.linspace(0.1, 3.0, 300)  # uneven channel scales


def test_sums_trace_and_quadratic_form_equal_the_full_matrix(X):
    C = summed(X.float(), block=128)  # 300 = 128 + 128 + 44: a short last block
    exact = X.float().double().mT @ X.float().double()
    assert C.nbytes() < 0.75 * exact.numel() * 8
    for (i, j), block in C.blocks.items():
        assert torch.allclose(block, exact[C.span(i), C.span(j)], rtol=1e-12, atol=1e-9)
    assert C.trace() == pytest.approx(exact.trace().item(), rel=1e-13)
    A = torch.randn(17, 300).to(torch.bfloat16)  # a module's factor, converted block by block
    assert rel(C.quadratic(A), A.double() @ exact @ A.double().mT) < 1e-12


def test_factor_and_solves_equal_the_full_cholesky(X):
    C = summed(X, block=128)
    exact = X.mT @ X
    shift = 1e-3 * exact.trace().item() / 300
    C.add_to_diagonal(shift)
    assert C.cholesky_(min_pivot=1e-12)
    S = full(C)
    reference = torch.linalg.cholesky(exact + shift * torch.eye(300, dtype=torch.float64))
    assert rel(S, reference) < 1e-10
    P = torch.randn(40, 300, dtype=torch.float64)
    expected = torch.linalg.solve_triangular(reference, P.mT, upper=False, left=True).mT  # P S^{-T}
    out = C.solve_left_transposed_(P.clone())
    assert rel(out, expected) < 1e-10
    Y = torch.randn(9, 300, dtype=torch.float64)
    assert rel(C.solve_right_(Y.clone()), torch.linalg.solve_triangular(reference, Y, upper=False, left=False)) < 1e-10
    with pytest.raises(RuntimeError, match="overwritten"):
        C.quadratic(Y)


def test_singular_covariance_is_summed_again_with_logged_jitter(caplog):
    torch.manual_seed(1)
    X = torch.randn(50, 200, dtype=torch.float64)  # 50 tokens, 200 channels: C' has rank 50
    C = summed(X, block=64)
    scale = C.trace() / 200
    assert not summed(X, block=64).cholesky_(min_pivot=1e-12 * scale)  # no ridge: the factor fails
    calls = []

    def again():
        calls.append(1)
        return summed(X, block=64)

    with caplog.at_level(logging.INFO, logger="odllm.compress.align"):
        S, jitter = align._factor(C, 0.0, scale, again)
    assert calls and jitter > 0 and "jitter" in caplog.text
    assert torch.isfinite(full(S)).all()
    reference = torch.linalg.cholesky(X.mT @ X + jitter * torch.eye(200, dtype=torch.float64))
    assert rel(full(S), reference) < 1e-8
