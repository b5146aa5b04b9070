"""Healing (distillation of a compressed model towards its dense parent): the loss, and that it heals."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config

from odllm.compress.heal import distillation_kl, heal
from odllm.data.batches import IGNORE_INDEX, Sample
from odllm.runner.compress import compress


def test_distillation_kl_hand_case():
    teacher = torch.tensor([[[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [9.0, 9.0, 9.0]]])
    student = torch.tensor([[[5.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 3.0, 0.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, IGNORE_INDEX]])  # only position 0 predicts a label
    p = F.softmax(teacher[0, 0], -1)
    expected = (p * (p.log() - F.log_softmax(student[0, 0], -1))).sum()
    assert distillation_kl(student, teacher, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    assert distillation_kl(teacher, teacher, labels).item() == pytest.approx(0.0, abs=1e-7)


def _mean_kl(student, teacher, samples):
    from odllm.data.batches import collate_right

    batch = collate_right(samples, pad_id=0)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        return distillation_kl(student(**inputs).logits, teacher(**inputs).logits, batch["labels"]).item()


def test_heal_moves_a_perturbed_model_towards_the_teacher(one_thread):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2))
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.model.layers.parameters():
            p.add_(0.05 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(1)
    samples = [Sample(ids, [IGNORE_INDEX] * 4 + ids[4:]) for ids in
               (torch.randint(1, 40, (12,), generator=gen).tolist() for _ in range(32))]
    shapes = {n: p.shape for n, p in student.named_parameters()}
    before = _mean_kl(student, teacher, samples)
    result = heal(student, teacher, samples, steps=30, lr=3e-3, batch_size=8, pad_id=0, seed=0, progress=False)
    after = _mean_kl(student, teacher, samples)
    assert after < 0.5 * before
    assert result["kl_last_tenth"] < result["kl_first_tenth"] and result["samples_seen"] == 240
    assert {n: p.shape for n, p in student.named_parameters()} == shapes and not student.training
    with pytest.raises(ValueError, match="positive number of distillation steps"):
        heal(student, teacher, samples, steps=0, lr=1e-3, batch_size=8, pad_id=0, seed=0)


def test_the_student_distils_without_dropout_unless_asked(one_thread):
    """A student identical to its teacher has zero KL to it with dropout off (the default), but not through
    attention dropout (``dropout=True``, the behaviour before 2026-12-01)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.5))
    gen = torch.Generator().manual_seed(1)
    samples = [Sample(ids, [IGNORE_INDEX] * 4 + ids[4:]) for ids in
               (torch.randint(1, 40, (12,), generator=gen).tolist() for _ in range(16))]
    settings = {"steps": 10, "lr": 1e-12, "batch_size": 8, "pad_id": 0, "seed": 0, "progress": False}
    plain = heal(copy.deepcopy(teacher), teacher, samples, **settings)
    noisy = heal(copy.deepcopy(teacher), teacher, samples, dropout=True, **settings)
    assert plain["kl_first_tenth"] < 1e-6 < 1e-4 < noisy["kl_first_tenth"]


def test_compress_with_heal_end_to_end(tmp_path, tiny_run_overrides):
    from odllm.runner.train import train

    # untied, as the Instruments models that healing is for (a tied toy model compresses almost losslessly here)
    overrides = [*tiny_run_overrides, "trainer.max_epochs=1", "calibration.size=32", "calibration.batch_size=8",
                 "ratio=0.3", "model.config.tie_word_embeddings=false"]
    train(compose_config(overrides), tmp_path / "train")
    plain = compress(compose_config([*overrides, "method=odllm"]), tmp_path / "plain")
    healed = compress(compose_config([*overrides, "method=odllm_heal", "method.heal.steps=20",
                                      "method.heal.batch_size=8", "method.heal.lr=5e-4"]), tmp_path / "healed")
    assert healed["sizes"]["model"] == plain["sizes"]["model"]  # healing changes values, not sizes
    assert healed["heal"]["steps"] == 20 and plain["heal"] is None
    assert healed["fidelity"]["kl"] < 0.9 * plain["fidelity"]["kl"]  # 6.3e-5 vs 9.5e-5 when written
    saved = json.loads((tmp_path / "healed" / "metrics.json").read_text())
    assert saved["heal"]["kl_last_tenth"] == healed["heal"]["kl_last_tenth"]
    with pytest.raises(ValueError, match="heal works on low-rank methods only"):
        compress(compose_config([*overrides, "method=gptq", "+method.heal.steps=5"]), tmp_path / "gptq")
