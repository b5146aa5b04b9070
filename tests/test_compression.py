"""The model-level pipeline on tiny LLaMA models: switches, alignment guarantee, padding, save and load."""

import itertools
import json
import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import odllm.compress.align as alignment
from odllm.compress.lowrank import LowRankLinear
from odllm.compress.lowrank_method import compress_model
from odllm.compress.saved import load_compressed, save_compression_config
from odllm.compress.spectra import plot_spectra
from odllm.compress.statistics import InputCovariances
from odllm.model.recommender import COMPRESSION_FILE

VOCAB, PAD = 50, 0


def tiny_model(*, tie: bool = False, kv_heads: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, tie_word_embeddings=tie, pad_token_id=PAD,
    )
    return LlamaForCausalLM(config).eval()


def sequences(count: int = 24, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 14, (count,), generator=g)
    return [torch.randint(1, VOCAB, (int(n),), generator=g) for n in lengths]


def left_pad(seqs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, width - len(s) :], mask[row, width - len(s) :] = s, 1
    return {"input_ids": ids, "attention_mask": mask}


def batches(seqs: list[torch.Tensor], size: int = 8) -> list[dict[str, torch.Tensor]]:
    return [left_pad(seqs[i : i + size]) for i in range(0, len(seqs), size)]


def logits(model, batch) -> torch.Tensor:
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions).logits


def layer_outputs(model, index: int, data) -> list[torch.Tensor]:
    outputs = []
    handle = model.model.layers[index].register_forward_hook(lambda module, args, out: outputs.append(out))
    for batch in data:
        logits(model, batch)
    handle.remove()
    return outputs


def kl_to(dense, model, data) -> float:
    """Mean KL(dense || model) of the next-token distributions over the non-pad positions."""
    total, count = 0.0, 0
    for batch in data:
        p, q = (torch.log_softmax(logits(m, batch), -1) for m in (dense, model))
        mask = batch["attention_mask"].bool()
        total += (p.exp() * (p - q)).sum(-1)[mask].sum().item()
        count += int(mask.sum())
    return total / count


def compressed(dense, data, **settings):
    model = tiny_model(tie=dense.config.tie_word_embeddings, kv_heads=dense.config.num_key_value_heads)
    model.load_state_dict(dense.state_dict())
    report = compress_model(model, data, progress=False, **settings)
    return model, report


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dense():
    return tiny_model()


@pytest.fixture(scope="module")
def data():
    return batches(sequences())


@pytest.fixture(scope="module")
def runs(dense, data):
    """Every switch combination at ratio 0.5: {(whiten, align): (model, report)}."""
    return {
        (whiten, align): compressed(dense, data, ratio=0.5, whiten=whiten, align=align)
        for whiten, align in itertools.product([False, True], [False, "B", "BA"])
    }


def test_all_switch_combinations_compress_every_decoder_linear(runs, dense, data):
    for (whiten, align), (model, report) in runs.items():
        json.dumps(report)
        assert report["settings"]["whiten"] is whiten and report["settings"]["align"] == align
        names = {e["name"] for e in report["matrices"]}
        assert len(names) == 2 * 7 and set(report["spectra"]) == names
        shapes = {e["name"].rsplit(".", 1)[-1]: tuple(e["shape"]) for e in report["matrices"]}
        assert shapes["k_proj"] == shapes["v_proj"] == (16, 32)  # GQA: 2 kv heads of 8
        for entry in report["matrices"]:
            module = model.get_submodule(entry["name"])
            assert isinstance(module, LowRankLinear) and module.rank == entry["rank"]
            assert entry["params_after"] <= 0.5 * entry["params_before"]
            assert entry["whitened_prediction"] <= entry["output_error"] * (1 + 1e-4)  # whitened is optimal
            if whiten:  # the identity: the prediction is the output error on the calibration data
                assert entry["output_error"] == pytest.approx(entry["predicted_error"], rel=1e-3)
            assert ("alignment" in entry) is bool(align)
        assert type(model.lm_head) is torch.nn.Linear and type(model.model.embed_tokens) is torch.nn.Embedding
        assert all(torch.isfinite(logits(model, batch)).all() for batch in data)
        totals = report["totals"]
        assert totals["decoder_linear"]["params_kept"] <= 0.5
        assert totals["model"]["params_before"] == sum(p.numel() for p in dense.parameters())
        assert totals["model"]["params_after"] == sum(p.numel() for p in model.parameters())


