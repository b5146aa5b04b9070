"""Latency of one decoder linear: dense float32 vs QuantLinear's dequantize path vs torch's packed low-bit kernels.

``python -m odllm.bench.kernels [--out docs/results/kernels/kernels] [--repeats 30] [--shapes 256x64,96x688]``
times, single-threaded, one ``QuantLinear`` per layout (int8 per row; int4 in groups of 32, or one grid per row
where 32 does not divide the input width; int4 in groups of 16, the default ``gptq``, which has no kernel, where 16
divides it) on shapes of the default model and of LLaMA-1B width, at 1 and 20 input rows (batch 1 with 20
beams), in every path it can run:

- ``dense fp32`` / ``dense bf16``: ``F.linear`` with the float weight (the model's own / the kernels' precision);
- ``dequantize``: today's forward, the float32 weight rebuilt from the codes in every call;
- ``kernel bf16``: ``ODLLM_KERNELS=bf16``, the packed kernel on bfloat16-rounded inputs;
- ``kernel fp32``: the same kernel in float32 (exact, the slow reference path of torch 2.13).

Paths are timed round-robin (one call of each, then the next repeat), so load from other jobs hits all alike; each
timing is the median over repeats of a loop long enough (>= 2 ms) to be above the clock's noise. Also reported per
layout: the relative error of each path to the dequantize path's float32 output. Writes ``<out>.json`` and
``<out>.md``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from odllm.compress.quant import QuantLinear
from odllm.files import output_path, write_json, write_text

SHAPES = [(256, 688), (688, 256), (2048, 8192)]  # (in, out): gate/up and down of the default model; LLaMA-1B up
ROWS = (1, 20)


def _layouts(n: int) -> list[tuple[str, int, int]]:
    """``(name, bits, group_size)`` for input width ``n``."""
    int4 = 32 if n % 32 == 0 else -1
    layouts = [("int8 row", 8, -1), (f"int4 {'g32' if int4 == 32 else 'row'}", 4, int4)]
    return layouts + ([("int4 g16", 4, 16)] if n % 16 == 0 else [])  # g16 needs whole groups


def _loop(call: Callable[[], torch.Tensor], seconds: float = 2e-3) -> int:
    """Calls per timing: enough for ``seconds`` (after a warm-up that also packs the kernel layout)."""
    for _ in range(3):
        call()
    start = time.perf_counter()
    call()
    return max(1, int(seconds / max(time.perf_counter() - start, 1e-7)))


def measure(n: int, m: int, rows: int, repeats: int, seed: int = 0) -> list[dict]:
    """One shape: every layout and path, timed round-robin; microseconds per call, median [q1, q3]."""
    g = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(n, m, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(m, n, generator=g) * n**-0.5)
    x = torch.randn(rows, n, generator=g)
    weight, weight_bf16 = linear.weight.detach(), linear.weight.detach().bfloat16()
    paths: dict[tuple[str, str], Callable[[], torch.Tensor]] = {
        ("dense", "dense fp32"): lambda: F.linear(x, weight),
        ("dense", "dense bf16"): lambda: F.linear(x.bfloat16(), weight_bf16).float(),
    }
    modules = {}
    for name, bits, group in _layouts(n):
        q = modules[name] = QuantLinear.from_linear(linear, bits, group)
        for mode, path in (("off", "dequantize"), ("bf16", "kernel bf16"), ("fp32", "kernel fp32")):
            if mode != "off" and q.planned_kernel(torch.bfloat16) == "dequantize":
                continue  # no kernel for this layout

            def call(q=q, mode=mode) -> torch.Tensor:
                q.kernel_mode = mode
                return q(x)

            paths[(name, path)] = call
    with torch.no_grad():
        reference = {name: q.dequantized_weight() for name, q in modules.items()}
        loops = {key: _loop(call) for key, call in paths.items()}
        times: dict[tuple[str, str], list[float]] = {key: [] for key in paths}
        for _ in range(repeats):
            for key, call in paths.items():
                start = time.perf_counter()
                for _ in range(loops[key]):
                    call()
                times[key].append((time.perf_counter() - start) / loops[key] * 1e6)
        results = []
        for (layout, path), call in paths.items():
            ref = F.linear(x, weight if layout == "dense" else reference[layout])
            q1, med, q3 = statistics.quantiles(times[(layout, path)], n=4)
            results.append({
                "in": n, "out": m, "rows": rows, "layout": layout, "path": path,
                "kernel": None if layout == "dense" else _ran(modules[layout], call),
                "us": {"median": med, "q1": q1, "q3": q3}, "calls_per_timing": loops[(layout, path)],
                "relative_error": ((call().float() - ref).norm() / ref.norm()).item(),
            })
    dense = next(r["us"]["median"] for r in results if r["path"] == "dense fp32")
    for r in results:
        r["x_dense_fp32"] = r["us"]["median"] / dense
    return results


def _ran(q: QuantLinear, call: Callable[[], torch.Tensor]) -> str:
    call()
    return q.kernel


def markdown(payload: dict) -> str:
    m = payload["machine"]
    lines = [
        "# Low-bit kernels on CPU: one decoder linear", "",
        f"{m['cpu']}, torch {m['torch']}, {m['threads']} thread, commit {payload['commit']}; microseconds per call, "
        f"median [IQR] over {payload['repeats']} round-robin repeats; 'x dense' = over dense float32 on the same "
        "rows; 'rel. error' = ||y - y_ref|| / ||y_ref|| against the float32 product with the dequantized weight "
        "(for dense rows: with the float32 weight).", "",
        "| in x out | rows | layout | path | kernel | us per call | x dense fp32 | rel. error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["results"]:
        us = r["us"]
        lines.append(f"| {r['in']}x{r['out']} | {r['rows']} | {r['layout']} | {r['path']} | {r['kernel'] or '-'} | "
                     f"{us['median']:.1f} [{us['q1']:.1f}-{us['q3']:.1f}] | {r['x_dense_fp32']:.2f} | "
                     f"{r['relative_error']:.1e} |")
    return "\n".join(lines) + "\n"


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"256x64,96x688"`` -> ``[(256, 64), (96, 688)]`` (in, out)."""
    try:
        return [(int(a), int(b)) for a, b in (item.lower().split("x") for item in text.split(","))]
    except ValueError:
        message = f"shapes {text!r}: give comma-separated INxOUT such as 256x64,96x688"
        raise argparse.ArgumentTypeError(message) from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results/kernels/kernels", help="output path without extension")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--shapes", type=parse_shapes, default=SHAPES,
                        help="comma-separated INxOUT, e.g. low-rank factors 256x64,64x256 (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    results = [r for n, m in args.shapes for rows in ROWS for r in measure(n, m, rows, args.repeats)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    payload = {
        "commit": commit, "repeats": args.repeats, "seconds": time.time() - start, "results": results,
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
    }
    out = Path(args.out)
    write_json(output_path(out, ".json"), payload)
    write_text(output_path(out, ".md"), markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
