"""LightningDataModule for the seqrec task (plus item-text tasks, if any): training samples per epoch, valid
prompts for beam search."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import lightning as L
from torch.utils.data import DataLoader

from odllm.data.batches import LengthGroupedBatches, collate_right
from odllm.data.dataset import Example, Split
from odllm.data.prompts import ItemTextEncoder, SeqRecEncoder, build_item_text_samples, build_training_samples


class SeqRecDataModule(L.LightningDataModule):
    def __init__(
        self,
        encoder: SeqRecEncoder,
        split: Split,
        pad_id: int,
        *,
        mode: str,
        max_history: int,
        window_stride: int | None,
        batch_size: int,
        valid_examples: Sequence[Example],
        eval_batch_size: int,
        seed: int,
        item_text: ItemTextEncoder | None = None,
        item_text_weights: Mapping[str, float] | None = None,
    ):
        super().__init__()
        self.encoder, self.split, self.pad_id = encoder, split, pad_id
        self.mode, self.max_history, self.window_stride = mode, max_history, window_stride
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self.valid_examples = list(valid_examples)
        self.item_text, self.item_text_weights = item_text, item_text_weights or {}

    def train_dataloader(self) -> DataLoader:
        # Templates are redrawn every epoch (the trainer reloads this loader each epoch).
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        samples = build_training_samples(
            self.encoder,
            self.split.train,
            mode=self.mode,
            max_history=self.max_history,
            stride=self.window_stride,
            seed=self.seed + epoch,
        )
        if self.item_text is not None:  # mixed in: the length-grouped shuffle spreads them over the epoch
            samples += build_item_text_samples(self.item_text, self.item_text_weights, seed=self.seed + epoch)
        sampler = LengthGroupedBatches(
            [len(s.input_ids) for s in samples], self.batch_size, self.seed + epoch, rank=self.rank, world=self.world
        )
        return DataLoader(samples, batch_sampler=sampler, collate_fn=lambda b: collate_right(b, self.pad_id))

    def val_dataloader(self) -> DataLoader:
        # Sorted by length so beam-search batches carry little padding; under DDP every process scores every
        # world-th user, each user exactly once (a DistributedSampler would pad with repeated users).
        examples = sorted(self.valid_examples, key=lambda e: len(e.history))[self.rank :: self.world]
        return DataLoader(examples, batch_size=self.eval_batch_size, collate_fn=list)

    @property
    def rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    @property
    def world(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1
