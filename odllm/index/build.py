"""``python -m odllm.index dataset=ml-100k``: learn a collision-free item index and write it in LC-Rec's format.

Item embeddings (text, collaborative or SASRec's, :mod:`odllm.index.embeddings`) -> RQ-VAE (:mod:`odllm.index.rqvae`) ->
codes by nearest code on every level -> LC-Rec's uniform semantic mapping for items that still share a
code (their last level re-assigned by Sinkhorn, group by group, up to ``sinkhorn.rounds`` times) -> any
remaining ties told apart by one extra level (``<e_0>``, ``<e_1>``, ... within a group; ``<e_0>`` for every
other item), so every item has its own code and all codes have the same length, as TIGER does.

The index goes to ``<paths.indices_dir>/<name>.index.json`` (``{"item": ["<a_12>", "<b_3>", ...]}``) with a
report beside it; ``python train.py dataset.item_tokens=learned dataset.index=<name>`` trains with it.
"""

from __future__ import annotations

import dataclasses
import logging
import string
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from odllm.checks import INDEX_EMBEDDINGS, check_index, user_errors
from odllm.data.dataset import Dataset, DatasetSource, leave_one_out, load_dataset
from odllm.data.items import INDEX_SUFFIX
from odllm.files import write_json
from odllm.index.embeddings import collaborative_embeddings, sasrec_embeddings, text_embeddings
from odllm.index.rqvae import RQVAE, train_rqvae

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sinkhorn:
    """LC-Rec's uniform semantic mapping on the last level (epsilon 0 = nearest code only)."""

    epsilon: float = 0.003
    iters: int = 50
    rounds: int = 20  # re-assignments of items that still share a code


@dataclass(frozen=True)
class IndexSettings:
    """The ``index`` config group (conf/index.yaml says what each setting does)."""

    name: str | None = None
    embeddings: str = "auto"
    text: dict = field(default_factory=lambda: {"batch_size": 64, "max_length": 128})
    collaborative: dict = field(default_factory=lambda: {"dim": 64, "window": 5})
    sasrec: dict = field(default_factory=lambda: {"path": None})
    levels: int = 4
    codebook_size: int = 256
    latent_dim: int = 32
    hidden: list[int] = field(default_factory=lambda: [256, 128])  # encoder widths (the decoder mirrors them)
    beta: float = 0.25
    epochs: int = 300
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 1e-4
    kmeans_iters: int = 50
    sinkhorn: Sinkhorn = field(default_factory=Sinkhorn)
    progress: bool = True

    @classmethod
    def from_mapping(cls, values: Mapping) -> IndexSettings:
        values = dict(values)
        if "sinkhorn" in values:
            values["sinkhorn"] = Sinkhorn(**values["sinkhorn"])
        return cls(**values)


def embedding_source(source: str, dataset: Dataset) -> str:
    """``auto`` means text when every item has text, else collaborative."""
    missing = [i for i in dataset.items if not dataset.item_text.get(i)]
    if source == "auto":
        return "collaborative" if missing else "text"
    if source == "text" and missing:
        raise ValueError(
            f"index.embeddings=text: {len(missing)} of {len(dataset.items)} items of {dataset.name} have no text "
            f"(e.g. {missing[:5]}); use index.embeddings=collaborative"
        )
    if source not in INDEX_EMBEDDINGS:
        raise ValueError(f"unknown index.embeddings {source!r}; choose one of {', '.join(INDEX_EMBEDDINGS)}")
    return source


def item_embeddings(
    settings: IndexSettings, dataset: Dataset, source: str, max_history: int, seed: int
) -> torch.Tensor:
    items = dataset.items
    if source == "text":
        t = settings.text
        texts = [dataset.item_text[i] for i in items]
        return text_embeddings(texts, t["batch_size"], t["max_length"], settings.progress)
    train = leave_one_out(dataset, max_history).train  # never the valid/test targets
    if source == "sasrec":
        return sasrec_embeddings(settings.sasrec["path"], items, {i for seq in train.values() for i in seq})
    c = settings.collaborative
    return collaborative_embeddings(train, items, c["dim"], c["window"], seed)


