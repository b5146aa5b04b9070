"""Baselines (GPTQ, SparseGPT, ASVD, bitsandbytes): the algorithms, their true storage, and the compress.py path."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import compose_config, tiny_overrides
from safetensors.torch import load_file, save_file
from test_compression import batches, logits, sequences, tiny_model

from odllm import config
from odllm.compress.gptq import GPTQ, gptq_quantize, hessian, weighted_error
from odllm.compress.grid import pack_bits, pack_int4, rtn_quantize, unpack_bits, unpack_int4
from odllm.compress.lowrank import LowRankLinear
from odllm.compress.lowrank_method import factorise_linear
from odllm.compress.pipeline import compress_recommender, load_dense
from odllm.compress.quant import QuantLinear
from odllm.compress.registry import algorithm_name, build_algorithm, compress_with
from odllm.compress.saved import load_compressed, load_recommender, save_compression_config
from odllm.compress.sparse import SparseLinear
from odllm.compress.sparsegpt import sparsegpt_prune
from odllm.config import load_method
from odllm.eval.protocol import score_examples
from odllm.model.recommender import COMPRESSION_FILE
from odllm.runner.compress import compress
from odllm.runner.train import train

CONF = Path(__file__).parents[1] / "conf" / "method"
BASELINES = ["gptq", "gptq8", "sparsegpt", "sparsegpt24", "asvd", "bnb_int8", "bnb_nf4"]
KIND = {"gptq": "gptq", "gptq8": "gptq", "sparsegpt": "sparse", "sparsegpt24": "sparse", "asvd": "lowrank",
        "bnb_int8": "bnb_int8", "bnb_nf4": "bnb_nf4", "odllm_int8": "lowrank"}


pytestmark = pytest.mark.usefixtures("one_thread")


def method(name: str):
    return load_method(name)


def problem(m: int = 24, n: int = 64, tokens: int = 600, seed: int = 0):
    """A weight and a calibration covariance with correlated input channels (where GPTQ's compensation pays)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5 + torch.eye(n, dtype=torch.float64)
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix
    W = torch.randn(m, n, generator=g, dtype=torch.float64) * 0.05
    return W, X.T @ X, tokens


# ---- storage ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 64])
def test_packed_int4_and_bit_masks_round_trip(n):
    codes = torch.randint(0, 16, (5, n), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, math.ceil(n / 2))
    assert torch.equal(unpack_int4(packed, n), codes)
    mask = torch.rand(5, n) < 0.5
    bits = pack_bits(mask)
    assert bits.shape == (5, math.ceil(n / 8)) and torch.equal(unpack_bits(bits, n), mask)


def test_quantlinear_stores_exactly_the_grid_gptq_chose(tmp_path):
    W, C, tokens = problem(m=20, n=48)
    for bits, group in [(4, 16), (8, -1)]:
        result = gptq_quantize(W, hessian(C, tokens), bits=bits, group_size=group)
        module = QuantLinear.from_codes(result.codes, result.scales, result.zeros, bits=bits, group_size=group)
        assert torch.equal(module.dequantized_weight().double(), result.weight)  # no rounding between them
        x = torch.randn(3, 48)
        assert torch.equal(module(x), torch.nn.functional.linear(x, result.weight.float()))
        save_file(module.state_dict(), tmp_path / "q.safetensors")
        loaded = QuantLinear(48, 20, bits, group)
        loaded.load_state_dict(load_file(tmp_path / "q.safetensors"))
        assert torch.equal(loaded(x), module(x))


def test_true_bytes_of_packed_and_sparse_weights(tmp_path):
    m, n = 256, 688  # llama-small's down_proj: int4 codes are 1/8 of float32 plus one scale and zero per group
    q4 = QuantLinear(n, m, bits=4, group_size=16)
    groups = n // 16
    assert q4.storage()["bytes"] == m * n // 2 + m * 2 * groups + m * math.ceil(groups / 2)
    ratio = q4.storage()["bytes"] / (4 * m * n)  # zero points of 43 groups pad to 22 bytes per row
    assert ratio == pytest.approx(1 / 8 + (2 + 0.5) / (4 * 16), rel=3e-3)
    q8 = QuantLinear(n, m, bits=8, group_size=-1)
    assert q8.storage()["bytes"] == m * n + m * 2 + m
    save_file(q4.state_dict(), tmp_path / "q4.safetensors")  # the file is the packed size (+ a small header)
    assert 0 < (tmp_path / "q4.safetensors").stat().st_size - q4.storage()["bytes"] < 1024
    q4.keep_dequantized = True  # the optional float32 cache is counted once it exists
    q4(torch.randn(1, n))
    assert q4.storage()["bytes"] == m * n // 2 + m * 2 * groups + m * math.ceil(groups / 2) + 4 * m * n
    kept = torch.rand(m, n) < 0.5
    sparse = SparseLinear.from_dense(torch.randn(m, n), kept)
    assert sparse.storage() == {"params": int(kept.sum()), "bytes": 4 * int(kept.sum()) + m * math.ceil(n / 8)}


# ---- GPTQ ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "group", "block"), [(4, 16, 128), (4, -1, 128), (4, 32, 8), (8, 16, 16)])
def test_gptq_error_is_below_round_to_nearest_on_the_same_groups(bits, group, block):
    W, C, tokens = problem()
    result = gptq_quantize(W, hessian(C, tokens), bits=bits, group_size=group, block_size=block)
    codes, scales, zeros = rtn_quantize(W, bits, group)
    g = W.shape[1] // scales.shape[1]
    rtn = scales.repeat_interleave(g, 1) * (codes - zeros.repeat_interleave(g, 1))
    assert weighted_error(W - result.weight, C) < 0.9 * weighted_error(W - rtn, C)
    assert ((result.codes >= 0) & (result.codes < 2**bits) & (result.codes == result.codes.round())).all()


def test_gptq_loss_is_the_output_error_without_damping():
    """The column-by-column OBS losses add up to ||(W - Q) X||^2 exactly: a check of the whole update chain."""
    W, C, tokens = problem()
    result = gptq_quantize(W, hessian(C, tokens), bits=4, group_size=16, damp=1e-12)
    assert result.loss * tokens == pytest.approx(weighted_error(W - result.weight, C), rel=1e-6)


def test_dead_input_columns_are_zeroed_and_do_not_break_cholesky():
    W, C, tokens = problem()
    C[3, :], C[:, 3] = 0, 0
    result = gptq_quantize(W, hessian(C, tokens), bits=4, group_size=16)
    assert result.dead_columns == 1 and (result.weight[:, 3] == 0).all()


def test_group_size_that_does_not_divide_the_columns_is_a_clear_error():
    with pytest.raises(ValueError, match=r"group_size=128 does not divide in_features=688 of mlp.down.*"
                                         r"method.group_size=.*\(e\.g\. 86, 43, 16\).*-1"):
        GPTQ(group_size=128).validate("mlp.down", torch.nn.Linear(688, 256))
    dense, data = tiny_model(), batches(sequences())
    with pytest.raises(ValueError, match="in_features=32 of model.layers.0.self_attn.q_proj"):
        compress_with(dense, data, {"name": "gptq", "group_size": 128}, progress=False)
    assert all(type(m) is torch.nn.Linear for m in dense.model.layers[0].modules() if hasattr(m, "weight")
               and m.weight.dim() == 2)  # validated before any layer was touched


# ---- SparseGPT -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_sparsegpt_reaches_the_requested_sparsity_exactly_in_every_block(sparsity):
    W, C, tokens = problem(m=30, n=80)
    result = sparsegpt_prune(W, hessian(C, tokens), sparsity=sparsity, block_size=32)
    for start in range(0, 80, 32):
        block = ~result.kept[:, start : start + 32]
        assert int(block.sum()) == int(block.numel() * sparsity)
    assert (result.weight[~result.kept] == 0).all()
    magnitude = W.abs() > W.abs().flatten().kthvalue(int(W.numel() * sparsity)).values
    assert weighted_error(W - result.weight, C) < weighted_error(W - W * magnitude, C)


def test_sparsegpt_two_of_four_prunes_two_in_every_group_of_four():
    W, C, tokens = problem(m=30, n=80)
    result = sparsegpt_prune(W, hessian(C, tokens), prune_n=2, prune_m=4, block_size=32)
    assert (result.kept.reshape(30, 20, 4).sum(-1) == 2).all()
    assert (result.weight[~result.kept] == 0).all()


# ---- ASVD and the dispatch ---------------------------------------------------------------------------------------


def test_asvd_is_a_scaling_choice_of_the_one_factorise_path():
    W, C, _ = problem(m=24, n=40)
    linear = torch.nn.Linear(40, 24, bias=False, dtype=torch.float64)
    linear.weight.data = W
    abs_mean = torch.rand(40, dtype=torch.float64) + 0.1
    module, entry, sigma = factorise_linear("x", linear, C, 0.5, "asvd", abs_mean, alpha=0.5)
    assert isinstance(module, LowRankLinear) and entry["rank"] == math.floor(0.5 * 24 * 40 / 64)
    S = torch.diag(abs_mean.sqrt() + 1e-6 * abs_mean.sqrt().max())
    D = W - module.B.weight @ module.A.weight
    assert (D @ S).square().sum().item() == pytest.approx(entry["predicted_error"], rel=1e-6)  # truncation in W S
    plain, _, _ = factorise_linear("x", linear, C, 0.5, False)
    assert not torch.allclose(plain.A.weight, module.A.weight)


def test_method_dispatch_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown compression method 'zip'.*'gptq'.*'sparsegpt'"):
        algorithm_name({"name": "zip"})
    with pytest.raises(ValueError, match=r"has no setting \['bitz'\]; its settings: \['bits'"):
        build_algorithm({"name": "gptq", "bitz": 4})
    assert {algorithm_name(method(p.stem)) for p in CONF.glob("*.yaml")} == {"lowrank", "gptq", "sparsegpt", "bnb"}
    with pytest.raises(ValueError, match="heal trains float factors"):
        build_algorithm({"name": "odllm_int8", "factor_bits": 8, "heal": {"steps": 1}}, 0.5)


# ---- every method on a tiny model: replaced modules, sizes, save and load -----------------------------------------


@pytest.fixture(scope="module")
def dense():
    return tiny_model(seed=5)


@pytest.fixture(scope="module")
def data():
    return batches(sequences())


@pytest.mark.parametrize("name", BASELINES)
def test_every_method_compresses_saves_and_loads_identically(tmp_path, dense, data, name):
    model = tiny_model(seed=5)
    report = compress_with(model, data, method(name), 0.5, progress=False)
    json.dumps(report)
    kinds = {e["name"]: model.get_submodule(e["name"]).kind for e in report["matrices"]}
    assert len(kinds) == 14 and set(kinds.values()) == {KIND[name]}
    totals = report["totals"]
    stored = sum(e["bytes_after"] for e in report["matrices"])
    assert totals["decoder_linear"]["bytes_after"] == stored < totals["decoder_linear"]["bytes_before"]
    assert totals["model"]["bytes_before"] == sum(p.numel() * 4 for p in dense.parameters())
    if KIND[name] == "sparse":
        assert all(e["sparsity"] == 0.5 for e in report["matrices"])
        assert 0.5 < totals["decoder_linear"]["bytes_kept"] < 0.54  # values + 1-bit mask, really stored
    if KIND[name] == "gptq":
        errors = [(e["output_error"], e["rtn_output_error"]) for e in report["matrices"]]
        assert sum(gptq for gptq, _ in errors) < sum(rtn for _, rtn in errors)
    if name == "gptq":
        assert totals["decoder_linear"]["bytes_kept"] < 1 / 8 + 2.5 / 64 + 0.01
    assert all(torch.isfinite(logits(model, batch)).all() for batch in data)

    model.save_pretrained(tmp_path, safe_serialization=True)
    save_compression_config(model, tmp_path)
    specs = json.loads((tmp_path / COMPRESSION_FILE).read_text())
    assert len(specs) == 14
    if KIND[name] != "lowrank":
        assert {spec["kind"] for spec in specs.values()} == {KIND[name]}
    loaded = load_compressed(tmp_path)
    for batch in data:
        assert torch.equal(logits(loaded, batch), logits(model, batch))
    if KIND[name] in ("gptq", "sparse"):  # the file holds the packed/sparse tensors, not float32 weights
        dense_bytes = sum(p.numel() * 4 for p in dense.parameters())
        on_disk = (tmp_path / "model.safetensors").stat().st_size
        assert on_disk < totals["model"]["bytes_after"] + 16_384 < dense_bytes


# ---- end to end through compress_recommender (what compress.py runs) ------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    overrides = [*tiny_overrides(root), "trainer.max_epochs=1", "calibration.size=32", "calibration.batch_size=8"]
    train(compose_config(overrides), root / "train")
    cfg = compose_config(overrides)
    dense, split = load_dense(config.model_dir(cfg), config.dataset_source(cfg), cfg.task.max_history)
    pad_id = dense.tokenizer.pad_token_id
    settings = config.eval_settings(cfg)
    dense_result = score_examples(dense.model, dense.encoder, dense.trie(), split.test, settings, pad_id, "dense")
    return root, overrides, dense, split, dense_result


@pytest.mark.parametrize(("name", "embeddings"),
                         [*((name, "null") for name in BASELINES), ("odllm_int8", "int8"), ("gptq", "int8")])
def test_each_baseline_runs_through_compress_recommender_and_reloads(trained, name, embeddings):
    root, overrides, dense, split, dense_result = trained
    cfg = compose_config([*overrides, f"method={name}", f"method.embeddings={embeddings}"])
    run_dir = root / "runs" / f"{name}-{embeddings}"
    job = config.compression_job(cfg)
    result = compress_recommender(dense, split, config.plain(cfg.method), job, run_dir, dense_result)
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["test"]["invalid_beams"] == 0 and saved["method"]["name"] == name
    sizes = saved["sizes"]
    assert sizes["decoder_linear"]["bytes_after"] < sizes["decoder_linear"]["bytes_before"]
    assert sizes["disk"]["bytes_after"] < sizes["disk"]["bytes_before"]
    assert (result["ratio"] is None) is (KIND[name] != "lowrank")
    report = json.loads((run_dir / "compression_report.json").read_text())
    if embeddings == "int8":  # the int8 table and head are in the model's bytes, in memory and on disk
        assert Path(result["model_dir"]).name.endswith("-emb8")
        embedding_bytes = sum(e["bytes_before"] - e["bytes_after"] for e in report["embeddings"].values())
        layers_only = sizes["model"]["bytes_before"] - sizes["decoder_linear"]["bytes_before"]
        assert sizes["model"]["bytes_after"] == sizes["decoder_linear"]["bytes_after"] + layers_only - embedding_bytes
        assert sizes["disk"]["bytes_after"] < sizes["model"]["bytes_after"] + 32_768
    reloaded = load_recommender(result["model_dir"])
    assert reloaded.meta["compression"]["method"] == name
    again = score_examples(reloaded.model, reloaded.encoder, reloaded.trie(), split.test, config.eval_settings(cfg),
                           reloaded.tokenizer.pad_token_id, name)
    assert again["metrics"] == result["test"]["metrics"]


def test_compress_py_path_names_the_model_by_its_settings(trained, tmp_path):
    root, overrides, *_ = trained
    result = compress(compose_config([*overrides, "method=gptq", "method.bits=8"]), tmp_path / "run")
    assert Path(result["model_dir"]).name == "toy-gptq-w8g16"
    assert not (tmp_path / "run" / "spectra.png").exists() and (tmp_path / "run" / "compression_report.json").exists()
    with pytest.raises(ValueError, match="group_size=24 does not divide in_features=32"):
        compress(compose_config([*overrides, "method=gptq", "method.group_size=24"]), tmp_path / "bad")


def test_nf4_fast_cpu_layout_saves_and_loads_and_odd_shapes_fall_back(tmp_path):
    from odllm.compress.bnb import NF4Linear

    torch.manual_seed(0)
    x = torch.randn(2, 3, 128)
    for out_features, fast in [(64, True), (48, False)]:  # bitsandbytes repacks blocks of 32 output rows
        linear = torch.nn.Linear(128, out_features)
        module = NF4Linear.from_linear(linear).eval()
        assert module.support_avx512bf16_for_cpu <= fast
        with torch.no_grad():
            y = module(x)
        model = torch.nn.Sequential(module)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "nf4.safetensors")
        rebuilt = torch.nn.Sequential(NF4Linear.empty(linear, module.spec())).eval()
        rebuilt.load_state_dict(load_file(tmp_path / "nf4.safetensors"))
        with torch.no_grad():
            assert torch.equal(rebuilt(x), y) and torch.equal(module(x), y)
        assert (y - linear(x)).norm() < 0.2 * linear(x).norm()


