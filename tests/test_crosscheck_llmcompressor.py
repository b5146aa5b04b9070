"""odllm's GPTQ and SparseGPT against llm-compressor's kernels (``quantize_weight``, ``sparsify_weight``) on the
same weight, Hessian (correlated inputs, one dead channel), damping and block size.

Skipped unless llm-compressor's kernels are importable. llm-compressor pins transformers <= 5.17 and pulls in
datasets, accelerate, ..., so it is not a dependency; its two pure-torch kernels are imported from the unpacked
wheels (``$LLMC_SRC``, default /tmp/llmc/src), past the package ``__init__``. Nothing is downloaded here; to run it:

    pip download --no-deps llmcompressor==0.14.0.1 compressed-tensors==0.20.0 loguru -d /tmp/llmc/wheels
    mkdir -p /tmp/llmc/src && for w in /tmp/llmc/wheels/*.whl; do python -m zipfile -e $w /tmp/llmc/src; done
    python -m pytest -q tests/test_crosscheck_llmcompressor.py

Measured (2026-11-30): identical GPTQ codes (with and without act-order) and SparseGPT masks (100 %),
max |difference| / max |W| <= 6e-7.
"""

import os
import sys
import types
from pathlib import Path

import pytest
import torch

from odllm.compress.gptq import gptq_quantize, weighted_error
from odllm.compress.sparsegpt import sparsegpt_prune

SRC = os.environ.get("LLMC_SRC", "/tmp/llmc/src")
PACKAGES = ("llmcompressor", "llmcompressor.modifiers", "llmcompressor.modifiers.gptq",
            "llmcompressor.modifiers.pruning", "llmcompressor.modifiers.pruning.sparsegpt")
M, N, T, BLOCK = 48, 128, 2000, 64
TOLERANCE = 1e-5  # max |odllm - llm-compressor| relative to max |W|; float32 against float64 arithmetic


@pytest.fixture(scope="module")
def kernels():
    """llm-compressor's ``quantize_weight``, ``sparsify_weight`` and ``QuantizationArgs``, or a skip."""
    if not Path(SRC, "llmcompressor").is_dir():
        pytest.skip(f"llm-compressor's unpacked wheels are not at {SRC} (see this module's docstring)")
    saved_path, saved_modules = list(sys.path), dict(sys.modules)
    sys.path.insert(0, SRC)
    for package in PACKAGES:  # namespace stubs: the kernels' modules without the package __init__ and its deps
        stub = types.ModuleType(package)
        stub.__path__ = [f"{SRC}/{package.replace('.', '/')}"]
        sys.modules[package] = stub
    try:
        quant = pytest.importorskip("compressed_tensors.quantization")
        gptq = pytest.importorskip("llmcompressor.modifiers.gptq.gptq_quantize")
        sgpt = pytest.importorskip("llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify")
        yield quant.QuantizationArgs, gptq.quantize_weight, sgpt.sparsify_weight
    finally:
        sys.path[:] = saved_path
        for name in set(sys.modules) - set(saved_modules):
            del sys.modules[name]
        sys.modules.update(saved_modules)


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    x = (torch.randn(T, N) @ (torch.randn(N, N) / N**0.5 + torch.eye(N))).double()
    x[:, 5] = 0  # a dead input channel
    c = x.T @ x
    return torch.randn(M, N).double() * 0.05, 2 * c / T, c


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(("bits", "group"), [(4, -1), (4, 32), (8, -1), (8, 32)])
def test_gptq_matches_llmcompressor(kernels, problem, bits, group, act_order):
    QuantizationArgs, quantize_weight, _ = kernels
    w, h, c = problem
    ours = gptq_quantize(w, h, bits=bits, group_size=group, block_size=BLOCK, scale_dtype=torch.float32,
                         static_groups=True,  # llm-compressor's observers fix every group's grid before the loop
                         act_order=act_order)
    g = N if group == -1 else group
    # llm-compressor's asymmetric int range is signed, [-2^(b-1), 2^(b-1)): the same grid with the zero shifted;
    # actorder="weight": columns by decreasing diag(H), each keeping its own (static) group's grid
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="channel" if group == -1 else "group",
                            group_size=None if group == -1 else group, actorder="weight" if act_order else None)
    q, _, fallback = quantize_weight(w.float()[None], h.float()[None], ours.scales.float()[None],
                                     (ours.zeros - 2 ** (bits - 1)).to(torch.int8)[None], None, args,
                                     blocksize=BLOCK, percdamp=0.01)
    theirs = q[0].double()
    codes = torch.round(theirs / ours.scales.repeat_interleave(g, 1)) + ours.zeros.repeat_interleave(g, 1)
    assert not fallback  # llm-compressor ran GPTQ, not its round-to-nearest fallback
    assert torch.equal(codes, ours.codes.to(codes.dtype))
    assert (ours.weight - theirs).abs().max() / w.abs().max() < TOLERANCE
    assert weighted_error(w - ours.weight, c) == pytest.approx(weighted_error(w - theirs, c), rel=1e-5)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_matches_llmcompressor(kernels, problem, pattern):
    _, _, sparsify_weight = kernels
    w, h, c = problem
    prune_n, prune_m = (2, 4) if pattern == "2:4" else (0, 0)
    ours = sparsegpt_prune(w, h, sparsity=0.5, prune_n=prune_n, prune_m=prune_m, block_size=BLOCK)
    linear = torch.nn.Linear(N, M, bias=False)
    linear.weight.data = w.float().clone()
    # llm-compressor prunes int(size * s) + 1 weights per block: ask it for one fewer to compare like with like
    block = M * BLOCK
    sparsity = 0.5 if prune_n else (block // 2 - 0.5) / block
    _, theirs = sparsify_weight(linear, {linear: h.float().clone()}, sparsity, prune_n, prune_m, BLOCK, 0.01, False)
    theirs = theirs.double()
    assert torch.equal(theirs == 0, ~ours.kept)
    assert int((~ours.kept).sum()) == w.numel() // 2
    assert (ours.weight - theirs).abs().max() / w.abs().max() < TOLERANCE
    assert weighted_error(w - ours.weight, c) == pytest.approx(weighted_error(w - theirs, c), rel=1e-5)
