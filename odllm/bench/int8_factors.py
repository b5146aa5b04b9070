"""Integer factors for a saved low-rank model, after the fact (``python -m odllm.bench.int8_factors``).

Every LowRankLinear of a saved odllm (or other low-rank) model whose factors are still float gets them stored as
``--bits`` (8 or 4) integers, round-to-nearest on one grid per row (``LowRankLinear.quantize_factors``; zero-centred
like ``method=odllm_int8``'s default, min-max with ``--no-symmetric``), and
the model is saved as compress.py saves one (weights, compression.json, tokenizer, item index, odllm.json; atomically).

Why: the inference benchmark needs the int8-factor model at LLaMA-1B width, and the real ``method=odllm_int8`` (each
layer quantized right after its alignment, so later layers align to the quantized ones) costs ~50 CPU minutes there.
The storage and kernels are the same, the accuracy is not: the factors are NOT re-aligned, so use the result for
latency and size measurements only. Its odllm.json says so (``compression.factor_quantization``), and its method is
named ``<source method>+int<bits>_rtn_post_hoc``, never ``odllm_int8``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from torch import nn

from odllm.checks import user_errors
from odllm.compress.lowrank import LowRankLinear
from odllm.compress.lowrank_method import factor_storage
from odllm.compress.saved import load_recommender, read_compression_config, save_compression_config
from odllm.compress.storage import storage
from odllm.model.recommender import COMPRESSION_FILE, Recommender, rewrite_hint

log = logging.getLogger(__name__)
BITS = (8, 4)  # what QuantLinear stores (4 bits: two codes per byte)


def note(bits: int, symmetric: bool) -> str:
    """What was done, in the words odllm.json records."""
    grid = "symmetric" if symmetric else "min-max"
    return (f"int{bits} factors by round-to-nearest on {grid} grids after compression (not re-aligned: for latency "
            "and size measurements)")


def check_request(model_dir: Path, out: Path, bits: int) -> None:
    """Refuses before any weight is read: a bit width QuantLinear does not store, an ``out`` that holds something
    (nothing is overwritten), and a ``model_dir`` whose compression.json names no low-rank module."""
    if bits not in BITS:
        raise ValueError(f"--bits {bits}: choose 8 or 4 (the factor widths QuantLinear stores)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not empty: pass a new (or empty) directory; nothing is "
                         "overwritten")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_dir} holds no saved model (config.json is missing): pass a directory "
                                "written by compress.py with a low-rank method, e.g. method=odllm")
    if not (model_dir / COMPRESSION_FILE).is_file():
        raise ValueError(f"--model {model_dir} is a dense model (no {COMPRESSION_FILE}): compress it first with "
                         "python compress.py method=odllm model_dir=<it>, then pass the compressed model")
    specs = read_compression_config(model_dir, rewrite_hint(model_dir))
    if not any(spec["kind"] == "lowrank" for spec in specs.values()):
        kinds = sorted({spec["kind"] for spec in specs.values()})
        raise ValueError(f"--model {model_dir} holds no low-rank module (LowRankLinear), only {kinds}: pass a model "
                         "compressed with a low-rank method such as method=odllm")


def quantize_float_factors(model: nn.Module, bits: int, symmetric: bool = True) -> list[str]:
    """Stores the float factors of every LowRankLinear of ``model`` as ``bits``-bit codes in place; the names done.
    A module whose factors are already integers (``method=odllm_int8``) is left as it is."""
    lowrank = [(name, m) for name, m in model.named_modules() if isinstance(m, LowRankLinear)]
    if not lowrank:
        raise ValueError("the model holds no LowRankLinear: pass a model compressed with a low-rank method (odllm)")
    done = []
    for name, module in lowrank:
        if isinstance(module.A, nn.Linear) and isinstance(module.B, nn.Linear):
            module.quantize_factors(bits, symmetric=symmetric)  # one grid per row
            done.append(name)
    if not done:
        raise ValueError(f"all {len(lowrank)} low-rank modules already hold integer factors (e.g. method=odllm_int8): "
                         "nothing to quantize; pass a model with float factors (method=odllm)")
    return done


def compression_entry(source: dict | None, model_dir: Path, bits: int, symmetric: bool) -> dict:
    """odllm.json's ``compression``: the source's method and ratio, what was done to it, and where it came from.
    Not ``simulated``: the factors are stored as real uint8 codes (the benchmark labels from this entry)."""
    source = dict(source or {})
    method = f"{source.get('method') or 'lowrank'}+int{bits}_rtn_post_hoc"
    settings = {**(source.get("settings") or {}), "name": method, "factor_bits": bits, "factor_group_size": -1,
                "factor_quantizer": "rtn", "factor_symmetric": symmetric, "factor_quantized_after_compression": True,
                "storage": factor_storage(bits, -1, symmetric)}
    return {"method": method, "ratio": source.get("ratio"), "settings": settings,
            "factor_quantization": note(bits, symmetric), "source_model": str(model_dir.resolve()),
            "source_compression": source or None, "simulated": False}


def int8_factors(model_dir: str | Path, out: str | Path, bits: int = 8, symmetric: bool = True) -> dict:
    """Loads the low-rank model in ``model_dir``, stores its float factors as ``bits``-bit codes and saves it to
    ``out`` (in the model's dtype outside the codes); returns a summary with the decoder factor bytes."""
    model_dir, out = Path(model_dir), Path(out)
    check_request(model_dir, out, bits)
    started = time.perf_counter()
    source = load_recommender(model_dir)
    model = source.model
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    before = storage([m for m in model.modules() if isinstance(m, LowRankLinear)])["bytes"]
    done = quantize_float_factors(model, bits, symmetric)
    after = storage([m for m in model.modules() if isinstance(m, LowRankLinear)])["bytes"]
    left = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != dtype})
    if left:  # quantize_factors keeps biases in their dtype; a change here would silently alter the model
        raise RuntimeError(f"quantizing changed parameters of a {dtype} model to {left}")
    meta = {**source.meta, "compression": compression_entry(source.meta.get("compression"), model_dir, bits, symmetric)}
    saved = Recommender(model, source.tokenizer, source.item_codes, meta)
    saved.save(out, extra=lambda d: save_compression_config(model, d))
    summary = {"model": str(model_dir), "out": str(out), "bits": bits, "symmetric": symmetric,
               "lowrank_modules_quantized": len(done), "dtype": str(dtype).removeprefix("torch."),
               "lowrank_bytes_before": before, "lowrank_bytes_after": after,
               "disk_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
               "seconds": round(time.perf_counter() - started, 1), "note": note(bits, symmetric)}
    log.info("%d low-rank modules -> int%d factors: %.2f MB -> %.2f MB, saved to %s", len(done), bits, before / 1e6,
             after / 1e6, out)
    return summary


@user_errors
def main(argv: list[str] | None = None) -> dict:
    """A refused request (bits, --out, not a low-rank model) prints ``error: <why>`` and exits with status 1."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="a saved low-rank model (compress.py method=odllm)")
    parser.add_argument("--out", required=True, type=Path, help="a new directory for the int8-factor model")
    parser.add_argument("--bits", type=int, default=8, help="8 (default) or 4")
    parser.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=True,
                        help="zero-centred grids as odllm_int8's default (default); --no-symmetric: min-max grids")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = int8_factors(args.model, args.out, args.bits, args.symmetric)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
