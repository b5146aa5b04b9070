"""Low-bit CPU kernels in QuantLinear: torch's int8/int4 packed matmuls against the dequantize path they replace.

Tolerances: in float32 the kernels compute the same numbers as the dequantize path (the zero-point conversion is
exact), so outputs agree to 1e-5 relative (Frobenius). In bfloat16 the inputs and the scales are rounded to 8
mantissa bits; the kernel's error to the float32 reference must stay within 1.5x the error of a plain bfloat16
matmul with the same dequantized weight (the unavoidable part), and below 1e-2 relative.
"""

import json

import pytest
import torch
from omegaconf import OmegaConf
from test_compression import batches, logits, sequences, tiny_model

from odllm.bench.weights import describe_model
from odllm.compress.embeddings import QuantEmbedding
from odllm.compress.grid import dequantize, rtn_quantize
from odllm.compress.lowrank import LowRankLinear
from odllm.compress.quant import KERNEL_MAX_ROWS, QuantLinear, set_kernels
from odllm.compress.registry import compress_with
from odllm.compress.saved import load_compressed, save_compression_config
from odllm.config import load_method
from odllm.model.recommender import COMPRESSION_FILE

pytestmark = pytest.mark.usefixtures("one_thread")
LAYOUTS = [(8, -1, 256), (8, -1, 688), (8, -1, 204), (8, -1, 21),  # 204, 21: not multiples of 16 (padded)
           (4, 32, 256), (4, 64, 256), (4, 128, 512), (4, -1, 688)]


def relative(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def module(
    bits: int, group: int, n: int, m: int = 96, bias: bool = False, seed: int = 0, symmetric: bool = False
) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(n, m, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(m, n, generator=g) * 0.05 + 0.01)  # off-centre: zero points far from 128 / 8
        if bias:
            linear.bias.copy_(torch.randn(m, generator=g))
    return QuantLinear.from_linear(linear, bits, group, symmetric)


def run(q: QuantLinear, x: torch.Tensor, mode: str) -> torch.Tensor:
    q.kernel_mode = mode
    with torch.no_grad():
        return q(x)


@pytest.mark.parametrize(("bits", "group", "n"), LAYOUTS)
@pytest.mark.parametrize(("bias", "symmetric"), [(False, False), (True, False), (False, True)])
def test_float32_kernel_equals_the_dequantize_path(bits, group, n, bias, symmetric):
    q = module(bits, group, n, bias=bias, symmetric=symmetric)
    x = torch.randn(2, 5, n, generator=torch.Generator().manual_seed(1))
    reference = run(q, x, "off")
    assert q.kernel == "dequantize"
    y = run(q, x, "fp32")
    assert q.kernel == ("int8pack_mm" if bits == 8 else "int4pack_mm")
    assert y.shape == reference.shape and y.dtype == torch.float32
    assert relative(y, reference) < 1e-5


@pytest.mark.parametrize(("bits", "group", "n"), LAYOUTS)
@pytest.mark.parametrize(("inputs", "symmetric"), [("float32 in bf16 mode", False), ("bfloat16", False),
                                                   ("float32 in bf16 mode", True)])
def test_bfloat16_kernel_is_within_bfloat16_rounding_of_the_reference(bits, group, n, inputs, symmetric):
    q = module(bits, group, n, symmetric=symmetric)
    x = torch.randn(4, n, generator=torch.Generator().manual_seed(2))
    reference = run(q, x, "off")
    floor = relative(torch.nn.functional.linear(x.bfloat16(), q.dequantized_weight().bfloat16()), reference)
    y = run(q, x, "bf16") if inputs == "float32 in bf16 mode" else run(q, x.bfloat16(), "auto")
    assert q.kernel == ("int8pack_mm" if bits == 8 else "int4pack_mm")
    assert y.dtype == (torch.float32 if inputs.startswith("float32") else torch.bfloat16)
    assert relative(y, reference) < min(1.5 * floor, 1e-2), (relative(y, reference), floor)


@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_grids_centre_the_codes_and_drop_the_int8_correction(bits):
    """zero = 2^(b-1), each row's largest |w| on code zero +- (2^(b-1) - 1), every weight within half a step; the
    8-bit kernel layout then carries no rank-one correction."""
    q = module(bits, -1, 256, symmetric=True)
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(0)) * 0.05 + 0.01  # module()'s weights
    half = 2 ** (bits - 1)
    assert torch.equal(q.zeros(), torch.full_like(q.zeros(), half))
    codes = q.codes().int()
    assert int(codes.min()) >= 1 and int(codes.max()) <= 2**bits - 1
    extreme = (codes - half).abs().max(1).values
    assert torch.equal(extreme, torch.full_like(extreme, half - 1))
    error = (q.dequantized_weight() - w).abs().max(1).values
    assert (error <= q.scales[:, 0].float() / 2 * (1 + 1e-3)).all()
    asymmetric = module(bits, -1, 256)  # one step more resolution on these off-centre rows
    assert (asymmetric.dequantized_weight() - w).norm() < (q.dequantized_weight() - w).norm()
    if bits == 8:
        assert q._kernel_layout(torch.bfloat16)[3] is None
        assert asymmetric._kernel_layout(torch.bfloat16)[3] is not None


