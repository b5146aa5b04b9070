"""The memory-lean forms of the compression math (one n x n float64 matrix at a time): each checked against the
textbook formula it replaces."""

import pytest
import torch
from torch import nn

from odllm.compress import align
from odllm.compress.cholesky import CholeskyInPlace, cholesky_with_jitter
from odllm.compress.driver import Streams
from odllm.compress.gptq import _factor, gptq_quantize, hessian, inverse_hessian_factor, permute_symmetric_
from odllm.compress.lowrank import LowRankLinear, factorize
from odllm.compress.lowrank_method import factorise_linear
from odllm.compress.sparsegpt import sparsegpt_prune
from odllm.compress.statistics import accumulate, mirror, product

pytestmark = pytest.mark.usefixtures("one_thread")


def covariance(n, tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) * torch.linspace(0.1, 2, n, dtype=torch.float64)
    return X.T @ X, X


def rel(a, b):
    return abs(a - b) / abs(b)


def test_accumulate_adds_the_product_in_place():
    _, X = covariance(40, 30)
    total = torch.ones(40, 40, dtype=torch.float64)
    ptr = total.data_ptr()
    accumulate(total, X, X)
    accumulate(total, X[:, :40], X)
    assert total.data_ptr() == ptr
    assert torch.allclose(total, 1 + 2 * product(X, X), rtol=1e-13, atol=1e-12)


def test_mirror_copies_one_triangle_onto_the_other():
    C = torch.randn(70, 70, dtype=torch.float64)
    lower = C.tril() + C.tril(-1).T
    mirror(C, from_lower=True, block=16)
    assert torch.equal(C, lower)
    C.triu_().add_(torch.randn(70, 70, dtype=torch.float64).tril(-1))
    mirror(C, from_lower=False, block=16)
    assert torch.equal(C, C.T)


@pytest.mark.parametrize(("n", "tokens"), [(64, 200), (64, 20), (1100, 1500)])  # 20 < n: the jitter path;
def test_cholesky_in_place_error_from_the_factor_and_exact_restore(n, tokens):  # 1100: three column blocks
    C, _ = covariance(n, tokens)
    C = C.tril() + C.tril(-1).T  # exactly symmetric, so that the restored C can be compared bit for bit
    original = C.clone()
    S_ref, jitter_ref = cholesky_with_jitter(original)
    S = CholeskyInPlace(C)
    assert S.S.data_ptr() == C.data_ptr()  # the factor lives in C's memory
    assert S.jitter == jitter_ref and (jitter_ref > 0) == (tokens < 64)
    assert torch.allclose(S.S.tril(), S_ref, rtol=0, atol=1e-10 * S_ref.abs().max().item())
    D = torch.randn(9, n, dtype=torch.float64)
    exact = ((D @ original) * D).sum().item()
    assert rel(S.quadratic(D), exact) < 1e-10  # tr(D C D^T) = ||D S||^2 - jitter ||D||^2
    low = D.bfloat16()  # read a column block at a time in float64: the same numbers as its float64 copy
    assert S.quadratic(low) == S.quadratic(low.double()) and torch.equal(S.gram(low), S.gram(low.double()))
    DS = D @ S_ref  # LAPACK's (scipy) and torch's factors agree to rounding, amplified near singularity
    assert torch.allclose(S.right(D), DS, rtol=0, atol=1e-9 * DS.abs().max().item())
    assert torch.allclose(S.gram(D), DS @ DS.T, rtol=0, atol=1e-9 * (DS @ DS.T).abs().max().item())
    A = torch.randn(5, n, dtype=torch.float64)
    assert torch.allclose(S.solve_right(A) @ S_ref, A, atol=1e-8)
    assert torch.equal(S.restore(), original)


def test_factorise_linear_reports_the_textbook_errors_and_gives_C_back():
    torch.manual_seed(0)
    C, _ = covariance(48, 300)
    C = C.tril() + C.tril(-1).T
    original = C.clone()
    linear = nn.Linear(48, 40, bias=False).double()
    module, entry, _ = factorise_linear("x", linear, C, 0.5, True)
    assert torch.equal(C, original)  # restored exactly: later users of the statistics see them unchanged
    W = linear.weight.detach()
    D = W - module.B.weight @ module.A.weight
    assert rel(entry["output_error"], ((D @ original) * D).sum().item()) < 1e-10
    assert rel(entry["relative_output_error"], entry["output_error"] / ((W @ original) * W).sum().item()) < 1e-10
    assert rel(entry["output_error"], entry["predicted_error"]) < 1e-8  # the dropped sigma^2


class One(nn.Module):
    """A 'layer' of one linear, the shape refit_group needs (a module whose forward reaches ``proj``)."""

    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def refit_from_K(W, B0, A0, a, b, ridge, factors):
    """The former refit: C' = sum x'x'^T, K = sum x x'^T, C = sum x x^T, all n x n."""
    Cc, K, C = b.T @ b, a.T @ b, a.T @ a
    energy = ((W @ C) * W).sum().item()
    k, n = A0.shape
    if factors == "B":
        G = A0 @ Cc @ A0.T
        L, _ = cholesky_with_jitter(G + ridge * G.trace() / k * torch.eye(k, dtype=G.dtype))
        B, A = torch.cholesky_solve((W @ K @ A0.T).T, L).T, A0
    else:
        S, _ = cholesky_with_jitter(Cc + ridge * Cc.trace() / n * torch.eye(n, dtype=Cc.dtype))
        B, A, _ = factorize(W @ torch.cholesky_solve(K.T, S).T, S, k)
    errors = [((M @ Cc) * M).sum().item() - 2 * ((M @ K.T) * W).sum().item() + energy for M in (B0 @ A0, B @ A)]
    return B @ A, errors[0] / energy, errors[1] / energy


