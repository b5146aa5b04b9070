"""Inference benchmark: latency, throughput, memory and weight bytes of saved models on this CPU, in one run.

``python -m odllm.inference_benchmark dataset=instruments 'models=[odllm-r0.5,svd-r0.5]'`` measures the dense
model (always first) and every listed model (a directory, or a name resolved to ``<models_dir>/<dataset>-<name>``):

- **latency**: one user at a time (batch 1, ``eval.num_beams`` beams, constrained beam search), from the item
  history to the ranked items, over a fixed seeded set of test users after warm-up; each repeat gives the mean
  over those users, and the table reports the median over repeats with the interquartile range, in wall time
  and in process CPU time (which other jobs on a shared machine inflate far less);
- **throughput**: users per second over a fixed seeded set of test users at the model's batch size
  (``batch_size``, or ``batch_sizes[<label>]``);
- **peak resident memory**: every model runs in its own fresh Python process; ``ru_maxrss`` after the
  batch-1 phase and after the throughput phase, and its increase over a baseline process that made the same
  imports (torch, transformers, odllm, the model class) but loaded no model;
- **weight bytes** in memory (parameters and persistent buffers, a shared tensor counted once; a compressed
  module that reports its own ``storage()`` counts what that reports) and on disk (the safetensors files,
  per tensor from their headers), for the whole model and for the decoder linears alone.

Measurements go round-robin over the models at the finest grain (user 1 on dense, A, B, then user 2 ...; batch by
batch for throughput), one process busy at a time, so bursts of load from other jobs hit every model alike; ratios
to dense are taken per repeat (paired) and then summarised (median and IQR over repeats).
``profile=true`` adds, per model, where batch-1 time goes (decoder linears, attention, MLP activation, norms,
embedding, lm_head, other model code, and beam search outside the model) from module hooks, and a
torch.profiler table of the top operators. Outputs: ``<out>.json``, ``<out>.md``, ``<out>.png`` and
``<out>-profile.txt``.
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
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from omegaconf import DictConfig

# Worker processes import this module: it imports only torch at the top, the rest where it is used, so the
# baseline process holds torch, transformers and odllm's model code, not Hydra, Lightning or torchmetrics.

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]
DENSE = "dense"


# --------------------------------------------------------------------------------------------------------------
# Weight bytes (in memory and on disk) and what a saved model really holds


def _is_compressed(module: nn.Module) -> bool:
    """A module written by a compression method: it names its ``kind`` and can describe itself (``spec``)."""
    return hasattr(module, "kind") and callable(getattr(module, "spec", None))


def weight_modules(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost linears and compressed modules under ``root`` (a compressed module's inner linears are
    part of it), with their names relative to ``root``."""
    found = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if _is_compressed(child) or isinstance(child, nn.Linear):
                found.append((full, child))
            else:
                visit(full + ".", child)

    visit("", root)
    return found


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no decoder layers at model.model.layers")
    return layers


def decoder_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(full name, module)`` of every weight module in the decoder layers (q/k/v/o/gate/up/down in LLaMA)."""
    names = {id(m): n for n, m in model.named_modules()}
    return [(names[id(m)], m) for layer in decoder_layers(model) for _, m in weight_modules(layer)]


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def held_bytes(roots: list[nn.Module]) -> dict:
    """Bytes held by the weights under ``roots``: parameters and persistent buffers, each tensor once (tied
    weights share one tensor); a module with a ``storage()`` method (compressed modules whose state is not
    all in parameters/buffers, e.g. bitsandbytes' quantization state) counts what it reports.

    Also returns the dtypes of what is held, so a table can say what the storage really is.
    """
    seen_modules: set[int] = set()
    seen_tensors: set[int] = set()
    total = {"bytes": 0, "numbers": 0}
    dtypes: Counter = Counter()

    def visit(module: nn.Module) -> None:
        if id(module) in seen_modules:
            return
        seen_modules.add(id(module))
        report = getattr(module, "storage", None)
        tensors = [*module.parameters(recurse=False)]
        tensors += [b for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]
        if callable(report):
            stored = report()
            total["bytes"] += int(stored["bytes"])
            total["numbers"] += int(stored.get("params", 0))
            for t in module.parameters(recurse=True):
                dtypes[str(t.dtype).removeprefix("torch.")] += _tensor_bytes(t)
            for _, b in module.named_buffers(recurse=True):
                dtypes[str(b.dtype).removeprefix("torch.")] += _tensor_bytes(b)
            seen_tensors.update(id(t) for t in [*module.parameters(), *module.buffers()])
            return
        for t in tensors:
            if t is None or id(t) in seen_tensors:
                continue
            seen_tensors.add(id(t))
            total["bytes"] += _tensor_bytes(t)
            total["numbers"] += t.numel()
            dtypes[str(t.dtype).removeprefix("torch.")] += _tensor_bytes(t)
        for child in module.children():
            visit(child)

    for root in roots:
        visit(root)
    return {**total, "dtypes": dict(dtypes)}


def memory_bytes(model: nn.Module) -> dict:
    """Weight bytes in memory: the whole model and the decoder linears alone."""
    return {
        "model": held_bytes([model]),
        "decoder_linear": held_bytes([m for _, m in decoder_linears(model)]),
    }


def safetensors_sizes(path: Path) -> dict[str, int]:
    """Bytes of every tensor in a safetensors file, from its header (the data is not read)."""
    with path.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    return {name: info["data_offsets"][1] - info["data_offsets"][0]
            for name, info in header.items() if name != "__metadata__"}


def disk_bytes(directory: Path, linear_names: list[str]) -> dict:
    """The safetensors files of a saved model: total file bytes, and the tensors of the decoder linears."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} holds no *.safetensors weights")
    sizes: dict[str, int] = {}
    for file in files:
        sizes.update(safetensors_sizes(file))
    prefixes = tuple(f"{name}." for name in linear_names)
    return {
        "model": {"bytes": sum(f.stat().st_size for f in files), "files": [f.name for f in files]},
        "decoder_linear": {"bytes": sum(b for name, b in sizes.items() if name.startswith(prefixes))},
    }