def test_the_zero_point_conversion_is_exact_at_the_extremes():
    """Codes 0 and 2^b - 1 with zero points 0 and 2^b - 1: the 8-bit rank-one term and the 4-bit offset."""
    for bits in (4, 8):
        top = 2**bits - 1
        codes = torch.tensor([[0, top] * 16, [top, 0] * 16, [top] * 32, [0] * 32], dtype=torch.float32)
        zeros = torch.tensor([[0.0], [top], [0.0], [top]])
        scales = torch.tensor([[0.5], [0.25], [2.0**-10], [3.0]])
        q = QuantLinear.from_codes(codes, scales, zeros, bits=bits, group_size=-1)
        x = torch.randn(3, 32, dtype=torch.float64).float()
        expected = x.double() @ dequantize(codes, scales, zeros, -1).double().T
        assert relative(run(q, x, "fp32"), expected) < 1e-6


@pytest.mark.parametrize(("bits", "group", "n", "kernel"), [
    (4, 16, 256, "dequantize"),     # the default gptq w4g16: the int4 kernel has no groups of 16, no exact repack
    (4, 32, 256, "int4pack_mm"),
    (4, 256, 512, "int4pack_mm"),
    (4, -1, 688, "int4pack_mm"),    # one grid per row: split into groups of 32 over zero-padded columns
    (8, -1, 256, "int8pack_mm"),
    (8, 16, 256, "dequantize"),     # grouped 8 bits: the int8 kernel has one scale per row
    (8, 128, 256, "dequantize"),
])
def test_the_kernel_is_chosen_where_the_layout_allows(bits, group, n, kernel):
    q = module(bits, group, n)
    q.kernel_mode = "bf16"
    assert q.planned_kernel() == kernel == q.planned_kernel(torch.bfloat16)
    run(q, torch.randn(1, n), "bf16")
    assert q.kernel == kernel
    q.kernel_mode = "auto"  # float32 inputs dequantize (float32 results unchanged); bfloat16 inputs take the kernel
    assert q.planned_kernel() == "dequantize" and q.planned_kernel(torch.bfloat16) == kernel
    q.kernel_mode, q.keep_dequantized = "bf16", True
    assert q.planned_kernel() == "dequantize"


