"""Exact SVD vs the Gram-eigendecomposition path of ``factorize`` at LLaMA widths: time and truncation error.

    OMP_NUM_THREADS=1 python -m odllm.bench.svd_speed --shapes 2048x5504 4096x11008 --out docs/results/svd-width

Each problem is a float64 m x n matrix M with a decaying spectrum (Gaussian entries, column scales from 1 down to
1e-2, as a whitened weight W S looks), factorised at the rank ``ratio`` allows. Both paths get the same M with
S = None, so the timed part is the factorisation alone (W S is one matmul both would share). Recorded per shape:
seconds of each path, the sum of dropped sigma^2 from each spectrum, the error ||M - B A||_F^2 each pair of factors
really leaves, and the relative differences between the two (factors' product, kept singular values).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from datetime import date
from pathlib import Path

import torch

from odllm.compress.lowrank import factorize, rank_for_ratio


def problem(m: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)


def _timed(M: torch.Tensor, k: int, method: str) -> tuple[float, tuple]:
    start = time.perf_counter()
    result = factorize(M, None, k, method)
    return time.perf_counter() - start, result


def measure(m: int, n: int, ratio: float = 0.5, seed: int = 0) -> dict:
    """One shape: both paths timed on the same matrix, their truncation errors and how far apart they are."""
    M = problem(m, n, seed)
    k = rank_for_ratio(m, n, ratio)
    record = {"m": m, "n": n, "ratio": ratio, "rank": k}
    products = {}
    for method in ("exact", "gram"):
        seconds, (B, A, sigma) = _timed(M, k, method)
        products[method] = B @ A
        record[method] = {
            "seconds": seconds,
            "dropped_sigma2": sigma[k:].square().sum().item(),
            "achieved_error": (M - products[method]).square().sum().item(),
            "kept_sigma": sigma[:k],
        }
    exact, gram = record["exact"], record["gram"]
    record["speedup"] = exact["seconds"] / gram["seconds"]
    record["dropped_sigma2_rel_diff"] = abs(gram["dropped_sigma2"] - exact["dropped_sigma2"]) / exact["dropped_sigma2"]
    record["achieved_error_rel_diff"] = abs(gram["achieved_error"] - exact["achieved_error"]) / exact["achieved_error"]
    record["product_rel_diff"] = ((products["gram"] - products["exact"]).norm() / products["exact"].norm()).item()
    kept_exact, kept_gram = exact.pop("kept_sigma"), gram.pop("kept_sigma")
    record["kept_sigma_max_rel_diff"] = ((kept_gram - kept_exact).abs() / kept_exact).max().item()
    return record


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["2048x5504", "4096x11008"], help="m x n, e.g. 4096x11008")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path("docs/results/svd-width"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for shape in args.shapes:
        m, n = (int(v) for v in shape.lower().split("x"))
        records.append(measure(m, n, args.ratio))
        r = records[-1]
        print(f"{m}x{n} rank {r['rank']}: exact {r['exact']['seconds']:.1f} s, gram {r['gram']['seconds']:.1f} s "
              f"(x{r['speedup']:.1f}); dropped sigma^2 rel diff {r['dropped_sigma2_rel_diff']:.1e}, "
              f"achieved error rel diff {r['achieved_error_rel_diff']:.1e}", flush=True)
        result = {
            "date": date.today().isoformat(), "commit": _commit(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "machine": platform.machine(), "command": "python -m odllm.bench.svd_speed "
            + " ".join(argv if argv is not None else __import__("sys").argv[1:]), "records": records,
        }
        (args.out / "svd_speed.json").write_text(json.dumps(result, indent=2))  # after each shape: partial results


if __name__ == "__main__":
    main()