def test_whitening_and_alignment_bring_logits_closer_to_the_dense_model(runs, dense, data):
    kl = {switches: kl_to(dense, model, data) for switches, (model, _) in runs.items()}
    assert kl[(True, False)] < kl[(False, False)]
    for whiten in (False, True):
        assert kl[(whiten, "BA")] < kl[(whiten, "B")] < kl[(whiten, False)]


def test_refitting_both_factors_is_the_optimum_refitting_b_approaches(runs):
    """Layer 0 sees the original stream (X' = X): there the whitened SVD already is the best rank-k fit, so
    refitting both factors (reduced-rank regression) must land on the same error, and B alone cannot beat it."""
    for whiten in (False, True):
        both = {e["name"]: e for e in runs[(whiten, "BA")][1]["matrices"] if ".layers.0.self_attn" in e["name"]}
        only_b = {e["name"]: e for e in runs[(whiten, "B")][1]["matrices"] if ".layers.0.self_attn" in e["name"]}
        for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"):
            entry = both[name]
            optimum = entry["whitened_prediction"] / entry["output_error"] * entry["relative_output_error"]
            refit = min(both[name]["alignment"]["error_refit"], both[name]["alignment"]["error_before"])
            assert refit == pytest.approx(optimum, rel=1e-3, abs=1e-9)
            assert min(only_b[name]["alignment"]["error_refit"], only_b[name]["alignment"]["error_before"]) >= (
                refit * (1 - 1e-3)
            )


def test_alignment_never_worsens_a_layers_output_error(runs, dense, data):
    for whiten, align in itertools.product((False, True), ("B", "BA")):
        model, report = runs[(whiten, align)]
        for layer in report["layers"]:
            assert layer["input_stream"] == "compressed"
            assert layer["output_error"] <= layer["error_before_alignment"]
            assert layer["alignment_kept"] == (layer["error_with_refit"] <= layer["error_before_alignment"])
        # recompute the last layer's error independently: its outputs in both full models
        error = reference = 0.0
        pairs = zip(layer_outputs(dense, -1, data), layer_outputs(model, -1, data), data, strict=True)
        for y, yc, batch in pairs:
            mask = batch["attention_mask"].bool()
            error += (yc - y)[mask].double().square().sum().item()
            reference += y[mask].double().square().sum().item()
        assert report["layers"][-1]["output_error"] == pytest.approx(error / reference, rel=1e-4)


def test_a_layer_whose_refit_hurts_is_reverted(monkeypatch, dense, data):
    def harmful_refit(original, layer, group, *args):
        for module in group.values():
            module.B.weight.mul_(3.0)
        return {name: {"refit_kept": True} for name in group}

    monkeypatch.setattr(alignment, "refit_group", harmful_refit)
    model, report = compressed(dense, data, ratio=0.5, whiten=True, align="BA")
    reference, _ = compressed(dense, data, ratio=0.5, whiten=True, align=False)
    for layer in report["layers"]:
        assert not layer["alignment_kept"] and layer["error_with_refit"] > layer["error_before_alignment"]
    assert all(not e["alignment"]["refit_kept"] for e in report["matrices"])
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), name  # the factors are those of whitened SVD again


def test_ratio_one_leaves_the_model_unchanged(dense, data):
    model, report = compressed(dense, data, ratio=1.0, whiten=True, align="BA")
    assert all(e["rank"] == "dense" for e in report["matrices"]) and report["spectra"] == {}
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    for batch in data:
        assert torch.equal(logits(model, batch), logits(dense, batch))


def test_pad_tokens_do_not_count(dense):
    seqs = sequences(12, seed=1)
    padded, alone = batches(seqs, size=6), batches(seqs, size=1)
    assert (padded[0]["attention_mask"] == 0).any()
    linears = {name: m for name, m in dense.model.layers[1].named_modules() if isinstance(m, torch.nn.Linear)}
    stats = []
    for data in (padded, alone):
        with InputCovariances(linears) as s:
            for batch in data:
                s.mask = batch["attention_mask"].bool()
                logits(dense, batch)
        stats.append(s)
    assert stats[0].tokens == stats[1].tokens == dict.fromkeys(linears, sum(len(s) for s in seqs))
    for name in linears:  # equal up to float32 rounding of the activations
        a, b = stats[0].covariance[name], stats[1].covariance[name]
        assert (a - b).norm() <= 1e-5 * a.norm()
    assert stats[0].groups == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]
    # end to end: the same errors whether the calibration set is padded or not
    reports = [compressed(dense, data, ratio=0.5, whiten=True, align="BA")[1] for data in (padded, alone)]
    for a, b in zip(reports[0]["matrices"], reports[1]["matrices"], strict=True):
        assert a["output_error"] == pytest.approx(b["output_error"], rel=1e-4)
    for a, b in zip(reports[0]["layers"], reports[1]["layers"], strict=True):
        assert a["output_error"] == pytest.approx(b["output_error"], rel=1e-4)


