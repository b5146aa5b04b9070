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
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from odllm.bench.fusion import FusedMember, fuse_projections
from odllm.compress.driver import decoder_layers
from odllm.compress.storage import is_compressed, storage
from odllm.model.artifacts import dense_model_dir

if TYPE_CHECKING:
    from omegaconf import DictConfig

# Worker processes import this module: besides torch it imports only odllm's model code (which the baseline
# process imports too), not Hydra, Lightning or torchmetrics.

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]
DENSE = "dense"


# --------------------------------------------------------------------------------------------------------------
# Weight bytes (in memory and on disk) and what a saved model really holds


def decoder_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(full name, module)`` of the weight modules in the decoder layers: each linear, compressed module or fused
    projection, not the linears inside them (a low-rank module's A and B are part of it)."""
    names = {id(m): n for n, m in model.named_modules()}
    found: list[tuple[str, nn.Module]] = []
    for layer in decoder_layers(model):
        for name, module in layer.named_modules(prefix=names[id(layer)]):
            inside = bool(found) and name.startswith(found[-1][0] + ".")  # pre-order: parts follow their module
            if not inside and (isinstance(module, nn.Linear | FusedMember) or is_compressed(module)):
                found.append((name, module))
    return found


def _dtypes(roots: list[nn.Module]) -> dict[str, int]:
    """Bytes per dtype of the tensors under ``roots`` (each once): what the storage really is."""
    held: Counter = Counter()
    for t in {id(t): t for root in roots for t in (*root.parameters(), *root.buffers())}.values():
        held[str(t.dtype).removeprefix("torch.")] += t.numel() * t.element_size()
    return dict(held)


def memory_bytes(model: nn.Module) -> dict:
    """Weight bytes in memory and their dtypes: the whole model and the decoder linears alone."""
    linears = [m for _, m in decoder_linears(model)]
    return {"model": {**storage([model]), "dtypes": _dtypes([model])},
            "decoder_linear": {**storage(linears), "dtypes": _dtypes(linears)}}


def safetensors_sizes(path: Path) -> dict[str, int]:
    """Bytes of every tensor in a safetensors file, from its header (the data is not read)."""
    with path.open("rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {name: info["data_offsets"][1] - info["data_offsets"][0] for name, info in header.items()
            if name != "__metadata__"}


def disk_bytes(directory: Path, linear_names: list[str]) -> dict:
    """The safetensors files of a saved model: total file bytes, and the tensors of the decoder linears."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} holds no *.safetensors weights")
    sizes = {name: size for file in files for name, size in safetensors_sizes(file).items()}
    prefixes = tuple(f"{name}." for name in linear_names)
    return {"model": {"bytes": sum(f.stat().st_size for f in files), "files": [f.name for f in files]},
            "decoder_linear": {"bytes": sum(b for name, b in sizes.items() if name.startswith(prefixes))}}


def describe_model(directory: Path, model: nn.Module) -> dict:
    """What a saved model is, from its own files and modules (nothing is assumed from its name).

    ``simulated`` when the saved metadata says so, or when it claims compression while every decoder linear is
    still a plain float ``nn.Linear`` (e.g. fake-quantized or masked weights in dense storage): such a model saves
    neither bytes nor time, and every table says it.
    """
    meta, specs = ({} if not (directory / f).exists() else json.loads((directory / f).read_text())
                   for f in ("odllm.json", "compression.json"))
    kinds = Counter("lowrank" if isinstance(s, int) else s.get("kind", "?") for s in specs.values())
    linears = [m for _, m in decoder_linears(model)]
    compression = meta.get("compression")
    flagged = bool((compression or {}).get("simulated") or ((compression or {}).get("settings") or {}).get("simulated")
                   or any(isinstance(s, dict) and s.get("simulated") for s in specs.values()))
    plain = all(type(m) is nn.Linear and m.weight.is_floating_point() for m in linears)
    simulated = flagged or (compression is not None and plain)
    held = _dtypes(linears)
    storage = " + ".join(sorted(held, key=lambda d: -held[d]))
    if compression is None and not specs:
        label = f"dense ({storage})"
    else:
        ratio = (compression or {}).get("ratio")
        kind_text = ", ".join(f"{n}x {k}" for k, n in sorted(kinds.items())) or "no compressed modules"
        label = (f"{(compression or {}).get('method', '?')}{'' if ratio is None else f' r{ratio:g}'}: {kind_text}; "
                 f"decoder linears held as {storage}")
        if simulated:
            label += "; SIMULATED: decoder linears are plain float linears (dense storage, no saving in bytes or time)"
    return {"compression": compression, "compression_kinds": dict(kinds),
            "decoder_linear_classes": dict(Counter(type(m).__name__ for m in linears)),
            "decoder_linear_dtypes": held, "simulated": simulated, "label": label}


# --------------------------------------------------------------------------------------------------------------
# The worker: one fresh process per model, driven over stdin/stdout by the orchestrator


def _maxrss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _current_rss_bytes() -> int | None:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return None


def import_runtime(dense_dir: str | None) -> None:
    """What every worker imports before measuring: the baseline makes exactly these imports and stops."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    import odllm.eval.generation  # noqa: F401
    import odllm.model.recommender  # noqa: F401

    if dense_dir is not None:  # transformers imports model classes lazily: resolve the architecture's module too
        MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(dense_dir))]


