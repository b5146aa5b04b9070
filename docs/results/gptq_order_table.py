"""Copy the runs' metrics.json / compression_report.json into a results directory (machine paths replaced) and
print the act-order / true-sequential table from it.

    python docs/results/gptq_order_table.py docs/results/ml-100k-gptq-order outputs/compress/ml-100k/<run> ...
    python docs/results/gptq_order_table.py docs/results/ml-100k-gptq-order        # print only
"""

import json
import os
import sys
from pathlib import Path


def clean(text: str, metrics: dict) -> str:
    """Machine paths -> ``$ODLLM_DATA_DIR`` and ``models/...`` (data from the environment, models from the run)."""
    roots = {os.environ.get("ODLLM_DATA_DIR"): "$ODLLM_DATA_DIR",
             str(Path(metrics["model_dir"]).parent): "models", str(Path(metrics["dense_model_dir"]).parent): "models"}
    for old, new in roots.items():
        if old:
            text = text.replace(old, new)
    return text


def main(here: Path, runs: list[str]) -> None:
    for run in map(Path, runs):
        metrics = json.loads((run / "metrics.json").read_text())
        for file in ("metrics.json", "compression_report.json"):
            (here / f"{metrics['method']['name']}.{file}").write_text(clean((run / file).read_text(), metrics))
    print("| method | act_order | true_sequential | KL to dense | top-10 overlap | NDCG@10 | HR@10 | "
          "layer output error (per layer) | compress s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in sorted(here.glob("*.metrics.json")):
        m = json.loads(path.read_text())
        report = json.loads(path.with_name(path.name.replace("metrics", "compression_report")).read_text())
        method, test = m["method"], m["test"]["metrics"]
        errors = ", ".join(f"{layer['output_error']:.2e}" for layer in report["layers"])
        print(f"| {method['name']} | {method.get('act_order', '–')} | {method['true_sequential']} | "
              f"{m['fidelity']['kl']:.2e} | {m['fidelity']['top10_overlap']:.3f} | "
              f"{test['ndcg@10']['value']:.4f} ± {test['ndcg@10']['stderr']:.4f} | "
              f"{test['hr@10']['value']:.4f} ± {test['hr@10']['stderr']:.4f} | {errors} | "
              f"{m['compress_seconds']:.0f} |")
    dense = m["dense"]["metrics"]
    print(f"| dense | | | 0 | 1 | {dense['ndcg@10']['value']:.4f} | {dense['hr@10']['value']:.4f} | | |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
