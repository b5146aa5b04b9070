"""Every entry point checks the config values it uses before any work, and a user's error is one line on stderr."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose_config
from omegaconf import OmegaConf

from odllm import config
from odllm.checks import ConfigError, check_index, check_prepare, user_errors

REPO = Path(__file__).parents[1]

BAD = [  # (checker, override, what the message must say)
    ("compress", "ratio=abc", r"ratio='abc' must be a number in \(0, 1\].*e.g. ratio=0.5"),
    ("compress", "ratio=0", r"ratio=0 is outside \(0, 1\]"),
    ("compress", "ratio=1.5", r"ratio=1.5 is outside \(0, 1\]"),
    ("compress", "calibration.size=0", r"calibration.size=0 must be a whole number >= 1, e.g. calibration.size="),
    ("compress", "calibration.size=-5", "calibration.size=-5"),
    ("compress", "calibration.batch_size=0", "calibration.batch_size=0"),
    ("compress", "calibration.tokens=some", "calibration.tokens='some' is not one of items, all"),
    ("compress", "eval.ks=[0,5]", r"eval.ks=\[0, 5\] must be a non-empty list of whole numbers >= 1"),
    ("compress", "eval.ks=[-1]", "eval.ks"),
    ("compress", "eval.ks=[2.5]", "eval.ks"),
    ("compress", "eval.ks=[]", "eval.ks"),
    ("evaluate", "eval.num_beams=5", r"eval.num_beams=5 is smaller than max\(eval.ks\)=10.*e.g. eval.num_beams=20"),
    ("evaluate", "eval.batch_size=0", "eval.batch_size=0"),
    ("evaluate", "eval.template=99", r"eval.template=99 must be a whole number in \[0, "),
    ("evaluate", "task.max_history=0", "task.max_history=0 must be a whole number >= 1"),
    ("evaluate", "dataset.format=xlsx", "dataset.format='xlsx' is not one of atomic, lcrec, csv"),
    ("evaluate", "dataset=interactions", "dataset.path is required.*e.g. dataset.path="),
    ("train", "trainer.max_epochs=0", "trainer.max_epochs=0 must be a whole number >= 1"),
    ("train", "train.lr=0", r"train.lr=0 is outside \(0, inf\)"),
    ("train", "train.lr=fast", r"train.lr='fast' must be a number"),
    ("train", "train.batch_size=0", "train.batch_size=0"),
    ("train", "train.val_users=0", r"train.val_users=0 must be a whole number >= 1 \(or null\)"),
    ("train", "train.warmup_ratio=1.0", r"train.warmup_ratio=1.0 is outside \[0, 1\)"),
    ("train", "train.ema_decay=1.0", "ema_decay"),
    ("train", "task.mode=all", "task.mode='all' is not one of all_positions, per_prefix"),
    ("train", "task.window_stride=0", "task.window_stride=0"),
    ("train", "task.window_stride=500", r"task.window_stride=500 must lie in \[1, task.max_history=50\]"),
    ("train", "seed=1.5", r"seed=1.5 must be a whole number in \[0, 4294967295\], e.g. seed=42"),
    ("train", "seed=-1", "seed=-1"),
    ("train", "seed=abc", "seed='abc'"),
    ("train", "model.dropout=1.0", r"model.dropout=1.0 is outside \[0, 1\)"),
    ("train", "ckpt_path=/no/such.ckpt", "ckpt_path='/no/such.ckpt' is not a file"),
]


@pytest.mark.parametrize(("entry", "override", "message"), BAD)
def test_bad_values_are_refused_with_the_key_and_an_example(entry, override, message):
    cfg = compose_config([override])
    with pytest.raises(ConfigError, match=message):
        getattr(config, f"check_{entry}")(cfg)


@pytest.mark.parametrize("entry", ["train", "compress", "evaluate", "benchmark", "inference"])
def test_the_shipped_defaults_pass(entry):
    name = entry if entry in ("benchmark", "inference") else "config"
    getattr(config, f"check_{entry}")(compose_config([], name))


def test_method_files_load_as_hydra_composes_them():
    """config.load_method (the benchmark's method lists, train.py's compress=) gives for every conf/method file
    what ``method=<name>`` composes, inherited keys of a defaults list (odllm_alloc_heal) included, in order."""
    names = sorted(p.stem for p in (config.CONF_DIR / "method").glob("*.yaml"))
    for name in names:
        composed = OmegaConf.to_container(compose_config([f"method={name}"]).method)
        loaded = OmegaConf.to_container(config.load_method(name))
        assert loaded == composed and list(loaded) == list(composed), name
    combined = config.load_method("odllm_alloc_heal")
    assert combined.name == "odllm_alloc_heal" and combined.allocation == "loss" and combined.heal.steps > 0


def test_train_with_compress_checks_the_ratio_before_training():
    with pytest.raises(ConfigError, match="ratio=2 is outside"):
        config.check_train(compose_config(["compress=odllm", "ratio=2"]))


def test_benchmark_and_inference_keys():
    with pytest.raises(ConfigError, match=r"bench.ratios.1=2 is outside \(0, 1\]"):
        config.check_benchmark(compose_config(["bench.ratios=[0.5,2]"], "benchmark"))
    with pytest.raises(ValueError, match="unknown compression method 'zip'"):
        config.check_benchmark(compose_config(["bench.methods=[odllm,zip]"], "benchmark"))
    with pytest.raises(ConfigError, match="bench.test_users=0"):
        config.check_benchmark(compose_config(["bench.test_users=0"], "benchmark"))
    with pytest.raises(ConfigError, match="top_k=30 is larger than eval.num_beams=20"):
        config.check_inference(compose_config(["top_k=30"], "inference"))
    with pytest.raises(ConfigError, match="repeats=0"):
        config.check_inference(compose_config(["repeats=0"], "inference"))
    with pytest.raises(ConfigError, match="fuse='maybe'"):
        config.check_inference(compose_config(["fuse=maybe"], "inference"))
    with pytest.raises(ConfigError, match="batch_sizes="):
        config.check_inference(compose_config(["+batch_sizes.dense=0"], "inference"))


def test_index_and_prepare_keys(tmp_path):
    check_index(compose_config([], "index"))
    with pytest.raises(ConfigError, match="index.levels=0 must be a whole number >= 1, e.g. index.levels=4"):
        check_index(compose_config(["index.levels=0"], "index"))
    with pytest.raises(ConfigError, match=r"index.lr=0 is outside \(0, inf\)"):
        check_index(compose_config(["index.lr=0"], "index"))
    with pytest.raises(ConfigError, match="index.embeddings='words'"):
        check_index(compose_config(["index.embeddings=words"], "index"))
    with pytest.raises(ConfigError, match="index.sasrec.path=None must be a non-empty string, e.g. .*sasrec.pt"):
        check_index(compose_config(["index.embeddings=sasrec"], "index"))
    with pytest.raises(ConfigError, match="prepare.raw_dir is required"):
        check_prepare(compose_config([], "prepare"))
    with pytest.raises(ConfigError, match="is not a directory"):
        check_prepare(compose_config([f"prepare.raw_dir={tmp_path / 'no'}", "prepare.category=X"], "prepare"))
    with pytest.raises(ConfigError, match="prepare.k=0"):
        check_prepare(compose_config([f"prepare.raw_dir={tmp_path}", "prepare.category=X", "prepare.k=0"], "prepare"))


def test_checks_come_before_any_data_is_read(tmp_path, tiny_run_overrides):
    from odllm.runner.compress import compress
    from odllm.runner.train import train

    # the data file does not exist: a check that ran after reading would fail with FileNotFoundError instead
    missing = [*tiny_run_overrides, f"dataset.path={tmp_path / 'absent.csv'}"]
    with pytest.raises(ConfigError, match="eval.num_beams=3 is smaller"):
        train(compose_config([*missing, "eval.num_beams=3"]), tmp_path / "t")
    with pytest.raises(ConfigError, match="calibration.size=0"):
        compress(compose_config([*missing, "calibration.size=0"]), tmp_path / "c")
    assert not (tmp_path / "models").exists()


def test_user_errors_print_one_line_and_keep_tracebacks_of_bugs(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv("ODLLM_DEBUG", raising=False)

    @user_errors
    def refuses():
        config.check_ratio(compose_config(["ratio=abc"]))

    with pytest.raises(SystemExit) as stop:
        refuses()
    assert stop.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: ratio='abc' must be a number in (0, 1]: ratio is the fraction of decoder-linear parameters kept, "
        "e.g. ratio=0.5"
    ]

    @user_errors
    def bug():
        return int("x")  # a ValueError that odllm did not raise with a message: a bug, keeps its traceback

    with pytest.raises(ValueError, match="invalid literal"):
        bug()
    monkeypatch.setenv("ODLLM_DEBUG", "1")
    with pytest.raises(ConfigError):
        refuses()


def _run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "ODLLM_DEBUG")}
    return subprocess.run(
        [sys.executable, *args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
        env={**environ, "OMP_NUM_THREADS": "1", **env}, timeout=300,
    )


def test_a_bad_value_on_the_command_line_is_one_line_on_stderr(tmp_path):
    done = _run([str(REPO / "compress.py"), "ratio=abc"], tmp_path)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: ratio='abc' must be a number in (0, 1]: ratio is the fraction of decoder-linear parameters kept, "
        "e.g. ratio=0.5"
    ]
    assert done.stderr.splitlines()[-1] == errors[0] and "Traceback" not in done.stderr + done.stdout
    full = _run([str(REPO / "compress.py"), "ratio=abc"], tmp_path, HYDRA_FULL_ERROR="1")
    assert full.returncode != 0 and "Traceback" in full.stderr and "ConfigError" in full.stderr


def test_module_entry_points_report_one_line(tmp_path):
    done = _run(["-m", "odllm.data.prepare"], tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].startswith("error: prepare.raw_dir is required")
