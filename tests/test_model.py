"""Backbones: scratch LLaMA, a local HF checkpoint, LoRA with trainable item-token rows, save/load."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from odllm.data.items import atomic_codes
from odllm.model.backbone import BackboneSpec, add_dropout, build_model, merge
from odllm.model.recommender import Recommender
from odllm.model.tokenizer import train_tokenizer

CORPUS = ["The user has interacted with the following items. History:", "Toy Story (1995)"] * 5
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 128, "tie_word_embeddings": False}
LORA = {"r": 4, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"]}


def model_cfg(**kw):
    base = {"source": "scratch", "path": None, "finetune": "full", "tokenizer_vocab": 300, "config": TINY,
            "lora": LORA}
    return BackboneSpec(**{**base, **kw})


def save_tiny_hf_checkpoint(path):
    tok = train_tokenizer(CORPUS, vocab_size=300)
    cfg = LlamaConfig(vocab_size=len(tok), **TINY)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return len(tok)


def test_scratch_model_has_item_tokens():
    codes = atomic_codes(["1", "2", "3"])
    model, tok = build_model(model_cfg(), codes, CORPUS)
    ids = tok.convert_tokens_to_ids(codes.tokens())
    assert len(set(ids)) == 3 and max(ids) < model.get_input_embeddings().weight.shape[0]
    assert tok("<item_2>", add_special_tokens=False)["input_ids"] == [ids[1]]


def test_hf_checkpoint_path_loads_and_resizes(tmp_path):
    base_vocab = save_tiny_hf_checkpoint(tmp_path / "ckpt")
    codes = atomic_codes([str(i) for i in range(7)])
    model, tok = build_model(model_cfg(source="hf", path=str(tmp_path / "ckpt")), codes, [])
    assert len(tok) == base_vocab + 7
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)


def test_lora_trains_new_item_token_rows_and_merges(tmp_path):
    save_tiny_hf_checkpoint(tmp_path / "ckpt")
    codes = atomic_codes(["1", "2"])
    model, tok = build_model(model_cfg(source="hf", path=str(tmp_path / "ckpt"), finetune="lora"), codes, [])
    new_ids = tok.convert_tokens_to_ids(codes.tokens())
    ids = torch.tensor([[1, new_ids[0], new_ids[1], 5, 7]])
    model(input_ids=ids, labels=ids).loss.backward()
    emb = [p for n, p in model.named_parameters() if "embed_tokens" in n and p.requires_grad]
    head = [p for n, p in model.named_parameters() if "lm_head" in n and p.requires_grad]
    assert emb and head, "embedding and output rows must be trainable under LoRA"
    assert all(emb[0].grad[i].abs().sum() > 0 for i in new_ids)
    assert all(head[0].grad[i].abs().sum() > 0 for i in new_ids)
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    merged = merge(model)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_save_load_gives_identical_logits(tmp_path):
    codes = atomic_codes(["1", "2", "3"])
    model, tok = build_model(model_cfg(), codes, CORPUS)
    model.eval()
    rec = Recommender(model, tok, codes, {"dataset": "x"})
    rec.save(tmp_path / "m")
    back = Recommender.load(tmp_path / "m")
    ids = torch.tensor([rec.encoder.prompt(["1", "2"])])
    torch.testing.assert_close(model(ids).logits, back.model(ids).logits, rtol=0, atol=0)
    assert back.item_codes.codes == codes.codes and back.meta == {"dataset": "x"}
    assert rec.encoder.prompt(["3"]) == back.encoder.prompt(["3"])


def test_recommend_returns_real_items_from_a_saved_model(tmp_path):
    codes = atomic_codes([str(i) for i in range(12)])
    model, tok = build_model(model_cfg(), codes, CORPUS)
    Recommender(model, tok, codes, {}).save(tmp_path / "m")
    items = Recommender.load(tmp_path / "m").recommend(["1", "2"], k=5, num_beams=10)
    assert len(items) == 5 and set(items) <= set(codes.codes)


def test_dropout_acts_in_training_only_and_hooks_come_off():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    ids = torch.randint(0, 50, (2, 7))
    model.eval()
    plain = model(ids).logits
    hooks = add_dropout(model, 0.3)
    assert len(hooks) == 1 + 2 * 2  # embeddings, o_proj and down_proj of each layer
    assert torch.equal(model(ids).logits, plain)  # eval mode: no dropout
    model.train()
    assert not torch.allclose(model(ids).logits, plain)
    for hook in hooks:
        hook.remove()
    assert torch.equal(model(ids).logits, plain)  # hooks removed (LLaMA itself has no dropout here)
    with pytest.raises(ValueError, match="must lie in"):
        add_dropout(model, 1.0)
