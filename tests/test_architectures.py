"""LLaMA, Mistral, Qwen2 (q/k/v biases, tied embeddings) and Qwen3 (q/k norms) from tiny random configs: one LoRA
step through ``build_model``, merge, compress with odllm and gptq, save and reload with identical logits.

The config classes ship with transformers; each checkpoint is written to a temp dir with a tokenizer trained
offline, so nothing is downloaded. GQA everywhere: 4 query heads share 2 key/value heads, so k/v are 16 x 32.
"""

import copy
import json

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from odllm.compress.driver import decoder_layers
from odllm.compress.lowrank import LowRankLinear, rank_for_ratio
from odllm.compress.quant import QuantLinear
from odllm.compress.registry import compress_with
from odllm.compress.saved import load_compressed, save_compression_config
from odllm.data.items import ItemCodes
from odllm.model.backbone import BackboneSpec, apply_lora, build_model, merge
from odllm.model.recommender import COMPRESSION_FILE
from odllm.model.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, max_position_embeddings=128)
ARCHITECTURES = {
    "llama": (LlamaConfig, {}),
    "mistral": (MistralConfig, {"sliding_window": 16}),
    "qwen2": (Qwen2Config, {}),  # q/k/v biases
    "qwen2-tied": (Qwen2Config, {"tie_word_embeddings": True}),  # as Qwen2-0.5B
    "qwen3": (Qwen3Config, {}),  # q_norm / k_norm inside attention
}
CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "qwen2-tied": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MLP = ("gate_proj", "up_proj", "down_proj")
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": PROJECTIONS}
METHODS = {"odllm": {"name": "odllm", "whiten": True, "align": "BA"}, "gptq": {"name": "gptq", "group_size": 16}}
CORPUS = [f"user {u} watched item {i} and then item {i + 1} ." for u in range(12) for i in range(8)]
ITEMS = ItemCodes({f"i{i}": (f"<a_{i % 4}>", f"<b_{i // 4}>") for i in range(12)})


