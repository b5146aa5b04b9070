"""What ``compress_model`` costs in time and memory as the model and the calibration set grow.

``python -m odllm.bench.cost [--out outputs/benchmarks/compression-cost] [--sizes small,medium,large]
[--calibration 64,256,1024]`` compresses randomly initialised LLaMAs (cost does not depend on training) with
the OD-LLM method (whitened SVD + alignment, ratio 0.5) on N random sequences of 60 tokens, and writes
``<out>.json`` and ``<out>.md``: growth with model size at N=256, and growth with N for the small model.

Each configuration runs in a fresh single-threaded subprocess, so its peak resident memory is its own. Next to
the measured peak the record gives the parts the algorithm holds, computed from shapes: the two hidden-state
streams (original and compressed, N x T x hidden float32 each; they grow with N), the largest layer's float64
covariance accumulators (sum of n x n per linear; independent of N) and the dense copy of one layer.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from odllm.compress.driver import decoder_layers
from odllm.compress.lowrank_method import compress_model
from odllm.data.batches import left_pad
from odllm.files import output_path, write_json, write_text

log = logging.getLogger(__name__)

MiB = 2**20
SEQ_LEN = 60
BATCH_SIZE = 16
RATIO = 0.5
SIZE_SWEEP_N = 256  # calibration sequences for the model-size table
SWEEP_SIZE = "small"  # the model of the calibration-size table
VOCAB = 1400
PAD_ID = 0
SIZES: dict[str, dict] = {
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2),  # the project default (conf/model/scratch.yaml)
    "medium": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=4),
    # 4 layers, not 8: 8 took 511 s alone on the shared CPU, over the ~12 min budget for the whole script. Time
    # is linear in depth; the per-layer parts of memory (streams, covariances, layer copy) do not depend on it
    "large": dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=4, num_attention_heads=16,
                  num_key_value_heads=8),
}
NOTE = (
    "Timings are single-threaded (torch.set_num_threads(1)) on a shared 2-core CPU with other jobs running: "
    "compare them with each other, not with other machines."
)


def _status_kib(field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status, in KiB."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def _reset_peak() -> bool:
    """Sets VmHWM to the current RSS (Linux >= 4.0), so the peak is this run's and not the model build's."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)  # hand freed heap back first, so it is not silently reused below the baseline
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def build_model(config: dict, seed: int = 0) -> nn.Module:
    """A float32 LlamaForCausalLM with seeded random weights."""
    torch.manual_seed(seed)
    llama = LlamaConfig(vocab_size=VOCAB, pad_token_id=PAD_ID, max_position_embeddings=512,
                        tie_word_embeddings=False, **config)
    return LlamaForCausalLM(llama).eval()


