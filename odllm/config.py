"""The Hydra config, read once: the entry points (runner, bench) turn it into the plain values and small
dataclasses that the library wings take, so a function's inputs show in its signature.

Each entry point first calls its ``check_*`` here, which checks every config value it uses (types, ranges and
cross-field rules such as eval.num_beams >= max(eval.ks)) before any data is read or any model built; the
primitives, :class:`ConfigError` and the sections shared with the lower wings' mains live in :mod:`odllm.checks`."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from odllm.checks import (  # noqa: F401 (ConfigError: the config layer's error, re-exported)
    ConfigError,
    boolean,
    check_dataset,
    check_seed,
    check_task,
    choice,
    int_list,
    integer,
    number,
    text,
)
from odllm.compress.pipeline import Calibration, CompressionJob
from odllm.compress.quant import KERNEL_MODES
from odllm.compress.registry import algorithm_name
from odllm.data.dataset import Dataset, DatasetSource
from odllm.data.items import ItemCodes, item_codes_for
from odllm.data.prompts import SEQREC_TEMPLATES
from odllm.eval.protocol import SPLITS, EvalSettings
from odllm.model.artifacts import dense_model_dir
from odllm.model.backbone import TRAINING_DTYPES, BackboneSpec
from odllm.model.sasrec import check_not_sasrec

CONF_DIR = Path(__file__).parents[1] / "conf"  # the repository's Hydra configs


def plain(node: DictConfig) -> dict:
    return OmegaConf.to_container(node, resolve=True)


def dataset_source(cfg: DictConfig) -> DatasetSource:
    return DatasetSource.from_mapping(plain(cfg.dataset))


def eval_settings(cfg: DictConfig) -> EvalSettings:
    e = cfg.eval
    return EvalSettings(num_beams=e.num_beams, batch_size=e.batch_size, ks=tuple(e.ks), template=e.template,
                        progress=e.progress, test_users=e.get("test_users"), split=e.get("split", "test"))


def device(cfg: DictConfig) -> torch.device:
    """``device``: auto = the first CUDA GPU when there is one, else the CPU; or cpu, cuda, cuda:N, mps."""
    name = cfg.get("device") or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
        evaluate=cfg.get("compress_eval", True),
    )


def method_config(cfg: DictConfig, name: str | None = None) -> dict:
    """The ``method`` group entry, or ``conf/method/<name>.yaml`` when train.py names one in ``compress=``;
    its algorithm is checked here, so a bad method fails before any training or calibration."""
    method = cfg.method if name is None or name == cfg.method.name else load_method(name)
    method = plain(method)
    algorithm_name(method)
    return method


def load_method(name: str) -> DictConfig:
    """``conf/method/<name>.yaml`` as Hydra composes it for ``method=<name>``: the method configs its ``defaults``
    list names merged in order, the file's own keys at ``_self_`` (last when not listed), so a combination such
    as odllm_alloc_heal inherits its parts instead of copying them."""
    path = CONF_DIR / "method" / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
        raise ValueError(f"unknown compression method {name!r}; choose one of {known}")
    own = OmegaConf.load(path)
    defaults = list(own.pop("defaults", []))
    if any(not isinstance(entry, str) for entry in defaults):
        raise ValueError(f"{path}: a method's defaults list may only name other method configs, got {defaults}")
    if "_self_" not in defaults:
        defaults.append("_self_")
    return OmegaConf.merge(*(own if entry == "_self_" else load_method(entry) for entry in defaults))


# ------------------------------------------------------------------------------ checks, one per entry point
RATIO_MEANS = "ratio is the fraction of decoder-linear parameters kept"


def check_train(cfg: DictConfig) -> None:
    """train.py: every key the training run reads (and compress= adds), before any data is loaded."""
    check_seed(cfg)
    check_dataset(cfg)
    check_task(cfg)
    check_eval(cfg)
    check_logger(cfg)
    integer(cfg, "trainer.max_epochs", 1, 10)
    ckpt = text(cfg, "ckpt_path", "outputs/train/ml-100k/<time>/checkpoints/last.ckpt", optional=True)
    if ckpt is not None and not Path(ckpt).is_file():
        raise ConfigError(f"ckpt_path={ckpt!r} is not a file: pass a checkpoint a training run wrote, e.g. "
                          "ckpt_path=outputs/train/ml-100k/<time>/checkpoints/last.ckpt")
    if cfg.model.get("kind") == "sasrec":  # the SASRec baseline reads its own model.* keys
        return
    if cfg.model.get("dtype") is not None:
        choice(cfg, "model.dtype", TRAINING_DTYPES)
    number(cfg, "model.dropout", 0, 1, 0.1, closed="[)")
    number(cfg, "train.lr", 0, None, 2e-3, closed="(]")
    number(cfg, "train.weight_decay", 0, None, 0.01)
    number(cfg, "train.warmup_ratio", 0, 1, 0.05, closed="[)")
    integer(cfg, "train.batch_size", 1, 32)
    integer(cfg, "train.val_users", 1, 2000, optional=True)
    integer(cfg, "train.early_stopping_patience", 0, 5, optional=True)
    number(cfg, "train.ema_decay", 0, 1, 0.995, closed="()", optional=True)
    integer(cfg, "trainer.log_every_n_steps", 1, 20)
    number(cfg, "trainer.gradient_clip_val", 0, None, 1.0, optional=True)
    if text(cfg, "compress", "odllm", optional=True) is not None:
        check_ratio(cfg)
        check_calibration(cfg)


def check_compress(cfg: DictConfig) -> None:
    """compress.py: every key the compression run reads, before the dense model is loaded."""
    check_not_sasrec(cfg.model.get("kind"), "compress.py")
    check_seed(cfg)
    check_dataset(cfg)
    integer(cfg, "task.window_stride", 1, 10, optional=True)
    check_eval(cfg)
    check_logger(cfg)
    check_ratio(cfg)
    check_calibration(cfg)
    text(cfg, "model_dir", "models/ml-100k", optional=True)
    check_device(cfg)
    if cfg.get("compress_eval") is not None:
        boolean(cfg, "compress_eval")
    if cfg.get("stream") is not None:
        choice(cfg, "stream", ("auto", True, False))  # layer-streamed compression (odllm.compress.streamed)


def check_evaluate(cfg: DictConfig) -> None:
    """evaluate.py: the keys the evaluation reads, before the model is loaded."""
    check_not_sasrec(cfg.model.get("kind"), "evaluate.py")
    check_dataset(cfg)
    check_eval(cfg)
    check_logger(cfg)
    text(cfg, "model_dir", "models/ml-100k", optional=True)
    check_device(cfg)


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device(cfg: DictConfig) -> None:
    """``device``: auto, cpu, cuda, cuda:N or mps; a GPU that is not there is an error, not a silent CPU run."""
    name = text(cfg, "device", "auto", optional=True) or "auto"
    if not DEVICE.fullmatch(name):
        raise ConfigError(f"device={name!r} is not auto, cpu, cuda, cuda:N or mps, e.g. device=auto")
    if name.startswith("cuda"):
        index = int(name.partition(":")[2] or 0)
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name} but torch finds no CUDA GPU (torch {torch.__version__}, "
                              f"CUDA build: {torch.version.cuda}); use device=cpu or device=auto")
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device={name} but only {torch.cuda.device_count()} CUDA GPU(s) are visible; "
                              f"use device=cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device=mps but the MPS backend is not available; use device=cpu or device=auto")


def check_benchmark(cfg: DictConfig) -> None:
    """python -m odllm.bench.compression: compress.py's keys with ``bench.*`` in place of ``ratio`` and ``method``."""
    check_seed(cfg)
    check_dataset(cfg)
    integer(cfg, "task.window_stride", 1, 10, optional=True)
    check_eval(cfg)
    check_calibration(cfg)
    text(cfg, "model_dir", "models/ml-100k", optional=True)
    methods = value_list(cfg, "bench.methods", "[odllm,svd]")
    for name in methods:
        if not isinstance(name, str):
            raise ConfigError(f"bench.methods holds {name!r}: list method names, e.g. 'bench.methods=[odllm,svd]'")
        method_config(cfg, name)
    for i, _ in enumerate(value_list(cfg, "bench.ratios", "[0.3,0.5]")):
        number(cfg, f"bench.ratios.{i}", 0, 1, 0.5, closed="(]", why=RATIO_MEANS)
    if cfg.bench.embeddings is not None:
        for i, _ in enumerate(value_list(cfg, "bench.embeddings", "[null,int8]")):
            choice(cfg, f"bench.embeddings.{i}", (None, "int8"))
    integer(cfg, "bench.test_users", 1, 1000, optional=True)
    boolean(cfg, "bench.resume")
    text(cfg, "bench.out", "outputs/benchmarks/ml-100k-compression")


