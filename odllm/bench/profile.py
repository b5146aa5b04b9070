"""Where batch-1 recommendation time goes, for the inference benchmark's ``profile=true``.

Three views of the same calls, per model: forward hooks split the time into exclusive parts (decoder linears,
attention around them, MLP activation, norms, embedding, lm_head, rotary embedding, other model code, and beam
search outside the model; prompt pass and decoding steps apart); the latency with every decoder linear replaced by
a free stand-in (the floor for any method that only makes decoder linears cheaper); and torch.profiler's top
operators. Times are process CPU time with one thread (other jobs barely inflate it), else wall time.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter, defaultdict
from typing import Protocol

import torch
from torch import nn

from odllm.bench.weights import decoder_linears

CLOCK_KEY = {"process CPU time": "cpu_seconds", "wall time": "seconds"}
SUMMARY = ("beam search outside the model ms", "total with hooks ms", "total without hooks ms",
           "real decoder linears ms", "free decoder linears ms", "free / real")


class ProfiledWorker(Protocol):
    """What profiling needs of :class:`odllm.bench.worker.Worker`, which imports this module to answer ``profile``
    requests (so this module cannot import it back)."""

    model: nn.Module

    def latency(self, users: list[dict]) -> dict: ...

    def recommend_one(self, user: dict) -> list[str]: ...


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


def profile_clock() -> str:
    """Process CPU time with one thread (on an idle machine it equals wall time), wall time with several (CPU
    time would add the threads up)."""
    return "process CPU time" if torch.get_num_threads() == 1 else "wall time"


def free_linears_floor(worker: ProfiledWorker, users: list[dict], rounds: int = 3) -> dict:
    """Batch-1 latency with every decoder linear replaced by a free stand-in: a lower bound for any method that
    only makes the decoder linears cheaper (low rank, quantization, sparsity) in this runtime. The stand-ins return
    zeros, so the recommendations are meaningless; the work around them has the same shapes. Real and free
    alternate user by user; the ratio is the median of the paired per-call ratios."""
    model, key = worker.model, CLOCK_KEY[profile_clock()]
    originals = decoder_linears(model)
    stand_ins = [(name, _FreeLinear(m.out_features)) for name, m in originals]

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
                real += worker.latency([user])[key]
                swap(stand_ins)
                free += worker.latency([user])[key]
                swap(originals)
    finally:
        swap(originals)
    return {"free decoder linears ms": 1000 * statistics.median(free),
            "real decoder linears ms": 1000 * statistics.median(real),
            "free / real": statistics.median(f / r for f, r in zip(free, real, strict=True))}


def _parts(model: nn.Module) -> dict[int, str]:
    """Module id -> the part its (inclusive) time counts for."""
    parts: dict[int, str] = {}
    for name, module in model.model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "self_attn":
            parts[id(module)] = "attention (incl. its linears)"
        elif leaf == "mlp":
            parts[id(module)] = "mlp (incl. its linears)"
        elif "norm" in type(module).__name__.lower():
            parts[id(module)] = "norms"
    parts.update({id(m): "decoder linears" for _, m in decoder_linears(model)})
    parts[id(model.get_input_embeddings())] = "embedding"
    parts[id(model.get_output_embeddings())] = "lm_head"
    if isinstance(getattr(model.model, "rotary_emb", None), nn.Module):
        parts[id(model.model.rotary_emb)] = "rotary embedding"
    parts[id(model)] = "model"
    return parts


def time_breakdown(worker: ProfiledWorker, users: list[dict]) -> dict:
    """Where batch-1 time goes, from forward hooks timing each module (inclusive), split into exclusive parts.

    Attention without its linears is rotary application, SDPA, KV-cache update and reshapes; MLP activation is
    SiLU and the gate product; other model code is mask building, residual adds, layer glue and hook cost; beam
    search outside the model is log-softmax, trie lookups, top-k, cache regrouping, prompt encoding and Python.
    Hooks cost a few microseconds each, so the total with hooks is reported beside the total without.
    """
    model = worker.model
    parts = _parts(model)
    inside = {id(m): "attention" if ".self_attn." in name else "mlp" for name, m in decoder_linears(model)
              if ".self_attn." in name or ".mlp." in name}  # to make attention and mlp exclusive of their linears
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

    hooked_modules = {id(m): m for m in model.modules() if id(m) in parts}.values()
    handles = [h for m in hooked_modules for h in (m.register_forward_pre_hook(pre, with_kwargs=True),
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
        t = defaultdict(float, {name: v for (p, name), v in totals.items() if p == ph})
        exclusive = {
            "decoder linears": t["decoder linears"],
            "attention (excl. linears)": t["attention (incl. its linears)"] - t["attention linears"],
            "mlp activation": t["mlp (incl. its linears)"] - t["mlp linears"],
            **{name: t[name] for name in ("norms", "embedding", "lm_head", "rotary embedding")},
        }
        result[ph] = {**exclusive, "other model code": t["model"] - sum(exclusive.values())}
    n = len(users)
    return {
        "clock": profile_clock(),
        "users": n,
        "ms_per_user": {ph: {k: 1000 * v / n for k, v in split.items()} for ph, split in result.items()},
        "beam search outside the model ms": 1000 * (hooked - sum(sum(v.values()) for v in result.values())) / n,
        "total with hooks ms": 1000 * hooked / n,
        "total without hooks ms": 1000 * plain / n,
        "model forward calls per user": {ph: calls[(ph, "model")] / n for ph in ("prompt", "steps")},
    }


def operator_table(worker: ProfiledWorker, users: list[dict], rows: int = 15) -> str:
    """torch.profiler's top operators by self CPU time over the same batch-1 recommendations."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, torch.inference_mode():
        for user in users:
            worker.recommend_one(user)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40)


