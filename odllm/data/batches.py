"""Training samples and how they become tensors: padding, collation and length-grouped batches."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler

IGNORE_INDEX = -100


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[B, T]``, padded on the left, on ``device`` (that of the model they meet;
    None = the CPU). Built on the CPU and moved in one copy per tensor, not one per row."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask


def collate_right(
    samples: Sequence[Sample], pad_id: int, device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        ids[row, :n] = torch.tensor(s.input_ids)
        labels[row, :n] = torch.tensor(s.labels)
        mask[row, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return batch if device is None else {k: v.to(device) for k, v in batch.items()}


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
