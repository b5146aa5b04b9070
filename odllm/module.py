"""LightningModule: causal-LM loss on item tokens, validation by beam search (HR/NDCG, not loss alone)."""

from __future__ import annotations

import lightning as L
import torch
from transformers import get_cosine_schedule_with_warmup

from odllm.data import Example
from odllm.generation import ItemTrie, beam_search, rank_of, ranked_codes
from odllm.metrics import ranking_metrics
from odllm.prompts import SeqRecEncoder


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
        if not self._val_ranks:
            return
        metrics = ranking_metrics(torch.cat(self._val_ranks), self.num_beams, self.ks)
        self._val_ranks.clear()
        for name, m in metrics.items():
            self.log(f"val/{name}", m["value"], prog_bar=name == "ndcg@10")

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
