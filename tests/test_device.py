"""Devices and dtypes: a bf16 checkpoint stays bf16 through beam search, compression (odllm, gptq, sparsegpt, int8
embeddings), saving and reloading; every tensor the code makes follows the device and dtype of what it meets; the
``device``, ``eval.test_users`` and ``compress_eval`` keys. Tests marked ``gpu`` run the same on CUDA (skipped here).
"""

import copy
import json
import random

import pytest
import torch
from conftest import compose_config
from transformers import AutoModelForCausalLM, Qwen2Config

from odllm import config
from odllm.checks import ConfigError
from odllm.compress.embeddings import compress_embeddings
from odllm.compress.lowrank import LowRankLinear
from odllm.compress.quant import QuantLinear
from odllm.compress.registry import compress_with
from odllm.compress.saved import load_compressed, save_compression_config
from odllm.compress.sparse import SparseLinear
from odllm.compress.statistics import InputCovariances
from odllm.data.batches import Sample, collate_right, left_pad
from odllm.data.dataset import Example, Split
from odllm.eval.generation import ItemTrie, beam_mask, beam_search, model_device
from odllm.eval.protocol import sample_test_users
from odllm.model.recommender import load_hf_model
from odllm.runner.compress import compress
from odllm.runner.evaluate import evaluate
from odllm.runner.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
CUDA = torch.cuda.is_available()

SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, max_position_embeddings=128, vocab_size=96)
CODES = [(40 + a, 50 + b) for a in range(4) for b in range(5)]  # 20 two-token items
METHODS = {"odllm": {"name": "odllm", "whiten": True, "align": "BA"}, "gptq": {"name": "gptq", "group_size": 16},
           "sparsegpt": {"name": "sparsegpt", "sparsity": 0.5, "block_size": 16}}
KINDS = {"odllm": LowRankLinear, "gptq": QuantLinear, "sparsegpt": SparseLinear}


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    """A random Qwen2 checkpoint (q/k/v biases, GQA) saved in bfloat16: config.json says dtype bfloat16."""
    directory = tmp_path_factory.mktemp("bf16")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**SHAPE), dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(directory)
    return directory


def batches(device) -> list[dict[str, torch.Tensor]]:
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 96) for _ in range(rng.randrange(6, 14))] for _ in range(16)]
    out = []
    for i in range(0, 16, 8):
        ids, mask = left_pad(prompts[i : i + 8], 0, device)
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def logits(model, batch) -> torch.Tensor:
    mask = batch["attention_mask"]
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=mask,
                     position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits


def floating(model) -> set[torch.dtype]:
    """The float dtypes of the weights (not the fp16 quantization scales, nor RoPE's float32 frequencies)."""
    tensors = [t for name, t in [*model.named_parameters(), *model.named_buffers()] if "rotary_emb" not in name]
    return {t.dtype for t in tensors if t.is_floating_point() and t.dtype != torch.float16}


def devices(model) -> set[str]:
    return {t.device.type for t in [*model.parameters(), *model.buffers()]}


