"""Shared fixtures: Hydra configs composed from conf/ as the entry points do, a tiny model, synthetic data."""

import os
import random
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

CONF = str(Path(__file__).parents[1] / "conf")
# W&B is off in every test (before any wandb.init); the one offline-mode test lifts this for itself.
os.environ["WANDB_MODE"] = "disabled"
os.environ["WANDB_SILENT"] = "true"

TINY_MODEL = [
    "model.tokenizer_vocab=300",
    "model.config.hidden_size=32",
    "model.config.intermediate_size=64",
    "model.config.num_hidden_layers=2",
    "model.config.num_attention_heads=4",
    "model.config.num_key_value_heads=2",
    "model.config.max_position_embeddings=256",
]


def compose_config(overrides: list[str], config_name: str = "config", with_hydra: bool = False):
    """``with_hydra``: keep the ``hydra`` node (sweeper params, run dirs), as a running entry point sees it."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=with_hydra)


def write_synthetic_interactions(path: Path, users: int = 48, items: int = 24, seed: int = 0) -> Path:
    """Users walk a cycle of items (item i is followed by i+1), so the next item is learnable."""
    rng = random.Random(seed)
    lines = ["user,item,timestamp,title"]
    for u in range(users):
        start, length = rng.randrange(items), rng.randrange(5, 11)
        for t in range(length):
            item = (start + t) % items
            lines.append(f"u{u},i{item},{t},Item number {item}")
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_overrides(root: Path) -> list[str]:
    """Overrides for a tiny model trained on synthetic interactions written under ``root``."""
    data = write_synthetic_interactions(root / "toy.csv")
    return [
        "dataset=interactions",
        f"dataset.path={data}",
        "dataset.name=toy",
        f"paths.models_dir={root / 'models'}",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "train.batch_size=8",
        "train.lr=5e-3",
        "eval.num_beams=10",
        "eval.batch_size=16",
        "eval.progress=false",
        "logger=none",
        *TINY_MODEL,
    ]


@pytest.fixture
def tiny_run_overrides(tmp_path) -> list[str]:
    return tiny_overrides(tmp_path)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: extra threads only add synchronisation, which stalls when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def trained(tmp_path, tiny_run_overrides) -> list[str]:
    """Overrides of a one-epoch tiny run that has been trained (its model in tmp_path/models)."""
    from odllm.runner.train import train

    overrides = [*tiny_run_overrides, "trainer.max_epochs=1", "calibration.size=32", "calibration.batch_size=8"]
    train(compose_config(overrides), tmp_path / "train")
    return overrides