def check_inference(cfg: DictConfig) -> None:
    """python -m odllm.bench.inference: its keys (conf/inference.yaml) and the eval/dataset keys it reads."""
    check_seed(cfg)
    check_dataset(cfg)
    integer(cfg, "eval.num_beams", 1, 20)
    integer(cfg, "eval.template", 0, 0, maximum=len(SEQREC_TEMPLATES) - 1)
    for i in range(len(value_list(cfg, "models", "[odllm-r0.5]"))):
        text(cfg, f"models.{i}", "odllm-r0.5")
    for key, low, example in (("threads", 1, 2), ("repeats", 1, 5), ("warmup", 0, 3), ("latency_users", 1, 32),
                              ("throughput_users", 1, 128), ("batch_size", 1, 32), ("top_k", 1, 10),
                              ("profile_users", 1, 8)):
        integer(cfg, key, low, example)
    sizes = cfg.batch_sizes or {}
    if not isinstance(sizes, DictConfig | dict) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes.values()
    ):
        raise ConfigError(f"batch_sizes={sizes!r} must map model labels to whole numbers >= 1, "
                          "e.g. 'batch_sizes={dense: 32}'")
    choice(cfg, "fuse", (False, True, "both"))
    choice(cfg, "kernels", (*KERNEL_MODES, None))
    boolean(cfg, "profile")
    text(cfg, "out", "outputs/benchmarks/ml-100k-inference")
    if cfg.top_k > cfg.eval.num_beams:
        raise ConfigError(f"top_k={cfg.top_k} is larger than eval.num_beams={cfg.eval.num_beams}: beam search returns "
                          f"at most num_beams items, e.g. eval.num_beams={max(20, cfg.top_k)}")


