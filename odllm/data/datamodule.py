"""LightningDataModule for the seqrec task (plus item-text tasks, if any): training samples per epoch, valid
prompts for beam search.

Resume: the samples, templates and batch order of an epoch are drawn from ``seed + epoch`` and need no state;
the global random generators (dropout masks, the DataLoader's base seed) do. The module's ``state_dict`` carries
them in every Lightning checkpoint and ``load_state_dict`` puts them back, so a run resumed from ``last.ckpt``
continues with the very draws the uninterrupted run made (same weights, same losses at the same thread count).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
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

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint, at the moment it is written: the global generator states."""
        return {"rng_states": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """On resume, before the first resumed epoch draws anything; a checkpoint without states is left alone."""
        if "rng_states" in state_dict:
            set_rng_states(state_dict["rng_states"])

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


def rng_states() -> dict[str, Any]:
    """python, numpy and torch (CPU, and CUDA when present) generator states, as plain values and tensors."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
