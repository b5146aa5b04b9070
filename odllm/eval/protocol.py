"""Test-time protocol shared by train.py, evaluate.py, compress.py and the benchmarks.

Every user is one test case (target = last item, history = up to ``max_history`` items before it), the
model ranks item codes by constrained beam search, and HR/NDCG come from the target's rank. A
most-popular-items ranking on the same split is reported beside it as a floor.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from odllm.data.batches import left_pad
from odllm.data.dataset import Example, Split
from odllm.data.items import ItemCodes
from odllm.data.prompts import SeqRecEncoder
from odllm.eval.generation import ItemTrie, model_device, recommend
from odllm.eval.metrics import ranking_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSettings:
    """How test users are scored (the ``eval`` config group)."""

    num_beams: int = 20
    batch_size: int = 32
    ks: tuple[int, ...] = (1, 5, 10)
    template: int = 0  # prompt template index
    progress: bool = True
    test_users: int | None = None  # a seeded random subset of this many test users (None = all): sample_test_users
    split: str = "test"  # which item of each user is scored: test (the last) or valid (the second-last)


SPLITS = ("test", "valid")  # eval.split choices


def sample_test_users(split: Split, users: int | None, seed: int, scored: str = "test") -> tuple[Split, str]:
    """``split`` with the examples to score in ``split.test``, ``users`` of them drawn with ``seed`` (all when None
    or not fewer than there are), and a note saying which. The draw is the compression benchmark's
    (``bench.test_users``), so both pick the same users.

    ``scored="valid"`` scores each user's second-last item instead of the last, for choosing settings without
    touching the test items: ``split.test`` then holds the valid examples (histories end before them) and
    ``split.valid`` is emptied, so nothing after them is seen (the popularity baseline counts training items only).
    """
    if scored not in SPLITS:
        raise ValueError(f"eval.split={scored!r}; choose one of {list(SPLITS)}")
    if scored == "valid":
        split = dataclasses.replace(split, test=split.valid, valid=[])
    if users is None or users >= len(split.test):
        return split, f"all {scored} users" + (" (their second-last items)" if scored == "valid" else "")
    note = f"a random subset of the {len(split.test)} {scored} users (seed {seed})"
    return dataclasses.replace(split, test=random.Random(seed).sample(split.test, users)), note


def score_examples(
    model,
    encoder: SeqRecEncoder,
    trie: ItemTrie,
    examples: Sequence[Example],
    settings: EvalSettings,
    pad_id: int,
    desc: str = "test",
) -> dict:
    """Beam-search ranking of ``examples`` -> metrics dict (values with standard errors)."""
    start = time.perf_counter()
    recs = recommend(
        model,
        [encoder.prompt(e.history, settings.template) for e in examples],
        [encoder.item(e.target) for e in examples],
        trie,
        num_beams=settings.num_beams,
        batch_size=settings.batch_size,
        pad_id=pad_id,
        progress=settings.progress,
        desc=desc,
    )
    return {
        "metrics": ranking_metrics(recs.ranks, settings.num_beams, settings.ks),
        "users": len(examples),
        "num_beams": settings.num_beams,
        "invalid_beams": recs.invalid_beams,
        "short_beams": recs.short_beams,
        "seconds": round(time.perf_counter() - start, 2),
        "_recommendations": recs,
    }


@torch.no_grad()
def fidelity(
    dense, compressed, encoder: SeqRecEncoder, examples: Sequence[Example], dense_top, compressed_top,
    *, template: int, batch_size: int, pad_id: int, top_k: int = 10,
) -> dict:
    """How close a compressed model stays to its dense parent on the test prompts.

    ``kl``: mean KL(dense || compressed) of the next-token distributions at the positions that predict the
    target's code tokens (teacher-forced); ``top10_overlap``: mean share of the dense model's top-10
    recommended items that the compressed model also recommends. Each model gets its inputs on its own device;
    the log-probabilities meet in float32 on the dense model's device.
    """
    dense.eval()
    compressed.eval()
    total_kl, positions = 0.0, 0
    depth = encoder.item_codes.code_length
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        ids, mask = left_pad([encoder.prompt(e.history, template) + encoder.item(e.target) for e in chunk], pad_id)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logp = []
        for m in (dense, compressed):
            device = model_device(m)
            logits = m(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device)).logits
            logp.append(torch.log_softmax(logits[:, -depth - 1 : -1].float(), -1).to(model_device(dense)))
        total_kl += (logp[0].exp() * (logp[0] - logp[1])).sum().item()
        positions += logp[0].shape[0] * depth
    overlap = [
        len(set(d[:top_k]) & set(c[:top_k])) / max(1, min(top_k, len(d)))
        for d, c in zip(dense_top, compressed_top, strict=True)
    ]
    return {"kl": total_kl / positions, "top10_overlap": sum(overlap) / len(overlap)}


def popularity_baseline(split: Split, encoder: SeqRecEncoder, examples: Sequence[Example], ks) -> dict:
    """Most popular codes among everything a test user could have seen (train items + valid targets)."""
    counts: Counter = Counter()
    for seq in split.train.values():
        counts.update(tuple(encoder.item(i)) for i in seq)
    counts.update(tuple(encoder.item(e.target)) for e in split.valid)
    length = max(ks)
    top = [code for code, _ in counts.most_common(length)]
    rank_of = {code: r + 1 for r, code in enumerate(top)}
    ranks = torch.tensor([rank_of.get(tuple(encoder.item(e.target)), 0) for e in examples])
    return ranking_metrics(ranks, length, ks)


def public(result: dict) -> dict:
    return {k: v for k, v in result.items() if not k.startswith("_")}


def check_items(item_codes: ItemCodes, split: Split, model_dir: Path, dataset: str) -> None:
    """Every item of the split must have a code in the model's index, else the model is for other data."""
    unknown = {i for seq in split.train.values() for i in seq} | {e.target for e in split.test}
    unknown -= item_codes.codes.keys()
    if unknown:
        raise ValueError(
            f"{len(unknown)} items of dataset={dataset} are not in the model's item index (e.g. "
            f"{sorted(unknown)[:5]}): the model at {model_dir} was trained on another dataset"
        )