def describe_model(directory: Path, model: nn.Module) -> dict:
    """What a saved model is, from its own files and modules (nothing is assumed from its name).

    ``simulated`` is true when the metadata says the model was compressed but every decoder linear is still a
    plain float linear (e.g. fake-quantized or masked weights in dense storage), or when the saved metadata
    itself says so; such a model saves neither bytes nor time, and the tables say it.
    """
    meta_file, spec_file = directory / "odllm.json", directory / "compression.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    specs = json.loads(spec_file.read_text()) if spec_file.exists() else {}
    kinds = Counter("lowrank" if isinstance(s, int) else s.get("kind", "?") for s in specs.values())
    linears = decoder_linears(model)
    classes = Counter(type(m).__name__ for _, m in linears)
    compression = meta.get("compression")
    plain = all(type(m) is nn.Linear and m.weight.is_floating_point() for _, m in linears)
    flagged = bool(
        (compression or {}).get("simulated")
        or ((compression or {}).get("settings") or {}).get("simulated")
        or any(isinstance(s, dict) and s.get("simulated") for s in specs.values())
    )
    simulated = flagged or (compression is not None and plain)
    linear_held = held_bytes([m for _, m in linears])["dtypes"]
    storage = " + ".join(f"{d}" for d, _ in sorted(linear_held.items(), key=lambda kv: -kv[1]))
    if compression is None and not specs:
        label = f"dense ({storage})"
    else:
        method = (compression or {}).get("method", "?")
        ratio = (compression or {}).get("ratio")
        kind_text = ", ".join(f"{n}x {k}" for k, n in sorted(kinds.items())) or "no compressed modules"
        label = f"{method}{'' if ratio is None else f' r{ratio:g}'}: {kind_text}; decoder linears held as {storage}"
        if simulated:
            label += "; SIMULATED: decoder linears are plain float linears (dense storage, no saving in bytes or time)"
    return {
        "compression": compression,
        "compression_kinds": dict(kinds),
        "decoder_linear_classes": dict(classes),
        "decoder_linear_dtypes": linear_held,
        "simulated": simulated,
        "label": label,
    }


# --------------------------------------------------------------------------------------------------------------
# The worker: one fresh process per model, driven over stdin/stdout by the orchestrator


def _maxrss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _current_rss_bytes() -> int | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def import_runtime(dense_dir: str | None) -> None:
    """What every worker imports before measuring: the baseline makes exactly these imports and stops."""
    import transformers  # noqa: F401
    from transformers import AutoConfig, AutoTokenizer  # noqa: F401
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    import odllm.generation  # noqa: F401
    import odllm.recommender  # noqa: F401

    if dense_dir is not None:  # transformers imports model classes lazily: resolve the architecture's module too
        MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(dense_dir))]


