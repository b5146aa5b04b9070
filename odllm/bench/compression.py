"""Compression benchmark: the dense model and every (method, ratio) side by side, in one run.

``python -m odllm.bench.compression dataset=instruments bench.ratios=[0.1,0.3,0.5,0.7,0.9] bench.methods=[odllm,svd]``
evaluates the dense model once, then compresses a fresh copy per setting with the same calibration prompts
(low-rank methods at every ratio, the others once at their own settings) and writes ``<bench.out>.json``, a
Markdown table ``<bench.out>.md`` and the quality-vs-size frontier ``<bench.out>.png``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from odllm import config
from odllm.bench.report import metric_cell, setting
from odllm.checks import user_errors
from odllm.compress.pipeline import compress_recommender, load_dense
from odllm.compress.registry import model_tag, uses_ratio
from odllm.eval.generation import Recommendations
from odllm.eval.protocol import public, sample_test_users, score_examples
from odllm.files import output_path, write_file_atomically, write_json, write_text
from odllm.model.recommender import Recommender

log = logging.getLogger(__name__)
METRICS = ("hr@5", "hr@10", "ndcg@5", "ndcg@10")
RUN_KEYS = ("method", "ratio", "storage", "sizes", "test", "fidelity", "compress_seconds")


def run_benchmark(cfg: DictConfig, output_dir: str | Path) -> dict:
    dense, split = load_dense(config.model_dir(cfg), config.dataset_source(cfg), cfg.task.max_history,
                              allow_other_dataset=cfg.allow_other_dataset, device=config.device(cfg))
    # bench.test_users: a seeded subset, a cheaper sweep; eval.split: the test or the valid items
    split, note = sample_test_users(split, cfg.bench.test_users, cfg.seed, config.eval_settings(cfg).split)
    out = Path(cfg.bench.out)
    protocol = run_protocol(cfg, dense, len(split.test))
    done, dense_result = previous_results(out, protocol) if cfg.bench.resume else ({}, None)
    pad_id = dense.tokenizer.pad_token_id
    if dense_result is None:
        evaluation = config.eval_settings(cfg)
        dense_result = score_examples(dense.model, dense.encoder, dense.trie(), split.test, evaluation, pad_id, "dense")
        recommendations = dataclasses.asdict(dense_result["_recommendations"])
        stored = {"result": public(dense_result), "recommendations": recommendations}
        write_file_atomically(output_path(out, ".dense.pt"), lambda tmp: torch.save(stored, tmp))
    payload = {
        "dataset": cfg.dataset.name,
        "test_users": len(split.test),
        "test_users_note": note,
        "protocol": protocol,
        "dense": public(dense_result),
        "runs": [],
    }
    for ratio, method in settings(cfg):
        job = dataclasses.replace(config.compression_job(cfg), ratio=ratio)
        key = run_key(method, ratio if uses_ratio(method) else None)
        if key in done:
            log.info("reusing %s (ratio %s) from %s.json (bench.resume=false recomputes)", method["name"], ratio, out)
            payload["runs"].append(done[key])
            continue
        run_dir = Path(output_dir) / "-".join(filter(None, [method["name"], model_tag(method, ratio)]))
        run = compress_recommender(dense, split, method, job, run_dir, dense_result)
        payload["runs"].append({k: run[k] for k in RUN_KEYS})
        write_outputs(out, payload)  # after every run: a stopped sweep resumes from here
    write_outputs(out, payload)  # also when every row was reused
    log.info("benchmark written to %s.{json,md,png}", out)
    return payload


def write_outputs(out: Path, payload: dict) -> None:
    write_json(output_path(out, ".json"), payload)
    write_text(output_path(out, ".md"), markdown_table(payload))
    frontier_plot(payload, output_path(out, ".png"))


def run_protocol(cfg: DictConfig, dense: Recommender, test_users: int) -> dict:
    """What a benchmark row depends on besides its method: a stored row is reused only under the same protocol
    (the same dense weights, test users, calibration prompts and beam search)."""
    weights = sorted(Path(dense.meta["model_dir"]).glob("*.safetensors"))
    digest = hashlib.sha256()
    for path in weights:
        digest.update(path.read_bytes())
    return {
        "dense_weights_sha256": digest.hexdigest(),
        "test_users": test_users,
        "seed": cfg.seed,
        "calibration": OmegaConf.to_container(cfg.calibration, resolve=True),
        "eval": OmegaConf.to_container(cfg.eval, resolve=True) | {"progress": None},
        "max_history": cfg.task.max_history,
    }


def run_key(method: dict, ratio: float | None) -> str:
    return json.dumps([method, ratio], sort_keys=True)


def previous_results(out: Path, protocol: dict) -> tuple[dict[str, dict], dict | None]:
    """Rows and the dense result of an earlier run of the same benchmark, for resuming a stopped run."""
    path, dense_path = output_path(out, ".json"), output_path(out, ".dense.pt")
    if not (path.exists() and dense_path.exists()):
        return {}, None
    previous = json.loads(path.read_text())
    if previous.get("protocol") != protocol:
        log.info("%s was written under another protocol (model, users, calibration or eval): starting afresh", path)
        return {}, None
    stored = torch.load(dense_path, weights_only=True)
    dense_result = {**stored["result"], "_recommendations": Recommendations(**stored["recommendations"])}
    log.info("resuming %s: %d stored rows and the dense evaluation", path, len(previous["runs"]))
    return {run_key(run["method"], run["ratio"]): run for run in previous["runs"]}, dense_result


def settings(cfg: DictConfig) -> list[tuple[float, dict]]:
    """(ratio, method) pairs: low-rank methods at every ``bench.ratios``, the others once (ratio unused); with a
    ``bench.embeddings`` list, every method once per embeddings choice (null = float32, int8)."""
    methods = [config.method_config(cfg, name) for name in cfg.bench.methods]  # unknown names fail before any work
    if cfg.bench.get("embeddings") is not None:
        methods = [{**m, "embeddings": e} for m in methods for e in cfg.bench.embeddings]
    pairs = [(ratio, m) for ratio in cfg.bench.ratios for m in methods if uses_ratio(m)]
    return pairs + [(cfg.ratio, m) for m in methods if not uses_ratio(m)]


def markdown_table(payload: dict) -> str:
    """One row per model; bytes are those held in memory, whole model = embeddings and lm_head included."""
    head = [
        "model",
        "setting",
        "decoder-linear bytes kept",
        "whole-model MB",
        *METRICS,
        "KL to dense",
        "top-10 overlap",
        "storage",
    ]
    users = f"{payload['test_users']} test users ({payload.get('test_users_note', 'all test users')})"
    lines = [f"{payload['dataset']}, {users}, 20 beams", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    first = payload["runs"][0]["sizes"] if payload["runs"] else None
    dense_mb = f"{first['model']['bytes_before'] / 1e6:.2f}" if first else "-"
    dense_cells = ["dense", "-", "100%", dense_mb, *(metric_cell(payload["dense"]["metrics"], m) for m in METRICS)]
    lines.append("| " + " | ".join([*dense_cells, "0", "1", "float32"]) + " |")
    for run in payload["runs"]:
        sizes = run["sizes"]
        cells = [
            run["method"]["name"],
            _setting(run),
            f"{sizes['decoder_linear']['bytes_kept']:.1%}",
            f"{sizes['model']['bytes_after'] / 1e6:.2f}",
            *(metric_cell(run["test"]["metrics"], m) for m in METRICS),
            f"{run['fidelity']['kl']:.4f}",
            f"{run['fidelity']['top10_overlap']:.3f}",
            _storage_cell(run),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _setting(run: dict) -> str:
    """The ratio of a low-rank run, else the method's own tag (w4g16, 2of4, ...); + int8 emb."""
    return setting({**run["method"], "embeddings": None}, run["ratio"]) + _embeddings(run)