def profile_table(profiles: dict) -> list[str]:
    """Markdown: per part, ms per user in the prompt pass / the decoding steps, one column per model."""
    labels = list(profiles)
    clock = profiles[labels[0]]["clock"]
    lines = [f"## Where batch-1 time goes (ms per user of {clock}, from module hooks)", "",
             "| " + " | ".join(["part", *(f"{label} prompt / steps" for label in labels)]) + " |",
             "|" + "---|" * (len(labels) + 1)]
    for name in profiles[labels[0]]["ms_per_user"]["prompt"]:
        cells = [f"{profiles[lb]['ms_per_user']['prompt'][name]:.2f} / {profiles[lb]['ms_per_user']['steps'][name]:.2f}"
                 for lb in labels]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    for key in SUMMARY:
        cells = [key.removesuffix(" ms"), *(f"{profiles[lb][key]:.2f}" for lb in labels)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def profile_report(payload: dict, operators: dict[str, str]) -> str:
    """The text report: per model its parts sorted by time, the free-linears floor, torch.profiler's operators."""
    clock = next(iter(payload["profile"].values()))["clock"]
    lines = [f"Batch-1 profile, {payload['dataset']}, {payload['machine']['threads']} thread(s), "
             f"{payload['protocol']['num_beams']} beams; times are {clock}.", ""]
    for label, prof in payload["profile"].items():
        total, phases = prof["total with hooks ms"], prof["ms_per_user"]
        lines.append(f"== {label}: {prof['total without hooks ms']:.2f} ms per user without hooks, {total:.2f} with "
                     f"({prof['users']} users; forward calls per user: {prof['model forward calls per user']})")
        lines.append(f"  if the decoder linears cost nothing: {prof['free decoder linears ms']:.2f} ms per call vs "
                     f"{prof['real decoder linears ms']:.2f} ms with them (medians, calls alternating), paired ratio "
                     f"{prof['free / real']:.2f}x: no method that only shrinks decoder linears can go below this")
        merged = {name: phases["prompt"][name] + phases["steps"][name] for name in phases["prompt"]}
        merged["beam search outside the model"] = prof["beam search outside the model ms"]
        for name, ms in sorted(merged.items(), key=lambda kv: -kv[1]):
            split = (f"  (prompt {phases['prompt'][name]:6.2f}, steps {phases['steps'][name]:6.2f})"
                     if name in phases["prompt"] else "")
            lines.append(f"  {name:32s} {ms:7.2f} ms  {100 * ms / total:5.1f} %{split}")
        lines.append("")
    for label, table in operators.items():
        lines += [f"== {label}: torch.profiler, top operators by self CPU time", table, ""]
    return "\n".join(lines)
