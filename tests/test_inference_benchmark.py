"""The inference benchmark end to end on a tiny dense model and a tiny compressed one (worker processes and all)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import compose_config

from odllm.bench.inference import resolve_models, run_inference_benchmark
from odllm.bench.weights import describe_model, disk_bytes, memory_bytes
from odllm.compress.saved import load_recommender
from odllm.runner.compress import compress
from odllm.runner.train import train


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny trained model, its svd-r0.5 compression and odllm + int8 with int8 embeddings, in one models directory."""
    from conftest import tiny_overrides

    root = tmp_path_factory.mktemp("inference")
    overrides = [*tiny_overrides(root), "trainer.max_epochs=1", "calibration.size=32", "calibration.batch_size=8"]
    train(compose_config(overrides), root / "train")
    compress(compose_config([*overrides, "ratio=0.5", "method=svd"]), root / "compress")
    compress(compose_config([*overrides, "ratio=0.5", "method=odllm_int8", "method.embeddings=int8"]), root / "int8")
    return root, overrides


def unique_tensor_bytes(model: torch.nn.Module) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # parameters() already drops tied copies
    persistent = {id(b) for m in model.modules() for n, b in m.named_buffers(recurse=False)
                  if n not in m._non_persistent_buffers_set}
    return sum(t.numel() * t.element_size() for i, t in tensors.items()
               if isinstance(t, torch.nn.Parameter) or i in persistent)


def test_benchmark_end_to_end(models):
    root, overrides = models
    out = root / "bench" / "toy-inference"
    cfg = compose_config([*overrides, "models=[svd-r0.5,odllm_int8-r0.5-emb8]", "threads=1", "repeats=2", "warmup=1",
                          "latency_users=3", "throughput_users=8", "batch_size=4", "+batch_sizes={svd-r0.5: 8}",
                          "profile=true", "profile_users=2", "fuse=true", f"out={out}"], config_name="inference")
    payload = run_inference_benchmark(cfg)

    saved = json.loads(out.with_suffix(".json").read_text())
    assert [row["label"] for row in saved["rows"]] == ["dense", "svd-r0.5", "odllm_int8-r0.5-emb8"]
    table = [line for line in out.with_suffix(".md").read_text().splitlines() if line.startswith("| ")]
    assert len([line for line in table if line.startswith(("| dense", "| svd-r0.5", "| odllm_int8"))]) == 3
    assert out.with_suffix(".png").stat().st_size > 0
    profile = (root / "bench" / "toy-inference-profile.txt").read_text()
    assert "decoder linears" in profile and "if the decoder linears cost nothing" in profile

    dense, low, int8 = payload["rows"]
    assert all(value in (1, None) for value in dense["ratios"].values())  # dense against itself
    assert dense["ratios"]["latency"] == dense["ratios"]["memory_model"] == dense["ratios"]["disk_model"] == 1
    assert dense["latency_ratio"]["median"] == dense["cpu_ratio"]["median"] == dense["top10_overlap_with_dense"] == 1
    assert low["batch_size"] == 8 and dense["batch_size"] == 4
    assert len(low["latency_repeats_ms"]) == 2 and len(low["throughput_repeats"]) == 2
    assert low["decoder_linear_classes"] == {"LowRankLinear": 7 * 2} and not low["simulated"]  # as saved, not fused
    assert low["fused_groups"] == dense["fused_groups"] == 2 * 2
    assert "lowrank" in low["description"] and "SIMULATED" not in low["description"]
    assert low["ratios"]["memory_decoder_linear"] < 0.55 < low["ratios"]["memory_model"] < 1
    # the toy dataset (interactions, atomic items) ties embeddings: the head is the int8 embedding table itself
    assert {"rtn", "quant_embedding", "tied_head"} <= set(int8["compression_kinds"]) and not int8["simulated"]
    assert int8["ratios"]["memory_decoder_linear"] < 0.2 and int8["ratios"]["memory_model"] < 0.3
    for row in payload["rows"]:
        # the summary is of the per-repeat means: with 2 repeats the median is their mean, q1/q3 a quarter in
        low_ms, high_ms = sorted(row["latency_repeats_ms"])
        assert row["latency_ms"]["median"] == pytest.approx((low_ms + high_ms) / 2)
        assert row["latency_ms"]["q1"] == pytest.approx(low_ms + (high_ms - low_ms) / 4)
        assert row["latency_ms"]["q3"] == pytest.approx(low_ms + 3 * (high_ms - low_ms) / 4)
        assert row["maxrss_bytes"]["peak"] >= row["maxrss_bytes"]["batch1"] > 0 and saved["baseline_maxrss_bytes"] > 0
        model = load_recommender(row["model_dir"]).model
        # bytes in memory = the parameters (and persistent buffers), tied weights once; on disk = the files
        assert row["memory_bytes"]["model"]["bytes"] == unique_tensor_bytes(model)
        linears = [m for layer in model.model.layers for m in (*layer.self_attn.children(), *layer.mlp.children())
                   if list(m.state_dict())]  # q, k, v, o, gate, up, down (the activation holds nothing)
        assert len(linears) == 7 * 2
        assert row["memory_bytes"]["decoder_linear"]["bytes"] == sum(
            t.numel() * t.element_size() for m in linears for t in m.state_dict().values())
        files = list(Path(row["model_dir"]).glob("*.safetensors"))
        assert row["disk_bytes"]["model"]["bytes"] == sum(f.stat().st_size for f in files)
        assert 0 < row["disk_bytes"]["decoder_linear"]["bytes"] < row["disk_bytes"]["model"]["bytes"]
    assert set(payload["profile"]) == {"dense", "svd-r0.5", "odllm_int8-r0.5-emb8"}


