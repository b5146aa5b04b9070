"""train.py model=sasrec: fit SASRec on the LLM's split, keep the best epoch by valid NDCG@10, test by full ranking.

Writes the same ``metrics.json`` as the LLM run (test metrics with standard errors, popularity, train_seconds,
best_valid_ndcg@10, config), so the two sit side by side. The model is kept in the run directory
(``sasrec.pt`` and ``checkpoints/``), never in ``paths.models_dir``, where compress.py and evaluate.py look for
LLMs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from odllm import config
from odllm.data.dataset import leave_one_out, load_dataset
from odllm.eval.metrics import format_metrics, ranking_metrics
from odllm.eval.protocol import popularity_baseline
from odllm.files import write_json
from odllm.model.sasrec import ItemVocab, SASRecData, SASRecModule, SASRecSettings, example_tensors, target_ranks
from odllm.runner.history import ValidationHistory
from odllm.runner.loggers import log_results, run_logger

log = logging.getLogger(__name__)


class _ItemAsCode:
    """The popularity baseline counts codes; one item is one code here (as with atomic item tokens)."""

    @staticmethod
    def item(item: str) -> tuple[str]:
        return (item,)


def train_sasrec(cfg: DictConfig, output_dir: str | Path) -> dict:
    """Fit, test and report SASRec with the settings of ``cfg.model`` (conf/model/sasrec.yaml)."""
    if cfg.compress:
        raise ValueError(f"compress={cfg.compress} needs an LLM recommender; model=sasrec is a baseline: drop compress")
    output_dir = Path(output_dir)
    settings = SASRecSettings.from_mapping(config.plain(cfg.model))
    if cfg.model.get("window_stride") is None:  # the LLM's training windows (task.window_stride, else half)
        stride = cfg.task.window_stride or max(1, cfg.task.max_history // 2)
        settings = dataclasses.replace(settings, window_stride=stride)
    with run_logger(cfg, output_dir, "train") as logger:
        L.seed_everything(cfg.seed, workers=True)
        started = time.perf_counter()
        dataset = load_dataset(config.dataset_source(cfg))
        max_history = cfg.task.max_history
        split = leave_one_out(dataset, max_history)
        vocab = ItemVocab(dataset.items)
        ks = tuple(cfg.eval.ks)
        data = SASRecData(split.train, split.valid, vocab, max_history, settings, cfg.seed)
        module = SASRecModule(len(vocab), max_history, settings, ks)
        log.info("SASRec: %d items, %d training windows, %d targets, %d parameters", len(vocab),
                 len(data.windows), int(data.n_targets.sum()), sum(p.numel() for p in module.parameters()))
        checkpoint = ModelCheckpoint(dirpath=output_dir / "checkpoints", filename="best", monitor="val/ndcg@10",
                                     mode="max")
        history = ValidationHistory()
        trainer = L.Trainer(
            accelerator=cfg.trainer.accelerator,
            devices=1,  # a model this small gains nothing from more processes
            max_epochs=settings.max_epochs,
            precision=cfg.trainer.precision,
            callbacks=[checkpoint, history, EarlyStopping("val/ndcg@10", mode="max", patience=settings.patience)],
            logger=logger or False,
            default_root_dir=output_dir,
            reload_dataloaders_every_n_epochs=1,
            num_sanity_val_steps=0,
            enable_progress_bar=cfg.trainer.enable_progress_bar,
            log_every_n_steps=cfg.trainer.log_every_n_steps,
            deterministic=True,
        )
        trainer.fit(module, datamodule=data)
        fit_seconds = time.perf_counter() - started

        best = checkpoint.best_model_path
        module.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["state_dict"])
        module.eval()
        torch.save({"state_dict": module.net.state_dict(), "items": vocab.items, "settings": vars(settings),
                    "max_history": max_history}, output_dir / "sasrec.pt")
        tested = time.perf_counter()
        ids, lengths, targets = example_tensors(split.test, vocab, max_history)
        ranks = torch.cat([
            target_ranks(module.net, ids[i : i + settings.eval_batch_size], lengths[i : i + settings.eval_batch_size],
                         targets[i : i + settings.eval_batch_size])
            for i in range(0, len(ids), settings.eval_batch_size)
        ])
        metrics = ranking_metrics(ranks, len(vocab), ks)
        payload = {
            "dataset": cfg.dataset.name,
            "dataset_stats": vars(dataset.stats),
            "model_dir": str(output_dir),
            "model": {"kind": "sasrec", "parameters": sum(p.numel() for p in module.net.parameters())},
            "epochs_run": trainer.current_epoch,
            "train_seconds": round(fit_seconds, 1),
            "best_valid_ndcg@10": float(checkpoint.best_model_score or float("nan")),
            "best_checkpoint": str(best),
            "valid_by_epoch": history.epochs,
            "valid_users": len(split.valid),
            "test": {
                "metrics": metrics,
                "users": len(split.test),
                "ranking": "full: every item scored, seen items included, ties counted against the target",
                "seconds": round(time.perf_counter() - tested, 2),
            },
            "popularity": popularity_baseline(split, _ItemAsCode(), split.test, ks),
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        write_json(output_dir / "metrics.json", payload)
        log.info("test  %s", format_metrics(metrics))
        log.info("popularity  %s", format_metrics(payload["popularity"]))
        log_results(logger, payload, output_dir, step=trainer.global_step)
        return payload
