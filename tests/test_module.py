"""SeqRecModule: a checkpoint says how the module was built; validation logs the RankMetrics values."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from odllm.eval.metrics import ranking_metrics
from odllm.model.backbone import apply_lora
from odllm.model.module import SeqRecModule, model_description

TINY = {"vocab_size": 40, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "max_position_embeddings": 32}
ARGS = {"lr": 1e-3, "weight_decay": 0.01, "warmup_ratio": 0.1, "num_beams": 12, "ks": (1, 5, 12)}


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY))


def trainer(**kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kw)


def test_checkpoint_hyper_parameters_rebuild_the_module(tmp_path):
    module = SeqRecModule(tiny_model(), None, None, 0, **ARGS)
    ids = torch.randint(1, TINY["vocab_size"], (4, 6), generator=torch.Generator().manual_seed(0))
    batches = DataLoader([{"input_ids": row, "labels": row} for row in ids], batch_size=2)
    fit = trainer(max_steps=2, limit_val_batches=0)
    fit.fit(module, train_dataloaders=batches)
    fit.save_checkpoint(tmp_path / "tiny.ckpt")

    checkpoint = torch.load(tmp_path / "tiny.ckpt", map_location="cpu", weights_only=True)  # plain values only
    hp = checkpoint["hyper_parameters"]
    assert {k: hp[k] for k in (*ARGS, "pad_id")} == {**ARGS, "pad_id": 0}
    assert not {"model", "encoder", "trie"} & hp.keys()  # live objects: rebuilt by the caller, not pickled
    assert hp["model_class"] == "LlamaForCausalLM" and hp["peft_config"] is None
    assert {k: hp["model_config"][k] for k in TINY} == TINY
    assert not any(k.startswith("val_metrics") for k in checkpoint["state_dict"])  # counts are not weights

    model = LlamaForCausalLM(LlamaConfig.from_dict(hp["model_config"]))  # built from the checkpoint alone
    restored = SeqRecModule.load_from_checkpoint(tmp_path / "tiny.ckpt", model=model, encoder=None, trie=None)
    assert (restored.lr, restored.num_beams, restored.ks) == (ARGS["lr"], ARGS["num_beams"], ARGS["ks"])
    trained = module.model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in restored.model.state_dict().items())


def test_lora_model_description_is_plain():
    lora = {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    description = model_description(apply_lora(tiny_model(), lora))
    assert description["model_class"] == "LlamaForCausalLM"
    (config,) = description["peft_config"].values()
    assert config["r"] == 2 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]


def test_beams_fewer_than_k_fail_before_training():
    with pytest.raises(ValueError, match="num_beams >= 12"):
        SeqRecModule(tiny_model(), None, None, 0, **{**ARGS, "num_beams": 10})


class FixedRanks(SeqRecModule):
    """Validation batches are the ranks themselves (beam search is tested elsewhere)."""

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.val_metrics.update(batch)


def test_validation_logs_what_ranking_metrics_reports():
    ranks = torch.randint(0, 13, (61,), generator=torch.Generator().manual_seed(0))
    module = FixedRanks(tiny_model(), None, None, 0, **ARGS)
    check = trainer()
    for _ in range(2):  # counts are reset after each epoch
        check.validate(module, dataloaders=DataLoader(ranks, batch_size=8), verbose=False)
        logged = check.callback_metrics
        expected = ranking_metrics(ranks, ARGS["num_beams"], ARGS["ks"])
        assert set(logged) == {f"val/{name}" for name in expected} | {"val/users"}
        for name, m in expected.items():  # logged as before: the float, as a float32 tensor
            assert torch.equal(logged[f"val/{name}"], torch.tensor(m["value"], dtype=torch.float32)), name
        assert logged["val/users"].item() == 61
