"""Experiment loggers of train/evaluate/compress runs: Lightning's CSV logger, Weights & Biases, or none.

Every run opens its logger with :func:`run_logger`, which closes it in ``finally``: the jobs of a Hydra
multirun share one process, and a W&B run left open would be silently reused by the next job.
W&B is offline-first: the mode is settled before ``wandb.init``, so a machine without credentials writes a
local run (``wandb sync`` uploads it later) instead of prompting for a key or waiting for a server.
"""

from __future__ import annotations

import netrc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

LOGGERS = ("csv", "none", "wandb")


@contextmanager
def run_logger(cfg: DictConfig, output_dir: str | Path, job: str) -> Iterator[Logger | None]:
    """The run's logger (None for ``logger=none``) with the config logged; finalized however the run ends."""
    logger = build_logger(cfg, Path(output_dir), job)
    status = "failed"
    try:
        if logger is not None:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        yield logger
        status = "success"
    finally:
        if logger is not None:
            logger.finalize(status)
        if isinstance(logger, WandbLogger):
            import wandb

            wandb.finish(exit_code=0 if status == "success" else 1)  # no-op on DDP ranks that never started one


def build_logger(cfg: DictConfig, output_dir: Path, job: str) -> Logger | None:
    name = cfg.logger.name
    if name == "none":
        return None
    if name == "csv":
        return CSVLogger(output_dir, name="logs")
    if name == "wandb":
        group, job_name = sweep_job() or (None, None)
        return WandbLogger(
            save_dir=str(output_dir),  # the run lands in <run>/wandb/
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            group=cfg.logger.group or group,
            name=job_name,
            tags=list(cfg.logger.tags),
            job_type=job,
            mode=wandb_mode(cfg.logger),
        )
    raise ValueError(f"logger={name!r}; choose one of {', '.join(LOGGERS)} (conf/logger/)")


def sweep_job() -> tuple[str, str] | None:
    """(sweep directory, the job's overrides) inside a Hydra multirun, else None: a sweep's runs form one group."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hydra = HydraConfig.get()
    return str(hydra.sweep.dir), hydra.job.override_dirname or f"job{hydra.job.num}"


def wandb_mode(logger_cfg: DictConfig) -> str:
    """``logger.mode``, else ``$WANDB_MODE``, else online when credentials exist and offline when they don't."""
    return logger_cfg.mode or os.environ.get("WANDB_MODE") or ("online" if has_wandb_credentials() else "offline")


def has_wandb_credentials() -> bool:
    """W&B's own credential sources, read without contacting a server: an API key or identity-token file in the
    environment, or the ``$NETRC`` / ``~/.netrc`` entry for the W&B host that ``wandb login`` writes."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    try:
        return netrc.netrc(Path(os.environ.get("NETRC", "~/.netrc")).expanduser()).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def log_results(logger: Logger | None, payload: dict, run_dir: Path, *subdirs: str, step: int | None = None) -> None:
    """The final numbers of a ``metrics.json`` payload; W&B also keeps the JSON reports and PNG plots found in
    ``run_dir`` and its ``subdirs`` (e.g. ``compress``), under their paths relative to ``run_dir``."""
    if logger is None:
        return
    logger.log_metrics(scalars(payload), step=step)
    if isinstance(logger, WandbLogger):
        import wandb

        directories = [run_dir, *(run_dir / s for s in subdirs)]
        files = [p for d in directories for pattern in ("*.json", "*.png") for p in sorted(d.glob(pattern))]
        for path in files:
            logger.experiment.save(str(path), base_path=str(run_dir), policy="now")
        images = {str(p.relative_to(run_dir).with_suffix("")): wandb.Image(str(p)) for p in files if p.suffix == ".png"}
        if images:
            logger.experiment.log(images)


def scalars(payload: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves as flat keys (``test/metrics/ndcg@10/value`` -> ``test/ndcg@10``); the config is logged apart."""
    out: dict[str, float] = {}
    for key, value in payload.items():
        if key == "config" or key.startswith("_"):
            continue
        name = prefix if key in ("metrics", "value") else f"{prefix}/{key}" if prefix else key
        if isinstance(value, dict):
            out.update(scalars(value, name))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out
