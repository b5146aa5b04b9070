"""Cross-check odllm's GPTQ and SparseGPT against llm-compressor's kernels on a tiny matrix (a script, not a test).

llm-compressor pins transformers <= 5.17 and needs datasets, accelerate, ... so it is not installed; its two
pure-torch kernels are imported from the unpacked wheels instead, past the package ``__init__``:

    pip download --no-deps llmcompressor==0.14.0.1 compressed-tensors==0.20.0 loguru -d /tmp/llmc/wheels
    mkdir -p /tmp/llmc/src && for w in /tmp/llmc/wheels/*.whl; do python -m zipfile -e $w /tmp/llmc/src; done
    python tests/crosscheck_llmcompressor.py /tmp/llmc/src

Both get the same weight, Hessian (correlated inputs, one dead channel), damping and block size; GPTQ gets the
same grids (``static_groups``, llm-compressor's way: its observers fix every group's scale before the loop).
"""

import sys
import types
from pathlib import Path

SRC = sys.argv[1] if len(sys.argv) > 1 else "/tmp/llmc/src"
sys.path[:0] = [SRC, str(Path(__file__).parents[1])]  # the unpacked wheels, and odllm without installing it
for package in ("llmcompressor", "llmcompressor.modifiers", "llmcompressor.modifiers.gptq",
                "llmcompressor.modifiers.pruning", "llmcompressor.modifiers.pruning.sparsegpt"):
    stub = types.ModuleType(package)
    stub.__path__ = [f"{SRC}/{package.replace('.', '/')}"]
    sys.modules[package] = stub

import torch  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs  # noqa: E402
from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight  # noqa: E402
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight  # noqa: E402

from odllm.compress.gptq import gptq_quantize, weighted_error  # noqa: E402
from odllm.compress.sparsegpt import sparsegpt_prune  # noqa: E402

torch.manual_seed(0)
m, n, T, BLOCK = 48, 128, 2000, 64
X = (torch.randn(T, n) @ (torch.randn(n, n) / n**0.5 + torch.eye(n))).double()
X[:, 5] = 0  # a dead input channel
C = X.T @ X
H = 2 * C / T
W = torch.randn(m, n).double() * 0.05


def compare(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    e_ours, e_theirs = weighted_error(W - ours, C), weighted_error(W - theirs, C)
    print(f"{name:28s} ||(W-Q)X||^2 odllm {e_ours:.6g}  llm-compressor {e_theirs:.6g}  "
          f"max |diff| / max |W| {(ours - theirs).abs().max() / W.abs().max():.1e}")


for bits, group in [(4, -1), (4, 32), (8, -1), (8, 32)]:
    ours = gptq_quantize(W, H, bits=bits, group_size=group, block_size=BLOCK, scale_dtype=torch.float32,
                         static_groups=True)
    g = n if group == -1 else group
    # llm-compressor's asymmetric int range is signed, [-2^(b-1), 2^(b-1)): the same grid with zero shifted
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="channel" if group == -1 else "group",
                            group_size=None if group == -1 else group)
    Q, _, fallback = quantize_weight(W.float()[None], H.float()[None], ours.scales.float()[None],
                                     (ours.zeros - 2 ** (bits - 1)).to(torch.int8)[None], None, args,
                                     blocksize=BLOCK, percdamp=0.01)
    Q = Q[0].double()
    codes = torch.round(Q / ours.scales.repeat_interleave(g, 1)) + ours.zeros.repeat_interleave(g, 1)
    compare(f"GPTQ {bits}-bit group {group}", ours.weight, Q)
    print(f"{'':28s} identical codes {(codes == ours.codes).double().mean():.2%}, RTN fallback {bool(fallback)}")

for pattern in ("unstructured", "2:4"):
    prune_n, prune_m = (2, 4) if pattern == "2:4" else (0, 0)
    ours = sparsegpt_prune(W, H, sparsity=0.5, prune_n=prune_n, prune_m=prune_m, block_size=BLOCK)
    linear = torch.nn.Linear(n, m, bias=False)
    linear.weight.data = W.float().clone()
    # the reference prunes int(size * s) + 1 weights per block: ask for one fewer to compare like with like
    block = m * BLOCK
    sparsity = 0.5 if prune_n else (block // 2 - 0.5) / block
    _, theirs = sparsify_weight(linear, {linear: H.float().clone()}, sparsity, prune_n, prune_m, BLOCK, 0.01, False)
    theirs = theirs.double()
    compare(f"SparseGPT {pattern}", ours.weight, theirs)
    print(f"{'':28s} identical masks {((theirs == 0) == ~ours.kept).double().mean():.2%}")

linear = torch.nn.Linear(n, m, bias=False)
linear.weight.data = W.float().clone()
_, theirs = sparsify_weight(linear, {linear: H.float().clone()}, 0.5, 0, 0, BLOCK, 0.01, False)
print(f"llm-compressor asked for 50 % unstructured prunes {int((theirs == 0).sum())} of {W.numel()}; "
      f"odllm prunes {W.numel() // 2}")