class Worker:
    """One model in one process: loads it, then answers ``latency``, ``throughput`` and ``profile`` requests."""

    def __init__(self, spec: dict):
        from odllm.compress.saved import load_recommender

        self.spec, self.directory = spec, Path(spec["model_dir"])
        started = time.perf_counter()
        self.rec = load_recommender(self.directory)
        self.model = self.rec.model.eval()
        self.about = describe_model(self.directory, self.model)  # before fusion, which renames the linears' classes
        self.fused_groups = fuse_projections(self.model) if spec.get("fuse") else 0
        self.load_seconds = time.perf_counter() - started
        started = time.perf_counter()
        self.trie = self.rec.trie()
        self.trie_seconds = time.perf_counter() - started
        self.pad_id = self.rec.tokenizer.pad_token_id
        self.by_ids = {tuple(ids): item for item, ids in self.rec.encoder.item_ids.items()}
        self.latency_users, self.throughput_users = spec["latency"], spec["throughput"]

    def info(self) -> dict:
        return {
            "chunks": len(self.chunks()), "load_seconds": self.load_seconds, "trie_build_seconds": self.trie_seconds,
            "fused_groups": self.fused_groups, "memory_bytes": memory_bytes(self.model),
            "disk_bytes": disk_bytes(self.directory, [n for n, _ in decoder_linears(self.model)]),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            **self.about,
        }

    def _recommend(self, users: list[dict], batch_size: int):
        from odllm.eval.generation import recommend

        encoder = self.rec.encoder
        return recommend(self.model, [encoder.prompt(u["history"], self.spec["template"]) for u in users],
                         [encoder.item(u["target"]) for u in users], self.trie, num_beams=self.spec["num_beams"],
                         batch_size=batch_size, pad_id=self.pad_id, progress=False)

    def recommend_one(self, user: dict) -> list[str]:
        """One user's top-k items from the history: encode, beam search at batch 1, map codes to items."""
        return [self.by_ids[c] for c in self._recommend([user], 1).top_codes[0][: self.spec["top_k"]]]

    def latency(self, users: list[dict] | None = None, index: int | None = None) -> dict:
        """Times one recommendation per user: ``users``, else latency user ``index``, else all of them."""
        if users is None:
            users = self.latency_users if index is None else [self.latency_users[index]]
        seconds, cpu, tops = [], [], []
        with torch.inference_mode():
            for user in users:
                started, cpu_started = time.perf_counter(), time.process_time()
                tops.append(self.recommend_one(user))
                seconds.append(time.perf_counter() - started)
                cpu.append(time.process_time() - cpu_started)
        return {"seconds": seconds, "cpu_seconds": cpu, "top": tops}

    def chunks(self) -> list[list[dict]]:
        """The throughput users in batches as ``recommend`` forms them (similar prompt lengths together)."""
        users, size = sorted(self.throughput_users, key=lambda u: len(u["history"])), self.spec["batch_size"]
        return [users[i : i + size] for i in range(0, len(users), size)]

    def throughput(self, chunk: int | None = None) -> dict:
        """Times recommending batch ``chunk`` of :meth:`chunks`, else every throughput user."""
        users = self.throughput_users if chunk is None else self.chunks()[chunk]
        with torch.inference_mode():
            started = time.perf_counter()
            self._recommend(users, self.spec["batch_size"])
            seconds = time.perf_counter() - started
        return {"seconds": seconds, "users": len(users), "users_per_second": len(users) / seconds}

    def warmup(self, phase: str) -> dict:
        """Untimed calls before a phase: ``latency`` (a few users at batch 1) or ``throughput`` (one batch),
        kept apart so that the peak RSS after the batch-1 phase has seen no large batch."""
        if self.spec["warmup"] > 0:
            self.latency(self.latency_users[: self.spec["warmup"]]) if phase == "latency" else self.throughput(0)
        return {}

    def profile(self) -> dict:
        from odllm.bench.profile import free_linears_floor, operator_table, time_breakdown

        users = self.latency_users[: self.spec["profile_users"]]
        return {"breakdown": {**time_breakdown(self, users), **free_linears_floor(self, users)},
                "operators": operator_table(self, users)}


