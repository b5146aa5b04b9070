"""compress.py: the latest trained model of the dataset (or ``model_dir``) -> compressed model + metrics."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from odllm import config
from odllm.compress.memory import resident_bytes
from odllm.compress.pipeline import compress_recommender, load_dense, should_stream
from odllm.compress.registry import build_algorithm
from odllm.eval.protocol import sample_test_users
from odllm.runner.loggers import log_results, run_logger

log = logging.getLogger(__name__)


def compress(cfg: DictConfig, output_dir: str | Path) -> dict:
    baseline_rss = resident_bytes()  # after the imports, before any data or weights: the streamed memory account
    config.check_compress(cfg)  # every value the run reads, before the dense model is loaded
    method = config.method_config(cfg)
    build_algorithm(method, cfg.ratio)  # bad settings, or a bad ratio for a low-rank method, fail before any work
    model_dir = config.model_dir(cfg)
    try:
        stream = should_stream(model_dir, cfg.get("stream", False), method)
    except ValueError as e:
        raise config.ConfigError(str(e)) from None
    if stream:
        log.info("stream: compressing %s one decoder layer at a time (the dense model is never resident)", model_dir)
    L.seed_everything(cfg.seed)
    device = config.device(cfg)
    dense, split = load_dense(model_dir, config.dataset_source(cfg), cfg.task.max_history,
                              allow_other_dataset=cfg.allow_other_dataset, device=device, stream=stream)
    job = config.compression_job(cfg)
    split, note = sample_test_users(split, job.eval.test_users, cfg.seed, job.eval.split)  # a seeded subset, or all
    job = dataclasses.replace(job, test_users_note=note, stream=stream, device=str(device), baseline_rss=baseline_rss)
    with run_logger(cfg, output_dir, "compress") as logger:
        payload = compress_recommender(dense, split, method, job, Path(output_dir))
        log_results(logger, payload, Path(output_dir))  # W&B also gets compression_report.json and the plots
    return payload
