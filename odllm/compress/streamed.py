"""Layer-streamed compression: a safetensors checkpoint compressed one decoder layer at a time.

The dense model is never resident. A skeleton is built on the ``meta`` device from config.json; only the
modules outside the decoder layers (embeddings, final norm, lm_head, the rotary module, whose non-persistent
``inv_freq`` is rebuilt on the device) are read from the shards. The calibration batches go through the skeleton
up to layer 0 (:func:`odllm.compress.driver.layer_inputs`: the layers are never run); the modules outside the
layers are then final (int8 with ``embeddings: int8``): they go to the last shard, ``model-<n+1>-of-<n+1>``, and are
freed (moved to ``meta``) before any layer is read. Then per layer i:

1. its tensors are read from the shards (``safe_open``, tensor by tensor, by the index's ``weight_map``) into a
   copy of the meta layer, in the dtype config.json names;
2. :func:`odllm.compress.driver.compress_layer` compresses it and advances both streams: the same code as the
   in-memory path, so the factors, codes and numbers are the same;
3. its tensors go to ``model-<i+1>-of-<n+1>.safetensors`` in a work directory ``.<name>.partial`` beside the
   target, its report entries to ``layer-<i>.json``, both streams to ``streams-<i>.pt`` and ``progress.json`` is
   rewritten last (the commit point); then the layer is freed.

A killed run re-run with the same command resumes after the last committed layer (the streams it saved are the
exact inputs of the next layer, so the result equals an uninterrupted run; a resumed run reads the embeddings
again to rebuild the layer arguments and rewrites the last shard); a work directory of another run (other method,
calibration or checkpoint: ``progress.json`` holds a fingerprint) is discarded. At the end the index,
compression.json, config, tokenizer and item index are added, and the directory is swapped in atomically
(:func:`odllm.files.write_directory_atomically`).

Peak memory: the embeddings and head until layer 0's inputs exist, then one dense layer and its compressed modules,
the two streams and one group of linears' statistics (and what the method builds from them: about one n x n float64
matrix, see ``docs/scale.md``), whatever the depth. ``memory`` in the report accounts for each part.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from odllm.compress.driver import (
    LayerAlgorithm,
    Streams,
    calibration_masks,
    compress_layer,
    decoder_layers,
    layer_inputs,
    settings_report,
    validate_layer,
)
from odllm.compress.embeddings import STORAGE as EMBEDDINGS_STORAGE
from odllm.compress.embeddings import quantize_embeddings
from odllm.compress.memory import peak_resident_bytes, resident_bytes, return_freed_memory
from odllm.compress.saved import compression_specs, write_compression_config
from odllm.compress.shards import ShardReader, layers_prefix, materialise_outside, outside_roots, read_layer, skeleton
from odllm.compress.statistics import input_groups
from odllm.compress.storage import sizes, storage, totals
from odllm.files import exclusive, write_directory_atomically, write_file_atomically, write_json
from odllm.model.recommender import SHARD_INDEX

log = logging.getLogger(__name__)

PROGRESS = "progress.json"


# ------------------------------------------------------------------------------------------------- the run
def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def fingerprint(model_dir: Path, reader: ShardReader, batches: list[dict], algorithm: LayerAlgorithm,
                extra: dict) -> str:
    """What makes two runs the same run: checkpoint files, calibration batches, method settings."""
    h = hashlib.sha256()
    h.update(str(model_dir.resolve()).encode())
    for file in sorted(set(reader.weight_map.values())):
        st = (model_dir / file).stat()
        h.update(f"{file}:{st.st_size}:{st.st_mtime_ns}".encode())
    for batch in batches:
        for key in sorted(batch):
            h.update(key.encode())
            h.update(batch[key].cpu().contiguous().numpy().tobytes())
    h.update(json.dumps([algorithm.settings(), extra], sort_keys=True, default=str).encode())
    return h.hexdigest()


def _shard_name(i: int, count: int) -> str:
    return f"model-{i + 1:05d}-of-{count:05d}.safetensors"


def _save_tensors(state: dict[str, torch.Tensor], path: Path) -> dict[str, str]:
    """``state`` into one safetensors file, a tensor shared by two names (a tied head) once, under the first."""
    tensors, seen = {}, set()
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.device)
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = t.detach().contiguous().cpu()
    write_file_atomically(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    return dict.fromkeys(tensors, path.name)


def _load_progress(work: Path, print_: str) -> int:
    """The last committed layer of the run ``print_`` in ``work`` (-1: start afresh, clearing ``work``)."""
    try:
        progress = json.loads((work / PROGRESS).read_text())
    except (OSError, ValueError):
        progress = None
    if progress and progress.get("fingerprint") == print_ and (work / f"streams-{progress['done']}.pt").exists():
        return int(progress["done"])
    if work.exists():
        if progress:
            log.warning("discarding %s: it holds an interrupted run with other settings or calibration", work)
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return -1


def _statistics_bytes(layer: nn.Module, streams: Streams) -> int:
    """Bytes of the largest group of statistics the driver holds at once (C and sum |x| per linear, float64)."""
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    groups = input_groups(layer, streams.X[0], streams.kwargs[0], linears)
    return max(sum(8 * (linears[n].in_features ** 2 + linears[n].in_features) for n in group) for group in groups)


def _compress_one(layer: nn.Module, name: str, index: int, streams: Streams, algorithm: LayerAlgorithm,
                  shard: Path) -> dict:
    """Compress ``layer``, write its tensors to ``shard``; its record (report entries, sizes, specs, memory)."""
    started, cpu = time.perf_counter(), time.process_time()
    before = sizes(layer, nn.ModuleList([layer]))
    statistics = _statistics_bytes(layer, streams)
    known = set(getattr(algorithm, "spectra", {}))
    entries, report = compress_layer(layer, name, index, streams, algorithm)
    after = sizes(layer, nn.ModuleList([layer]))
    weight_map = _save_tensors({f"{name}.{k}": t for k, t in layer.state_dict().items()}, shard)
    return {
        "entries": entries, "report": report, "before": before, "after": after, "weight_map": weight_map,
        "specs": {f"{name}.{k}": v for k, v in compression_specs(layer).items()},
        "spectra": {k: v for k, v in getattr(algorithm, "spectra", {}).items() if k not in known},
        "memory": {"dense_layer_bytes": before["model"]["bytes"], "compressed_layer_bytes": after["model"]["bytes"],
                   "largest_statistics_bytes": statistics, "streams_bytes": _tensor_bytes([*streams.X, *streams.Xc]),
                   "rss_after_layer_bytes": resident_bytes(), "peak_rss_bytes": peak_resident_bytes(),
                   "seconds": round(time.perf_counter() - started, 2),
                   "cpu_seconds": round(time.process_time() - cpu, 2)},  # this process's, on a shared CPU
    }


def write_outside(model: nn.Module, layers: nn.ModuleList, embeddings: str | None, shard: Path) -> dict:
    """The modules outside the decoder layers in their final form (the int8 table and head with ``embeddings:
    int8``) written to ``shard``, then moved to the meta device (their memory freed: 0.49 GiB for LLaMA-1B's tied
    128k x 2048 bf16 table); returns what the report needs of them (weight map, specs, storage, the int8 entries)."""
    prefix = layers_prefix(model, layers) + "."
    done = quantize_embeddings(model, embeddings)
    roots = list(outside_roots(model, layers))
    record = {
        "after": storage(roots),
        "specs": {k: v for k, v in compression_specs(model).items() if not k.startswith(prefix)},
        "weight_map": _save_tensors({n: t for n, t in model.state_dict().items() if not n.startswith(prefix)}, shard),
        "embeddings": done, "embeddings_setting": EMBEDDINGS_STORAGE if done is not None else None,
    }
    for root in roots:
        root.to("meta")
    return record


def _report(records: list[dict], algorithm: LayerAlgorithm, masks: list, rest_before: dict, outside: dict) -> dict:
    """The report :func:`odllm.compress.driver.compress_layers` gives, from the layers' records; sizes summed as
    the modules outside the layers (``outside``: :func:`write_outside`) plus each layer (no tensor is shared across
    them)."""
    if hasattr(algorithm, "spectra"):
        for record in records:
            algorithm.spectra.update(record["spectra"])

    def summed(part: str, key: str, rest: dict | None = None) -> dict:
        rest = rest or {"params": 0, "bytes": 0}
        return {unit: rest[unit] + sum(r[part][key][unit] for r in records) for unit in ("params", "bytes")}

    report = {
        "settings": settings_report(algorithm, masks),
        "matrices": [entry for r in records for entry in r["entries"]],
        "layers": [r["report"] for r in records],
        "spectra": getattr(algorithm, "spectra", {}),
        "totals": totals({"decoder_linear": summed("before", "decoder_linear"),
                          "model": summed("before", "model", rest_before)},
                         {"decoder_linear": summed("after", "decoder_linear"),
                          "model": summed("after", "model", rest_before)}),
    }
    if outside["embeddings"] is not None:  # int8 table and head, as compress_embeddings reports them
        report["settings"]["embeddings"] = outside["embeddings_setting"]
        report["embeddings"] = outside["embeddings"]
    report["totals"].update(totals({"model": summed("before", "model", rest_before)},
                                   {"model": summed("after", "model", outside["after"])}))
    return report


def compress_streamed(model_dir: str | Path, target: str | Path, *args, **kwargs) -> tuple[dict, Path]:
    """Compress the checkpoint in ``model_dir`` layer by layer into ``target``; returns ``(report, target)``.

    Arguments: see :func:`_compress_streamed`. A lock file ``.<name>.lock`` beside ``target`` keeps a second run
    from writing the same work directory at the same time (it fails at once, naming the first).
    """
    lock = Path(target).with_name(f".{Path(target).name}.lock")
    with exclusive(lock, f"the streamed compression into {target}"):
        result = _compress_streamed(model_dir, target, *args, **kwargs)
        lock.unlink(missing_ok=True)
    return result


@torch.no_grad()
def _compress_streamed(
    model_dir: str | Path, target: str | Path, batches: list[dict[str, torch.Tensor]], algorithm: LayerAlgorithm,
    *, write_extra: Callable[[Path], None], embeddings: str | None = None, device: torch.device | str = "cpu",
    progress: bool = True, baseline_rss: int | None = None,
) -> tuple[dict, Path]:
    """``write_extra(directory)`` adds the files besides the weights (tokenizer, item index, odllm.json).
    ``embeddings``: None or "int8" (the embedding table and head, after the layers). The report has the keys of
    :func:`odllm.compress.driver.compress_layers` plus ``memory`` (bytes of each part, RSS) and ``streaming``.
    """
    started = time.perf_counter()
    model_dir, target, device = Path(model_dir), Path(target), torch.device(device)
    memory = {"baseline_rss_bytes": baseline_rss, "glibc_returns_freed_memory": return_freed_memory(),
              "rss_before_weights_bytes": resident_bytes()}
    reader = ShardReader(model_dir)
    model = skeleton(model_dir)
    layers = decoder_layers(model)
    prefix = layers_prefix(model, layers)
    for i, layer in enumerate(layers):
        validate_layer(layer, f"{prefix}.{i}", algorithm)  # shapes only: the meta layers have them
    materialise_outside(model, reader, device)
    rest_before = storage(outside_roots(model, layers))
    memory.update(embeddings_and_head_bytes=rest_before["bytes"], rss_after_embeddings_bytes=resident_bytes())
    batches = [{key: value.to(device) for key, value in batch.items()} for batch in batches]
    masks = calibration_masks(batches)
    X, kwargs = layer_inputs(model, layers, batches)
    streams = Streams(X, list(X), kwargs, masks)

    work = target.with_name(f".{target.name}.partial")
    run = fingerprint(model_dir, reader, batches, algorithm, {"embeddings": embeddings, "device": device.type})
    done = _load_progress(work, run)
    count = len(layers) + 1  # a shard per layer, then the modules outside the layers
    outside = write_outside(model, layers, embeddings, work / _shard_name(len(layers), count))  # and freed
    return_freed_memory()
    memory.update(outside_modules="written to the last shard and freed once layer 0's inputs were computed",
                  rss_after_outside_freed_bytes=resident_bytes())
    if done >= 0:
        saved = torch.load(work / f"streams-{done}.pt", map_location=device)
        streams.X, streams.Xc = saved["X"], saved["Xc"]
        log.info("resuming %s after layer %d (%s)", target, done, work)
    for i in tqdm(range(done + 1, len(layers)), desc="compress layers (streamed)", disable=not progress):
        layer = read_layer(layers[i], f"{prefix}.{i}", reader, device)
        record = _compress_one(layer, f"{prefix}.{i}", i, streams, algorithm, work / _shard_name(i, count))
        del layer
        # commit: the layer's record and the streams it produced, then progress.json (a kill before it redoes i)
        write_json(work / f"layer-{i:05d}.json", record)
        write_file_atomically(work / f"streams-{i}.pt", lambda tmp: torch.save({"X": streams.X, "Xc": streams.Xc},
                                                                               tmp))
        write_json(work / PROGRESS, {"fingerprint": run, "done": i, "layers": len(layers)})
        (work / f"streams-{i - 1}.pt").unlink(missing_ok=True)
        return_freed_memory()
        log.info("layer %d/%d compressed in %.1f s, peak RSS %.2f GiB", i + 1, len(layers),
                 record["memory"]["seconds"], peak_resident_bytes() / 2**30)

    records = [json.loads((work / f"layer-{i:05d}.json").read_text()) for i in range(len(layers))]
    report = _report(records, algorithm, masks, rest_before, outside)
    weight_map = {key: file for r in records for key, file in r["weight_map"].items()}
    weight_map.update(outside["weight_map"])  # a tied head once
    specs = {**{k: v for r in records for k, v in r["specs"].items()}, **outside["specs"]}
    total = sum((work / f).stat().st_size for f in set(weight_map.values()))

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        for file in sorted(set(weight_map.values())):
            try:
                os.link(work / file, tmp / file)  # same file system: no copy
            except OSError:
                shutil.copy2(work / file, tmp / file)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / SHARD_INDEX).write_text(json.dumps(index, indent=2))
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        write_compression_config(specs, tmp)
        write_extra(tmp)

    target = write_directory_atomically(target, write)
    shutil.rmtree(work)
    per_layer = [r["memory"] for r in records]
    memory.update({key: max(m[key] for m in per_layer) for key in (
        "dense_layer_bytes", "compressed_layer_bytes", "largest_statistics_bytes", "streams_bytes")})
    # the kernel's high-water mark can lag a little behind RSS it saw (pages freed by madvise): never below an RSS read
    observed = [memory[k] for k in ("baseline_rss_bytes", "rss_before_weights_bytes", "rss_after_embeddings_bytes",
                                    "rss_after_outside_freed_bytes") if memory.get(k)]
    observed += [m["rss_after_layer_bytes"] for m in per_layer] + [m["peak_rss_bytes"] for m in per_layer]
    memory.update(peak_rss_bytes=max(peak_resident_bytes(), *observed), layers=per_layer)
    if baseline_rss:
        memory["peak_above_baseline_bytes"] = memory["peak_rss_bytes"] - baseline_rss
    report["memory"] = memory
    report["streaming"] = {"layers": len(layers), "resumed_after_layer": done if done >= 0 else None,
                           "seconds": round(time.perf_counter() - started, 1), "shards": count}
    return report, target
