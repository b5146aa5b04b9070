"""LightningModule: causal-LM loss on item tokens, validation by beam search (HR/NDCG, not loss alone)."""

from __future__ import annotations

import json
from typing import Any

import lightning as L
import torch
from transformers import get_cosine_schedule_with_warmup

from odllm.data.dataset import Example
from odllm.data.prompts import SeqRecEncoder
from odllm.eval.generation import ItemTrie, beam_search, rank_of, ranked_codes
from odllm.eval.metrics import RankMetrics, check_list_length


class SeqRecModule(L.LightningModule):
    """Trains ``model`` on batches of token ids; validates by constrained beam search over ``trie``.

    The checkpoint's ``hyper_parameters`` record every plain argument plus how the model was built (its class,
    its config as a dict and, under LoRA, the peft config), so a checkpoint says on its own what it holds; the
    live objects (model, encoder, trie) are rebuilt from the run's config and passed to ``load_from_checkpoint``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        encoder: SeqRecEncoder,
        trie: ItemTrie,
        pad_id: int,
        *,
        lr: float,
        weight_decay: float,
        warmup_ratio: float,
        num_beams: int,
        ks: tuple[int, ...] = (1, 5, 10),
    ):
        super().__init__()
        check_list_length(ks, num_beams)  # fail before training, not at the first validation
        # logger=False: the run logger already logs the whole resolved config; these are for the checkpoint
        self.save_hyperparameters(ignore=["model", "encoder", "trie"], logger=False)
        self.hparams.update(model_description(model))
        self.model, self.encoder, self.trie, self.pad_id = model, encoder, trie, pad_id
        self.lr, self.weight_decay, self.warmup_ratio = lr, weight_decay, warmup_ratio
        self.num_beams, self.ks = num_beams, tuple(ks)
        # a submodule, so Lightning moves it to the device; its counts are summed across processes in compute()
        self.val_metrics = RankMetrics(self.ks)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        if isinstance(batch, list):  # valid batches are Examples, encoded in validation_step
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def validation_step(self, batch: list[Example], batch_idx: int) -> None:
        prompts = [self.encoder.prompt(e.history) for e in batch]
        codes, scores = beam_search(self.model, prompts, self.trie, self.num_beams, self.pad_id)
        ranked = ranked_codes(codes, scores)
        ranks = [rank_of(self.encoder.item(e.target), r) for e, r in zip(batch, ranked, strict=True)]
        # beam_search makes its inputs on the model's device; the counts live there too (NCCL sums device tensors)
        self.val_metrics.update(torch.tensor(ranks, dtype=torch.long, device=self.val_metrics.counts.device))

    def on_validation_epoch_end(self) -> None:
        summary = self.val_metrics.compute()  # every process's users: torchmetrics sums the counts first
        self.val_metrics.reset()
        if not summary.users:
            return
        # the summed counts give every process the same values: sync_dist averages equal numbers
        for name, m in summary.metrics.items():
            self.log(f"val/{name}", m["value"], prog_bar=name == "ndcg@10", sync_dist=True)
        self.log("val/users", float(summary.users), sync_dist=True)

    def configure_optimizers(self):
        decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
            betas=(0.9, 0.98),
        )
        total = self.trainer.estimated_stepping_batches
        scheduler = get_cosine_schedule_with_warmup(optimizer, int(self.warmup_ratio * total), total)
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]


def model_description(model: torch.nn.Module) -> dict[str, Any]:
    """Plain values saying how ``model`` was built: its class, its config and, under LoRA, the peft config."""
    peft = getattr(model, "peft_config", None)
    base = model.get_base_model() if peft is not None else model
    config = getattr(base, "config", None)
    return {
        "model_class": type(base).__name__,
        "model_config": config.to_dict() if config is not None else None,
        "peft_config": None if peft is None else {name: _plain(c.to_dict()) for name, c in peft.items()},
    }


def _plain(values: dict) -> dict:
    """peft configs hold sets and enums: as lists and strings they load under ``torch.load(weights_only=True)``."""
    return json.loads(json.dumps(values, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
