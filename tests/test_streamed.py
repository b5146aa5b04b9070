"""Layer-streamed compression (odllm.compress.streamed): a sharded checkpoint compressed one decoder layer at a time
gives the same model and numbers as the whole-model path, resumes after a kill, and loads back shard by shard."""

import json

import pytest
import torch
from conftest import compose_config, write_synthetic_interactions
from safetensors import safe_open

from odllm import config
from odllm.bench import checkpoint
from odllm.compress import streamed
from odllm.compress.saved import load_recommender
from odllm.model.recommender import SavedModelError
from odllm.runner.compress import compress

pytestmark = pytest.mark.usefixtures("one_thread")

TIED = {**checkpoint.SHAPES["tiny"], "tie_word_embeddings": True, "num_hidden_layers": 3}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_interactions(tmp_path_factory.mktemp("data") / "toy.csv", users=40, items=12)


def build(root, data, shape="tiny", layers=None):
    """A bf16 random checkpoint of the toy dataset in shards of 0.05 MiB (several per layer set)."""
    out = root / f"ckpt-{shape}"
    if not out.exists():
        args = ["--shape", shape, "--out", str(out), "--dataset", "interactions", "--override",
                f"dataset.path={data}", "--override", "dataset.name=toy", "--shard-mb", "0.05"]
        checkpoint.main([*args, *(["--layers", str(layers)] if layers else [])])
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, data):
    return build(tmp_path_factory.mktemp("ckpt"), data, layers=3)


@pytest.fixture(scope="module")
def tied(tmp_path_factory, data):
    checkpoint.SHAPES["tiny-tied"] = TIED
    try:
        return build(tmp_path_factory.mktemp("tied"), data, shape="tiny-tied")
    finally:
        checkpoint.SHAPES.pop("tiny-tied")


def run(ckpt, data, out, method="odllm", stream=True, extra=()):
    overrides = ["dataset=interactions", f"dataset.path={data}", "dataset.name=toy", f"model_dir={ckpt}",
                 f"paths.models_dir={out / 'models'}", f"method={method}", f"stream={str(stream).lower()}",
                 "calibration.size=24", "calibration.batch_size=8", "eval.num_beams=10", "eval.batch_size=16",
                 "eval.progress=false", "eval.test_users=16", "logger=none", "compress_eval=false", *extra]
    payload = compress(compose_config(overrides), out / "run")
    report = json.loads((out / "run" / "compression_report.json").read_text())
    return payload, report


def tensors(directory):
    index = json.loads((directory / "model.safetensors.index.json").read_text()) if (
        directory / "model.safetensors.index.json").exists() else None
    files = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
    found = {}
    for file in files:
        with safe_open(directory / file, framework="pt") as f:
            found.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    return found


def assert_same_model(a, b):
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name
    assert json.loads((a / "compression.json").read_text()) == json.loads((b / "compression.json").read_text())


def drop_disk(part):
    """Report parts without the on-disk bytes: one shard per layer has more safetensors headers than one file."""
    return {k: v for k, v in part.items() if k != "disk"} if isinstance(part, dict) else part


def logits(directory):
    recommender = load_recommender(directory)
    ids = torch.tensor([recommender.encoder.prompt(["i1", "i2", "i3"])])
    with torch.no_grad():
        return recommender.model(input_ids=ids).logits