def check_ratio(cfg: DictConfig) -> None:
    number(cfg, "ratio", 0, 1, 0.5, closed="(]", why=RATIO_MEANS)


def check_calibration(cfg: DictConfig) -> None:
    integer(cfg, "calibration.size", 1, 256)
    integer(cfg, "calibration.batch_size", 1, 16)
    choice(cfg, "calibration.tokens", ("items", "all"))


def check_eval(cfg: DictConfig) -> None:
    """``eval.*``: beam search returns ``num_beams`` items, so it must reach the largest cut-off K."""
    beams = integer(cfg, "eval.num_beams", 1, 20)
    integer(cfg, "eval.batch_size", 1, 32)
    ks = int_list(cfg, "eval.ks", 1, "[1,5,10]")
    integer(cfg, "eval.template", 0, 0, maximum=len(SEQREC_TEMPLATES) - 1)
    boolean(cfg, "eval.progress")
    integer(cfg, "eval.test_users", 1, 200, optional=True)
    choice(cfg, "eval.split", SPLITS)
    if beams < max(ks):
        raise ConfigError(f"eval.num_beams={beams} is smaller than max(eval.ks)={max(ks)}: beam search ranks only "
                          f"num_beams items, so HR@{max(ks)} needs eval.num_beams >= {max(ks)}, "
                          f"e.g. eval.num_beams={max(20, max(ks))}")


def check_logger(cfg: DictConfig) -> None:
    choice(cfg, "logger.name", tuple(sorted(p.stem for p in (CONF_DIR / "logger").glob("*.yaml"))))


def value_list(cfg: DictConfig, key: str, example: str) -> list:
    """A non-empty list at ``key``."""
    v = OmegaConf.select(cfg, key)
    if not isinstance(v, ListConfig) or len(v) == 0:
        shown = OmegaConf.to_container(v) if isinstance(v, DictConfig) else v
        raise ConfigError(f"{key}={shown!r} must be a non-empty list, e.g. '{key}={example}'")
    return list(v)
