"""The worker: one model in a fresh Python process, answering the benchmark driver over stdin/stdout.

A process per model so that its peak resident memory is its own; :class:`WorkerProcess` is the driver's end.
Protocol: the driver writes one JSON spec line, the worker answers its RSS after imports, then one JSON answer
per request line (``load``, ``memory``, ``warmup``, ``latency``, ``throughput``, ``profile``, ``quit``).

The worker must stay light and its stdout clean: besides torch this module imports only odllm code that the
baseline process imports too (not Hydra, Lightning or torchmetrics); transformers and the saved-model loader are
imported inside functions, once stdout is redirected to stderr (see :func:`worker_main`).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from odllm.bench.fusion import fuse_projections
from odllm.bench.profile import free_linears_floor, operator_table, time_breakdown
from odllm.bench.weights import decoder_linears, describe_model, disk_bytes, memory_bytes
from odllm.eval.generation import recommend

REPO_ROOT = Path(__file__).resolve().parents[2]


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
    # here, not at the top: called once stdout is redirected, and the baseline stops right after
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    import odllm.model.recommender  # noqa: F401

    if dense_dir is not None:  # transformers imports model classes lazily: resolve the architecture's module too
        MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(dense_dir))]


class Worker:
    """One model in one process: loads it, then answers ``latency``, ``throughput`` and ``profile`` requests."""

    def __init__(self, spec: dict):
        from odllm.compress.quant import set_kernels
        from odllm.compress.saved import load_recommender  # imports transformers: only after stdout is redirected

        self.spec, self.directory = spec, Path(spec["model_dir"])
        started = time.perf_counter()
        self.rec = load_recommender(self.directory)
        self.model = self.rec.model.eval()
        if spec.get("kernels"):  # the benchmark's kernels= key; else each QuantLinear's default (ODLLM_KERNELS)
            set_kernels(self.model, spec["kernels"])
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
    import transformers  # after the redirect, as in import_runtime

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
            [sys.executable, "-c", "from odllm.bench.worker import worker_main; worker_main()"],
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