@pytest.mark.parametrize("method", ["odllm", "gptq", "sparsegpt", "asvd"])
def test_streamed_equals_in_memory(ckpt, data, tmp_path, method):
    assert len(set(json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"].values())) >= 4
    payload, report = run(ckpt, data, tmp_path / "streamed", method)
    dense_payload, dense_report = run(ckpt, data, tmp_path / "memory", method, stream=False)
    assert payload["stream"] and "stream" not in dense_payload  # the whole-model metrics.json keeps its keys
    assert payload["memory"]["peak_rss_bytes"] >= payload["memory"]["baseline_rss_bytes"] > 0
    assert_same_model(tmp_path / "streamed" / "models" / payload["model_dir"].split("/")[-1],
                      tmp_path / "memory" / "models" / dense_payload["model_dir"].split("/")[-1])
    for key in ("matrices", "layers", "totals", "settings"):
        assert drop_disk(report[key]) == drop_disk(dense_report[key]), key
    memory = report["memory"]
    assert memory["dense_layer_bytes"] > memory["compressed_layer_bytes"] > 0 and memory["streams_bytes"] > 0
    assert memory["largest_statistics_bytes"] == 8 * (128 * 128 + 128)  # down_proj's C and |x| sum (float64)
    assert len(memory["layers"]) == 3 and report["streaming"]["resumed_after_layer"] is None


def test_embeddings_and_head_are_freed_before_the_layers(tied, data, tmp_path, monkeypatch):
    """The modules outside the layers are written (int8 here) and moved to meta once layer 0's inputs exist."""
    real, seen = streamed.compress_layer, []

    def spy(layer, prefix, index, streams, algorithm):
        model = spy.model
        seen.append([t.is_meta for m in streamed.outside_roots(model, model.model.layers)
                     for t in (*m.parameters(), *m.buffers())])
        return real(layer, prefix, index, streams, algorithm)

    real_write = streamed.write_outside

    def remember(model, layers, embeddings, shard):
        spy.model = model
        return real_write(model, layers, embeddings, shard)

    monkeypatch.setattr(streamed, "compress_layer", spy)
    monkeypatch.setattr(streamed, "write_outside", remember)
    payload, report = run(tied, data, tmp_path / "streamed", extra=("method.embeddings=int8",))
    assert len(seen) == 3 and all(flags and all(flags) for flags in seen)
    memory = report["memory"]
    assert "freed" in memory["outside_modules"] and memory["rss_after_outside_freed_bytes"] > 0
    assert report["embeddings"] and report["settings"]["embeddings"]


def test_resume_after_a_failure_equals_an_uninterrupted_run(ckpt, data, tmp_path, monkeypatch):
    clean, clean_report = run(ckpt, data, tmp_path / "clean")
    real = streamed.compress_layer

    def killed_at_layer_2(layer, prefix, index, streams, algorithm):
        if index == 2:
            raise KeyboardInterrupt("killed")
        return real(layer, prefix, index, streams, algorithm)

    monkeypatch.setattr(streamed, "compress_layer", killed_at_layer_2)
    with pytest.raises(KeyboardInterrupt):
        run(ckpt, data, tmp_path / "resumed")
    models = tmp_path / "resumed" / "models"
    partial = [p for p in models.iterdir() if p.name.endswith(".partial")]
    assert len(partial) == 1 and json.loads((partial[0] / "progress.json").read_text())["done"] == 1
    assert not [p for p in models.iterdir() if not p.name.startswith(".")]  # nothing at the target yet
    monkeypatch.setattr(streamed, "compress_layer", real)
    resumed, report = run(ckpt, data, tmp_path / "resumed")
    assert report["streaming"]["resumed_after_layer"] == 1
    assert_same_model(tmp_path / "clean" / "models" / clean["model_dir"].split("/")[-1],
                      models / resumed["model_dir"].split("/")[-1])
    for key in ("matrices", "layers", "totals"):
        assert report[key] == clean_report[key], key
    assert [p.name for p in models.iterdir()] == [resumed["model_dir"].split("/")[-1]]  # work directory removed


def test_tied_int8_embeddings_round_trip_and_evaluation(tied, data, tmp_path):
    extra = ("method.embeddings=int8",)
    payload, report = run(tied, data, tmp_path / "streamed", extra=(*extra, "compress_eval=true"))
    dense_payload, dense_report = run(tied, data, tmp_path / "memory", stream=False, extra=extra)
    a = tmp_path / "streamed" / "models" / payload["model_dir"].split("/")[-1]
    b = tmp_path / "memory" / "models" / dense_payload["model_dir"].split("/")[-1]
    assert_same_model(a, b)
    assert drop_disk(report["totals"]) == drop_disk(dense_report["totals"])
    assert report["embeddings"] == dense_report["embeddings"]
    assert payload["test"]["metrics"] and payload["dense"] is None and "reloaded" in payload["evaluation"]
    assert torch.equal(logits(a), logits(b))
    model = load_recommender(a).model
    assert model.get_output_embeddings().kind == "tied_head"
    assert model.model.layers[0].self_attn.q_proj.A.weight.dtype == torch.bfloat16


def test_plain_tied_model_round_trip(tied, data, tmp_path):
    payload, _ = run(tied, data, tmp_path / "streamed")
    directory = tmp_path / "streamed" / "models" / payload["model_dir"].split("/")[-1]
    assert "lm_head.weight" not in tensors(directory)  # saved once, under the embedding's name
    model = load_recommender(directory).model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert torch.isfinite(logits(directory)).all()


def test_clear_errors(ckpt, data, tmp_path):
    with pytest.raises(config.ConfigError, match="stream=false"):
        run(ckpt, data, tmp_path / "a", method="odllm_alloc")
    with pytest.raises(config.ConfigError, match="stream=false"):
        run(ckpt, data, tmp_path / "b", extra=("+method.heal={epochs: 1}",))
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ckpt.iterdir():
        (broken / f.name).symlink_to(f)
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(SavedModelError, match=shard.name):
        run(broken, data, tmp_path / "c")


def test_auto_streams_only_large_sharded_checkpoints(ckpt, monkeypatch):
    from odllm.compress import pipeline

    method = {"name": "odllm"}
    assert not pipeline.should_stream(ckpt, "auto", method)
    monkeypatch.setattr(pipeline, "STREAM_AUTO_BYTES", 1000)
    assert pipeline.should_stream(ckpt, "auto", method)
    assert not pipeline.should_stream(ckpt, "auto", {"name": "odllm_alloc", "allocation": "loss"})
    with pytest.raises(ValueError, match="stream=false"):
        pipeline.should_stream(ckpt, True, {"name": "bnb_int8"})
