"""LightningDataModule for the seqrec task (plus item-text tasks, if any): training samples per epoch, valid
prompts for beam search."""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from odllm.data import Example, Split
from odllm.prompts import (
    IGNORE_INDEX,
    ItemTextEncoder,
    Sample,
    SeqRecEncoder,
    build_item_text_samples,
    build_training_samples,
)


class LengthGroupedBatches(Sampler[list[int]]):
    """Shuffled batches of similar-length samples: on a CPU every padding token is wasted time.

    Under DDP (``world`` processes) ``batch_size`` stays the global batch and process ``rank`` takes every
    ``world``-th sample of each batch, so the steps and the learning-rate schedule are the single-process ones;
    a last batch smaller than ``world`` is dropped, since every process must take the same number of steps.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group: int = 50, rank: int = 0,
                 world: int = 1):
        self.lengths, self.batch_size, self.seed, self.group = lengths, batch_size, seed, group
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        span = self.batch_size * self.group
        batches = []
        for i in range(0, len(order), span):
            chunk = sorted(order[i : i + span], key=lambda j: self.lengths[j])
            batches += [chunk[k : k + self.batch_size] for k in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        return iter([b[self.rank :: self.world] for b in batches if len(b) >= self.world])

    def __len__(self) -> int:
        short = 0 < len(self.lengths) % self.batch_size < self.world  # only the very last batch can be short
        return -(-len(self.lengths) // self.batch_size) - short


def collate_right(samples: Sequence[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        ids[row, :n] = torch.tensor(s.input_ids)
        labels[row, :n] = torch.tensor(s.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


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