class Worker:
    """One model in one process: loads it, then answers ``latency``, ``throughput`` and ``profile`` requests."""

    def __init__(self, spec: dict):
        from odllm.recommender import Recommender

        self.spec = spec
        self.directory = Path(spec["model_dir"])
        started = time.perf_counter()
        self.rec = Recommender.load(self.directory)
        self.load_seconds = time.perf_counter() - started
        self.model = self.rec.model.eval()
        started = time.perf_counter()
        self.trie = self.rec.trie()
        self.trie_seconds = time.perf_counter() - started
        self.pad_id = self.rec.tokenizer.pad_token_id
        self.by_ids = {tuple(ids): item for item, ids in self.rec.encoder.item_ids.items()}
        self.latency_users = spec["latency"]
        self.throughput_users = spec["throughput"]

    def info(self) -> dict:
        linears = decoder_linears(self.model)
        return {
            "chunks": len(self.chunks()),
            "load_seconds": self.load_seconds,
            "trie_build_seconds": self.trie_seconds,
            "memory_bytes": memory_bytes(self.model),
            "disk_bytes": disk_bytes(self.directory, [n for n, _ in linears]),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            **describe_model(self.directory, self.model),
        }

    def recommend_one(self, user: dict) -> list[str]:
        """One user's top-k items from the history: encode, beam search at batch 1, map codes to items."""
        from odllm.generation import recommend

        encoder = self.rec.encoder
        recs = recommend(self.model, [encoder.prompt(user["history"], self.spec["template"])],
                         [encoder.item(user["target"])], self.trie, num_beams=self.spec["num_beams"],
                         batch_size=1, pad_id=self.pad_id, progress=False)
        return [self.by_ids[c] for c in recs.top_codes[0][: self.spec["top_k"]]]

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
        users = sorted(self.throughput_users, key=lambda u: len(u["history"]))
        size = self.spec["batch_size"]
        return [users[i : i + size] for i in range(0, len(users), size)]

    def throughput(self, users: list[dict] | None = None, chunk: int | None = None) -> dict:
        """Times recommending ``users``, else batch ``chunk`` of :meth:`chunks`, else every throughput user."""
        from odllm.generation import recommend

        if users is None:
            users = self.throughput_users if chunk is None else self.chunks()[chunk]
        encoder = self.rec.encoder
        with torch.inference_mode():
            started = time.perf_counter()
            prompts = [encoder.prompt(u["history"], self.spec["template"]) for u in users]
            recommend(self.model, prompts, [encoder.item(u["target"]) for u in users], self.trie,
                      num_beams=self.spec["num_beams"], batch_size=self.spec["batch_size"], pad_id=self.pad_id,
                      progress=False)
            seconds = time.perf_counter() - started
        return {"seconds": seconds, "users": len(users), "users_per_second": len(users) / seconds}

    def warmup(self, phase: str) -> dict:
        """Untimed calls before a phase: ``latency`` (a few users at batch 1) or ``throughput`` (one batch).
        Kept apart so the peak RSS after the batch-1 phase has seen no large batch."""
        if self.spec["warmup"] > 0:
            if phase == "latency":
                self.latency(self.latency_users[: self.spec["warmup"]])
            else:
                self.throughput(self.chunks()[0])
        return {}

    def profile(self) -> dict:
        users = self.latency_users[: self.spec["profile_users"]]
        breakdown = time_breakdown(self, users)
        breakdown.update(free_linears_floor(self, users))
        return {"breakdown": breakdown, "operators": operator_table(self, users)}


