"""Inference benchmark: latency, throughput, memory and weight bytes of saved models on this CPU, in one run.

``python -m odllm.bench.inference dataset=instruments 'models=[odllm-r0.5,svd-r0.5]'`` measures the dense
model (always first) and every listed model (a directory, or a name resolved to ``<models_dir>/<dataset>-<name>``):

- **latency**: one user per call (batch 1, ``eval.num_beams`` beams, constrained beam search), from the item
  history to the ranked items, over seeded test users after warm-up: per repeat the mean over users, reported as
  the median [IQR] over repeats, in wall time and in process CPU time (far less inflated by other jobs);
- **throughput**: users per second over seeded test users at the model's batch size (``batch_size``, or
  ``batch_sizes[<label>]``);
- **peak resident memory**: every model in its own fresh Python process; ``ru_maxrss`` after the batch-1 phase and
  after the throughput phase, and its increase over a baseline process with the same imports and no model;
- **weight bytes** in memory (parameters and persistent buffers, a shared tensor once; a compressed module counts
  its own ``storage()``) and on disk (safetensors, per tensor from the headers), whole model and decoder linears.

Models are measured round-robin at the finest grain (user 1 on dense, A, B, then user 2 ...; batch by batch for
throughput), one process busy at a time, so bursts of load from other jobs hit every model alike; ratios to dense
are paired per repeat. ``fuse=true`` fuses the projections that share an input (``odllm.bench.fusion``) in every model,
dense included; ``fuse=both`` measures every model also fused (``<label>+fused``). ``profile=true`` adds, per
model, where batch-1 time goes (:mod:`odllm.bench.profile`).
Outputs: ``<out>.json``, ``<out>.md``, ``<out>.png`` (and ``<out>-profile.txt``).
This module is the driver; the worker processes are :mod:`odllm.bench.worker`, what a model holds and weighs is
:mod:`odllm.bench.weights`, the Markdown table and plot :mod:`odllm.bench.inference_report`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import statistics
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from odllm import config
from odllm.bench.inference_report import markdown_report, plot
from odllm.bench.profile import profile_report
from odllm.bench.worker import WorkerProcess
from odllm.checks import user_errors
from odllm.data.dataset import leave_one_out, load_dataset
from odllm.files import output_path, write_json, write_text
from odllm.model.artifacts import dense_model_dir

log = logging.getLogger(__name__)
DENSE = "dense"


def resolve_models(cfg: DictConfig) -> list[tuple[str, Path]]:
    """``(label, directory)``: the dense model first, then each entry of ``models`` (a directory, or a name
    such as ``odllm-r0.5`` meaning ``<models_dir>/<dataset>-odllm-r0.5``), each once."""

    dense = dense_model_dir(cfg.paths.models_dir, cfg.dataset.name, cfg.get("model_dir"))
    if not (dense / "config.json").exists():
        raise FileNotFoundError(f"no dense model at {dense}: train one (python train.py dataset=...) or set model_dir")
    chosen = [(DENSE, dense)]
    for entry in map(str, cfg.models or []):
        path = Path(entry)
        if not (path / "config.json").exists():
            path = Path(cfg.paths.models_dir) / f"{cfg.dataset.name}-{entry}"
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"models entry {entry!r}: neither {entry} nor {path} holds a saved model (config.json); "
                f"give a model directory or a name such as odllm-r0.5 for <models_dir>/{cfg.dataset.name}-<name>"
            )
        if path.resolve() not in {p.resolve() for _, p in chosen}:
            chosen.append((entry if path.name == f"{cfg.dataset.name}-{entry}" else path.name, path))
    return chosen


def history_length(cfg: DictConfig, dense_dir: Path) -> int:
    """The history length the dense model was trained with (its ``odllm.json``), else ``task.max_history``."""
    meta_file = dense_dir / "odllm.json"
    saved = json.loads(meta_file.read_text()).get("max_history") if meta_file.exists() else None
    if saved is not None and saved != cfg.task.max_history:
        log.warning("the dense model was trained with max_history=%d (task.max_history=%d): prompts use %d",
                    saved, cfg.task.max_history, saved)
    return int(saved if saved is not None else cfg.task.max_history)


def sample_users(cfg: DictConfig, max_history: int) -> tuple[list[dict], list[dict]]:
    """Seeded test users: a set for batch-1 latency and a (possibly overlapping) set for throughput."""
    split = leave_one_out(load_dataset(cfg.dataset), max_history)
    rows = [{"user": e.user, "history": list(e.history), "target": e.target} for e in split.test]
    pick = random.Random(cfg.seed)
    return pick.sample(rows, min(cfg.latency_users, len(rows))), pick.sample(rows, min(cfg.throughput_users, len(rows)))


def _quantiles(values: list[float]) -> dict:
    if len(values) == 1:
        return dict.fromkeys(("median", "q1", "q3", "p10", "p90"), values[0])
    q = statistics.quantiles(values, n=20, method="inclusive")  # 5 % steps
    return {"median": statistics.median(values), "q1": q[4], "q3": q[14], "p10": q[1], "p90": q[17]}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _measure(cfg: DictConfig, workers: dict[str, WorkerProcess], chunks: dict[str, int], users: int,
             throughput_users: int) -> dict:
    """Latency (per repeat, per user) and throughput (per repeat) of every worker, round-robin at the finest
    grain: each user (each batch) goes through every model before the next, so load bursts hit all alike."""
    latency = {label: [[] for _ in range(cfg.repeats)] for label in workers}
    cpu = {label: [[] for _ in range(cfg.repeats)] for label in workers}
    tops = {label: [] for label in workers}
    for r in range(cfg.repeats):
        for i in range(users):
            for label, w in workers.items():
                answer = w.request("latency", index=i)
                latency[label][r] += answer["seconds"]
                cpu[label][r] += answer["cpu_seconds"]
                tops[label] += answer["top"] if r == 0 else []
        log.info("latency repeat %d/%d: %s", r + 1, cfg.repeats,
                 ", ".join(f"{label} {1000 * statistics.mean(latency[label][r]):.1f} ms" for label in workers))
    batch1_rss = {label: w.request("memory")["maxrss"] for label, w in workers.items()}
    for w in workers.values():
        w.request("warmup", phase="throughput")
    throughput = {label: [] for label in workers}
    for r in range(cfg.repeats):
        spent = dict.fromkeys(workers, 0.0)
        for j in range(max(chunks.values())):
            for label, w in workers.items():
                spent[label] += w.request("throughput", chunk=j)["seconds"] if j < chunks[label] else 0.0
        for label in workers:
            throughput[label].append(throughput_users / spent[label])
        log.info("throughput repeat %d/%d: %s", r + 1, cfg.repeats,
                 ", ".join(f"{label} {throughput[label][-1]:.1f} users/s" for label in workers))
    peak_rss = {label: w.request("memory")["maxrss"] for label, w in workers.items()}
    return {"latency": latency, "cpu": cpu, "tops": tops, "throughput": throughput, "batch1_rss": batch1_rss,
            "peak_rss": peak_rss}


def _row(label: str, path: Path, about: dict, m: dict, batch_size: int, baseline_rss: int) -> dict:
    """One model's results; latency and throughput ratios are paired with dense repeat by repeat (call by call)."""
    mean = statistics.mean
    latency, cpu, dense_latency, dense_cpu = m["latency"][label], m["cpu"][label], m["latency"][DENSE], m["cpu"][DENSE]
    paired = [x / d for s, ds in zip(latency, dense_latency, strict=True) for x, d in zip(s, ds, strict=True)]
    overlap = [len(set(a) & set(b)) / max(1, len(a)) for a, b in zip(m["tops"][DENSE], m["tops"][label], strict=True)]
    rss = {"batch1": m["batch1_rss"][label], "peak": m["peak_rss"][label]}
    return {
        "label": label, "model_dir": str(path), "description": about["label"],
        **{key: about[key] for key in ("simulated", "compression", "compression_kinds", "decoder_linear_classes",
                                       "decoder_linear_dtypes", "kernels", "parameters", "memory_bytes", "disk_bytes",
                                       "load_seconds", "trie_build_seconds", "fused_groups")},
        "latency_ms": {k: 1000 * v for k, v in _quantiles([mean(s) for s in latency]).items()},
        "latency_ms_per_call": {k: 1000 * v for k, v in _quantiles([x for s in latency for x in s]).items()},
        "latency_repeats_ms": [1000 * mean(s) for s in latency],
        "latency_ratio": _quantiles([mean(s) / mean(d) for s, d in zip(latency, dense_latency, strict=True)]),
        "latency_ratio_per_call": _quantiles(paired),
        "cpu_ms": {k: 1000 * v for k, v in _quantiles([mean(s) for s in cpu]).items()},
        "cpu_ratio": _quantiles([mean(s) / mean(d) for s, d in zip(cpu, dense_cpu, strict=True)]),
        "batch_size": batch_size,
        "throughput_users_per_s": _quantiles(m["throughput"][label]),
        "throughput_repeats": m["throughput"][label],
        "throughput_ratio": _quantiles([t / d for t, d in zip(m["throughput"][label], m["throughput"][DENSE],
                                                                strict=True)]),
        "maxrss_bytes": {**rss, "after_load": about["maxrss_after_load"]},
        "maxrss_over_baseline_bytes": {k: v - baseline_rss for k, v in rss.items()},
        "top10_overlap_with_dense": mean(overlap),
    }