@pytest.mark.parametrize("bits", [8, 4])
def test_many_rows_per_call_dequantize(bits):
    """Above KERNEL_MAX_ROWS the shared dequantization is cheaper than the kernel (prompt passes, big batches)."""
    q = module(bits, -1, 64)
    limit = KERNEL_MAX_ROWS[bits]
    run(q, torch.randn(limit, 64), "bf16")
    assert q.kernel != "dequantize"
    run(q, torch.randn(2, limit // 2 + 1, 64), "bf16")
    assert q.kernel == "dequantize"


def test_gradients_and_off_mode_use_the_dequantize_path_and_bad_modes_are_clear():
    q = module(4, 32, 64)
    x = torch.randn(2, 64, requires_grad=True)
    q.kernel_mode = "bf16"
    q(x).sum().backward()
    assert q.kernel == "dequantize" and x.grad is not None
    with pytest.raises(ValueError, match="ODLLM_KERNELS"):
        set_kernels(torch.nn.Sequential(q), "int4")


def test_packed_cache_is_not_saved_is_counted_and_follows_new_codes():
    q = module(4, 32, 256)
    stored = q.storage()["bytes"]
    keys = set(q.state_dict())
    x = torch.randn(1, 256)
    first = run(q, x, "bf16")
    assert set(q.state_dict()) == keys  # nothing new on disk
    assert q.storage()["bytes"] > stored  # the kernel layout is a second copy, counted while it exists
    other = module(4, 32, 256, seed=3)
    q.load_state_dict(other.state_dict())
    assert torch.equal(run(q, x, "bf16"), run(other, x, "bf16")) and not torch.equal(first, run(q, x, "bf16"))


def test_int8_factors_and_int8_head_run_the_int8_kernel():
    low = LowRankLinear.from_factors(torch.randn(96, 16), torch.randn(16, 64))
    low.quantize_factors(8)
    table = torch.nn.Embedding(300, 64)
    codes, scales, zeros = rtn_quantize(table.weight.detach(), 8, -1)
    head = QuantEmbedding.from_codes(codes, scales, zeros, bits=8, group_size=-1)
    model = torch.nn.ModuleDict({"low": low, "head": head})
    x = torch.randn(3, 64)
    with torch.no_grad():
        set_kernels(model, "off")
        ref_low, ref_head = low(x), head.project(x)
        assert set_kernels(model, "bf16") == {"int8pack_mm": 3}
        y_low, y_head = low(x), head.project(x)
    assert low.A.kernel == low.B.kernel == head.kernel == "int8pack_mm"
    assert relative(y_low, ref_low) < 1e-2 and relative(y_head, ref_head) < 1e-2
    assert torch.equal(head(torch.tensor([3, 5])), head.dequantized_rows(torch.tensor([3, 5])))  # lookup unchanged


def test_a_saved_and_reloaded_gptq_model_runs_the_kernel_with_the_same_outputs(tmp_path, monkeypatch):
    model, data = tiny_model(seed=5), batches(sequences())
    settings = OmegaConf.merge(load_method("gptq"), {"group_size": 32})
    compress_with(model, data, settings, 0.5, progress=False)
    assert set_kernels(model, "bf16") == {"int4pack_mm": 14}
    before = [logits(model, batch) for batch in data]
    set_kernels(model, "off")
    exact = [logits(model, batch) for batch in data]
    model.save_pretrained(tmp_path, safe_serialization=True)
    save_compression_config(model, tmp_path)
    specs = json.loads((tmp_path / COMPRESSION_FILE).read_text())
    assert set(next(iter(specs.values()))) == {"kind", "bits", "group_size", "scale_dtype"}  # stored format as before
    assert "kernels: 14x dequantize" in describe_model(tmp_path, load_compressed(tmp_path))["label"]  # "auto"
    monkeypatch.setenv("ODLLM_KERNELS", "bf16")  # what a benchmark worker inherits
    loaded = load_compressed(tmp_path)
    about = describe_model(tmp_path, loaded)
    assert about["kernels"] == {"int4pack_mm": 14} and "kernels: 14x int4pack_mm" in about["label"]
    for batch, expected, reference in zip(data, before, exact, strict=True):
        out = logits(loaded, batch)
        assert torch.equal(out, expected)
        assert relative(out, reference) < 1e-2
    kernels = {m.kernel for m in loaded.modules() if isinstance(m, QuantLinear)}
    assert kernels == {"int4pack_mm"}


@pytest.mark.parametrize(("bits", "group", "n"), [(8, -1, 256), (4, 64, 256)])
def test_a_strided_input_runs_the_kernel_like_a_contiguous_one(bits, group, n):
    """A fused projection's member gets a slice of the shared product (rows strided): the kernels need rows
    contiguous (int8pack_mm crashed on such a slice)."""
    q = module(bits, group, n)
    wide = torch.randn(4, 3, n + 40, generator=torch.Generator().manual_seed(3)).bfloat16()  # 12 rows: the kernel
    x = wide[..., 7 : 7 + n]
    assert not x.is_contiguous()
    y = run(q, x, "auto")
    assert q.kernel == ("int8pack_mm" if bits == 8 else "int4pack_mm")
    assert torch.equal(y, run(q, x.contiguous(), "auto"))
