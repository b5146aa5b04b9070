"""Scale checkpoints built offline: real shapes, sharded bf16 safetensors, a tokenizer of the real vocabulary and the
item index, loadable by transformers and by the recommender loader compress.py and evaluate.py use."""

import json

import pytest
import torch
from conftest import write_synthetic_interactions
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from odllm.bench.checkpoint import SHAPES, main, model_config, tensor_specs
from odllm.compress.saved import load_recommender

pytestmark = pytest.mark.usefixtures("one_thread")


def numel(specs) -> int:
    return sum(torch.Size(shape).numel() for _, shape in specs)


@pytest.mark.parametrize(("shape", "params", "k_proj"), [
    ("llama-1b", 1_235_814_400, (512, 2048)),  # LLaMA-3.2-1B: GQA 32/8 heads of 64, tied embeddings
    ("llama-7b", 6_738_415_616, (4096, 4096)),  # LLaMA-2-7B
    ("qwen-0.5b", 494_032_768, (128, 896)),  # Qwen2.5-0.5B: q/k/v biases, tied embeddings
])
def test_shapes_have_the_published_parameter_counts(shape, params, k_proj):
    specs = dict(tensor_specs(model_config(shape)))
    assert numel(specs.items()) == params
    assert specs["model.layers.0.self_attn.k_proj.weight"] == k_proj
    assert ("model.layers.0.self_attn.q_proj.bias" in specs) == (shape == "qwen-0.5b")
    assert ("lm_head.weight" in specs) == (not SHAPES[shape]["tie_word_embeddings"])  # tied: stored once


def test_tiny_checkpoint_loads_in_transformers_and_as_a_recommender(tmp_path):
    data = write_synthetic_interactions(tmp_path / "toy.csv", users=20, items=12)
    out = tmp_path / "ckpt"
    args = ["--shape", "tiny", "--out", str(out), "--dataset", "interactions", "--override", f"dataset.path={data}",
            "--override", "dataset.name=toy", "--shard-mb", "0.1"]
    summary = main(args)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert summary["shards"] == len(files) >= 3 and summary["item_tokens"] == 12
    sizes = {}
    for file in files:
        with safe_open(out / file, framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        assert all(t.dtype == torch.bfloat16 for t in tensors.values())
        nbytes = sum(t.numel() * 2 for t in tensors.values())
        assert nbytes <= 0.1 * 2**20 or len(tensors) == 1  # a tensor larger than a shard gets one alone
        sizes.update({name: t for name, t in tensors.items()})
    assert sum(t.numel() * 2 for t in sizes.values()) == index["metadata"]["total_size"] == summary["bytes"]

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 2
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == model.config.vocab_size == SHAPES["tiny"]["vocab_size"] + 12
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, sizes["model.layers.1.mlp.down_proj.weight"])
    assert model.model.norm.weight.eq(1).all()
    assert abs(model.model.layers[0].self_attn.q_proj.weight.float().std().item() - 0.02) < 0.002

    recommender = load_recommender(out)  # what compress.py and evaluate.py load: tokenizer, item index, odllm.json
    assert recommender.meta["dataset"] == "toy" and recommender.meta["random_weights"]
    prompt = recommender.encoder.prompt(["i1", "i2"])
    ids = torch.tensor([prompt])
    assert int(ids.max()) >= SHAPES["tiny"]["vocab_size"]  # the item tokens are single new tokens
    with torch.no_grad():
        assert torch.isfinite(recommender.model(input_ids=ids).logits).all()

    again = tmp_path / "again"  # values depend on the seed and the name only, not on the sharding
    main(["--shape", "tiny", "--out", str(again), "--layers", "1"])
    with safe_open(again / "model-00001-of-00001.safetensors", framework="pt") as f:
        assert torch.equal(f.get_tensor("model.layers.0.self_attn.o_proj.weight"),
                           sizes["model.layers.0.self_attn.o_proj.weight"])
        assert "model.layers.1.mlp.up_proj.weight" not in f.keys()  # noqa: SIM118
    assert not (again / "odllm.json").exists()


def test_bad_shape_and_depth_are_refused():
    with pytest.raises(ValueError, match="unknown --shape 'llama-70b'"):
        model_config("llama-70b")
    with pytest.raises(ValueError, match="at least one decoder layer"):
        model_config("tiny", layers=0)