def worker_main() -> None:
    """Entry point of a worker process: one JSON request per stdin line, one JSON answer per line.

    Anything a library prints goes to stderr; the answers use a private copy of the original stdout.
    """
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    spec = json.loads(sys.stdin.readline())
    torch.set_num_threads(spec["threads"])
    import_runtime(spec.get("dense_dir"))
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    answers.write(json.dumps({"maxrss_after_imports": _maxrss_bytes(), "threads": torch.get_num_threads()}) + "\n")
    if spec.get("model_dir") is None:  # the baseline: imports only
        return
    worker = None
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["cmd"] == "load":
                worker = Worker(spec)
                answer = {**worker.info(), "maxrss_after_load": _maxrss_bytes(), "rss_after_load": _current_rss_bytes()}
            elif request["cmd"] == "memory":
                answer = {"maxrss": _maxrss_bytes(), "rss": _current_rss_bytes()}
            elif request["cmd"] == "quit":
                answers.write(json.dumps({"maxrss": _maxrss_bytes()}) + "\n")
                return
            else:
                answer = getattr(worker, request.pop("cmd"))(**request)
        except Exception:  # noqa: BLE001 - reported to the orchestrator, which raises it
            answer = {"error": traceback.format_exc()}
        answers.write(json.dumps(answer) + "\n")


class WorkerProcess:
    """A worker in a fresh interpreter (``python -c``), so its memory is its own."""

    def __init__(self, label: str, spec: dict, threads: int):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
               "TOKENIZERS_PARALLELISM": "false"}
        self.label = label
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from odllm.bench.inference import worker_main; worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, bufsize=1,
        )
        self.process.stdin.write(json.dumps(spec) + "\n")
        self.process.stdin.flush()

    def read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker for {self.label} exited (code {self.process.wait()}); its stderr is above")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"the worker for {self.label} failed:\n{answer['error']}")
        return answer

    def request(self, cmd: str, **arguments) -> dict:
        self.process.stdin.write(json.dumps({"cmd": cmd, **arguments}) + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        """Ask the worker to quit; kill it if it does not within a few seconds (or is stuck)."""
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.process.stdin.close()
                self.process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


# --------------------------------------------------------------------------------------------------------------
# The orchestrator


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
    from odllm.data.dataset import leave_one_out, load_dataset

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
                                       "decoder_linear_dtypes", "parameters", "memory_bytes", "disk_bytes",
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
    from odllm.files import write_json, write_text

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
        "latency": latency_users, "throughput": throughput_users,
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
                     "order": "round-robin over models per user (latency), per batch (throughput)"},
        "baseline_maxrss_bytes": baseline_rss,
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    if profiles:
        payload["profile"] = {label: p["breakdown"] for label, p in profiles.items()}
    out = Path(cfg.out)
    write_json(out.with_suffix(".json"), payload)
    write_text(out.with_suffix(".md"), markdown_report(payload))
    plot(payload, out.with_suffix(".png"))
    if profiles:
        from odllm.bench.profile import profile_report

        write_text(f"{out}-profile.txt", profile_report(payload, {k: p["operators"] for k, p in profiles.items()}))
    log.info("inference benchmark written to %s.{json,md,png}%s in %.0f s", out,
             " and -profile.txt" if profiles else "", payload["seconds"])
    return payload


# --------------------------------------------------------------------------------------------------------------
# Reports


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"  # MB of 10^6 bytes, as in the compression tables