class _FreeLinear(nn.Module):
    """Stands in for a decoder linear at (almost) no cost: returns a cached zero tensor of the output shape."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features
        self.outputs: dict[tuple[int, ...], torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.out_features)
        if shape not in self.outputs:
            self.outputs[shape] = x.new_zeros(shape)
        return self.outputs[shape]


CLOCK_KEY = {"process CPU time": "cpu_seconds", "wall time": "seconds"}


def profile_clock() -> str:
    """The profile's clock: process CPU time with one thread (other jobs barely inflate it, and on an idle
    machine it equals wall time), wall time with several (CPU time would add the threads up)."""
    return "process CPU time" if torch.get_num_threads() == 1 else "wall time"


def free_linears_floor(worker: Worker, users: list[dict], rounds: int = 3) -> dict:
    """Batch-1 latency with every decoder linear replaced by a free stand-in: a lower bound for any method
    that only makes the decoder linears cheaper (low rank, quantization, sparsity) in this runtime. The
    stand-ins return zeros, so the recommendations are meaningless; the work around them has the same shapes.
    Real and free alternate user by user; the ratio is the median of the paired per-call ratios."""
    model = worker.model
    originals = decoder_linears(model)
    stand_ins = [(name, _FreeLinear(m.out_features if hasattr(m, "out_features") else m.weight.shape[0]))
                 for name, m in originals]

    def swap(modules: list[tuple[str, nn.Module]]) -> None:
        for name, module in modules:
            model.set_submodule(name, module)

    real, free = [], []
    try:
        swap(stand_ins)
        worker.latency(users[:1])  # the stand-ins cache their outputs
        swap(originals)
        for _ in range(rounds):
            for user in users:
                real += worker.latency([user])[CLOCK_KEY[profile_clock()]]
                swap(stand_ins)
                free += worker.latency([user])[CLOCK_KEY[profile_clock()]]
                swap(originals)
    finally:
        swap(originals)
    return {"free decoder linears ms": 1000 * statistics.median(free),
            "real decoder linears ms": 1000 * statistics.median(real),
            "free / real": statistics.median(f / r for f, r in zip(free, real, strict=True))}


def time_breakdown(worker: Worker, users: list[dict]) -> dict:
    """Where batch-1 time goes, from forward hooks timing each module (inclusive), split into exclusive parts.

    Parts: decoder linears; attention without its linears (rotary application, SDPA, KV-cache update,
    reshapes); MLP activation (SiLU, gate product); RMS norms; token embedding; lm_head; rotary embedding;
    the rest of the model's forward (mask building, residual adds, layer glue, hook cost); and beam search
    outside the model (log-softmax, trie masks, top-k, cache regrouping, prompt encoding, Python). The
    prompt pass and the decoding steps are reported apart. Hooks cost a few microseconds each, so the total
    with hooks is reported beside the total without. Times are on :func:`profile_clock`.
    """
    model = worker.model
    layers = decoder_layers(model)
    parts: dict[int, str] = {}
    for layer in layers:
        for name, module in layer.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if name == "self_attn" or leaf == "self_attn":
                parts[id(module)] = "attention (incl. its linears)"
            elif leaf == "mlp":
                parts[id(module)] = "mlp (incl. its linears)"
            elif "norm" in type(module).__name__.lower():
                parts[id(module)] = "norms"
        for _, module in weight_modules(layer):
            parts[id(module)] = "decoder linears"
    base = model.model
    if "norm" in type(getattr(base, "norm", None)).__name__.lower():
        parts[id(base.norm)] = "norms"
    parts[id(model.get_input_embeddings())] = "embedding"
    parts[id(model.get_output_embeddings())] = "lm_head"
    if isinstance(getattr(base, "rotary_emb", None), nn.Module):
        parts[id(base.rotary_emb)] = "rotary embedding"
    parts[id(model)] = "model"
    inside = {}  # linears inside attention / mlp, to make those two exclusive
    for layer in layers:
        for owner, key in ((getattr(layer, "self_attn", None), "attention"), (getattr(layer, "mlp", None), "mlp")):
            if owner is not None:
                for _, module in weight_modules(owner):
                    inside[id(module)] = key

    clock = time.process_time if profile_clock() == "process CPU time" else time.perf_counter
    totals: dict[tuple[str, str], float] = defaultdict(float)
    calls: Counter = Counter()
    starts: dict[int, float] = {}
    phase = ["prompt"]

    def pre(module, args, kwargs):
        if module is model:
            phase[0] = "prompt" if kwargs.get("cache") is None and kwargs.get("past_key_values") is None else "steps"
        starts[id(module)] = clock()

    def post(module, args, kwargs, output):
        elapsed = clock() - starts.pop(id(module))
        totals[(phase[0], parts[id(module)])] += elapsed
        if id(module) in inside:
            totals[(phase[0], f"{inside[id(module)]} linears")] += elapsed
        calls[(phase[0], parts[id(module)])] += 1

    modules = {id(m): m for m in model.modules() if id(m) in parts}
    handles = [h for m in modules.values() for h in (m.register_forward_pre_hook(pre, with_kwargs=True),
                                                      m.register_forward_hook(post, with_kwargs=True))]
    try:
        with torch.inference_mode():
            started = clock()
            for user in users:
                worker.recommend_one(user)
            hooked = clock() - started
    finally:
        for h in handles:
            h.remove()
    plain = sum(worker.latency(users)[CLOCK_KEY[profile_clock()]])

    result: dict[str, dict[str, float]] = {}
    for ph in ("prompt", "steps"):
        t = {name: totals[(ph, name)] for name in {n for (p, n) in totals if p == ph}}
        exclusive = {
            "decoder linears": t.get("decoder linears", 0.0),
            "attention (excl. linears)": t.get("attention (incl. its linears)", 0.0) - t.get("attention linears", 0.0),
            "mlp activation": t.get("mlp (incl. its linears)", 0.0) - t.get("mlp linears", 0.0),
            "norms": t.get("norms", 0.0),
            "embedding": t.get("embedding", 0.0),
            "lm_head": t.get("lm_head", 0.0),
            "rotary embedding": t.get("rotary embedding", 0.0),
        }
        exclusive["other model code"] = t.get("model", 0.0) - sum(exclusive.values())
        result[ph] = exclusive
    model_total = sum(sum(v.values()) for v in result.values())
    n = len(users)
    return {
        "clock": profile_clock(),
        "users": n,
        "ms_per_user": {ph: {k: 1000 * v / n for k, v in parts_.items()} for ph, parts_ in result.items()},
        "beam search outside the model ms": 1000 * (hooked - model_total) / n,
        "total with hooks ms": 1000 * hooked / n,
        "total without hooks ms": 1000 * plain / n,
        "model forward calls per user": {ph: calls[(ph, "model")] / n for ph in ("prompt", "steps")},
    }


def operator_table(worker: Worker, users: list[dict], rows: int = 15) -> str:
    """torch.profiler's top operators by self CPU time over the same batch-1 recommendations."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.inference_mode():
        for user in users:
            worker.recommend_one(user)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40)


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
    after_imports = _maxrss_bytes()
    answers.write(json.dumps({"maxrss_after_imports": after_imports, "threads": torch.get_num_threads()}) + "\n")
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
            [sys.executable, "-c", "from odllm.inference_benchmark import worker_main; worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, bufsize=1,
        )
        self.process.stdin.write(json.dumps(spec) + "\n")
        self.process.stdin.flush()
        self.started = None

    def read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            raise RuntimeError(f"the worker for {self.label} exited (code {code}); its stderr is above")
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
    from odllm.evaluation import latest_model_dir

    dense = latest_model_dir(cfg)
    chosen = [(DENSE, dense)]
    for entry in cfg.models or []:
        entry = str(entry)
        path = Path(entry)
        if not (path / "config.json").exists():
            path = Path(cfg.paths.models_dir) / f"{cfg.dataset.name}-{entry}"
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"models entry {entry!r}: neither {entry} nor {path} holds a saved model (config.json); "
                f"give a model directory or a name such as odllm-r0.5 for <models_dir>/{cfg.dataset.name}-<name>"
            )
        if path.resolve() in {p.resolve() for _, p in chosen}:
            continue
        label = entry if path.name == f"{cfg.dataset.name}-{entry}" else path.name
        chosen.append((label, path))
    if not (dense / "config.json").exists():
        raise FileNotFoundError(f"no dense model at {dense}: train one (python train.py dataset=...) or set model_dir")
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
    from odllm.data import leave_one_out, load_dataset

    split = leave_one_out(load_dataset(cfg.dataset), max_history)
    rows = [{"user": e.user, "history": list(e.history), "target": e.target} for e in split.test]
    pick = random.Random(cfg.seed)
    latency = pick.sample(rows, min(cfg.latency_users, len(rows)))
    throughput = pick.sample(rows, min(cfg.throughput_users, len(rows)))
    return latency, throughput


