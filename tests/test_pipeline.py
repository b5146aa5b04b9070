"""train -> save -> evaluate on a tiny synthetic dataset; determinism and resume from a checkpoint."""

import json

import pytest
from conftest import compose_config

from odllm.runner.evaluate import evaluate
from odllm.runner.train import train


def test_train_then_evaluate_round_trip(tmp_path, tiny_run_overrides):
    cfg = compose_config(tiny_run_overrides)
    result = train(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["test"]["metrics"] == result["test"]["metrics"]
    assert saved["dataset_stats"]["users"] == 48 and saved["test"]["users"] == 48
    assert saved["test"]["invalid_beams"] == 0 and saved["test"]["num_beams"] == 10
    for name in ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10"):
        assert {"value", "stderr"} <= saved["test"]["metrics"][name].keys()
    assert "popularity" in saved and saved["epochs_run"] == 2
    model_dir = tmp_path / "models" / "toy"
    assert (model_dir / "config.json").exists() and (model_dir / "item_index.json").exists()

    again = evaluate(compose_config(tiny_run_overrides), tmp_path / "eval")
    assert again["test"]["metrics"] == result["test"]["metrics"]  # the saved model is the evaluated one
    assert again["model_dir"] == str(model_dir)


def test_same_seed_same_metrics_and_resume(tmp_path, tiny_run_overrides):
    first = train(compose_config(tiny_run_overrides), tmp_path / "a")
    second = train(compose_config(tiny_run_overrides), tmp_path / "b")
    assert first["test"]["metrics"] == second["test"]["metrics"]
    # resume the 2-epoch run for a third epoch from its last checkpoint
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    resumed = train(compose_config([*tiny_run_overrides, "trainer.max_epochs=3", f"ckpt_path={ckpt}"]), tmp_path / "c")
    assert resumed["epochs_run"] == 3
    # the best epoch before the stop still competes: the resumed run writes beside the checkpoint it resumed
    assert resumed["best_valid_ndcg@10"] >= first["best_valid_ndcg@10"] > 0
    assert not (tmp_path / "c" / "checkpoints").exists()


def test_missing_model_dir_is_a_clear_error(tmp_path, tiny_run_overrides):
    cfg = compose_config([*tiny_run_overrides, f"model_dir={tmp_path / 'nowhere'}"])
    with pytest.raises(FileNotFoundError, match="run `python train.py"):
        evaluate(cfg, tmp_path / "eval")


def test_weight_average_is_what_gets_validated_and_saved(tmp_path, tiny_run_overrides):
    import torch
    from safetensors.torch import load_file

    overrides = [*tiny_run_overrides, "train.ema_decay=0.9"]
    train(compose_config(overrides), tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    average, current = ckpt["state_dict"], ckpt["current_model_state"]
    name = "model.model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(average[name], current[name])  # the average differs from the last step's weights
    saved = load_file(tmp_path / "models" / "toy" / "model.safetensors")
    assert torch.equal(saved[name.removeprefix("model.")], average[name])
    # resuming restores the weights and their average; the third epoch keeps averaging
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    resumed = train(compose_config([*overrides, "trainer.max_epochs=3", f"ckpt_path={last}"]), tmp_path / "resumed")
    assert resumed["epochs_run"] == 3
    after = torch.load(last, map_location="cpu", weights_only=False)
    assert after["epoch"] == 2 and not torch.equal(after["state_dict"][name], after["current_model_state"][name])


def test_ema_decay_outside_its_range_is_a_clear_error(tmp_path, tiny_run_overrides):
    with pytest.raises(ValueError, match="ema_decay"):
        train(compose_config([*tiny_run_overrides, "train.ema_decay=1.0"]), tmp_path / "run")
