"""LightningDataModule for the seqrec task: training samples per epoch, valid prompts for beam search."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from odllm.data import Example, Split
from odllm.prompts import IGNORE_INDEX, Sample, SeqRecEncoder, build_training_samples


class LengthGroupedBatches(Sampler[list[int]]):
    """Shuffled batches of similar-length samples: on a CPU every padding token is wasted time."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group: int = 50):
        self.lengths, self.batch_size, self.seed, self.group = lengths, batch_size, seed, group

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
        return iter(batches)

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)


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
    ):
        super().__init__()
        self.encoder, self.split, self.pad_id = encoder, split, pad_id
        self.mode, self.max_history, self.window_stride = mode, max_history, window_stride
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self.valid_examples = list(valid_examples)

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
        sampler = LengthGroupedBatches([len(s.input_ids) for s in samples], self.batch_size, self.seed + epoch)
        return DataLoader(samples, batch_sampler=sampler, collate_fn=lambda b: collate_right(b, self.pad_id))

    def val_dataloader(self) -> DataLoader:
        # Sorted by length so beam-search batches carry little padding.
        examples = sorted(self.valid_examples, key=lambda e: len(e.history))
        return DataLoader(examples, batch_size=self.eval_batch_size, collate_fn=list)
