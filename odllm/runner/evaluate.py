"""evaluate.py: score a saved model directory (dense or compressed) on the test split."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from odllm import config
from odllm.compress.saved import load_recommender
from odllm.data.dataset import leave_one_out, load_dataset
from odllm.eval.metrics import format_metrics
from odllm.eval.protocol import check_items, popularity_baseline, public, sample_test_users, score_examples
from odllm.files import write_json
from odllm.model.backbone import memory_summary
from odllm.model.recommender import check_dataset
from odllm.runner.loggers import log_results, run_logger
from odllm.versions import package_versions

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig, output_dir: str | Path) -> dict:
    """evaluate.py: score a saved model directory (dense or compressed) on the test split."""
    model_dir = config.model_dir(cfg)
    rec = load_recommender(model_dir, device=config.device(cfg))
    # provenance first (odllm.json names the training dataset), then item coverage (also for older models)
    check_dataset(rec.meta, model_dir, cfg.dataset.name, cfg.allow_other_dataset)
    split = leave_one_out(load_dataset(config.dataset_source(cfg)), cfg.task.max_history)
    check_items(rec.item_codes, split, model_dir, cfg.dataset.name)
    settings = config.eval_settings(cfg)
    split, note = sample_test_users(split, settings.test_users, cfg.seed, settings.split)  # a seeded subset, or all
    examples = split.test
    result = score_examples(rec.model, rec.encoder, rec.trie(), examples, settings, rec.tokenizer.pad_token_id)
    payload = {
        "dataset": cfg.dataset.name,
        "model_dir": str(model_dir),
        "model_dataset": rec.meta.get("trained_on_dataset", rec.meta.get("dataset")),  # what it was trained on
        "compression": rec.meta.get("compression"),  # method and ratio of a compressed model, None when dense
        "test_users": len(examples),
        "test_users_note": note,
        "test": public(result),
        "popularity": popularity_baseline(split, rec.encoder, examples, cfg.eval.ks),
        "resources": memory_summary(rec.model),
        "versions": package_versions(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    write_json(Path(output_dir) / "metrics.json", payload)
    log.info("test  %s", format_metrics(result["metrics"]))
    log.info("popularity  %s", format_metrics(payload["popularity"]))
    with run_logger(cfg, output_dir, "evaluate") as logger:
        log_results(logger, payload, Path(output_dir))
    return payload