def test_dead_input_channel_is_whitened_with_jitter_and_logged(caplog, data):
    dense = tiny_model(seed=2)
    with torch.no_grad():
        dense.model.embed_tokens.weight[:, 3] = 0.0  # layer 0 never sees input channel 3
    with caplog.at_level(logging.INFO, logger="odllm.compress.lowrank_method"):
        model, report = compressed(dense, data, ratio=0.5, whiten=True, align="BA")
    q_proj = next(e for e in report["matrices"] if e["name"] == "model.layers.0.self_attn.q_proj")
    assert q_proj["jitter"] > 0 and "model.layers.0.self_attn.q_proj" in caplog.text
    assert q_proj["output_error"] == pytest.approx(q_proj["predicted_error"], rel=1e-3)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(("tie", "kv_heads"), [(False, 2), (True, 2), (False, 4)])
def test_save_and_load_give_identical_logits(tmp_path, data, tie, kv_heads):
    dense = tiny_model(tie=tie, kv_heads=kv_heads, seed=3)
    model, report = compressed(dense, data, ratio=0.4, whiten=True, align="BA")
    model.save_pretrained(tmp_path, safe_serialization=True)
    save_compression_config(model, tmp_path)
    loaded = load_compressed(tmp_path)
    ranks = json.loads((tmp_path / COMPRESSION_FILE).read_text())
    assert ranks == {e["name"]: e["rank"] for e in report["matrices"]}
    assert {n: m.rank for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)} == ranks
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) is tie
    if tie:
        assert report["totals"]["model"]["params_before"] == sum(p.numel() for p in dense.parameters())
    for batch in data:
        assert torch.equal(logits(loaded, batch), logits(model, batch))


def test_qwen2_with_attention_biases_compresses_and_reloads(tmp_path, data):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(4)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=PAD,
    )
    dense = Qwen2ForCausalLM(config).eval()
    model = Qwen2ForCausalLM(config).eval()
    model.load_state_dict(dense.state_dict())
    compress_model(model, data, ratio=0.5, whiten=True, align="BA", progress=False)
    k_proj = model.model.layers[0].self_attn.k_proj
    assert isinstance(k_proj, LowRankLinear) and k_proj.out_features == 16
    assert torch.equal(k_proj.B.bias, dense.model.layers[0].self_attn.k_proj.bias)
    assert kl_to(dense, model, data) < 0.01
    model.save_pretrained(tmp_path, safe_serialization=True)
    save_compression_config(model, tmp_path)
    loaded = load_compressed(tmp_path)
    assert type(loaded) is Qwen2ForCausalLM
    assert all(torch.equal(logits(loaded, batch), logits(model, batch)) for batch in data)


def test_load_handles_shards_and_dense_directories_and_refuses_mismatches(tmp_path, dense, data):
    model, _ = compressed(dense, data, ratio=0.5, whiten=False, align=False)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
    save_compression_config(model, sharded)
    assert (sharded / "model.safetensors.index.json").exists()
    assert torch.equal(logits(load_compressed(sharded), data[0]), logits(model, data[0]))

    dense.save_pretrained(tmp_path / "dense", safe_serialization=True)
    plain = load_compressed(tmp_path / "dense")
    assert not any(isinstance(m, LowRankLinear) for m in plain.modules())
    assert torch.equal(logits(plain, data[0]), logits(dense, data[0]))

    ranks = json.loads((sharded / COMPRESSION_FILE).read_text())
    ranks.pop("model.layers.1.mlp.down_proj")
    (sharded / COMPRESSION_FILE).write_text(json.dumps(ranks))
    with pytest.raises(ValueError, match="unexpected"):
        load_compressed(sharded)


def test_plot_spectra_writes_a_png(tmp_path, runs):
    path = plot_spectra(runs[(True, "BA")][1], tmp_path / "spectra.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = {"settings": {"whiten": True, "ratio": 1.0}, "matrices": [], "spectra": {}}
    assert plot_spectra(empty, tmp_path / "empty.png").stat().st_size > 0