def collision_groups(codes: torch.Tensor) -> list[list[int]]:
    """Rows that share their full code with another row, grouped by code."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for row, code in enumerate(codes.tolist()):
        groups[tuple(code)].append(row)
    return [g for g in groups.values() if len(g) > 1]


def collision_stats(codes: torch.Tensor) -> dict:
    groups = collision_groups(codes)
    colliding = sum(len(g) for g in groups)
    return {
        "colliding_items": colliding,
        "collision_rate": colliding / codes.shape[0],
        "distinct_codes": codes.shape[0] - colliding + len(groups),
        "largest_group": max((len(g) for g in groups), default=1),
    }


def uniform_mapping(model: RQVAE, x: torch.Tensor, codes: torch.Tensor, sinkhorn: Sinkhorn) -> torch.Tensor:
    """LC-Rec: re-assign the last level of each group of items sharing a code by Sinkhorn over that group."""
    codes = codes.clone()
    if sinkhorn.epsilon <= 0:
        return codes
    for _ in range(sinkhorn.rounds):
        groups = collision_groups(codes)
        if not groups:
            break
        for g in groups:
            codes[g] = model.codes(x[g], (sinkhorn.epsilon, sinkhorn.iters))
    return codes


def disambiguate(codes: torch.Tensor) -> torch.Tensor:
    """Append a level numbering the items within each group that shares a code (0 elsewhere); no-op without ties."""
    groups = collision_groups(codes)
    if not groups:
        return codes
    extra = torch.zeros(codes.shape[0], 1, dtype=codes.dtype)
    for g in groups:
        extra[g, 0] = torch.arange(len(g), dtype=codes.dtype)
    return torch.cat([codes, extra], dim=1)


def code_tokens(codes: torch.Tensor) -> list[list[str]]:
    """Level l, code c -> ``<{letter l}_{c}>``: ``<a_12>``, ``<b_3>``, ... as in LC-Rec's files."""
    if codes.shape[1] > len(string.ascii_lowercase):
        raise ValueError(f"at most {len(string.ascii_lowercase)} levels (one letter each), got {codes.shape[1]}")
    return [[f"<{string.ascii_lowercase[lvl]}_{c}>" for lvl, c in enumerate(row)] for row in codes.tolist()]


def build_index(
    ix: IndexSettings, data: DatasetSource, *, max_history: int, seed: int, indices_dir: str | Path,
    output_dir: str | Path,
) -> dict:
    """Embeds, trains, assigns and writes; returns the report (also written beside the index)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    torch.manual_seed(seed)
    # the index is what is being built: a dataset without its own X.index.json is fine here
    dataset = load_dataset(dataclasses.replace(data, require_index=False))
    items = dataset.items
    source = embedding_source(ix.embeddings, dataset)
    x = item_embeddings(ix, dataset, source, max_history, seed)
    embedded = time.perf_counter()

    sinkhorn_last = (ix.sinkhorn.epsilon, ix.sinkhorn.iters) if ix.sinkhorn.epsilon > 0 else None
    model = RQVAE(x.shape[1], list(ix.hidden), ix.latent_dim, ix.levels, ix.codebook_size, ix.beta)
    history = train_rqvae(
        model, x, epochs=ix.epochs, batch_size=ix.batch_size, lr=ix.lr, weight_decay=ix.weight_decay,
        kmeans_iters=ix.kmeans_iters, sinkhorn_last=sinkhorn_last, seed=seed, progress=ix.progress,
    )
    trained = time.perf_counter()
    model.eval()
    nearest = model.codes(x)
    mapped = uniform_mapping(model, x, nearest, ix.sinkhorn)
    final = disambiguate(mapped)
    name = ix.name or f"{dataset.name}-{source}"
    path = Path(indices_dir) / f"{name}{INDEX_SUFFIX}"
    write_json(path, dict(zip(items, code_tokens(final), strict=True)))

    report = {
        "dataset": dataset.name,
        "items": len(items),
        "index_file": str(path),
        "embeddings": {"source": source, "dim": x.shape[1], "zero_vectors": int((x.norm(dim=1) == 0).sum())},
        "code_length": final.shape[1],
        "levels": ix.levels,
        "codebook_size": ix.codebook_size,
        "reconstruction_loss": {"after_kmeans_init": history[0], "final": history[-1]},
        "collisions": {
            "nearest_code": collision_stats(nearest),
            "after_uniform_mapping": collision_stats(mapped),
            "written": collision_stats(final),
        },
        "codes_used_per_level": [len(torch.unique(final[:, lvl])) for lvl in range(final.shape[1])],
        "seconds": {
            "embeddings": round(embedded - started, 1),
            "rqvae": round(trained - embedded, 1),
            "total": round(time.perf_counter() - started, 1),
            "total_cpu": round(time.process_time() - cpu_started, 1),  # wall time is inflated on a shared machine
        },
        "config": dataclasses.asdict(ix),
    }
    write_json(path.with_name(f"{name}.report.json"), report)
    write_json(Path(output_dir) / "index_report.json", report)
    c = report["collisions"]
    log.info(
        "%s: %d items, %s embeddings; reconstruction loss %.4g -> %.4g; colliding items: nearest code %.2f%%, "
        "after uniform mapping %.2f%%, written %.2f%% (code length %d); codes used per level %s; %.0f s",
        dataset.name, len(items), source, history[0], history[-1],
        *(100 * c[k]["collision_rate"] for k in ("nearest_code", "after_uniform_mapping", "written")),
        final.shape[1], report["codes_used_per_level"], report["seconds"]["total"],
    )
    log.info("wrote %s; train with dataset.item_tokens=learned dataset.index=%s", path, name)
    return report


@hydra.main(version_base="1.3", config_path=str(Path(__file__).parents[2] / "conf"), config_name="index")
@user_errors
def main(cfg: DictConfig) -> None:
    check_index(cfg)
    build_index(
        IndexSettings.from_mapping(OmegaConf.to_container(cfg.index, resolve=True)),
        DatasetSource.from_mapping(OmegaConf.to_container(cfg.dataset, resolve=True)),
        max_history=cfg.task.max_history, seed=cfg.seed, indices_dir=cfg.paths.indices_dir,
        output_dir=HydraConfig.get().runtime.output_dir,
    )


if __name__ == "__main__":
    main()