def _embeddings(run: dict) -> str:
    return f" + {run['method']['embeddings']} emb" if run["method"].get("embeddings") else ""


def _storage_cell(run: dict) -> str:
    embeddings = run["method"].get("embeddings")
    return run.get("storage", "") + (f"; embeddings and lm_head {embeddings}" if embeddings else "")


def frontier_plot(payload: dict, path: str | Path) -> Path:
    """NDCG@10 (± standard error) against whole-model bytes in memory: one line per method, dense as a star."""
    from matplotlib.figure import Figure  # object API: no pyplot, no global backend; PNG renders with Agg

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    by_method: dict[str, list[dict]] = {}
    for run in payload["runs"]:
        by_method.setdefault(run["method"]["name"] + _embeddings(run), []).append(run)
    for name, runs in by_method.items():
        runs = sorted(runs, key=lambda r: r["sizes"]["model"]["bytes_after"])
        x = [r["sizes"]["model"]["bytes_after"] / 1e6 for r in runs]
        y = [r["test"]["metrics"]["ndcg@10"]["value"] for r in runs]
        err = [r["test"]["metrics"]["ndcg@10"]["stderr"] for r in runs]
        ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=2, lw=1, label=name)
    if payload["runs"]:
        dense = payload["dense"]["metrics"]["ndcg@10"]
        ax.errorbar(
            [payload["runs"][0]["sizes"]["model"]["bytes_before"] / 1e6],
            [dense["value"]],
            yerr=[dense["stderr"]],
            marker="*",
            ms=12,
            color="black",
            capsize=2,
            label="dense",
        )
        ax.axhline(dense["value"], color="black", lw=0.6, ls=":")
    ax.set_xlabel("whole-model bytes in memory (MB)")
    ax.set_ylabel("test NDCG@10")
    ax.set_title(f"{payload['dataset']}: quality vs size ({payload['test_users']} test users)")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    return Path(path)


@hydra.main(version_base="1.3", config_path=str(Path(__file__).parents[2] / "conf"), config_name="benchmark")
@user_errors
def main(cfg: DictConfig) -> None:
    config.check_benchmark(cfg)
    run_benchmark(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
