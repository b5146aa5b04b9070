"""SASRec (Kang & McAuley, ICDM 2018) as RecBole 1.2.1 builds it, trained and scored in odllm's harness.

Why here: the baseline a user would pick instead of an LLM recommender, on the same leave-one-out ``Split``,
the same history length and the same metric code (:class:`odllm.eval.metrics.RankMetrics`), so its rows sit
beside the LLM's with nothing but the model changed.

Defaults follow RecBole 1.2.1 (the wheel's ``recbole/properties/model/SASRec.yaml`` and ``overall.yaml``):
2 blocks, hidden 64, 2 heads, inner size 256, GELU (erf), hidden and attention dropout 0.5, layer-norm eps
1e-12, normal(0, 0.02) init, post-LN blocks (BERT style, as RecBole's ``TransformerEncoder``), learned
absolute positions counted from the first item of the (right-padded) history, input and output item
embeddings tied, CE loss over all items, Adam lr 1e-3, no weight decay, no gradient clipping, batches of
2048 training targets, ``MAX_ITEM_LIST_LENGTH`` 50 (here ``task.max_history``), ``stopping_step`` 10 (here on
valid NDCG@10, as the issue asks; RecBole's default ``valid_metric`` is MRR@10), at most 300 epochs.

Training samples: RecBole's data augmentation makes one sample per (prefix of at most ``max_history`` items,
next item). One causal pass over a window of items gives the same loss for every target whose prefix starts
at the window's first item (positions count from there in both). Windows come from
:func:`odllm.data.prompts.training_windows`; ``window_stride=1`` reproduces RecBole's samples exactly (the
first window of a user carries its first ``max_history`` targets, every later target gets its own window with
its full history); a larger stride trains the same targets once each per epoch at less cost, some of them with
a shorter history (at least ``max_history + 1 - stride`` items).

Scoring: full ranking over every item (seen items are not excluded, as RecBole does for sequential models);
the target's 1-based rank is 1 + the number of other items scoring at least as high (ties count against the
target, pessimistic; RecBole takes ``torch.topk``'s order, which is arbitrary among ties).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from odllm.checks import settings_from
from odllm.data.dataset import Example
from odllm.data.prompts import training_windows
from odllm.eval.metrics import RankMetrics

PAD = 0  # item index 0 pads histories; items are 1..n_items


@dataclass(frozen=True)
class SASRecSettings:
    """The ``model=sasrec`` config entry (conf/model/sasrec.yaml)."""

    n_layers: int = 2
    n_heads: int = 2
    hidden_size: int = 64
    inner_size: int = 256
    hidden_dropout: float = 0.5
    attn_dropout: float = 0.5
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 2048  # training targets per batch (RecBole: samples per batch)
    eval_batch_size: int = 4096
    max_epochs: int = 300
    patience: int = 10  # epochs without a better valid NDCG@10 (RecBole's stopping_step)
    window_stride: int = 1  # 1 = RecBole's per-prefix samples exactly; see the module docstring (the runner
    # passes task.window_stride, the LLM's windows, when the config leaves it null)

    @classmethod
    def from_mapping(cls, values: Mapping) -> SASRecSettings:
        return settings_from(cls, values, skip_none=True)


class Block(nn.Module):
    """RecBole's ``TransformerLayer``: attention and feed-forward, each dropout -> residual -> LayerNorm."""

    def __init__(self, s: SASRecSettings):
        super().__init__()
        if s.hidden_size % s.n_heads:
            raise ValueError(f"model.hidden_size={s.hidden_size} must be a multiple of model.n_heads={s.n_heads}")
        self.heads, self.attn_dropout = s.n_heads, s.attn_dropout
        self.qkv = nn.Linear(s.hidden_size, 3 * s.hidden_size)
        self.out = nn.Linear(s.hidden_size, s.hidden_size)
        self.norm1 = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)
        self.ff = nn.Sequential(
            nn.Linear(s.hidden_size, s.inner_size), nn.GELU(), nn.Linear(s.inner_size, s.hidden_size)
        )
        self.norm2 = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)
        self.dropout = nn.Dropout(s.hidden_dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        p = self.attn_dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        x = self.norm1(x + self.dropout(self.out(a.transpose(1, 2).reshape(b, t, h))))
        return self.norm2(x + self.dropout(self.ff(x)))


class SASRec(nn.Module):
    """Item ids (right-padded with 0) -> one hidden state per position; scores are dot products with the
    (tied) item embeddings."""

    def __init__(self, n_items: int, max_len: int, s: SASRecSettings):
        super().__init__()
        self.items = nn.Embedding(n_items + 1, s.hidden_size, padding_idx=PAD)
        self.positions = nn.Embedding(max_len, s.hidden_size)
        self.norm = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)
        self.dropout = nn.Dropout(s.hidden_dropout)
        self.blocks = nn.ModuleList(Block(s) for _ in range(s.n_layers))
        self.apply(lambda m: _init(m, s.initializer_range))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.dropout(self.norm(self.items(ids) + self.positions(torch.arange(t, device=ids.device))))
        causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
        mask = (causal & (ids != PAD)[:, None, None, :])  # [B, 1, T, T]: earlier, non-padding items
        for block in self.blocks:
            x = block(x, mask)
        return x

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over index 0..n_items (0 is padding; CE keeps it as a class, as RecBole does)."""
        return hidden @ self.items.weight.T


def _init(m: nn.Module, std: float) -> None:
    """RecBole's ``_init_weights`` (the padding row is drawn too, as there)."""
    if isinstance(m, nn.Linear | nn.Embedding):
        m.weight.data.normal_(0.0, std)
    if isinstance(m, nn.Linear) and m.bias is not None:
        m.bias.data.zero_()
    if isinstance(m, nn.LayerNorm):
        m.weight.data.fill_(1.0)
        m.bias.data.zero_()


