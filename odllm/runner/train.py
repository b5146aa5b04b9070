"""train.py: LC-Rec instruction tuning of a causal LM on the seqrec task, then test evaluation.

The best epoch (by valid NDCG@10) is restored, LoRA (if any) is merged, and the plain model is saved
with its tokenizer and item index at ``paths.models_dir/<dataset>`` so later steps find it by dataset name.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from odllm import config
from odllm.compress.pipeline import compress_recommender
from odllm.data.datamodule import SeqRecDataModule
from odllm.data.dataset import leave_one_out, load_dataset
from odllm.data.prompts import ItemTextEncoder, SeqRecEncoder, tokenizer_corpus
from odllm.eval.metrics import format_metrics
from odllm.eval.protocol import popularity_baseline, public, sample_test_users, score_examples
from odllm.files import write_json
from odllm.model.backbone import add_dropout, build_model, memory_summary, merge, parameter_summary
from odllm.model.module import SeqRecModule
from odllm.model.recommender import Recommender
from odllm.runner.history import ValidationHistory
from odllm.runner.loggers import log_results, run_logger, sweep_job
from odllm.runner.train_sasrec import train_sasrec
from odllm.versions import package_versions

log = logging.getLogger(__name__)


def train(cfg: DictConfig, output_dir: str | Path) -> dict:
    """train.py: fit, save and test the model (and compress it when ``compress=`` names a method), one logger."""
    config.check_train(cfg)  # every value the run reads, before any data is loaded
    if cfg.model.get("kind") == "sasrec":  # the SASRec baseline (conf/model/sasrec.yaml)
        return train_sasrec(cfg, output_dir)
    with run_logger(cfg, output_dir, "train") as logger:
        return _fit_and_test(cfg, Path(output_dir), logger)


def _fit_and_test(cfg: DictConfig, output_dir: Path, logger: Logger | None) -> dict:
    if cfg.compress:  # an unknown method fails before training, not after (check_train did ratio and the rest)
        config.method_config(cfg, cfg.compress)
    L.seed_everything(cfg.seed, workers=True)
    started = time.perf_counter()

    dataset = load_dataset(config.dataset_source(cfg))
    split = leave_one_out(dataset, cfg.task.max_history)
    item_codes = config.item_codes(cfg, dataset)
    if item_codes.collisions:
        log.info(
            "%d items share their full code with another item (%d distinct codes for %d items); "
            "a recommended code counts as a hit for every item that carries it",
            item_codes.collisions, item_codes.distinct_codes, len(item_codes.codes),
        )
    corpus = tokenizer_corpus(dataset.item_text, cfg.task.item_text)
    torch.manual_seed(cfg.seed)
    model, tokenizer = build_model(config.backbone_spec(cfg), item_codes, corpus)
    encoder = SeqRecEncoder(tokenizer, item_codes)
    log.info("model: %s", parameter_summary(model))
    dropout_hooks = add_dropout(model, cfg.model.dropout)

    valid = split.valid
    if cfg.train.val_users and cfg.train.val_users < len(valid):
        valid = random.Random(cfg.seed).sample(valid, cfg.train.val_users)
    vocab = model.get_output_embeddings().weight.shape[0]
    trie = Recommender.trie_for(encoder, vocab)
    datamodule = SeqRecDataModule(
        encoder,
        split,
        tokenizer.pad_token_id,
        mode=cfg.task.mode,
        max_history=cfg.task.max_history,
        window_stride=cfg.task.window_stride,
        batch_size=cfg.train.batch_size,
        valid_examples=valid,
        eval_batch_size=cfg.eval.batch_size,
        seed=cfg.seed,
        item_text=ItemTextEncoder(tokenizer, encoder, dataset.item_text, cfg.task.item_text.max_text_tokens),
        item_text_weights=cfg.task.item_text,
    )
    module = SeqRecModule(
        model,
        encoder,
        trie,
        tokenizer.pad_token_id,
        lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        warmup_ratio=cfg.train.warmup_ratio,
        num_beams=cfg.eval.num_beams,
        ks=tuple(cfg.eval.ks),
    )
    # a resumed run keeps writing beside the checkpoint it resumes: Lightning restores the best score only
    # for the same directory, and without it the best epoch before the stop could be lost
    checkpoints = Path(cfg.ckpt_path).parent if cfg.ckpt_path else output_dir / "checkpoints"
    checkpoint = ModelCheckpoint(dirpath=checkpoints, filename="best", monitor="val/ndcg@10", mode="max")
    # last.ckpt after every epoch from a callback of its own: Lightning 2.6's save_last writes it only when a new
    # best is saved, so a run killed after epochs that did not improve would resume from the best one
    latest = ModelCheckpoint(dirpath=checkpoints, filename="last")
    history = ValidationHistory()
    callbacks = [checkpoint, latest, history]
    if cfg.train.early_stopping_patience:
        callbacks.append(EarlyStopping("val/ndcg@10", mode="max", patience=cfg.train.early_stopping_patience))
    if cfg.train.ema_decay:
        # validation, checkpoints and the saved model all see the average, so early stopping and the best
        # epoch are judged on the weights that are kept
        callbacks.append(EMAWeightAveraging(decay=cfg.train.ema_decay))
    trainer = L.Trainer(
        # deterministic=True unless the trainer config says otherwise (trainer=gpu: "warn", see conf/trainer/gpu.yaml)
        **{"deterministic": True, **OmegaConf.to_container(cfg.trainer, resolve=True)},
        callbacks=callbacks,
        logger=logger or False,
        use_distributed_sampler=False,  # the datamodule shards batches itself, with no padded duplicates
        default_root_dir=output_dir,
        reload_dataloaders_every_n_epochs=1,
        num_sanity_val_steps=0,
    )
    if trainer.world_size > 1 and sweep_job() is not None:
        raise ValueError(
            "multi-process training cannot run inside a Hydra multirun (-m): Lightning relaunches train.py with the "
            "sweep's command line for every extra process; run the jobs one at a time (e.g. a shell loop)"
        )
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    if trainer.global_rank:  # DDP: the other processes stop after fit; rank 0 saves, tests and reports
        return {}
    fit_seconds = time.perf_counter() - started
    for hook in dropout_hooks:
        hook.remove()

    best = checkpoint.best_model_path or latest.best_model_path
    module.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["state_dict"])
    model = merge(module.model).to(trainer.strategy.root_device)  # Lightning hands the model back on the CPU
    meta = {
        "dataset": cfg.dataset.name,
        "item_tokens": item_codes.kind,
        "max_history": cfg.task.max_history,
        "best_valid_ndcg@10": float(checkpoint.best_model_score or float("nan")),
        "best_checkpoint": str(best),
    }
    recommender = Recommender(model, tokenizer, item_codes, meta)
    model_dir = recommender.save(config.model_dir(cfg))
    log.info("saved the trained model to %s", model_dir)

    settings = config.eval_settings(cfg)
    split, test_note = sample_test_users(split, settings.test_users, cfg.seed, settings.split)  # eval.test_users
    test = score_examples(model, encoder, trie, split.test, settings, tokenizer.pad_token_id)
    payload = {
        "dataset": cfg.dataset.name,
        "dataset_stats": vars(dataset.stats),
        "model_dir": str(model_dir),
        "model": parameter_summary(model),
        "epochs_run": trainer.current_epoch,
        "train_seconds": round(fit_seconds, 1),
        "best_valid_ndcg@10": meta["best_valid_ndcg@10"],
        "valid_by_epoch": history.epochs,
        "valid_users": len(valid),
        "test_users": len(split.test),
        "test_users_note": test_note,
        "test": public(test),
        "popularity": popularity_baseline(split, encoder, split.test, cfg.eval.ks),
        "resources": memory_summary(model),
        "versions": package_versions(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    write_json(output_dir / "metrics.json", payload)
    write_json(model_dir / "metrics.json", payload)
    log.info("test  %s", format_metrics(test["metrics"]))
    log.info("popularity  %s", format_metrics(payload["popularity"]))
    if cfg.compress:  # post-fit compression of the saved best model, same path as compress.py
        recommender.meta["model_dir"] = str(model_dir)
        method = config.method_config(cfg, cfg.compress)
        payload["compressed"] = compress_recommender(
            recommender, split, method, config.compression_job(cfg), output_dir / "compress"
        )
    log_results(logger, payload, output_dir, "compress", step=trainer.global_step)
    return payload