def _ratios(row: dict, dense: dict) -> dict:
    def share(key: str, part: str) -> float:
        return row[key][part]["bytes"] / dense[key][part]["bytes"]

    dense_peak = dense["maxrss_over_baseline_bytes"]["peak"]
    return {
        "latency": row["latency_ratio"]["median"], "cpu_time": row["cpu_ratio"]["median"],
        "throughput": row["throughput_ratio"]["median"],
        **{f"{where}_{part}": share(f"{where}_bytes", part) for where in ("memory", "disk")
           for part in ("model", "decoder_linear")},
        # None when the dense model's increase is not positive (a tiny model within the baseline's noise)
        "peak_rss_over_baseline": row["maxrss_over_baseline_bytes"]["peak"] / dense_peak if dense_peak > 0 else None,
    }


def run_inference_benchmark(cfg: DictConfig) -> dict:
    if cfg.repeats < 1 or cfg.latency_users < 1 or cfg.throughput_users < 1 or cfg.threads < 1:
        raise ValueError("repeats, latency_users, throughput_users and threads must all be >= 1")
    if cfg.fuse not in (False, True, "both"):
        raise ValueError(f"fuse={cfg.fuse!r}; choose false, true (every model fused) or both (each also fused)")
    models = resolve_models(cfg)
    fused = {label: cfg.fuse is True for label, _ in models}
    if cfg.fuse == "both":  # the same models fused, measured side by side with the plain ones
        fused |= {f"{label}+fused": True for label, _ in models}
        models += [(f"{label}+fused", path) for label, path in models]
    max_history = history_length(cfg, models[0][1])
    latency_users, throughput_users = sample_users(cfg, max_history)
    batch_sizes = {label: int((cfg.batch_sizes or {}).get(label, cfg.batch_size)) for label, _ in models}
    log.info("models: %s", ", ".join(f"{label} ({path}, batch {batch_sizes[label]})" for label, path in models))
    base_spec = {
        "threads": cfg.threads, "template": cfg.eval.template, "num_beams": cfg.eval.num_beams, "top_k": cfg.top_k,
        "warmup": cfg.warmup, "profile_users": cfg.profile_users, "dense_dir": str(models[0][1]),
        "latency": latency_users, "throughput": throughput_users, "kernels": cfg.kernels,
    }
    load_before = os.getloadavg()
    if load_before[0] + cfg.threads > (os.cpu_count() or 1):
        log.warning("the machine is busy (load average %.1f on %d CPUs): with threads=%d every number is inflated, and "
                    "more threads than idle cores can make OpenMP threads wait for descheduled peers (much slower)",
                    load_before[0], os.cpu_count() or 1, cfg.threads)
    workers: dict[str, WorkerProcess] = {}
    started = time.perf_counter()
    baseline = WorkerProcess("baseline", {**base_spec, "model_dir": None, "latency": [], "throughput": []}, cfg.threads)
    try:
        for label, path in models:  # started together: their imports overlap, their measurements never do
            spec = {**base_spec, "model_dir": str(path), "batch_size": batch_sizes[label], "fuse": fused[label]}
            workers[label] = WorkerProcess(label, spec, cfg.threads)
        baseline_rss = baseline.read()["maxrss_after_imports"]
        log.info("baseline process (imports, no model): peak RSS %.1f MB", baseline_rss / 1e6)
        info = {}
        for label, w in workers.items():
            info[label] = {**w.read(), **w.request("load")}
            log.info("%s loaded in %.1f s: %s", label, info[label]["load_seconds"], info[label]["label"])
            w.request("warmup", phase="latency")
        measured = _measure(cfg, workers, {label: info[label]["chunks"] for label in workers}, len(latency_users),
                            len(throughput_users))
        profiles = {}
        if cfg.profile:
            for label, w in workers.items():
                log.info("profiling %s on %d users", label, min(cfg.profile_users, len(latency_users)))
                profiles[label] = w.request("profile")
    finally:
        for w in [baseline, *workers.values()]:
            w.close()
    rows = [_row(label, path, info[label], measured, batch_sizes[label], baseline_rss) for label, path in models]
    for row in rows:
        row["ratios"] = _ratios(row, rows[0])
    payload = {
        "dataset": cfg.dataset.name,
        "machine": {"cpu": _cpu_name(), "logical_cpus": os.cpu_count(), "threads": cfg.threads,
                    "torch": torch.__version__, "python": platform.python_version(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "protocol": {"num_beams": cfg.eval.num_beams, "repeats": cfg.repeats, "warmup_users": cfg.warmup,
                     "latency_users": len(latency_users), "throughput_users": len(throughput_users),
                     "seed": cfg.seed, "template": cfg.eval.template, "max_history": max_history, "fuse": cfg.fuse,
                     "kernels": cfg.kernels or os.environ.get("ODLLM_KERNELS", "auto"),
                     "order": "round-robin over models per user (latency), per batch (throughput)"},
        "baseline_maxrss_bytes": baseline_rss,
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    if profiles:
        payload["profile"] = {label: p["breakdown"] for label, p in profiles.items()}
    out = Path(cfg.out)
    write_json(output_path(out, ".json"), payload)
    write_text(output_path(out, ".md"), markdown_report(payload))
    plot(payload, output_path(out, ".png"))
    if profiles:
        write_text(f"{out}-profile.txt", profile_report(payload, {k: p["operators"] for k, p in profiles.items()}))
    log.info("inference benchmark written to %s.{json,md,png}%s in %.0f s", out,
             " and -profile.txt" if profiles else "", payload["seconds"])
    return payload


@user_errors
def _run(cfg: DictConfig) -> None:
    config.check_inference(cfg)
    keys = ("models", "threads", "repeats", "latency_users", "throughput_users", "batch_size", "batch_sizes", "fuse",
            "kernels", "out")
    log.info("config:\n%s", OmegaConf.to_yaml({k: cfg[k] for k in keys}))
    run_inference_benchmark(cfg)


def main() -> None:
    hydra.main(version_base="1.3", config_path=str(Path(__file__).parents[2] / "conf"), config_name="inference")(_run)()


if __name__ == "__main__":
    main()
