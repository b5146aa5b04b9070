"""Prints the factor-GPTQ frontier table of docs/results.md from the raw JSON beside this script.

Every run's ``metrics.json`` (``<label>.metrics.json``, written by compress.py or the benchmark's run directories):
decoder-linear bytes, KL to dense, top-10 overlap, NDCG@10, HR@10; a point is on the (bytes, KL) Pareto frontier
when no other point has at most its bytes and a lower KL. Run: python docs/results/factor-gptq/make_table.py
"""

import json
from pathlib import Path

HERE = Path(__file__).parent


def rows() -> list[dict]:
    out = []
    for path in sorted(HERE.glob("*.metrics.json")):
        m = json.loads(path.read_text())
        method = m["method"] if isinstance(m["method"], dict) else {"name": m["method"]}
        metrics = m["test"]["metrics"]
        out.append({
            "label": path.name.removesuffix(".metrics.json"), "name": method["name"], "ratio": m["ratio"],
            "bytes": m["sizes"]["decoder_linear"]["bytes_after"], "kept": m["sizes"]["decoder_linear"]["bytes_kept"],
            "model_mb": m["sizes"]["model"]["bytes_after"] / 1e6, "kl": m["fidelity"]["kl"],
            "overlap": m["fidelity"]["top10_overlap"], "ndcg": metrics["ndcg@10"], "hr": metrics["hr@10"],
            "seconds": m["compress_seconds"], "dense": m["dense"]["metrics"],
        })
    return sorted(out, key=lambda r: r["bytes"])


def value(metric) -> str:
    return f"{metric['value']:.4f} ± {metric['stderr']:.4f}" if isinstance(metric, dict) else f"{metric:.4f}"


def main() -> None:
    table = rows()
    print("| model | ratio | decoder-linear bytes (kept) | whole-model MB | KL to dense | top-10 overlap | NDCG@10 "
          "| HR@10 | on the (bytes, KL) frontier | compress s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        dominated = [q["label"] for q in table if q is not r and q["bytes"] <= r["bytes"] and q["kl"] < r["kl"]]
        frontier = "yes" if not dominated else f"no ({', '.join(dominated[:2])})"
        print(f"| {r['label']} | {r['ratio'] if r['ratio'] is not None else '-'} | {r['bytes']:,} ({r['kept']:.1%}) "
              f"| {r['model_mb']:.2f} | {r['kl']:.2e} | {r['overlap']:.3f} | {value(r['ndcg'])} | {value(r['hr'])} "
              f"| {frontier} | {r['seconds']:.0f} |")
    print("\n| model | matrices | sum of relative output errors: float factors | GPTQ factors "
          "| RTN factors (same grids) | layer output error (0, 1, 2, 3), float factors -> integer factors |")
    print("|---|---|---|---|---|---|")
    for path in sorted(HERE.glob("*.compression_report.json")):
        report = json.loads(path.read_text())
        found = [e["factor_quantization"] for e in report["matrices"] if "factor_quantization" in e]
        layers = report["layers"]
        if "output_error_float_factors" not in layers[0]:
            continue
        sums = [f"{sum(f[key] for f in found):.4f}" if found else "-"
                for key in ("error_float_factors", "error", "error_rtn")]
        errors = ", ".join(f"{e['output_error_float_factors']:.2e} -> {e['output_error']:.2e}" for e in layers)
        print(f"| {path.name.removesuffix('.compression_report.json')} | {len(found) or '-'} | {' | '.join(sums)} "
              f"| {errors} |")
    dense = table[0]["dense"]
    print(f"\ndense: NDCG@10 {value(dense['ndcg@10'])}, HR@10 {value(dense['hr@10'])}")


if __name__ == "__main__":
    main()