def test_simulated_compression_is_labelled(models, tmp_path):
    """A model whose metadata says compressed but whose linears are dense float storage is flagged."""
    root, _ = models
    fake = tmp_path / "toy-fake"
    shutil.copytree(root / "models" / "toy", fake)
    meta = json.loads((fake / "odllm.json").read_text())
    (fake / "odllm.json").write_text(json.dumps({**meta, "compression": {"method": "gptq", "ratio": None}}))
    model = load_recommender(fake).model
    about = describe_model(fake, model)
    assert about["simulated"] and "SIMULATED" in about["label"]
    dense = describe_model(root / "models" / "toy", load_recommender(root / "models" / "toy").model)
    assert not dense["simulated"] and dense["label"].startswith("dense")
    # the fake saves nothing: same bytes as dense, in memory and on disk
    assert memory_bytes(model) == memory_bytes(load_recommender(root / "models" / "toy").model)
    names = [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert disk_bytes(fake, names) == disk_bytes(root / "models" / "toy", names)


def test_model_names_resolve_and_unknown_ones_fail(models):
    root, overrides = models
    chosen = resolve_models(compose_config([*overrides, f"models=[svd-r0.5,{root / 'models' / 'toy'}]"],
                                           config_name="inference"))
    assert [label for label, _ in chosen] == ["dense", "svd-r0.5"]  # the dense model is listed once, first
    with pytest.raises(FileNotFoundError, match="odllm-r0.9"):
        resolve_models(compose_config([*overrides, "models=[odllm-r0.9]"], config_name="inference"))


def test_kernels_key_reaches_the_workers(models):
    """kernels=bf16 makes the int8 factors and head run torch's packed kernel; the payload records the mode."""
    root, overrides = models
    out = root / "bench" / "kernels"
    cfg = compose_config([*overrides, "models=[odllm_int8-r0.5-emb8]", "threads=1", "repeats=1", "warmup=0",
                          "latency_users=2", "throughput_users=2", "batch_size=2", "kernels=bf16", f"out={out}"],
                         config_name="inference")
    payload = run_inference_benchmark(cfg)
    assert payload["protocol"]["kernels"] == "bf16"
    dense, int8 = payload["rows"]
    assert not dense["kernels"] and set(int8["kernels"]) == {"int8pack_mm"}
    assert "int8pack_mm" in int8["description"]
