"""Compression benchmark: the dense model and every (method, ratio) side by side, in one run.

``python -m odllm.benchmark dataset=instruments bench.ratios=[0.1,0.3,0.5,0.7,0.9] bench.methods=[odllm,svd]``
evaluates the dense model once, then compresses a fresh copy per setting with the same calibration prompts
and writes ``<bench.out>.json`` and a Markdown table ``<bench.out>.md``.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from odllm.compress_job import compress_recommender, load_dense, method_config
from odllm.evaluation import public, score_examples, write_json

log = logging.getLogger(__name__)
METRICS = ("hr@5", "hr@10", "ndcg@5", "ndcg@10")
RUN_KEYS = ("method", "ratio", "sizes", "test", "fidelity", "compress_seconds")


def run_benchmark(cfg: DictConfig, output_dir: str | Path) -> dict:
    dense, split = load_dense(cfg)
    users, note = cfg.bench.test_users, "all test users"
    if users is not None and users < len(split.test):  # a seeded subset: a sweep at a fraction of the cost
        note = f"a random subset of the {len(split.test)} test users (seed {cfg.seed})"
        split = dataclasses.replace(split, test=random.Random(cfg.seed).sample(split.test, users))
    pad_id = dense.tokenizer.pad_token_id
    dense_result = score_examples(dense.model, dense.encoder, dense.trie(), split.test, cfg.eval, pad_id, "dense")
    payload = {
        "dataset": cfg.dataset.name,
        "test_users": len(split.test),
        "test_users_note": note,
        "dense": public(dense_result),
        "runs": [],
    }
    out = Path(cfg.bench.out)
    for ratio in cfg.bench.ratios:
        for name in cfg.bench.methods:
            run_cfg = OmegaConf.merge(cfg, {"ratio": ratio})
            run_dir = Path(output_dir) / f"{name}-r{ratio:g}"
            run = compress_recommender(dense, split, run_cfg, method_config(cfg, name), run_dir, dense_result)
            payload["runs"].append({k: run[k] for k in RUN_KEYS})
            write_json(out.with_suffix(".json"), payload)  # after every run: a stopped sweep keeps what it did
            out.with_suffix(".md").write_text(markdown_table(payload))
    log.info("benchmark written to %s.{json,md}", out)
    return payload


def _cell(metrics: dict, name: str) -> str:
    return f"{metrics[name]['value']:.4f} ± {metrics[name]['stderr']:.4f}"


def markdown_table(payload: dict) -> str:
    """One row per model; sizes are whole-model parameters (embeddings and lm_head included)."""
    head = ["model", "ratio", "decoder linears kept", "whole-model params", *METRICS, "KL to dense", "top-10 overlap"]
    users = f"{payload['test_users']} test users ({payload.get('test_users_note', 'all test users')})"
    lines = [f"{payload['dataset']}, {users}, 20 beams", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    first = payload["runs"][0]["sizes"] if payload["runs"] else None
    dense_params = first["model"]["params_before"] if first else "-"
    dense_cells = ["dense", "1", "100%", f"{dense_params:,}", *(_cell(payload["dense"]["metrics"], m) for m in METRICS)]
    lines.append("| " + " | ".join([*dense_cells, "0", "1"]) + " |")
    for run in payload["runs"]:
        sizes = run["sizes"]
        ratio = "-" if run["ratio"] is None else f"{run['ratio']:g}"  # baselines other than low rank have none
        cells = [run["method"]["name"], ratio, f"{sizes['decoder_linear']['params_kept']:.1%}",
                 f"{sizes['model']['params_after']:,}", *(_cell(run["test"]["metrics"], m) for m in METRICS),
                 f"{run['fidelity']['kl']:.4f}", f"{run['fidelity']['top10_overlap']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@hydra.main(version_base="1.3", config_path="../conf", config_name="benchmark")
def main(cfg: DictConfig) -> None:
    run_benchmark(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
