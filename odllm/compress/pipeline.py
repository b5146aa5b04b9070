"""Compress a recommender with one method, evaluate it beside its dense parent, save it.

The shared path of compress.py, ``train.py compress=<method>`` and the compression benchmark: calibration
prompts, the layer driver (:mod:`odllm.compress.driver`), optional healing and int8 embeddings, test
evaluation of both models, and the saved compressed model.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from odllm.compress.driver import compress_layers
from odllm.compress.embeddings import compress_embeddings
from odllm.compress.heal import heal
from odllm.compress.lowrank_method import LowRank
from odllm.compress.registry import algorithm_name, build_algorithm, model_tag, uses_ratio
from odllm.compress.saved import load_recommender, save_compression_config
from odllm.compress.shards import skeleton
from odllm.compress.spectra import plot_ranks, plot_spectra
from odllm.compress.streamed import compress_streamed
from odllm.data.batches import left_pad
from odllm.data.dataset import DatasetSource, Split, leave_one_out, load_dataset
from odllm.data.prompts import SeqRecEncoder, build_training_samples
from odllm.eval.metrics import format_metrics
from odllm.eval.protocol import EvalSettings, check_items, fidelity, popularity_baseline, public, score_examples
from odllm.files import write_json
from odllm.model.backbone import memory_summary
from odllm.model.recommender import COMPRESSION_FILE, META_FILE, SHARD_INDEX, Recommender, check_dataset
from odllm.versions import package_versions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    """Which training prompts the statistics come from (the ``calibration`` config group)."""

    size: int = 1024  # prompts drawn with the seed
    batch_size: int = 16
    tokens: str = "items"  # items: statistics from the history's item-code tokens only; all: every token


@dataclass(frozen=True)
class CompressionJob:
    """What compressing one recommender needs besides the method: read once from the config by the runner."""

    dataset: str
    models_dir: str  # the compressed model is saved at <models_dir>/<dataset>-<method>-<tag>
    ratio: float | None  # low-rank methods: fraction of each decoder linear's parameters kept
    seed: int
    max_history: int
    window_stride: int | None  # healing's training windows
    calibration: Calibration
    eval: EvalSettings
    config: dict = field(default_factory=dict)  # the whole resolved config, recorded in metrics.json
    evaluate: bool = True  # compress_eval: false compresses and saves only (evaluate.py scores the model later)
    test_users_note: str = "all test users"  # which users split.test holds (odllm.eval.protocol.sample_test_users)
    stream: bool = False  # read the checkpoint one decoder layer at a time (odllm.compress.streamed)
    device: str = "cpu"  # where a streamed run computes (the in-memory path uses the dense model's device)
    baseline_rss: int | None = None  # the process's RSS before any model was read (streamed memory account)


def calibration_batches(
    encoder: SeqRecEncoder, split: Split, calibration: Calibration, *, max_history: int, seed: int, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    """``calibration.size`` training prompts (the task's own windows) drawn with ``seed``, left-padded in batches."""
    samples = build_training_samples(
        encoder, split.train, mode="all_positions", max_history=max_history, stride=max_history, seed=seed
    )
    if calibration.size > len(samples):
        raise ValueError(
            f"calibration.size={calibration.size} but the training split has only {len(samples)} prompts; "
            f"use calibration.size<={len(samples)}"
        )
    if calibration.tokens not in ("all", "items"):
        raise ValueError(f"calibration.tokens={calibration.tokens!r}; choose 'all' or 'items'")
    chosen = sorted(random.Random(seed).sample(samples, calibration.size), key=lambda s: len(s.input_ids))
    item_tokens = torch.tensor(sorted(encoder.token_id.values()))
    batches = []
    for i in range(0, len(chosen), calibration.batch_size):
        ids, mask = left_pad([s.input_ids for s in chosen[i : i + calibration.batch_size]], pad_id)
        batch = {"input_ids": ids, "attention_mask": mask}
        if calibration.tokens == "items":  # statistics from history item tokens only, not the instruction text
            batch["statistics_mask"] = mask.bool() & torch.isin(ids, item_tokens)
        batches.append(batch)
    return batches


def compressed_model_dir(models_dir: str | Path, dataset: str, method: str | Mapping, ratio: float | None) -> Path:
    """``<models_dir>/<dataset>-<method>-<tag>``: the tag is r<ratio> for low-rank methods (a plain method
    name means one), the method's own settings otherwise (w4g128, s0.5, 2of4; none for bnb)."""
    name, tag = (method, f"r{ratio:g}") if isinstance(method, str) else (method["name"], model_tag(method, ratio))
    return Path(models_dir) / "-".join(part for part in (dataset, name, tag) if part)


STREAM_AUTO_BYTES = 2**30  # stream=auto streams a sharded checkpoint whose weights exceed this (1 GiB)


def streaming_refusal(method: Mapping) -> str | None:
    """Why ``method`` cannot run layer-streamed (it needs the whole model resident), or None."""
    if method.get("heal"):
        return "heal distils the whole compressed model towards the whole dense one"
    if method.get("allocation") == "loss":
        return "allocation=loss ranks every matrix of the dense model before the first layer is compressed"
    if algorithm_name(method) == "bnb":
        return "bitsandbytes modules are built and saved through the whole-model path only"
    return None


def check_streamable(method: Mapping) -> None:
    """A method that needs the whole model resident, asked to stream: an error naming stream=false."""
    refusal = streaming_refusal(method)
    if refusal:
        raise ValueError(f"method {method['name']!r} cannot run with stream=true: {refusal}; use stream=false "
                         "(the whole model in memory)")


def should_stream(model_dir: str | Path, stream: bool | str, method: Mapping) -> bool:
    """``stream``: true, false or "auto" (a checkpoint with a shard index whose weights exceed
    :data:`STREAM_AUTO_BYTES`, unless the method needs the whole model). stream=true with such a method is an
    error naming stream=false."""
    if stream is True:
        check_streamable(method)
    refusal = streaming_refusal(method)
    if stream != "auto":
        return bool(stream)
    size = _safetensors_bytes(model_dir) or 0
    return (Path(model_dir) / SHARD_INDEX).exists() and size > STREAM_AUTO_BYTES and refusal is None


def _safetensors_bytes(directory: str | Path | None) -> int | None:
    """Bytes of the weight files in a saved model directory (None when there is none)."""
    files = list(Path(directory).glob("*.safetensors")) if directory else []
    return sum(f.stat().st_size for f in files) if files else None


def compress_recommender(
    dense: Recommender, split: Split, method: Mapping, job: CompressionJob, output_dir: Path,
    dense_result: dict | None = None,
) -> dict:
    """Compress ``dense`` (left untouched), evaluate both on the test split (unless ``job.evaluate`` is false),
    save the compressed model.

    ``method``: a method config as a plain dict (``conf/method/*.yaml``, see :mod:`odllm.compress.registry`).
    ``dense_result`` (a :func:`score_examples` result of the dense model) saves its re-evaluation in sweeps.
    The copy is compressed on the dense model's device and in its dtype. Memory: the dense model and its copy are
    both held (the dense one is the teacher of healing and the reference of the fidelity numbers).
    """
    ratio = job.ratio if uses_ratio(method) else None
    algorithm = build_algorithm(method, ratio)  # settings (and a low-rank method's ratio) checked first
    if method.get("heal") and not uses_ratio(method):
        raise ValueError(f"method {method['name']!r}: heal works on low-rank methods only (their factors train); "
                         "remove heal from the method config")
    output_dir.mkdir(parents=True, exist_ok=True)
    pad_id = dense.tokenizer.pad_token_id
    batches = calibration_batches(
        dense.encoder, split, job.calibration, max_history=job.max_history, seed=job.seed, pad_id=pad_id
    )
    about = {"method": method["name"], "ratio": ratio, "settings": dict(method)}
    target = compressed_model_dir(job.models_dir, job.dataset, method, ratio)
    started = time.perf_counter()
    if job.stream:
        check_streamable(method)
        report, model_dir = compress_streamed(
            dense.meta["model_dir"], target, batches, algorithm, embeddings=method.get("embeddings"),
            write_extra=lambda d: _write_recommender_files(dense, {**dense.meta, "compression": about}, d),
            device=job.device, progress=job.eval.progress, baseline_rss=job.baseline_rss,
        )
        seconds = time.perf_counter() - started
        log.info("compressed with %s (%s), streamed layer by layer, in %.1f s", method["name"],
                 model_tag(method, ratio) or "defaults", seconds)
        healing = dense_result = close = result = None
        summary = {**memory_summary(dense.model), "device": str(job.device)}
        if job.evaluate:  # the compressed model, read back shard by shard; the dense one is never resident
            compressed = load_recommender(model_dir, device=job.device)
            result = score_examples(compressed.model, dense.encoder, dense.trie(), split.test, job.eval, pad_id,
                                    desc=method["name"])
            summary = memory_summary(compressed.model)
            del compressed
    else:
        report, model_dir, seconds, healing, dense_result, result, close, summary = _compress_in_memory(
            dense, split, method, job, algorithm, batches, target, about, dense_result)
    sizes = report["totals"]
    sizes["disk"] = {  # the safetensors files as saved: what a device has to store and load
        "bytes_before": _safetensors_bytes(dense.meta.get("model_dir")),
        "bytes_after": _safetensors_bytes(model_dir),
    }
    if isinstance(algorithm, LowRank):
        plot_spectra(report, output_dir / "spectra.png")
        if algorithm.ranks is not None:
            plot_ranks(report, output_dir / "ranks.png")
    report.pop("spectra")  # plotted; too bulky for the JSON report
    payload = {
        "dataset": job.dataset,
        "method": dict(method),
        "ratio": ratio,
        "model_dir": str(model_dir),
        "dense_model_dir": dense.meta.get("model_dir"),
        "compress_seconds": round(seconds, 1),
        "heal": healing,
        "calibration_sequences": job.calibration.size,
        "storage": report["settings"].get("storage", f"{summary['dtype']} weights (low-rank factors "
                                                     "where factorised)"),
        "sizes": sizes,
        "evaluation": _evaluation_note(job, model_dir),
        "test_users": len(split.test),
        "test_users_note": job.test_users_note,
        "dense": public(dense_result) if dense_result is not None else None,
        "test": public(result) if job.evaluate else None,
        "fidelity": close,
        "popularity": popularity_baseline(split, dense.encoder, split.test, job.eval.ks),
        "resources": {**summary, "compress_seconds": round(seconds, 1)},
        "versions": package_versions(),
        "config": job.config,
    }
    if job.stream:  # layer-streamed: RSS and the bytes of each part (odllm.compress.streamed)
        payload.update(stream=True, memory=report["memory"], streaming=report["streaming"])
    write_json(output_dir / "compression_report.json", report)
    write_json(output_dir / "metrics.json", payload)
    if not job.evaluate:
        log.info("saved %s without evaluation (compress_eval=false): python evaluate.py model_dir=%s", method["name"],
                 model_dir)
        return payload
    if dense_result is not None:
        log.info("dense       %s", format_metrics(dense_result["metrics"]))
    log.info("%-11s %s", method["name"], format_metrics(result["metrics"]))
    if close is not None:
        log.info("KL to dense %.4f, top-10 overlap %.3f", close["kl"], close["top10_overlap"])
    return payload


def _evaluation_note(job: CompressionJob, model_dir: Path) -> str:
    later = f"python evaluate.py model_dir={model_dir}"
    if not job.evaluate:
        return f"skipped (compress_eval=false): score it later with {later}"
    if job.stream:
        return ("compressed model only, reloaded shard by shard (stream=true: the dense model is never resident; "
                "score it with python evaluate.py model_dir=<the dense model>)")
    return "done"


def _compress_in_memory(dense: Recommender, split: Split, method: Mapping, job: CompressionJob, algorithm,
                        batches: list[dict], target: Path, about: dict, dense_result: dict | None) -> tuple:
    """Compress a copy of the resident dense model, heal it, evaluate both, save it (the whole-model path)."""
    pad_id = dense.tokenizer.pad_token_id
    ratio = about["ratio"]
    started = time.perf_counter()
    model = copy.deepcopy(dense.model)
    if isinstance(algorithm, LowRank):
        algorithm.allocate(model, batches)  # allocation=loss: ranks from the dense model first; uniform: nothing
    report = compress_layers(model, batches, algorithm, progress=job.eval.progress)
    seconds = time.perf_counter() - started
    log.info("compressed with %s (%s) in %.1f s", method["name"], model_tag(method, ratio) or "defaults", seconds)
    healing = None
    if method.get("heal"):  # optional distillation towards the dense model (odllm.compress.heal), training split only
        samples = build_training_samples(
            dense.encoder, split.train, mode="all_positions", max_history=job.max_history,
            stride=job.window_stride, seed=job.seed,
        )
        healing = heal(model, dense.model, samples, **method["heal"], pad_id=pad_id, seed=job.seed,
                       progress=job.eval.progress)
    compress_embeddings(model, method.get("embeddings"), report)  # int8 embedding table and lm_head, or nothing

    trie = dense.trie()
    result = close = None
    if job.evaluate:
        if dense_result is None:
            dense_result = score_examples(dense.model, dense.encoder, trie, split.test, job.eval, pad_id, desc="dense")
        result = score_examples(model, dense.encoder, trie, split.test, job.eval, pad_id, desc=method["name"])
        close = fidelity(
            dense.model, model, dense.encoder, split.test,
            dense_result["_recommendations"].top_codes, result["_recommendations"].top_codes,
            template=job.eval.template, batch_size=job.eval.batch_size, pad_id=pad_id,
        )
    compressed = Recommender(model, dense.tokenizer, dense.item_codes, {**dense.meta, "compression": about})
    model_dir = compressed.save(target, extra=lambda d: save_compression_config(model, d))
    return report, model_dir, seconds, healing, dense_result, result, close, memory_summary(model)


def _write_recommender_files(dense: Recommender, meta: dict, directory: Path) -> None:
    """What ``Recommender.save`` writes besides the weights and config: tokenizer, item index, odllm.json."""
    dense.tokenizer.save_pretrained(directory)
    dense.item_codes.save(directory)
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))