def _quantiles(values: list[float]) -> dict:
    values = sorted(values)
    if len(values) == 1:
        return {"median": values[0], "q1": values[0], "q3": values[0], "p10": values[0], "p90": values[0]}
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


def run_inference_benchmark(cfg: DictConfig) -> dict:
    from odllm.evaluation import write_json

    if cfg.repeats < 1 or cfg.latency_users < 1 or cfg.throughput_users < 1 or cfg.threads < 1:
        raise ValueError("repeats, latency_users, throughput_users and threads must all be >= 1")
    models = resolve_models(cfg)
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
    try:
        baseline = WorkerProcess("baseline", {**base_spec, "model_dir": None, "latency": [], "throughput": []},
                                 cfg.threads)
        for label, path in models:  # started together: their imports overlap, their measurements never do
            spec = {**base_spec, "model_dir": str(path), "batch_size": batch_sizes[label]}
            workers[label] = WorkerProcess(label, spec, cfg.threads)
        baseline_rss = baseline.read()["maxrss_after_imports"]
        baseline.process.wait()
        log.info("baseline process (imports, no model): peak RSS %.1f MB", baseline_rss / 2**20)
        info = {}
        for label, w in workers.items():
            info[label] = {**w.read(), **w.request("load")}
            log.info("%s loaded in %.1f s: %s", label, info[label]["load_seconds"], info[label]["label"])
            w.request("warmup", phase="latency")
        # round-robin at the finest grain: each user (each batch) goes through every model before the next one,
        # so a burst of load from other jobs hits all models alike
        latency = {label: [[] for _ in range(cfg.repeats)] for label in workers}
        cpu = {label: [[] for _ in range(cfg.repeats)] for label in workers}
        tops = {label: [] for label in workers}
        for r in range(cfg.repeats):
            for i in range(len(latency_users)):
                for label, w in workers.items():
                    answer = w.request("latency", index=i)
                    latency[label][r] += answer["seconds"]
                    cpu[label][r] += answer["cpu_seconds"]
                    if r == 0:
                        tops[label] += answer["top"]
            log.info("latency repeat %d/%d: %s", r + 1, cfg.repeats,
                     ", ".join(f"{label} {1000 * statistics.mean(latency[label][r]):.1f} ms" for label in workers))
        batch1_rss = {label: w.request("memory")["maxrss"] for label, w in workers.items()}
        throughput = {label: [] for label in workers}
        for w in workers.values():
            w.request("warmup", phase="throughput")
        for r in range(cfg.repeats):
            spent = dict.fromkeys(workers, 0.0)
            for j in range(max(info[label]["chunks"] for label in workers)):
                for label, w in workers.items():
                    if j < info[label]["chunks"]:
                        spent[label] += w.request("throughput", chunk=j)["seconds"]
            for label in workers:
                throughput[label].append(len(throughput_users) / spent[label])
            log.info("throughput repeat %d/%d: %s", r + 1, cfg.repeats,
                     ", ".join(f"{label} {throughput[label][-1]:.1f} users/s" for label in workers))
        peak_rss = {label: w.request("memory")["maxrss"] for label, w in workers.items()}
        profiles = {}
        if cfg.profile:
            for label, w in workers.items():
                log.info("profiling %s on %d users", label, min(cfg.profile_users, len(latency_users)))
                profiles[label] = w.request("profile")
    finally:
        for w in workers.values():
            w.close()
        if "baseline" in locals():
            baseline.close()
    seconds = time.perf_counter() - started

    rows = []
    dense_means = [statistics.mean(s) for s in latency[DENSE]]
    dense_cpu = [statistics.mean(s) for s in cpu[DENSE]]
    for label, path in models:
        means = [statistics.mean(s) for s in latency[label]]
        calls = [x for s in latency[label] for x in s]
        paired = [x / d for s, ds in zip(latency[label], latency[DENSE], strict=True)
                  for x, d in zip(s, ds, strict=True)]
        overlap = [len(set(a) & set(b)) / max(1, len(a)) for a, b in zip(tops[DENSE], tops[label], strict=True)]
        about = info[label]
        row = {
            "label": label,
            "model_dir": str(path),
            "description": about["label"],
            "simulated": about["simulated"],
            "compression": about["compression"],
            "compression_kinds": about["compression_kinds"],
            "decoder_linear_classes": about["decoder_linear_classes"],
            "decoder_linear_dtypes": about["decoder_linear_dtypes"],
            "parameters": about["parameters"],
            "latency_ms": {k: 1000 * v for k, v in _quantiles(means).items()},
            "latency_ms_per_call": {k: 1000 * v for k, v in _quantiles(calls).items()},
            "latency_repeats_ms": [1000 * m for m in means],
            "latency_ratio": _quantiles([m / d for m, d in zip(means, dense_means, strict=True)]),
            "latency_ratio_per_call": _quantiles(paired),
            "cpu_ms": {k: 1000 * v for k, v in _quantiles([statistics.mean(s) for s in cpu[label]]).items()},
            "cpu_ratio": _quantiles([statistics.mean(s) / d for s, d in zip(cpu[label], dense_cpu, strict=True)]),
            "batch_size": batch_sizes[label],
            "throughput_users_per_s": _quantiles(throughput[label]),
            "throughput_repeats": throughput[label],
            "throughput_ratio": _quantiles([t / d for t, d in zip(throughput[label], throughput[DENSE], strict=True)]),
            "maxrss_bytes": {"batch1": batch1_rss[label], "peak": peak_rss[label],
                             "after_load": about["maxrss_after_load"]},
            "maxrss_over_baseline_bytes": {"batch1": batch1_rss[label] - baseline_rss,
                                           "peak": peak_rss[label] - baseline_rss},
            "memory_bytes": about["memory_bytes"],
            "disk_bytes": about["disk_bytes"],
            "load_seconds": about["load_seconds"],
            "trie_build_seconds": about["trie_build_seconds"],
            "top10_overlap_with_dense": statistics.mean(overlap),
        }
        rows.append(row)
    dense = rows[0]
    for row in rows:
        row["ratios"] = {
            "latency": row["latency_ratio"]["median"],
            "cpu_time": row["cpu_ratio"]["median"],
            "throughput": row["throughput_ratio"]["median"],
            "memory_model": row["memory_bytes"]["model"]["bytes"] / dense["memory_bytes"]["model"]["bytes"],
            "memory_decoder_linear": (row["memory_bytes"]["decoder_linear"]["bytes"]
                                      / dense["memory_bytes"]["decoder_linear"]["bytes"]),
            "disk_model": row["disk_bytes"]["model"]["bytes"] / dense["disk_bytes"]["model"]["bytes"],
            "disk_decoder_linear": (row["disk_bytes"]["decoder_linear"]["bytes"]
                                    / dense["disk_bytes"]["decoder_linear"]["bytes"]),
            # None when the dense model's increase is not positive (a tiny model within the baseline's noise)
            "peak_rss_over_baseline": (row["maxrss_over_baseline_bytes"]["peak"]
                                       / dense["maxrss_over_baseline_bytes"]["peak"]
                                       if dense["maxrss_over_baseline_bytes"]["peak"] > 0 else None),
        }
    payload = {
        "dataset": cfg.dataset.name,
        "machine": {"cpu": _cpu_name(), "logical_cpus": os.cpu_count(), "threads": cfg.threads,
                    "torch": torch.__version__, "python": platform.python_version(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "protocol": {"num_beams": cfg.eval.num_beams, "repeats": cfg.repeats, "warmup_users": cfg.warmup,
                     "latency_users": len(latency_users), "throughput_users": len(throughput_users),
                     "seed": cfg.seed, "template": cfg.eval.template, "max_history": max_history,
                     "order": "round-robin over models per user (latency), per batch (throughput)"},
        "baseline_maxrss_bytes": baseline_rss,
        "seconds": round(seconds, 1),
        "rows": rows,
    }
    if profiles:
        payload["profile"] = {label: p["breakdown"] for label, p in profiles.items()}
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), payload)
    out.with_suffix(".md").write_text(markdown_report(payload))
    plot(payload, out.with_suffix(".png"))
    if profiles:
        Path(f"{out}-profile.txt").write_text(profile_report(payload, {k: p["operators"] for k, p in profiles.items()}))
    log.info("inference benchmark written to %s.{json,md,png}%s in %.0f s", out,
             " and -profile.txt" if profiles else "", seconds)
    return payload


