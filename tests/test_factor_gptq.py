"""GPTQ on the low-rank factors (odllm_gptq4 / odllm_gptq8): error, grids, bytes, save/reload, the layer loop."""

import copy
import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from test_baselines import problem
from test_compression import batches, logits, sequences, tiny_model

from odllm.compress.cholesky import cholesky_with_jitter
from odllm.compress.grid import dequantize
from odllm.compress.lowrank import LowRankLinear, factor_group_size, factorize
from odllm.compress.quant import QuantLinear, set_kernels
from odllm.compress.registry import build_algorithm, compress_with, model_tag
from odllm.compress.saved import load_compressed, save_compression_config
from odllm.config import load_method
from odllm.model.recommender import COMPRESSION_FILE

pytestmark = pytest.mark.usefixtures("one_thread")


def method(name: str, **changes):
    return {**OmegaConf.to_container(load_method(name)), **changes}


def output_error(W, module: LowRankLinear, C) -> float:
    """||(W - B A) X||^2 / ||W X||^2 with C = X X^T: the error in the H norm."""
    weights = [f.dequantized_weight() if isinstance(f, QuantLinear) else f.weight for f in (module.B, module.A)]
    D = W - weights[0].double() @ weights[1].double()
    return ((D @ C) * D).sum().item() / ((W @ C) * W).sum().item()


def factorised(m=48, n=96, k=24, seed=0):
    W, C, tokens = problem(m=m, n=n, tokens=800, seed=seed)
    S, _ = cholesky_with_jitter(C)
    B, A, _ = factorize(W, S, k)
    return W, C, tokens, LowRankLinear.from_factors(B.float(), A.float())


def test_factor_group_size_clips_to_the_width():
    assert [factor_group_size(128, n) for n in (256, 688, 64, 93, 97)] == [128, 86, -1, -1, -1]
    assert [factor_group_size(32, n) for n in (256, 688, 93, 97, 32)] == [32, 16, 31, -1, -1]
    assert factor_group_size(-1, 688) == -1 and factor_group_size(32, 200) == 25
    with pytest.raises(ValueError, match="group_size"):
        factor_group_size(0, 64)


@pytest.mark.parametrize("bits, group", [(4, -1), (4, 16), (8, -1), (8, 16)])
def test_gptq_factors_beat_round_to_nearest_in_the_h_norm(bits, group):
    """On correlated inputs GPTQ's factors leave less output error than RTN's on the same grids, with and without
    B's refit on Â; the report's numbers are the measured ones."""
    for seed in range(3):
        W, C, tokens, low = factorised(seed=seed)
        floats = output_error(W, low, C)
        rtn, plain, gptq = copy.deepcopy(low), copy.deepcopy(low), low
        rtn.quantize_factors(bits, group)
        plain.gptq_factors(W, C, tokens, bits=bits, group_size=group, refit_b=False)
        found = gptq.gptq_factors(W, C, tokens, bits=bits, group_size=group)
        errors = {name: output_error(W, module, C) for name, module in
                  (("rtn", rtn), ("plain", plain), ("gptq", gptq))}
        assert floats < errors["gptq"] <= errors["plain"] < errors["rtn"], errors
        extra = {name: e - floats for name, e in errors.items()}  # what quantizing added to the truncation
        assert extra["gptq"] < (0.8 if bits == 4 else 0.9) * extra["rtn"], extra
        assert found["error"] == pytest.approx(errors["gptq"], rel=1e-6)
        assert found["error_rtn"] == pytest.approx(errors["rtn"], rel=1e-4)  # RTN there in float64, here float32
        assert found["error_float_factors"] == pytest.approx(floats, rel=1e-6)


@pytest.mark.parametrize("bits, group, symmetric", [(4, 16, False), (8, -1, False), (8, -1, True), (4, 16, True)])
def test_gptq_factor_codes_lie_on_the_stored_grid(bits, group, symmetric):
    W, C, tokens, low = factorised(m=40, n=64, k=12)
    low.gptq_factors(W, C, tokens, bits=bits, group_size=group, symmetric=symmetric)
    for factor, width in ((low.A, 64), (low.B, 12)):
        assert isinstance(factor, QuantLinear) and factor.kind == "gptq" and factor.bits == bits
        assert factor.group_size == factor_group_size(group, width)
        codes = factor.codes()
        assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
        assert int(factor.zeros().max()) <= 2**bits - 1 and factor.scales.dtype == torch.float16
        if symmetric:  # zero-centred grids (GPTQ's updates may still reach code 0 below the original minimum)
            assert (factor.zeros() == 2 ** (bits - 1)).all()
        assert torch.equal(factor.dequantized_weight(), dequantize(codes, factor.scales, factor.zeros(), group))
        groups = 1 if factor.group_size == -1 else width // factor.group_size
        per_byte = 8 // bits
        expected = factor.out_features * (math.ceil(width / per_byte) + math.ceil(groups / per_byte) + 2 * groups)
        assert factor.storage() == {"params": factor.out_features * width, "bytes": expected}


