"""Experiment workflow: Hydra multiruns of the entry points, run loggers (CSV, W&B), the comparison report."""

import csv
import json
import runpy
import socket
import sys
from pathlib import Path

import pytest
import wandb
from conftest import compose_config
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from odllm.bench import report
from odllm.runner.loggers import has_wandb_credentials, scalars, wandb_mode
from odllm.runner.train import train

ROOT = Path(__file__).parents[1]
QUIET_HYDRA = ["hydra/job_logging=none", "hydra/hydra_logging=none"]  # leave the test process's logging alone


def run_script(script: str, args: list[str], monkeypatch) -> None:
    """``python <script> <args>`` in this process: Hydra's default launcher runs multirun jobs in-process too,
    so this is also the test that jobs do not leak state into each other."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), *args, *QUIET_HYDRA])
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    finally:
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None


@pytest.fixture
def trained(tmp_path, tiny_run_overrides):
    """A tiny model trained with the CSV logger (the default); overrides for later runs on it."""
    overrides = [*tiny_run_overrides, "trainer.max_epochs=1", "calibration.size=32", "calibration.batch_size=8"]
    train(compose_config([*overrides, "logger=csv", "trainer.log_every_n_steps=4"]), tmp_path / "train")
    return overrides


def test_csv_logger_holds_curves_final_metrics_and_config(tmp_path, trained):
    log_dir = tmp_path / "train" / "logs" / "version_0"
    rows = list(csv.DictReader((log_dir / "metrics.csv").open()))
    saved = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert any(r.get("train/loss") for r in rows) and any(r.get("val/ndcg@10") for r in rows)
    final = [r for r in rows if r.get("test/ndcg@10")]
    assert len(final) == 1 and float(final[0]["test/ndcg@10"]) == pytest.approx(
        saved["test"]["metrics"]["ndcg@10"]["value"])
    assert "dataset:" in (log_dir / "hparams.yaml").read_text()


def test_compress_multirun_then_report(tmp_path, trained, monkeypatch, capsys):
    inits = []
    real_init = wandb.init
    monkeypatch.setattr(wandb, "init", lambda **kw: inits.append(kw) or real_init(**kw))
    sweep = tmp_path / "sweep"
    run_script("compress.py", ["-m", *trained, "method=svd", "ratio=0.3,0.6", "logger=wandb",
                               f"hydra.sweep.dir={sweep}"], monkeypatch)

    jobs = [json.loads((sweep / str(n) / "metrics.json").read_text()) for n in (0, 1)]
    assert [job["ratio"] for job in jobs] == [0.3, 0.6]
    assert [job["config"]["ratio"] for job in jobs] == [0.3, 0.6]
    for n, job in enumerate(jobs):
        assert f"ratio: {job['ratio']}" in (sweep / str(n) / ".hydra" / "config.yaml").read_text()
    # one W&B run per job (disabled in tests), both in the sweep's group, each closed before the next started
    assert [kw["group"] for kw in inits] == [str(sweep)] * 2 and inits[0]["name"] != inits[1]["name"]
    assert [kw["mode"] for kw in inits] == ["disabled"] * 2 and wandb.run is None

    report.main([str(sweep), "--out", str(tmp_path / "report")])
    text = (tmp_path / "report" / "report.md").read_text()
    assert text in capsys.readouterr().out
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ")][1:]
    assert [r[0] for r in rows] == ["| dense", "| svd", "| svd"]  # the dense parent once, not once per job
    for job, row in zip(jobs, rows[1:], strict=True):
        assert row[1] == f"{job['ratio']:g}"
        cells = row[4:8]
        assert cells == [f"{job['test']['metrics'][m]['value']:.4f} ± {job['test']['metrics'][m]['stderr']:.4f}"
                         for m in report.METRICS]
        assert row[8] == f"{job['fidelity']['kl']:.4f}"
        assert row[3] == f"{job['sizes']['model']['bytes_after'] / 1e6:.2f}"
    dense = jobs[0]["dense"]["metrics"]["ndcg@10"]
    assert rows[0][7] == f"{dense['value']:.4f} ± {dense['stderr']:.4f}"
    assert (tmp_path / "report" / "toy-ratio.png").stat().st_size > 0
    assert (tmp_path / "report" / "toy-bytes.png").stat().st_size > 0


def test_train_multirun_gives_each_job_its_run(tmp_path, tiny_run_overrides, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default sweep directory, multirun/train/<time>/<job>, is relative
    run_script("train.py", ["-m", *tiny_run_overrides, "trainer.max_epochs=1", "seed=1,2", "logger=csv"], monkeypatch)
    (sweep,) = (tmp_path / "multirun" / "train").iterdir()
    for n, seed in enumerate((1, 2)):
        job = sweep / str(n)
        assert json.loads((job / "metrics.json").read_text())["config"]["seed"] == seed
        assert f"seed: {seed}" in (job / ".hydra" / "config.yaml").read_text()
        assert [p.name for p in (job / "logs").iterdir()] == ["version_0"]  # its own logger, not the last job's
    rows = report.load_rows(report.metrics_files([sweep]))
    assert [(r.method, r.config["seed"]) for r in rows] == [("dense", 1), ("dense", 2)]
    assert report.swept(rows) == ["seed"]


def test_ddp_inside_a_multirun_is_a_clear_error(tmp_path, tiny_run_overrides, monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # raise instead of printing and exiting
    with pytest.raises(ValueError, match="cannot run inside a Hydra multirun"):
        run_script("train.py", ["-m", *tiny_run_overrides, "trainer=ddp", "seed=1",
                                f"hydra.sweep.dir={tmp_path / 'sweep'}"], monkeypatch)


def test_report_reads_train_and_evaluate_runs_and_plots_the_swept_key(tmp_path, trained):
    x_rows = [report.Row(path=tmp_path / f"{n}" / "metrics.json", dataset="toy", method="odllm", setting="0.3",
                         metrics={m: {"value": 0.1 * n, "stderr": 0.01} for m in report.METRICS}, users=48,
                         model_dir=None, config={"calibration.size": size, "ratio": 0.3, "seed": 42},
                         ratio=0.3, model_bytes=1000, kl=0.1 / size, overlap=0.9)
              for n, size in enumerate((64, 128, 256, 512))]
    assert report.x_key(x_rows) == "calibration.size" and report.swept(x_rows) == ["calibration.size"]
    assert report.plot_dataset(x_rows, tmp_path)[0].name == "toy-calibration.size.png"

    rows = report.load_rows(report.metrics_files([tmp_path / "train"]))
    assert [(r.method, r.setting, r.users) for r in rows] == [("dense", "-", 48)]


def test_report_without_metrics_names_the_path_and_the_fix(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no metrics.json under .*empty: pass run directories"):
        report.main([str(tmp_path / "empty")])
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        report.main([str(tmp_path / "nowhere")])


def test_wandb_offline_without_credentials_writes_a_local_run(tmp_path, trained, monkeypatch):
    """No key, no netrc entry, no WANDB_MODE: offline, chosen before wandb.init; a dead server URL and a socket
    guard make any attempt to reach the network fail loudly instead of passing unnoticed."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    real_connect = socket.socket.connect

    def local_only(sock, address):
        assert sock.family == socket.AF_UNIX or address[0] in ("127.0.0.1", "::1", "localhost"), address
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    assert not has_wandb_credentials()

    run_dir = tmp_path / "wandb-run"
    cfg = compose_config([*trained, "logger=wandb", "compress=svd", "ratio=0.5", "trainer.log_every_n_steps=4"])
    train(cfg, run_dir)
    assert wandb.run is None  # finished, so a next job starts its own run
    wandb.teardown()  # the wandb-core service writes the run's log asynchronously; wait for it before reading
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (log,) = offline.glob("run-*.wandb")
    data = log.read_bytes()
    for key in (b"train/loss", b"val/ndcg@10", b"test/ndcg@10", b"compressed/fidelity/kl", b"max_epochs"):
        assert key in data, key
    saved = {p.relative_to(offline / "files").as_posix() for p in (offline / "files").rglob("*") if p.is_file()}
    assert {"metrics.json", "compress/metrics.json", "compress/compression_report.json"} <= saved


