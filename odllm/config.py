"""The Hydra config, read once: the entry points (runner, bench) turn it into the plain values and small
dataclasses that the library wings take, so a function's inputs show in its signature."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from odllm.compress.pipeline import Calibration, CompressionJob
from odllm.compress.registry import algorithm_name
from odllm.data.dataset import Dataset, DatasetSource
from odllm.data.items import ItemCodes, item_codes_for
from odllm.eval.protocol import EvalSettings
from odllm.model.artifacts import dense_model_dir
from odllm.model.backbone import BackboneSpec

CONF_DIR = Path(__file__).parents[1] / "conf"  # the repository's Hydra configs


def plain(node: DictConfig) -> dict:
    return OmegaConf.to_container(node, resolve=True)


def dataset_source(cfg: DictConfig) -> DatasetSource:
    return DatasetSource.from_mapping(plain(cfg.dataset))


def eval_settings(cfg: DictConfig) -> EvalSettings:
    e = cfg.eval
    return EvalSettings(num_beams=e.num_beams, batch_size=e.batch_size, ks=tuple(e.ks), template=e.template,
                        progress=e.progress)


def backbone_spec(cfg: DictConfig) -> BackboneSpec:
    return BackboneSpec.from_mapping(plain(cfg.model))


def item_codes(cfg: DictConfig, dataset: Dataset) -> ItemCodes:
    return item_codes_for(dataset, cfg.dataset.item_tokens, cfg.dataset.get("index"), cfg.paths.indices_dir)


def model_dir(cfg: DictConfig) -> Path:
    """The dense model of the dataset: ``model_dir`` when given, else ``<paths.models_dir>/<dataset>``."""
    return dense_model_dir(cfg.paths.models_dir, cfg.dataset.name, cfg.get("model_dir"))


def compression_job(cfg: DictConfig) -> CompressionJob:
    c = cfg.calibration
    return CompressionJob(
        dataset=cfg.dataset.name,
        models_dir=cfg.paths.models_dir,
        ratio=cfg.ratio,
        seed=cfg.seed,
        max_history=cfg.task.max_history,
        window_stride=cfg.task.window_stride,
        calibration=Calibration(size=c.size, batch_size=c.batch_size, tokens=c.tokens),
        eval=eval_settings(cfg),
        config=plain(cfg),
    )


def method_config(cfg: DictConfig, name: str | None = None) -> dict:
    """The ``method`` group entry, or ``conf/method/<name>.yaml`` when train.py names one in ``compress=``;
    its algorithm is checked here, so a bad method fails before any training or calibration."""
    if name is None or name == cfg.method.name:
        method = cfg.method
    else:
        path = CONF_DIR / "method" / f"{name}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
            raise ValueError(f"unknown compression method {name!r}; choose one of {known}")
        method = OmegaConf.load(path)
    method = plain(method)
    algorithm_name(method)
    return method
