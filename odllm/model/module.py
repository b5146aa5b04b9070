"""LightningModule: causal-LM loss on item tokens, validation by beam search (HR/NDCG, not loss alone)."""

from __future__ import annotations

import lightning as L
import torch
from transformers import get_cosine_schedule_with_warmup

from odllm.data.dataset import Example
from odllm.data.prompts import SeqRecEncoder
from odllm.eval.generation import ItemTrie, beam_search, rank_of, ranked_codes
from odllm.eval.metrics import ranking_metrics


class SeqRecModule(L.LightningModule):
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
        self.model, self.encoder, self.trie, self.pad_id = model, encoder, trie, pad_id
        self.lr, self.weight_decay, self.warmup_ratio = lr, weight_decay, warmup_ratio
        self.num_beams, self.ks = num_beams, tuple(ks)
        self._val_ranks: list[torch.Tensor] = []

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
        self._val_ranks.append(torch.tensor(ranks))

    def on_validation_epoch_end(self) -> None:
        ranks = torch.cat(self._val_ranks) if self._val_ranks else torch.zeros(0, dtype=torch.long)
        self._val_ranks.clear()
        if self.trainer.world_size > 1:
            ranks = self._gather(ranks)
        if not ranks.numel():
            return
        metrics = ranking_metrics(ranks, self.num_beams, self.ks)
        # every process holds every user's rank, so the values already agree: sync_dist averages equal numbers
        for name, m in metrics.items():
            self.log(f"val/{name}", m["value"], prog_bar=name == "ndcg@10", sync_dist=True)
        self.log("val/users", float(ranks.numel()), sync_dist=True)

    def _gather(self, ranks: torch.Tensor) -> torch.Tensor:
        """All processes' ranks (each user scored by exactly one process); shards differ in size by at most one,
        so they are padded with -1 for the collective and the padding dropped after it."""
        size = int(self.all_gather(torch.tensor(ranks.numel())).max())
        padded = torch.full((size,), -1, dtype=torch.long)
        padded[: ranks.numel()] = ranks
        gathered = self.all_gather(padded).reshape(-1)
        return gathered[gathered >= 0]

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