@pytest.mark.parametrize("factors", ["BA", "B"])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])  # m < n as down_proj, m > n as gate/up
def test_refit_from_P_equals_the_refit_from_K(factors, shape):
    torch.manual_seed(1)
    m, n = shape
    k = 6
    dense = nn.Linear(n, m, bias=False).double()
    W = dense.weight.detach()
    x = torch.randn(2, 50, n, dtype=torch.float64)
    xc = x + 0.1 * torch.randn_like(x)
    mask = torch.ones(2, 50, dtype=torch.bool)
    mask[0, :7] = False  # padding counts nowhere
    B0, A0, _ = factorize(W, None, k)
    module = LowRankLinear.from_factors(B0, A0)
    streams = Streams([x], [xc], [{}], [mask])
    with torch.no_grad():
        result = align.refit_group(One(dense), One(module), {"proj": module}, streams, 1e-4, factors)["proj"]
    M, before, after = refit_from_K(W, B0, A0, x[mask], xc[mask], 1e-4, factors)
    assert rel(result["error_before"], before) < 1e-9 and rel(result["error_refit"], after) < 1e-9
    assert result["refit_kept"] == (after < before)
    if result["refit_kept"]:
        assert torch.allclose(module.B.weight @ module.A.weight, M, rtol=1e-8, atol=1e-10)


def test_permute_symmetric_in_place():
    C, _ = covariance(37, 50)
    perm = torch.randperm(37, generator=torch.Generator().manual_seed(3))
    expected = C[perm][:, perm]
    ptr = C.data_ptr()
    permute_symmetric_(C, perm)
    assert C.data_ptr() == ptr and torch.equal(C, expected)


@pytest.mark.parametrize("tokens", [300, 10])  # 10 < n: H singular, dead-free, damping makes it definite
def test_inverse_hessian_factor_in_place_matches_torch(tokens):
    C, _ = covariance(64, tokens)
    H = hessian(C, tokens)
    W = torch.randn(8, 64, dtype=torch.float64)
    mean = H.diagonal().mean()
    U_ref = _factor(H + 0.01 * mean * torch.eye(64, dtype=H.dtype))
    work = H.clone()
    U, dead, used = inverse_hessian_factor(work, W.clone(), 0.01, overwrite=True)
    assert U.data_ptr() == work.data_ptr() and used == 0.01 and not dead.any()
    assert torch.allclose(U, U_ref, rtol=1e-9, atol=1e-12 * U_ref.abs().max().item())
    assert torch.equal(U, U.triu())
    inverse = torch.linalg.inv(H + 0.01 * mean * torch.eye(64, dtype=H.dtype))
    assert torch.allclose(U.T @ U, inverse, rtol=1e-8, atol=1e-10 * inverse.abs().max().item())
    copy, _, _ = inverse_hessian_factor(H, W.clone(), 0.01)  # without overwrite H stays
    assert torch.equal(copy, U) and torch.equal(H, hessian(C, tokens))


def test_inverse_hessian_factor_retries_on_the_restored_hessian():
    C, _ = covariance(32, 100)
    H = hessian(C, 100)
    H -= 1.5 * torch.linalg.eigvalsh(H)[0].abs() * torch.eye(32, dtype=H.dtype) + 0.05 * H.diagonal().mean() * \
        torch.eye(32, dtype=H.dtype)  # indefinite: damp=0.01 fails, a larger one succeeds
    H = H.tril() + H.tril(-1).T
    damped = [d for d in (0.01 * 10**i for i in range(7)) if _factor(H + d * H.diagonal().mean() *
                                                                      torch.eye(32, dtype=H.dtype)) is not None][0]
    U, _, used = inverse_hessian_factor(H.clone(), torch.zeros(4, 32, dtype=H.dtype), 0.01, overwrite=True)
    assert used == damped > 0.01
    ref = _factor(H + used * H.diagonal().mean() * torch.eye(32, dtype=H.dtype))
    assert torch.allclose(U, ref, rtol=1e-8, atol=1e-10 * ref.abs().max().item())


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_and_sparsegpt_overwriting_H_give_the_same_result(act_order):
    C, _ = covariance(64, 200)
    W = torch.randn(16, 64, dtype=torch.float64)
    kept = gptq_quantize(W, hessian(C, 200), bits=4, group_size=16, act_order=act_order)
    H = hessian(C, 200)
    lean = gptq_quantize(W, H, bits=4, group_size=16, act_order=act_order, overwrite_h=True)
    assert torch.equal(kept.codes, lean.codes) and kept.loss == lean.loss
    pruned = sparsegpt_prune(W, hessian(C, 200), sparsity=0.5, block_size=32)
    lean = sparsegpt_prune(W, hessian(C, 200), sparsity=0.5, block_size=32, overwrite_h=True)
    assert torch.equal(pruned.weight, lean.weight)