def test_method_tags_name_the_factor_settings():
    assert model_tag(method("odllm_int8"), 0.5) == "r0.5"  # existing names unchanged
    assert model_tag(method("odllm"), 0.5) == "r0.5" and model_tag(method("gptq"), None) == "w4g16"
    assert model_tag(method("odllm_gptq4"), 0.5) == "r0.5" and model_tag(method("odllm_gptq8"), 0.3) == "r0.3"
    assert model_tag(method("odllm_int8", factor_bits=4), 0.5) == "r0.5-rtn4rowsym"
    assert model_tag(method("odllm_alloc", factor_bits=8), 0.5) == "r0.5-rtn8row"
    assert model_tag(method("odllm_gptq4", factor_group_size=32), 0.5) == "r0.5-gptq4g32"
    assert model_tag(method("odllm_gptq4", embeddings="int8"), 0.5) == "r0.5-emb8"
    assert model_tag(method("odllm_int8", factor_symmetric=False), 0.5) == "r0.5-rtn8row"  # the earlier grid
    assert model_tag(method("gptq", group_size=-1, symmetric=True), None) == "w4rowsym"
    with pytest.raises(ValueError, match="factor_quantizer"):
        build_algorithm(method("odllm_gptq4", factor_quantizer="nf4"), 0.5)


@pytest.fixture(scope="module")
def data():
    return batches(sequences())


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_factors_through_the_layer_loop_save_and_reload(tmp_path, data, bits):
    """compress_layers with alignment: every factor a GPTQ QuantLinear, quantized after alignment; the byte
    totals are the modules' storage(); less factor error than RTN; the saved model reloads to the same logits."""
    settings = method(f"odllm_gptq{bits}", factor_group_size=8)
    model = tiny_model(seed=5)
    dense = copy.deepcopy(model)
    report = compress_with(model, data, settings, 0.5, progress=False)
    rtn_model = copy.deepcopy(dense)
    rtn = compress_with(rtn_model, data, {**settings, "factor_quantizer": "rtn"}, 0.5, progress=False)
    lows = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(lows) == 14 and all(isinstance(f, QuantLinear) and f.kind == "gptq" and f.bits == bits
                                   for m in lows for f in (m.A, m.B))
    assert report["settings"]["factor_quantizer"] == "gptq" and report["settings"]["factor_group_size"] == 8
    entries = [e for e in report["matrices"] if "factor_quantization" in e]
    assert len(entries) == 14
    errors = [sum(e["factor_quantization"][key] for e in entries) for key in ("error", "error_rtn")]
    assert errors[0] < errors[1]
    totals = report["totals"]["decoder_linear"]
    assert totals["bytes_after"] == sum(e["bytes_after"] for e in report["matrices"])
    assert totals["bytes_after"] == rtn["totals"]["decoder_linear"]["bytes_after"]  # same grids, same bytes
    for layer in report["layers"]:  # quantized after alignment, the next layer aligned to the quantized stream
        assert "output_error_float_factors" in layer and layer["alignment_kept"] in (True, False)
    first = report["layers"][0]
    assert first["output_error"] < rtn["layers"][0]["output_error"]

    model.save_pretrained(tmp_path, safe_serialization=True)
    save_compression_config(model, tmp_path)
    specs = json.loads((tmp_path / COMPRESSION_FILE).read_text())
    assert specs["model.layers.0.mlp.up_proj.A"] == {"kind": "gptq", "bits": bits, "group_size": 8,
                                                    "scale_dtype": "float16"}
    loaded = load_compressed(tmp_path)
    assert all(torch.equal(logits(loaded, batch), logits(model, batch)) for batch in data)


def test_gptq_factors_without_alignment_and_the_int4_kernel(data):
    """align=false: factors quantized right after factorisation against the original stream's C; 4-bit factors
    in groups of 32 run torch's int4 kernel (bf16 mode) and agree with the dequantized path."""
    torch.manual_seed(0)
    model = tiny_model(seed=7)
    report = compress_with(model, data, method("odllm_gptq4", align=False, factor_group_size=32), 0.5,
                           progress=False)
    entries = [e["factor_quantization"] for e in report["matrices"] if "factor_quantization" in e]
    assert len(entries) == 14 and all(e["error"] < e["error_rtn"] for e in entries)
    A = model.model.layers[0].mlp.down_proj.A  # 64 columns in two groups
    assert A.group_size == 32 and A.planned_kernel() == "dequantize"
    expected = logits(model, data[0])
    counts = set_kernels(model, "bf16")
    assert counts.get("int4pack_mm", 0) >= 14  # every A (32 or 64 columns in groups of 32) and row-wide Bs
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(A(x), torch.nn.functional.linear(x, A.dequantized_weight()), rtol=0.02,
                                   atol=0.02 * A(x).abs().max().item())
    assert A.kernel == "int4pack_mm"
    set_kernels(model, "off")
    assert torch.equal(logits(model, data[0]), expected)