def markdown_report(payload: dict) -> str:
    m, p = payload["machine"], payload["protocol"]
    lines = [
        f"# Inference benchmark: {payload['dataset']}", "",
        f"{m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']}, {m['threads']} thread(s) per process; "
        f"load average {m['load_average_before'][0]:.2f} before, {m['load_average_after'][0]:.2f} after (other jobs "
        "inflate every number alike; ratios are paired: models interleaved call by call)"
        + {True: "; q/k/v and gate/up fused in every model (odllm.bench.fusion).",
           "both": "; '+fused' rows: the same model with q/k/v and gate/up fused (odllm.bench.fusion)."
           }.get(p["fuse"], "."),
        f"Latency: batch 1, {p['num_beams']} beams, history (up to {p['max_history']} items) -> top items, mean over "
        f"{p['latency_users']} seeded test users per repeat, median [IQR] over {p['repeats']} repeats; CPU ms: process "
        f"CPU time of the same calls. Throughput: {p['throughput_users']} seeded test users at the batch size shown. "
        f"Peak RSS: one process per model; 'over baseline' subtracts a process with the same imports and no model "
        f"({_mb(payload['baseline_maxrss_bytes'])} MB). Weights: parameters + persistent buffers in memory (shared "
        "tensors once), safetensors bytes on disk.", "",
    ]
    head = ["model", "what it holds", "latency ms", "x dense", "CPU ms (x dense)", "users/s (batch)", "x dense",
            "peak RSS MB", "over baseline MB (batch 1 / peak)", "weights in memory MB (model / decoder linears)",
            "x dense", "on disk MB (model / decoder linears)", "x dense", "top-10 overlap"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in payload["rows"]:
        lat, ratio, thr, r = row["latency_ms"], row["latency_ratio"], row["throughput_users_per_s"], row["ratios"]
        mem, disk, over = row["memory_bytes"], row["disk_bytes"], row["maxrss_over_baseline_bytes"]
        cells = [
            row["label"], row["description"], f"{lat['median']:.1f} [{lat['q1']:.1f}-{lat['q3']:.1f}]",
            f"{ratio['median']:.3f} [{ratio['q1']:.3f}-{ratio['q3']:.3f}]",
            f"{row['cpu_ms']['median']:.1f} ({row['cpu_ratio']['median']:.3f})",
            f"{thr['median']:.1f} ({row['batch_size']})", f"{row['throughput_ratio']['median']:.3f}",
            _mb(row["maxrss_bytes"]["peak"]), f"{_mb(over['batch1'])} / {_mb(over['peak'])}",
            f"{_mb(mem['model']['bytes'])} / {_mb(mem['decoder_linear']['bytes'])}",
            f"{r['memory_model']:.3f} / {r['memory_decoder_linear']:.3f}",
            f"{_mb(disk['model']['bytes'])} / {_mb(disk['decoder_linear']['bytes'])}",
            f"{r['disk_model']:.3f} / {r['disk_decoder_linear']:.3f}", f"{row['top10_overlap_with_dense']:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    simulated = [row["label"] for row in payload["rows"] if row["simulated"]]
    if simulated:
        lines += ["", f"SIMULATED compression (dense storage, no saving in bytes or time): {', '.join(simulated)}."]
    lines += ["", f"Run took {payload['seconds']:.0f} s. Per-call latency percentiles, per-repeat values and "
              "RSS after load are in the JSON."]
    if "profile" in payload:
        from odllm.bench.profile import profile_table

        lines += ["", *profile_table(payload["profile"])]
    return "\n".join(lines) + "\n"


def plot(payload: dict, path: Path) -> None:
    """Per model: latency, 1/throughput, weights (memory, disk) and peak RSS over baseline, relative to dense."""
    from matplotlib.figure import Figure  # object API: no pyplot, no global backend; PNG renders with Agg

    rows = payload["rows"]
    series = [
        ("batch-1 latency", lambda r: r["latency_ratio"]["median"]),
        ("time per user at batch (1/throughput)", lambda r: 1 / r["throughput_ratio"]["median"]),
        ("weights in memory (whole model)", lambda r: r["ratios"]["memory_model"]),
        ("weights in memory (decoder linears)", lambda r: r["ratios"]["memory_decoder_linear"]),
        ("weights on disk (whole model)", lambda r: r["ratios"]["disk_model"]),
        ("peak RSS over baseline", lambda r: r["ratios"]["peak_rss_over_baseline"] or 0.0),
    ]
    fig = Figure(figsize=(max(6, 1.6 * len(rows) + 3), 4.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(series)
    for i, (name, value) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))]
        errors = None
        if i == 0:  # the latency IQR
            q = [r["latency_ratio"] for r in rows]
            errors = [[max(0.0, x["median"] - x["q1"]) for x in q], [max(0.0, x["q3"] - x["median"]) for x in q]]
        ax.bar(xs, [value(r) for r in rows], width, label=name, yerr=errors, capsize=2)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(0.65, color="tab:red", linestyle="--", linewidth=0.8, label="latency target 0.65")
    ax.axhline(0.55, color="tab:purple", linestyle=":", linewidth=0.8, label="weights target 0.55")
    ax.set_xticks(range(len(rows)), [r["label"] + (" (simulated)" if r["simulated"] else "") for r in rows],
                  rotation=20, ha="right")
    ax.set_ylabel("relative to dense")
    ax.set_title(f"{payload['dataset']}: inference cost relative to dense (threads={payload['machine']['threads']})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.savefig(path, dpi=120)


def _run(cfg: DictConfig) -> None:
    from omegaconf import OmegaConf

    keys = ("models", "threads", "repeats", "latency_users", "throughput_users", "batch_size", "batch_sizes", "fuse",
            "out")
    log.info("config:\n%s", OmegaConf.to_yaml({k: cfg[k] for k in keys}))
    run_inference_benchmark(cfg)


def main() -> None:
    import hydra  # here, not at the top: worker processes import this module and need no Hydra

    hydra.main(version_base="1.3", config_path="../../conf", config_name="inference")(_run)()


if __name__ == "__main__":
    main()