def calibration_batches(n: int, vocab: int = VOCAB, seq_len: int = SEQ_LEN, batch_size: int = BATCH_SIZE,
                        seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` random sequences of ``seq_len`` non-pad tokens, in batches as ``compress_model`` takes them."""
    rng = random.Random(seed)
    sequences = [[rng.randrange(1, vocab) for _ in range(seq_len)] for _ in range(n)]
    batches = []
    for start in range(0, n, batch_size):
        ids, mask = left_pad(sequences[start : start + batch_size], PAD_ID)
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _bytes(parameters) -> tuple[int, int]:
    unique = {id(p): p for p in parameters}.values()
    return sum(p.numel() for p in unique), sum(p.numel() * p.element_size() for p in unique)


TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _warm_up() -> None:
    """One tiny compression first: the library code it pages in (LAPACK, kernels) is RSS the first call
    would otherwise count as its own, a fixed ~70 MiB that hides what grows."""
    compress_model(build_model(TINY), calibration_batches(16), ratio=RATIO, whiten=True, align="BA", progress=False)


def measure(name: str, config: dict, n: int, seq_len: int = SEQ_LEN, warm_up: bool = True) -> dict:
    """Compresses one fresh model in this process and returns its cost record.

    The peak is VmHWM after the call minus VmRSS just before it (the model and batches already built), so it
    is what ``compress_model`` adds; run it in a fresh process for a clean number.
    """
    if warm_up:
        _warm_up()
    model = build_model(config)
    batches = calibration_batches(n, seq_len=seq_len)
    layers = decoder_layers(model)
    linears = [[m for m in layer.modules() if isinstance(m, nn.Linear)] for layer in layers]
    decoder_params, _ = _bytes(p for layer in linears for m in layer for p in m.parameters())
    model_params, model_bytes = _bytes(model.parameters())
    covariance = max(sum(m.in_features**2 * 8 for m in layer) for layer in linears)
    layer_bytes = max(_bytes(layer.parameters())[1] for layer in layers)
    hidden = model.config.hidden_size
    peak_reset = _reset_peak()
    rss_before = _status_kib("VmRSS")
    start = time.perf_counter()
    report = compress_model(model, batches, ratio=RATIO, whiten=True, align="BA", progress=False)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return {
        "size": name,
        "config": config,
        "layers": model.config.num_hidden_layers,
        "hidden": hidden,
        "intermediate": model.config.intermediate_size,
        "decoder_linear_params": decoder_params,
        "model_params": model_params,
        "calibration_sequences": n,
        "sequence_length": seq_len,
        "calibration_tokens": report["settings"]["calibration_tokens"],
        "ratio": RATIO,
        "method": "odllm (whiten + align)",
        "seconds": seconds,
        "threads": torch.get_num_threads(),
        "rss_before_mib": rss_before / 1024,
        "peak_rss_delta_mib": (peak - rss_before) / 1024,
        "peak_reset": peak_reset,
        "model_weight_bytes": model_bytes,
        "stream_bytes": n * seq_len * hidden * 4 * 2,
        "covariance_bytes": covariance,
        "layer_copy_bytes": layer_bytes,
        "decoder_params_kept": report["totals"]["decoder_linear"]["params_kept"],
    }


def _run_one(name: str, n: int, timeout: float) -> dict:
    """``measure`` in a fresh single-threaded interpreter; its record is the last line it prints."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "odllm.bench.cost", "--one", name, "--n", str(n)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def plan(sizes: list[str], calibration: list[int]) -> list[tuple[str, int]]:
    """Every size at ``SIZE_SWEEP_N``, and every N for ``SWEEP_SIZE``, each configuration once."""
    runs = [(SWEEP_SIZE, n) for n in calibration] if SWEEP_SIZE in sizes else []
    runs += [(size, SIZE_SWEEP_N) for size in sizes]
    return list(dict.fromkeys(runs))


COLUMNS = ["size", "layers x hidden / inter", "decoder-linear params", "model params", "weights MiB", "N",
           "tokens", "seconds", "peak ΔRSS MiB", "streams MiB (∝N)", "covariances MiB", "layer copy MiB"]


def _row(r: dict) -> str:
    cells = [r["size"], f"{r['layers']} x {r['hidden']} / {r['intermediate']}", f"{r['decoder_linear_params']:,}",
             f"{r['model_params']:,}", f"{r['model_weight_bytes'] / MiB:.1f}", str(r["calibration_sequences"]),
             f"{r['calibration_tokens']:,}", f"{r['seconds']:.1f}", f"{r['peak_rss_delta_mib']:.0f}",
             f"{r['stream_bytes'] / MiB:.1f}", f"{r['covariance_bytes'] / MiB:.1f}",
             f"{r['layer_copy_bytes'] / MiB:.1f}"]
    return "| " + " | ".join(cells) + " |"


def _table(records: list[dict]) -> list[str]:
    return ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS), *map(_row, records)]


def markdown_tables(records: list[dict]) -> str:
    """Two tables: the records at N = ``SIZE_SWEEP_N`` by model size, and the ``SWEEP_SIZE`` records by N."""
    by_size = sorted((r for r in records if r["calibration_sequences"] == SIZE_SWEEP_N),
                     key=lambda r: r["decoder_linear_params"])
    by_n = sorted((r for r in records if r["size"] == SWEEP_SIZE), key=lambda r: r["calibration_sequences"])
    lines = [
        f"Cost of compress_model (OD-LLM: whitened SVD + alignment, ratio {RATIO}) on random-weight LLaMAs, "
        f"calibration = N random sequences of {SEQ_LEN} tokens in batches of {BATCH_SIZE}.", "",
        NOTE, "",
        "peak ΔRSS = VmHWM after compress_model minus VmRSS just before it, in a fresh process. "
        f"streams = N x {SEQ_LEN} x hidden x 4 B x 2 (original and compressed); covariances = sum of n x n x 8 B "
        "over the largest layer's linears; layer copy = the dense copy of the layer being compressed. "
        "What grows with N: the streams, which at layer 0 briefly exist three times (the shared input and both "
        "outputs), and the rotary cos/sin kept per batch (2 x 60 x head_dim x 4 B per sequence). The rest of the "
        "peak does not: per-batch activations and float64 temporaries, the previous layer's covariances and copy "
        "(still referenced while the next layer is calibrated) and allocator slack.", "",
        f"## Growth with model size (N = {SIZE_SWEEP_N})", "", *_table(by_size), "",
        f"## Growth with calibration size ({SWEEP_SIZE} model)", "", *_table(by_n),
    ]
    return "\n".join(lines) + "\n"


def run(out: str | Path, sizes: list[str], calibration: list[int], timeout: float = 1800) -> list[dict]:
    """Measures every planned configuration in its own subprocess and writes ``<out>.json`` and ``<out>.md``."""
    unknown = set(sizes) - SIZES.keys()
    if unknown:
        raise ValueError(f"unknown sizes {sorted(unknown)}; known: {sorted(SIZES)}")
    out = Path(out)
    records = []
    for name, n in plan(sizes, calibration):
        log.info("compressing %s with N=%d ...", name, n)
        records.append(_run_one(name, n, timeout))
        log.info("  %.1f s, peak ΔRSS %.0f MiB", records[-1]["seconds"], records[-1]["peak_rss_delta_mib"])
        payload = {"note": NOTE, "ratio": RATIO, "sequence_length": SEQ_LEN, "batch_size": BATCH_SIZE,
                   "records": records}
        write_json(output_path(out, ".json"), payload)  # after every run: partial results
        write_text(output_path(out, ".md"), markdown_tables(records))
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/benchmarks/compression-cost")
    parser.add_argument("--sizes", default="small,medium,large")
    parser.add_argument("--calibration", default="64,256,1024", help="N values for the small model")
    parser.add_argument("--one", choices=sorted(SIZES), help=argparse.SUPPRESS)  # the subprocess side
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        torch.set_num_threads(1)
        print(json.dumps(measure(args.one, SIZES[args.one], args.n)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run(args.out, args.sizes.split(","), [int(n) for n in args.calibration.split(",")])


if __name__ == "__main__":
    main()