def check_bf16_round_trip(directory, device, method, tmp_path):
    """Load in the checkpoint's dtype on ``device``, beam-search, compress, save, reload: all in bf16 there."""
    dense = load_hf_model(directory).to(device)
    assert dense.dtype == torch.bfloat16 and model_device(dense).type == torch.device(device).type
    trie = ItemTrie(CODES, 96)
    prompts = [[3, 5, 7, 9], [11, 13, 15, 17, 19, 21], [4, 6]]
    codes, scores = beam_search(dense, prompts, trie, num_beams=10, pad_id=0)
    assert codes.device == dense.device and scores.dtype == torch.float32
    assert all(tuple(c) in trie.codes for row in codes.tolist() for c in row) and torch.isfinite(scores).all()

    model = copy.deepcopy(dense)
    data = batches("cpu")  # the driver moves the calibration batches to the model's device
    report = compress_with(model, data, METHODS[method], 0.5, progress=False)
    replaced = [model.get_submodule(e["name"]) for e in report["matrices"]]
    assert len(replaced) == 14 and all(isinstance(m, KINDS[method]) for m in replaced)
    if method == "odllm":
        compress_embeddings(model, "int8", report)  # a lookup returns bf16 rows, so the layers get bf16
    assert floating(model) == {torch.bfloat16}, "factors, sparse values and biases stay in the model's dtype"
    assert devices(model) == {torch.device(device).type}
    assert all(0 <= layer["output_error"] < 0.5 for layer in report["layers"])
    on_device = batches(device)
    expected = [logits(model, b) for b in on_device]
    assert all(torch.isfinite(e).all() for e in expected)

    model.save_pretrained(tmp_path, safe_serialization=True)
    save_compression_config(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = load_compressed(tmp_path).to(device)
    assert floating(loaded) == {torch.bfloat16} and devices(loaded) == {torch.device(device).type}
    for batch, before in zip(on_device, expected, strict=True):
        assert torch.equal(logits(loaded, batch), before)
    again = beam_search(loaded, prompts, trie, num_beams=10, pad_id=0)
    first = beam_search(model, prompts, trie, num_beams=10, pad_id=0)
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


@pytest.mark.parametrize("method", list(METHODS))
def test_bf16_checkpoint_stays_bf16_through_compression_and_reload_on_cpu(bf16_dir, method, tmp_path):
    check_bf16_round_trip(bf16_dir, "cpu", method, tmp_path)


def test_statistics_sum_in_float64_on_the_inputs_device():
    linear = torch.nn.Linear(8, 4, dtype=torch.bfloat16)
    x = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with InputCovariances({"l": linear}) as stats:
        stats.mask = mask
        linear(x)
        linear(x * 2)  # a second batch adds to the same sums
    t = x[mask].double()
    s = stats.statistics("l")
    assert s.covariance.dtype == torch.float64 and s.tokens == 18
    torch.testing.assert_close(s.covariance, 5 * t.T @ t, rtol=0, atol=0)  # float64 on the CPU: exact
    torch.testing.assert_close(s.abs_mean, 3 * t.abs().sum(0) / 18)


def test_tensors_are_made_on_the_device_they_meet():
    """The meta device has no data: any tensor made without the input's device would land on the CPU."""
    ids, mask = left_pad([[1, 2, 3], [4]], 0, "meta")
    assert ids.device.type == mask.device.type == "meta" and ids.shape == (2, 3)
    batch = collate_right([Sample([1, 2], [-100, 2]), Sample([3], [3])], 0, "meta")
    assert {t.device.type for t in batch.values()} == {"meta"}
    assert beam_mask(mask, 4, 1, torch.bfloat16).device.type == "meta"
    assert beam_mask(mask, 4, 1, torch.bfloat16).dtype == torch.bfloat16


def test_device_key_is_checked(tmp_path, tiny_run_overrides):
    assert config.device(compose_config(tiny_run_overrides)) == torch.device("cuda" if CUDA else "cpu")
    assert config.device(compose_config([*tiny_run_overrides, "device=cpu"])) == torch.device("cpu")
    with pytest.raises(ConfigError, match="device='tpu' is not auto, cpu, cuda, cuda:N or mps"):
        config.check_compress(compose_config([*tiny_run_overrides, "device=tpu"]))
    if not CUDA:
        with pytest.raises(ConfigError, match="device=cuda:1 but torch finds no CUDA GPU.*use device=cpu"):
            config.check_evaluate(compose_config([*tiny_run_overrides, "device=cuda:1"]))
    with pytest.raises(ConfigError, match="eval.test_users=0 must be a whole number >= 1 \\(or null\\)"):
        config.check_evaluate(compose_config([*tiny_run_overrides, "eval.test_users=0"]))
    with pytest.raises(ConfigError, match="eval.split='train' is not one of test, valid"):
        config.check_evaluate(compose_config([*tiny_run_overrides, "eval.split=train"]))
    with pytest.raises(ConfigError, match="compress_eval='no' must be true or false"):
        config.check_compress(compose_config([*tiny_run_overrides, "compress_eval='no'"]))


def test_test_subset_draws_what_the_benchmark_draws():
    test = [Example(f"u{i}", [f"i{i}"], f"i{i + 1}") for i in range(50)]
    split = Split(train={}, valid=[], test=test)
    same, note = sample_test_users(split, None, 7)
    assert same is split and note == "all test users"
    assert sample_test_users(split, 50, 7)[0] is split
    subset, note = sample_test_users(split, 10, 7)
    assert subset.test == random.Random(7).sample(test, 10) and "random subset of the 50 test users (seed 7)" in note


def test_valid_split_scores_the_second_last_items_and_sees_nothing_after_them():
    train = {"u0": ["a", "b"], "u1": ["a"]}
    valid = [Example("u0", ["a", "b"], "c"), Example("u1", ["a"], "d")]
    test = [Example("u0", ["a", "b", "c"], "e"), Example("u1", ["a", "d"], "f")]
    scored, note = sample_test_users(Split(train=train, valid=valid, test=test), None, 7, "valid")
    assert scored.test == valid and scored.valid == [] and scored.train == train
    assert note == "all valid users (their second-last items)"
    _, note = sample_test_users(Split(train=train, valid=valid, test=test), 1, 7, "valid")
    assert note == "a random subset of the 2 valid users (seed 7)"
    with pytest.raises(ValueError, match="eval.split='train'; choose one of"):
        sample_test_users(Split(train=train, valid=valid, test=test), None, 7, "train")


def test_compress_without_evaluation_then_evaluate_a_subset_later(tmp_path, trained):
    result = compress(compose_config([*trained, "compress_eval=false", "device=cpu"]), tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["test"] is None and saved["dense"] is None and saved["fidelity"] is None
    assert saved["evaluation"].startswith("skipped (compress_eval=false)")
    assert result["model_dir"] in saved["evaluation"]
    assert saved["resources"]["device"] == "cpu" and saved["resources"]["dtype"] == "float32"
    scored = evaluate(compose_config([*trained, f"model_dir={result['model_dir']}", "eval.test_users=10"]),
                      tmp_path / "eval")
    assert scored["test"]["users"] == scored["test_users"] == 10 and "random subset" in scored["test_users_note"]
    full = compress(compose_config([*trained, "eval.test_users=10"]), tmp_path / "run2")
    assert full["test"]["users"] == 10 and full["test"]["metrics"] == scored["test"]["metrics"]  # the same 10 users
    on_valid = evaluate(compose_config([*trained, f"model_dir={result['model_dir']}", "eval.split=valid"]),
                        tmp_path / "eval-valid")
    assert on_valid["test_users_note"] == "all valid users (their second-last items)"
    assert on_valid["test"]["metrics"] != scored["test"]["metrics"]


# ------------------------------------------------------------------------------------------- CUDA (marker gpu)
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (tests marked gpu)")
def test_bf16_round_trip_on_cuda(bf16_dir, method, tmp_path):
    check_bf16_round_trip(bf16_dir, "cuda", method, tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (tests marked gpu)")
def test_train_bf16_mixed_compress_and_reload_on_cuda(tmp_path, tiny_run_overrides):
    """trainer=gpu (bf16-mixed): validation beam search on the GPU, then compress and evaluate there."""
    overrides = [*tiny_run_overrides, "trainer=gpu", "trainer.devices=1", "trainer.max_epochs=1",
                 "trainer.enable_progress_bar=false", "calibration.size=32", "calibration.batch_size=8", "device=cuda"]
    trained = train(compose_config(overrides), tmp_path / "train")
    assert trained["resources"]["device"].startswith("cuda") and trained["resources"]["peak_gpu_memory_bytes"] > 0
    dense = evaluate(compose_config(overrides), tmp_path / "dense")
    assert dense["test"]["metrics"] == trained["test"]["metrics"]
    for method in METHODS:
        result = compress(compose_config([*overrides, f"method={method}"]), tmp_path / method)
        assert result["resources"]["device"].startswith("cuda")
        again = evaluate(compose_config([*overrides, f"model_dir={result['model_dir']}"]), tmp_path / f"{method}-e")
        assert again["test"]["metrics"] == result["test"]["metrics"]