# --------------------------------------------------------------------------------------------------------------
# Reports


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f}"


def markdown_report(payload: dict) -> str:
    m, p = payload["machine"], payload["protocol"]
    lines = [
        f"# Inference benchmark: {payload['dataset']}",
        "",
        f"{m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']}, {m['threads']} thread(s) per process; "
        f"load average {m['load_average_before'][0]:.2f} before, {m['load_average_after'][0]:.2f} after "
        "(other jobs on the machine inflate every number alike; ratios are paired: models interleaved call by call).",
        f"Latency: one user per call (batch 1), {p['num_beams']} beams, constrained beam search, history "
        f"(up to {p['max_history']} items) -> top items, "
        f"mean over {p['latency_users']} seeded test users per repeat; median [IQR] over {p['repeats']} repeats "
        "after warm-up, models in round-robin user by user; CPU ms is the process CPU time of the same calls (with "
        "threads=1 it equals wall time on an idle machine and is far less inflated by other jobs than wall time). "
        f"Throughput: {p['throughput_users']} seeded test users "
        "at the batch size shown. Peak RSS: each model in its own process; 'over baseline' subtracts a process with "
        f"the same imports and no model ({_mb(payload['baseline_maxrss_bytes'])} MB). Weights: parameters + persistent "
        "buffers in memory (shared tensors once), safetensors bytes on disk.",
        "",
    ]
    head = ["model", "what it holds", "latency ms", "x dense", "CPU ms (x dense)", "users/s (batch)", "x dense",
            "peak RSS MB",
            "over baseline MB (batch 1 / peak)", "weights in memory MB (model / decoder linears)", "x dense",
            "on disk MB (model / decoder linears)", "x dense", "top-10 overlap"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in payload["rows"]:
        lat, ratio, thr = row["latency_ms"], row["latency_ratio"], row["throughput_users_per_s"]
        mem, disk, r = row["memory_bytes"], row["disk_bytes"], row["ratios"]
        over = row["maxrss_over_baseline_bytes"]
        cells = [
            row["label"],
            row["description"],
            f"{lat['median']:.1f} [{lat['q1']:.1f}-{lat['q3']:.1f}]",
            f"{ratio['median']:.3f} [{ratio['q1']:.3f}-{ratio['q3']:.3f}]",
            f"{row['cpu_ms']['median']:.1f} ({row['cpu_ratio']['median']:.3f})",
            f"{thr['median']:.1f} ({row['batch_size']})",
            f"{row['throughput_ratio']['median']:.3f}",
            _mb(row["maxrss_bytes"]["peak"]),
            f"{_mb(over['batch1'])} / {_mb(over['peak'])}",
            f"{_mb(mem['model']['bytes'])} / {_mb(mem['decoder_linear']['bytes'])}",
            f"{r['memory_model']:.3f} / {r['memory_decoder_linear']:.3f}",
            f"{_mb(disk['model']['bytes'])} / {_mb(disk['decoder_linear']['bytes'])}",
            f"{r['disk_model']:.3f} / {r['disk_decoder_linear']:.3f}",
            f"{row['top10_overlap_with_dense']:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    simulated = [row["label"] for row in payload["rows"] if row["simulated"]]
    if simulated:
        lines += ["", f"SIMULATED compression (dense storage, no saving in bytes or time): {', '.join(simulated)}."]
    lines += ["", f"Run took {payload['seconds']:.0f} s. Per-call latency percentiles, per-repeat values and "
              "RSS after load are in the JSON."]
    if "profile" in payload:
        clock = next(iter(payload["profile"].values()))["clock"]
        lines += ["", f"## Where batch-1 time goes (ms per user of {clock}, from module hooks)", ""]
        lines += _profile_table(payload["profile"])
    return "\n".join(lines) + "\n"


def _profile_table(profiles: dict) -> list[str]:
    labels = list(profiles)
    first = profiles[labels[0]]["ms_per_user"]
    names = list(first["prompt"])
    head = ["part", *(f"{label} prompt / steps" for label in labels)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        cells = [f"{profiles[lb]['ms_per_user']['prompt'][name]:.2f} / {profiles[lb]['ms_per_user']['steps'][name]:.2f}"
                 for lb in labels]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    for key in ("beam search outside the model ms", "total with hooks ms", "total without hooks ms",
                "real decoder linears ms", "free decoder linears ms", "free / real"):
        cells = [key.removesuffix(" ms"), *(f"{profiles[lb][key]:.2f}" for lb in labels)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def profile_report(payload: dict, operators: dict[str, str]) -> str:
    clock = next(iter(payload["profile"].values()))["clock"]
    lines = [f"Batch-1 profile, {payload['dataset']}, {payload['machine']['threads']} thread(s), "
             f"{payload['protocol']['num_beams']} beams; times are {clock}.", ""]
    for label, prof in payload["profile"].items():
        total = prof["total with hooks ms"]
        lines.append(f"== {label}: {prof['total without hooks ms']:.2f} ms per user without hooks, {total:.2f} with "
                     f"({prof['users']} users; forward calls per user: {prof['model forward calls per user']})")
        lines.append(f"  if the decoder linears cost nothing: {prof['free decoder linears ms']:.2f} ms per call vs "
                     f"{prof['real decoder linears ms']:.2f} ms with them (medians, calls alternating), paired ratio "
                     f"{prof['free / real']:.2f}x: no method that only shrinks decoder linears can go below this")
        merged: dict[str, float] = defaultdict(float)
        for ph in ("prompt", "steps"):
            for name, ms in prof["ms_per_user"][ph].items():
                merged[name] += ms
        merged["beam search outside the model"] = prof["beam search outside the model ms"]
        for name, ms in sorted(merged.items(), key=lambda kv: -kv[1]):
            phases = prof["ms_per_user"]
            split = (f"  (prompt {phases['prompt'][name]:6.2f}, steps {phases['steps'][name]:6.2f})"
                     if name in phases["prompt"] else "")
            lines.append(f"  {name:32s} {ms:7.2f} ms  {100 * ms / total:5.1f} %{split}")
        lines.append("")
    for label, table in operators.items():
        lines += [f"== {label}: torch.profiler, top operators by self CPU time", table, ""]
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> None:
    """Per model: latency, 1/throughput, weights (memory, disk) and peak RSS over baseline, relative to dense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["rows"]
    series = [
        ("batch-1 latency", lambda r: r["latency_ratio"]["median"],
         lambda r: (r["latency_ratio"]["median"] - r["latency_ratio"]["q1"],
                    r["latency_ratio"]["q3"] - r["latency_ratio"]["median"])),
        ("time per user at batch (1/throughput)", lambda r: 1 / r["throughput_ratio"]["median"], None),
        ("weights in memory (whole model)", lambda r: r["ratios"]["memory_model"], None),
        ("weights in memory (decoder linears)", lambda r: r["ratios"]["memory_decoder_linear"], None),
        ("weights on disk (whole model)", lambda r: r["ratios"]["disk_model"], None),
        ("peak RSS over baseline", lambda r: r["ratios"]["peak_rss_over_baseline"] or 0.0, None),
    ]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows) + 3), 4.5))
    width = 0.8 / len(series)
    for i, (name, value, err) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))]
        ys = [value(r) for r in rows]
        errors = None
        if err is not None:
            pairs = [err(r) for r in rows]
            errors = [[max(0.0, a) for a, _ in pairs], [max(0.0, b) for _, b in pairs]]
        ax.bar(xs, ys, width, label=name, yerr=errors, capsize=2)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(0.65, color="tab:red", linestyle="--", linewidth=0.8, label="latency target 0.65")
    ax.axhline(0.55, color="tab:purple", linestyle=":", linewidth=0.8, label="weights target 0.55")
    ax.set_xticks(range(len(rows)), [r["label"] + (" (simulated)" if r["simulated"] else "") for r in rows],
                  rotation=20, ha="right")
    ax.set_ylabel("relative to dense")
    ax.set_title(f"{payload['dataset']}: inference cost relative to dense (threads={payload['machine']['threads']})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _run(cfg: DictConfig) -> None:
    from omegaconf import OmegaConf

    keys = ("models", "threads", "repeats", "latency_users", "throughput_users", "batch_size", "batch_sizes", "out")
    log.info("config:\n%s", OmegaConf.to_yaml({k: cfg[k] for k in keys}))
    run_inference_benchmark(cfg)


def main() -> None:
    import hydra  # here, not at the top: worker processes import this module and need no Hydra

    hydra.main(version_base="1.3", config_path="../conf", config_name="inference")(_run)()


if __name__ == "__main__":
    main()