class SASRecModule(L.LightningModule):
    """CE over all items at every target position; validation by full ranking (valid NDCG@10 picks the epoch)."""

    def __init__(self, n_items: int, max_history: int, settings: SASRecSettings, ks: Sequence[int] = (1, 5, 10)):
        super().__init__()
        self.save_hyperparameters({"n_items": n_items, "max_history": max_history, "ks": list(ks),
                                   **dataclasses.asdict(settings)}, logger=False)
        self.settings, self.max_history, self.ks = settings, max_history, tuple(ks)
        self.net = SASRec(n_items, max_history, settings)
        self.val_metrics = RankMetrics(self.ks)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids, labels = batch
        hidden = self.net(ids)
        keep = labels != PAD  # only target positions reach the (costly) output layer
        loss = F.cross_entropy(self.net.scores(hidden[keep]), labels[keep])
        self.log("train/loss", loss, prog_bar=True, batch_size=int(keep.sum()))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.val_metrics.update(target_ranks(self.net, *batch))

    def on_validation_epoch_end(self) -> None:
        summary = self.val_metrics.compute()
        self.val_metrics.reset()
        for name, m in summary.metrics.items():
            self.log(f"val/{name}", m["value"], prog_bar=name == "ndcg@10")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.settings.lr, weight_decay=self.settings.weight_decay)


@torch.no_grad()
def target_ranks(net: SASRec, ids: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank of each target among all items (pessimistic on ties), from right-padded histories."""
    hidden = net(ids)[torch.arange(len(ids)), lengths - 1]
    scores = net.scores(hidden)
    scores[:, PAD] = float("-inf")
    own = scores.gather(1, targets[:, None])
    return (scores >= own).sum(1)  # counts the target itself: rank 1 when nothing else scores as high


class ItemVocab:
    """Item id <-> index 1..n (0 pads)."""

    def __init__(self, items: Sequence[str]):
        self.items = list(items)
        self.index = {item: i + 1 for i, item in enumerate(self.items)}

    def __len__(self) -> int:
        return len(self.items)

    def encode(self, items: Sequence[str]) -> list[int]:
        return [self.index[i] for i in items]


def window_tensors(train: Mapping[str, Sequence[str]], vocab: ItemVocab, max_history: int, stride: int):
    """Right-padded inputs and labels (0 = no loss there) of every training window, [W, max_history] each."""
    inputs, labels = [], []
    for seq in train.values():
        ids = vocab.encode(seq)
        for start, end, n_targets in training_windows(ids, max_history, stride):
            window = ids[start:end]
            x, y = window[:-1], window[1:]
            y = [PAD] * (len(y) - n_targets) + y[len(y) - n_targets :]
            inputs.append(x + [PAD] * (max_history - len(x)))
            labels.append(y + [PAD] * (max_history - len(y)))
    return torch.tensor(inputs, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def example_tensors(examples: Sequence[Example], vocab: ItemVocab, max_history: int):
    """Right-padded histories, their lengths and the target indices."""
    ids = torch.zeros(len(examples), max_history, dtype=torch.long)
    lengths = torch.tensor([len(e.history[-max_history:]) for e in examples], dtype=torch.long)
    for row, e in enumerate(examples):
        h = vocab.encode(e.history[-max_history:])
        ids[row, : len(h)] = torch.tensor(h)
    return ids, lengths, torch.tensor(vocab.encode([e.target for e in examples]), dtype=torch.long)


def target_batches(n_targets: torch.Tensor, batch_size: int, seed: int) -> list[list[int]]:
    """Shuffled windows grouped so that each batch holds about ``batch_size`` targets (RecBole's batch unit)."""
    order = list(range(len(n_targets)))
    random.Random(seed).shuffle(order)
    batches, current, count = [], [], 0
    for i in order:
        current.append(i)
        count += int(n_targets[i])
        if count >= batch_size:
            batches.append(current)
            current, count = [], 0
    if current:
        batches.append(current)
    return batches


class SASRecData(L.LightningDataModule):
    """Training windows of ``split.train`` (reshuffled every epoch) and valid examples, as tensors."""

    def __init__(self, train: Mapping[str, Sequence[str]], valid: Sequence[Example], vocab: ItemVocab,
                 max_history: int, settings: SASRecSettings, seed: int):
        super().__init__()
        self.windows = TensorDataset(*window_tensors(train, vocab, max_history, settings.window_stride))
        self.n_targets = (self.windows.tensors[1] != PAD).sum(1)
        self.valid = TensorDataset(*example_tensors(valid, vocab, max_history))
        self.batch_size, self.eval_batch_size, self.seed = settings.batch_size, settings.eval_batch_size, seed

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        batches = target_batches(self.n_targets, self.batch_size, self.seed + epoch)
        return DataLoader(self.windows, batch_sampler=batches)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.valid, batch_size=self.eval_batch_size)


def check_not_sasrec(kind: str | None, job: str) -> None:
    """Compression and beam-search evaluation are for LLM recommenders; SASRec is scored in train.py."""
    if kind == "sasrec":
        raise ValueError(
            f"{job} works on LLM recommenders; model=sasrec is a baseline that train.py trains and tests in one "
            "run (see its metrics.json). Drop model=sasrec (and compress=) to compress or evaluate an LLM"
        )