def write_checkpoint(directory, architecture: str) -> None:
    """A random checkpoint whose biases and q/k norms are not the init's zeros and ones, so they matter."""
    config_class, extra = ARCHITECTURES[architecture]
    tokenizer = train_tokenizer(CORPUS, vocab_size=300)
    config = config_class(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **SHAPE, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "q_norm" in name or "k_norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def prompts(tokenizer) -> list[dict[str, torch.Tensor]]:
    texts = [f"{text} next {ITEMS.text(f'i{i % 12}')}" for i, text in enumerate(CORPUS[:16])]
    return [dict(tokenizer(texts[i : i + 8], return_tensors="pt", padding=True)) for i in range(0, 16, 8)]


def logits(model, batch) -> torch.Tensor:
    mask = batch["attention_mask"]
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=mask,
                     position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def trained(request, tmp_path_factory):
    """``(architecture, checkpoint dir, merged model after one LoRA step, calibration batches)``."""
    directory = tmp_path_factory.mktemp(request.param)
    write_checkpoint(directory, request.param)
    model, tokenizer = build_model(BackboneSpec(source="hf", path=str(directory), finetune="lora", lora=LORA),
                                   ITEMS, CORPUS)
    data = prompts(tokenizer)
    batch = data[0]
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = model(**batch, labels=labels).loss
    loss.backward()
    lora_grads = [p.grad for name, p in model.named_parameters() if "lora_B" in name]
    assert torch.isfinite(loss) and len(lora_grads) == 7 * 2 and all(g.abs().sum() > 0 for g in lora_grads)
    optimizer.step()
    model.eval()
    expected = [logits(model, b) for b in data]
    merged = merge(model).eval()
    for b, before in zip(data, expected, strict=True):  # merging keeps what was trained
        torch.testing.assert_close(logits(merged, b), before, rtol=1e-4, atol=1e-4)
    return request.param, directory, merged, data


def test_one_lora_step_merges_into_the_plain_architecture(trained):
    architecture, directory, merged, _ = trained
    assert type(merged).__name__ == CLASSES[architecture]
    assert not any("lora" in name for name, _ in merged.named_modules())
    before = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    for projection in PROJECTIONS:  # every LoRA target moved, in the real GQA shapes
        name = f"model.layers.0.{'mlp' if projection in MLP else 'self_attn'}.{projection}"
        new, old = merged.get_submodule(name), before.get_submodule(name)
        assert type(new) is nn.Linear and new.weight.shape == old.weight.shape
        assert not torch.equal(new.weight, old.weight[: new.weight.shape[0]])
    assert merged.get_submodule("model.layers.0.self_attn.k_proj").weight.shape == (16, 32)
    assert len(decoder_layers(merged)) == 2
    biases = [m.bias for m in decoder_layers(merged).modules() if isinstance(m, nn.Linear) and m.bias is not None]
    assert len(biases) == (3 * 2 if architecture.startswith("qwen2") else 0)  # q, k, v in each of 2 layers
    if architecture == "qwen2-tied":  # peft's modules_to_save unties: the trained embeddings, the original head
        assert not merged.config.tie_word_embeddings


@pytest.mark.parametrize("method", list(METHODS))
def test_compresses_saves_and_reloads_with_identical_logits(trained, method, tmp_path):
    architecture, _, merged, data = trained
    model = copy.deepcopy(merged)
    report = compress_with(model, data, METHODS[method], 0.5, progress=False)
    json.dumps(report)
    replaced = {e["name"]: model.get_submodule(e["name"]) for e in report["matrices"]}
    kind = LowRankLinear if method == "odllm" else QuantLinear
    assert len(replaced) == 14 and all(isinstance(m, kind) for m in replaced.values())
    for name, module in replaced.items():  # biases kept exactly; GQA shapes kept; ranks per shape
        dense = merged.get_submodule(name)
        bias = module.B.bias if method == "odllm" else module.bias
        assert (bias is None) == (dense.bias is None)
        if bias is not None:
            assert torch.equal(bias, dense.bias)
        assert (module.out_features, module.in_features) == tuple(dense.weight.shape)
        if method == "odllm":
            assert module.rank == rank_for_ratio(*dense.weight.shape, 0.5)
    if method == "odllm":
        ranks = {name.rsplit(".", 1)[1]: module.rank for name, module in replaced.items()}
        assert ranks["k_proj"] == 5 and ranks["q_proj"] == 8 and ranks["up_proj"] == 10  # GQA: k/v are 16 x 32
    assert all(0 <= layer["output_error"] < 0.5 for layer in report["layers"])

    model.save_pretrained(tmp_path, safe_serialization=True)
    save_compression_config(model, tmp_path)
    assert len(json.loads((tmp_path / COMPRESSION_FILE).read_text())) == 14
    loaded = load_compressed(tmp_path)
    assert type(loaded).__name__ == CLASSES[architecture]
    for batch in data:
        expected = logits(model, batch)
        assert torch.isfinite(expected).all()
        assert torch.equal(logits(loaded, batch), expected)


def test_unknown_layouts_and_unmerged_lora_are_refused_with_what_was_expected():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(TypeError, match=r"no decoder layers at model\.model\.layers.*q_proj.*\['transformer'"):
        decoder_layers(gpt2)
    llama = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=32, **SHAPE))
    with pytest.raises(TypeError, match="merge LoRA first"):
        decoder_layers(apply_lora(llama, LORA))
    llama = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=32, **SHAPE))
    for layer in llama.model.layers:  # a layer whose projections are not nn.Linear
        layer.self_attn, layer.mlp = nn.Identity(), nn.Identity()
    with pytest.raises(TypeError, match=r"decoder layers \[0, 1\] hold no nn.Linear"):
        decoder_layers(llama)
