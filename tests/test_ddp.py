"""trainer=ddp: processes split every batch and every validation user without padding, and train like one."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from conftest import compose_config

from odllm.data.batches import LengthGroupedBatches
from odllm.data.datamodule import SeqRecDataModule
from odllm.data.dataset import Example
from odllm.runner.train import train

ROOT = Path(__file__).parents[1]


def test_processes_split_each_single_process_batch():
    lengths = [i % 7 for i in range(21)]  # batches of 4: five full ones and a last one of a single sample
    single = list(LengthGroupedBatches(lengths, 4, seed=3))
    shards = [list(LengthGroupedBatches(lengths, 4, seed=3, rank=r, world=2)) for r in (0, 1)]
    assert len(single) == len(LengthGroupedBatches(lengths, 4, seed=3)) == 6
    assert len(shards[0]) == len(shards[1]) == len(LengthGroupedBatches(lengths, 4, 3, rank=1, world=2)) == 5
    full = [b for b in single if len(b) >= 2]  # a batch too small to split is dropped: equal steps everywhere
    assert [sorted(a + b) for a, b in zip(*shards, strict=True)] == [sorted(b) for b in full]


def test_validation_users_are_split_without_duplicates():
    examples = [Example(f"u{i}", ["a"] * (i % 5 + 1), "b") for i in range(47)]
    module = SeqRecDataModule(None, None, 0, mode="all_positions", max_history=5, window_stride=None, batch_size=8,
                              valid_examples=examples, eval_batch_size=6, seed=0)
    users = []
    for rank in (0, 1):
        module.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        users += [e.user for batch in module.val_dataloader() for e in batch]
    assert sorted(users) == sorted(e.user for e in examples)  # 47 users, each once (a DistributedSampler: 48)


def test_two_processes_match_one(tmp_path, tiny_run_overrides):
    """``python train.py trainer=ddp`` (2 gloo processes, Lightning relaunches the script) against one process."""
    overrides = [*tiny_run_overrides, "train.val_users=47", "logger=csv", "trainer.log_every_n_steps=2"]
    single = train(compose_config(overrides), tmp_path / "single")
    ddp_dir = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides, "trainer=ddp", f"hydra.run.dir={ddp_dir}",
                    f"paths.models_dir={tmp_path / 'ddp-models'}"], cwd=tmp_path, env=env, check=True, timeout=600)
    ddp = json.loads((ddp_dir / "metrics.json").read_text())

    rows = list(csv.DictReader((ddp_dir / "logs" / "version_0" / "metrics.csv").open()))
    assert [float(r["val/users"]) for r in rows if r.get("val/users")] == [47.0, 47.0]  # every valid user once
    single_rows = list(csv.DictReader((tmp_path / "single" / "logs" / "version_0" / "metrics.csv").open()))
    assert rows[-1]["step"] == single_rows[-1]["step"]  # the same optimizer steps
    assert ddp["test"]["users"] == single["test"]["users"] == 48 and ddp["valid_users"] == 47
    for name in ("ndcg@10", "hr@10"):
        a, b = ddp["test"]["metrics"][name], single["test"]["metrics"][name]
        assert abs(a["value"] - b["value"]) <= 3 * math.hypot(a["stderr"], b["stderr"]) + 1e-9, name
    assert abs(ddp["best_valid_ndcg@10"] - single["best_valid_ndcg@10"]) < 0.1