def load_dense(
    model_dir: Path, source: DatasetSource, max_history: int, allow_other_dataset: bool = False,
    device: torch.device | str | None = None, stream: bool = False,
) -> tuple[Recommender, Split]:
    """The dense model to compress (in its saved dtype, on ``device``) and the split of the dataset it was trained
    on (its odllm.json says which; ``allow_other_dataset`` uses it on ``source`` anyway, recording both names).
    ``stream``: the model is a skeleton on the meta device (no weights read; :mod:`odllm.compress.streamed`)."""
    if (model_dir / COMPRESSION_FILE).exists():
        raise ValueError(f"{model_dir} holds a compressed model; pass model_dir=<the dense model train.py saved>")
    dense = (Recommender.load(model_dir, load_model=skeleton) if stream
             else Recommender.load(model_dir, device=device))
    check_dataset(dense.meta, model_dir, source.name, allow_other_dataset)
    if dense.meta.get("dataset", source.name) != source.name:  # the compressed model is named after source.name
        dense.meta = {**dense.meta, "dataset": source.name,
                      "trained_on_dataset": dense.meta.get("trained_on_dataset", dense.meta["dataset"])}
    dense.meta["model_dir"] = str(model_dir)
    split = leave_one_out(load_dataset(source), max_history)
    check_items(dense.item_codes, split, model_dir, source.name)
    return dense, split
