"""Copy the runs' metrics.json / compression_report.json here (machine paths replaced) and print the table.

    python docs/results/ml-100k-gptq-order/make_table.py outputs/compress/ml-100k/<run> ...
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
REPLACE = {"/work/shared/data": "$ODLLM_DATA_DIR", "/work/baseline/models/": "models/", "/work/gptq/models/": "models/"}


def clean(text: str) -> str:
    for old, new in REPLACE.items():
        text = text.replace(old, new)
    return text


def main(runs: list[str]) -> None:
    for run in map(Path, runs):
        name = json.loads((run / "metrics.json").read_text())["method"]["name"]
        for file in ("metrics.json", "compression_report.json"):
            (HERE / f"{name}.{file}").write_text(clean((run / file).read_text()))
    print("| method | act_order | true_sequential | KL to dense | top-10 overlap | NDCG@10 | HR@10 | "
          "layer output error (0, 1, 2, 3) | compress s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in sorted(HERE.glob("*.metrics.json")):
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
    main(sys.argv[1:])
