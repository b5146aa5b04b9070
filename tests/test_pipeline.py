"""train -> save -> evaluate on a tiny synthetic dataset; determinism and resume from a checkpoint."""

import csv
import json

import lightning as L
import pytest
import torch
from conftest import compose_config
from safetensors.torch import load_file

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
    assert saved["epochs_run"] == 2
    epochs = saved["valid_by_epoch"]  # one row per epoch: the curve a user checks before stopping a schedule
    assert [row["epoch"] for row in epochs] == [1, 2] and epochs[1]["step"] > epochs[0]["step"] > 0
    assert max(row["ndcg@10"] for row in epochs) == pytest.approx(saved["best_valid_ndcg@10"])
    assert {"hr@1", "hr@10", "ndcg@5", "users"} <= epochs[0].keys()
    # the synthetic users walk a cycle (item i -> i+1): two epochs learn it, the popularity baseline cannot.
    # Measured: test NDCG@10 0.665 vs popularity 0.209 (an untrained model: 0.072); HR@10 0.875 vs 0.500
    model, popular = saved["test"]["metrics"], saved["popularity"]
    assert model["ndcg@10"]["value"] > popular["ndcg@10"]["value"] + 0.25
    assert model["hr@10"]["value"] > popular["hr@10"]["value"] + 0.2
    assert saved["versions"]["torch"] in (torch.__version__, torch.__version__.split("+")[0])
    assert set(saved["versions"]) == {"python", "torch", "transformers", "lightning", "peft", "torchmetrics"}
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
    # the history travels in the checkpoint: the resumed run reports epochs 1-2 as the first run saw them
    assert resumed["valid_by_epoch"][:2] == first["valid_by_epoch"] and resumed["valid_by_epoch"][2]["epoch"] == 3
    # the best epoch before the stop still competes: the resumed run writes beside the checkpoint it resumes
    assert resumed["best_valid_ndcg@10"] >= first["best_valid_ndcg@10"] > 0
    assert not (tmp_path / "c" / "checkpoints").exists()


def test_last_checkpoint_is_the_latest_epoch_not_the_best(tmp_path, tiny_run_overrides):
    # lr 1e-12 (below float32 resolution): validation never improves after epoch 1, the first stays the best
    train(compose_config([*tiny_run_overrides, "trainer.max_epochs=3", "train.lr=1e-12"]), tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert torch.load(checkpoints / "best.ckpt", map_location="cpu", weights_only=False)["epoch"] == 0
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)["epoch"] == 2


class Killed(Exception):
    pass


class KillInSecondEpoch(L.Callback):
    """Stops the run at the first step of epoch 2, after epoch 1's checkpoints were written, as a kill would."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.current_epoch == 1:
            raise Killed


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, tiny_run_overrides, monkeypatch, one_thread):
    # dropout on (the tiny model's attention dropout plus model.dropout): the masks come from the global generator
    overrides = [o for o in tiny_run_overrides if o != "logger=none"]
    overrides += ["logger=csv", "trainer.log_every_n_steps=1", "model.dropout=0.1"]
    whole = train(compose_config([*overrides, f"paths.models_dir={tmp_path / 'm_whole'}"]), tmp_path / "whole")

    real = L.Trainer

    def killed_in_second_epoch(*args, callbacks=(), **kwargs):
        return real(*args, callbacks=[*callbacks, KillInSecondEpoch()], **kwargs)

    monkeypatch.setattr(L, "Trainer", killed_in_second_epoch)
    with pytest.raises(Killed):
        train(compose_config([*overrides, f"paths.models_dir={tmp_path / 'm_cut'}"]), tmp_path / "cut")
    monkeypatch.setattr(L, "Trainer", real)
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    resumed = train(compose_config([*overrides, f"ckpt_path={last}", f"paths.models_dir={tmp_path / 'm_resumed'}"]),
                    tmp_path / "resumed")

    def losses(run):  # (step, train loss) of every logged step
        rows = csv.DictReader((tmp_path / run / "logs" / "version_0" / "metrics.csv").open())
        return [(r["step"], r["train/loss"]) for r in rows if r.get("train/loss")]

    whole_losses, cut, rest = losses("whole"), losses("cut"), losses("resumed")
    assert len(whole_losses) == 12 and cut and rest  # 6 steps per epoch
    assert cut + rest == whole_losses  # every loss, as printed to the CSV (full float precision)
    a = load_file(tmp_path / "m_whole" / "toy" / "model.safetensors")
    b = load_file(tmp_path / "m_resumed" / "toy" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test"]["metrics"] == whole["test"]["metrics"]


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