def test_nf4_is_right_when_rows_are_not_whole_blocks():
    """bitsandbytes' native CPU NF4 dequantization misplaces the absmax when in_features % blocksize != 0."""
    from odllm.compress.bnb import NF4Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 32)  # 96 = 1.5 blocks of 64 per row
    with torch.no_grad():
        linear.weight.mul_(2.0 ** (torch.arange(32) % 8)[:, None])  # rows of very different scales
    module = NF4Linear.from_linear(linear).eval()
    x = torch.randn(5, 96)
    with torch.no_grad():
        error = (module(x) - linear(x)).norm() / linear(x).norm()
    assert not module.native_kernels and error < 0.15


@pytest.mark.parametrize("align", ["BA", False])
def test_odllm_int8_stores_int8_factors_that_save_and_load(tmp_path, data, align):
    """odllm + int8: every factor a packed QuantLinear (kind rtn), listed under its own name in compression.json."""
    settings = {**method("odllm_int8"), "align": align}
    model, floats = tiny_model(seed=5), tiny_model(seed=5)
    report = compress_with(model, data, settings, 0.5, progress=False)
    without = {key: value for key, value in settings.items() if not key.startswith("factor_")}  # float32 factors
    reference = compress_with(floats, data, without, 0.5, progress=False)
    factors = [f for m in model.modules() if isinstance(m, LowRankLinear) for f in (m.A, m.B)]
    assert len(factors) == 28 and all(isinstance(f, QuantLinear) and f.kind == "rtn" and f.bits == 8 for f in factors)
    assert all(bool((f.zeros() == 128).all()) for f in factors)  # symmetric grids (factor_symmetric: true)
    totals, float_totals = report["totals"]["decoder_linear"], reference["totals"]["decoder_linear"]
    assert totals["bytes_after"] == sum(e["bytes_after"] for e in report["matrices"])
    assert totals["params_after"] == float_totals["params_after"]  # the same numbers, in int8
    assert 0.25 < totals["bytes_after"] / float_totals["bytes_after"] < 0.25 + 3 / 16  # + scale/zero per row
    assert report["settings"]["factor_bits"] == 8 and "int8" in report["settings"]["storage"]
    for mine, theirs in zip(report["layers"], reference["layers"], strict=True):  # int8 adds little error
        assert mine["output_error"] < 1.5 * theirs["output_error"] + 1e-4
        assert ("output_error_float_factors" in mine) is bool(align)

    model.save_pretrained(tmp_path, safe_serialization=True)
    save_compression_config(model, tmp_path)
    specs = json.loads((tmp_path / COMPRESSION_FILE).read_text())
    assert specs["model.layers.0.self_attn.q_proj"] == 8 and specs["model.layers.0.self_attn.q_proj.A"]["kind"] == "rtn"
    loaded = load_compressed(tmp_path)
    assert isinstance(loaded.model.layers[1].mlp.down_proj.B, QuantLinear)
    assert all(torch.equal(logits(loaded, batch), logits(model, batch)) for batch in data)
