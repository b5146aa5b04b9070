"""Fair GPTQ and SparseGPT: act-order with static groups, and true-sequential statistics inside a layer."""

import json

import pytest
import torch
from test_compression import batches, logits, sequences, tiny_model

from odllm.compress.driver import compress_layers
from odllm.compress.gptq import GPTQ, gptq_quantize, hessian, weighted_error
from odllm.compress.quant import QuantLinear
from odllm.compress.saved import load_compressed, save_compression_config
from odllm.compress.sparsegpt import SparseGPT
from odllm.compress.statistics import InputCovariances
from odllm.model.recommender import COMPRESSION_FILE

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER_GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def skewed_problem(seed: int, m: int = 32, n: int = 128, tokens: int = 1000):
    """Correlated inputs whose channel energies span ~3 orders of magnitude (LLM activations have such outlier
    channels): the case act-order is for."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5 + torch.eye(n, dtype=torch.float64)
    scale = torch.exp(1.2 * torch.randn(n, generator=g, dtype=torch.float64))
    X = (torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix) * scale
    W = torch.randn(m, n, generator=g, dtype=torch.float64) * 0.05
    return W, X.T @ X, tokens


def test_act_order_lowers_the_hessian_weighted_error_on_a_skewed_diagonal():
    plain, static, ordered = [], [], []
    for seed in range(8):
        W, C, tokens = skewed_problem(seed)
        H = hessian(C, tokens)
        plain.append(weighted_error(W - gptq_quantize(W, H, bits=4, group_size=16).weight, C))
        static.append(weighted_error(W - gptq_quantize(W, H, bits=4, group_size=16, static_groups=True).weight, C))
        ordered.append(weighted_error(W - gptq_quantize(W, H, bits=4, group_size=16, act_order=True).weight, C))
    # every seed, and clearly on average, against both the default and plain static groups
    assert all(o < p and o < s for o, p, s in zip(ordered, plain, static, strict=True))
    assert sum(ordered) < 0.9 * min(sum(plain), sum(static))


@pytest.mark.parametrize("group", [16, -1])
def test_act_order_stores_contiguous_groups_without_a_permutation(group):
    W, C, tokens = skewed_problem(0, n=64)
    result = gptq_quantize(W, hessian(C, tokens), bits=4, group_size=group, act_order=True)
    g = 64 if group == -1 else group
    # the grids are the static ones of the original contiguous groups ...
    fixed = gptq_quantize(W, hessian(C, tokens), bits=4, group_size=group, static_groups=True)
    assert torch.equal(result.scales, fixed.scales) and torch.equal(result.zeros, fixed.zeros)
    assert not torch.equal(result.codes, fixed.codes)  # ... but the order changed the rounding
    # ... so scale * (code - zero) per contiguous group, as QuantLinear stores it, is the weight GPTQ chose
    expected = result.scales.repeat_interleave(g, 1) * (result.codes - result.zeros.repeat_interleave(g, 1))
    assert torch.equal(expected, result.weight)
    module = QuantLinear.from_codes(result.codes, result.scales, result.zeros, bits=4, group_size=group, bias=None)
    assert torch.equal(module.dequantized_weight().double(), result.weight)


def covariances_of(model, data) -> dict[str, torch.Tensor]:
    """sum x x^T of every decoder linear's input, measured by hooks on the (compressed) model itself."""
    linears = {name: m for name, m in model.model.layers.named_modules() if hasattr(m, "in_features")}
    with InputCovariances(linears) as stats:
        for batch in data:
            stats.mask = batch["attention_mask"].bool()
            logits(model, batch)
    return stats.covariance


def recording(cls):
    """``cls`` (GPTQ or SparseGPT) keeping the statistics the driver handed it."""

    class Recording(cls):
        def compress_linear(self, name, linear, stats):
            self.seen = getattr(self, "seen", {})
            self.seen[name] = stats.covariance.clone()
            return super().compress_linear(name, linear, stats)

    return Recording


@pytest.mark.parametrize("cls", [GPTQ, SparseGPT])
@pytest.mark.parametrize("true_sequential", [True, False])
def test_true_sequential_statistics_are_those_of_the_compressed_sublayers(cls, true_sequential):
    model, data = tiny_model(seed=3), batches(sequences())
    settings = {"bits": 4, "group_size": 16} if cls is GPTQ else {"sparsity": 0.5}
    algorithm = recording(cls)(**settings, true_sequential=true_sequential)
    report = compress_layers(model, data, algorithm, progress=False)
    # in the final model, o_proj's input is the output of the compressed attention (q/k/v compressed), down_proj's
    # that of the compressed gate/up, and every layer reads the compressed layers before it
    measured = covariances_of(model, data)
    for layer in range(2):
        for names in LAYER_GROUPS:
            for name in names:
                full = f"model.layers.{layer}.{name}"
                same = torch.allclose(algorithm.seen[full], measured[f"{layer}.{name}"], rtol=1e-9, atol=1e-9)
                # without true_sequential only q/k/v (whose input nothing in the layer changes) match
                assert same == (true_sequential or names is LAYER_GROUPS[0]), full
    if true_sequential:
        assert [r["statistics_groups"] for r in report["layers"]] == [LAYER_GROUPS, LAYER_GROUPS]
    else:
        assert "statistics_groups" not in report["layers"][0]


def test_act_order_model_saves_and_reloads_identically(tmp_path):
    model, data = tiny_model(seed=5), batches(sequences())
    compress_layers(model, data, GPTQ(bits=4, group_size=16, act_order=True), progress=False)
    model.save_pretrained(tmp_path, safe_serialization=True)
    save_compression_config(model, tmp_path)
    specs = json.loads((tmp_path / COMPRESSION_FILE).read_text())
    assert {spec["kind"] for spec in specs.values()} == {"gptq"} and len(specs) == 14
    assert all("g_idx" not in key for key in model.state_dict())  # no permutation index is stored
    loaded = load_compressed(tmp_path)
    for batch in data:
        assert torch.equal(logits(loaded, batch), logits(model, batch))