def test_wandb_mode_is_settled_before_init(tmp_path, monkeypatch):
    cfg = compose_config(["logger=wandb"]).logger
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine example.org login user password secret\n")
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_mode(cfg) == "offline"
    netrc.write_text("machine api.wandb.ai login user password secret\n")
    assert wandb_mode(cfg) == "online"  # what `wandb login` leaves behind
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(cfg) == "disabled"
    assert wandb_mode(compose_config(["logger=wandb", "logger.mode=offline"]).logger) == "offline"


def test_scalars_flatten_a_payload_for_the_loggers():
    payload = {"test": {"metrics": {"ndcg@10": {"value": 0.5, "stderr": 0.1}}, "users": 3}, "ratio": 0.3,
               "config": {"seed": 1}, "fidelity": {"kl": 0.01}, "dataset": "toy", "flag": True}
    assert scalars(payload) == {"test/ndcg@10": 0.5, "test/ndcg@10/stderr": 0.1, "test/users": 3.0, "ratio": 0.3,
                                "fidelity/kl": 0.01}


@pytest.mark.parametrize(("experiment", "params"), [
    ("main_table", {"dataset": "ml-100k,instruments"}),
    ("ablation", {"method": "svd,svd_whiten,svd_align,odllm"}),
    ("ratio_sweep", {"method": "odllm,svd", "ratio": "0.1,0.3,0.5,0.7,0.9"}),
    ("calibration_sweep", {"method": "odllm,svd_whiten", "calibration.size": "64,128,256,512"}),
])
def test_experiments_are_sweeps_of_the_entry_points(experiment, params):
    cfg = compose_config([f"experiment={experiment}"], with_hydra=True)
    assert dict(cfg.hydra.sweeper.params) == params
    assert f"/{experiment}/" in cfg.hydra.sweep._get_node("dir")._value()  # resolved only inside a run


def test_logger_and_trainer_groups():
    assert compose_config(["logger=none"]).logger.name == "none"
    ddp, gpu = compose_config(["trainer=ddp"]).trainer, compose_config(["trainer=gpu"]).trainer
    assert (ddp.strategy, ddp.devices, ddp.accelerator, ddp.max_epochs) == ("ddp", 2, "cpu", 10)
    assert (gpu.accelerator, gpu.devices, gpu.strategy) == ("gpu", "auto", "auto")
