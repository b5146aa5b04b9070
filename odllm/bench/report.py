"""Comparison report of finished runs, offline: ``python -m odllm.bench.report <run or sweep dirs> [--out DIR]``

Reads every ``metrics.json`` that train.py, evaluate.py or compress.py (or the benchmark) wrote under the given
directories and writes ``report.md`` (one row per model; a dense parent once, however many runs scored it) and,
per dataset with compressed models, PNG plots: NDCG@10, HR@10 and KL to dense against the swept setting
(``ratio``, else what the sweep varied, e.g. ``calibration.size``) with one line per method and the dense model as
a horizontal line, and NDCG@10 against whole-model bytes. The numbers are those of the files, formatted as the
runs log them.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from odllm.compress.registry import model_tag

METRICS = ("hr@5", "hr@10", "ndcg@5", "ndcg@10")
NOT_SWEPT = ("paths.", "logger.", "hydra.", "eval.progress", "trainer.enable_progress_bar")


@dataclass
class Row:
    """One tested model: a compressed one, or a dense one (``method="dense"``)."""

    path: Path  # the metrics.json it comes from
    dataset: str
    method: str
    setting: str  # the ratio of a low-rank method, else the method's own tag (w4g16, 2of4); "-" for dense
    metrics: dict[str, dict[str, float]]
    users: int
    model_dir: str | None
    config: dict = field(default_factory=dict)  # the run's resolved config, flattened (calibration.size: 256)
    ratio: float | None = None
    model_bytes: int | None = None
    kl: float | None = None
    overlap: float | None = None


def metrics_files(paths: Sequence[str | Path]) -> list[Path]:
    """Every metrics.json at or under ``paths`` (each path must hold at least one), each file once."""
    found: dict[Path, Path] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        files = [path] if path.is_file() else sorted(path.rglob("metrics.json"))
        if not files:
            raise FileNotFoundError(
                f"no metrics.json under {path}: pass run directories of train.py, evaluate.py or compress.py "
                "(outputs/<job>/<dataset>/<time>) or a sweep directory (multirun/<job>/<time>); a run that failed "
                "or is still running has none"
            )
        found.update((f.resolve(), f) for f in files)
    return list(found.values())


def load_rows(files: Sequence[Path]) -> list[Row]:
    rows: list[Row] = []
    for path in files:
        rows += rows_of(json.loads(path.read_text()), path)
    return merge_duplicates(rows)


def rows_of(payload: dict, path: Path) -> list[Row]:
    """compress.py: the compressed model and its dense parent; train.py / evaluate.py: the model they tested."""
    if "test" not in payload or "dataset" not in payload:
        raise ValueError(f"{path} has no test metrics: not a metrics.json of train.py, evaluate.py or compress.py")
    common = {"path": path, "dataset": payload["dataset"], "config": flatten(payload.get("config") or {})}
    if "fidelity" in payload:  # compress.py (or a benchmark run)
        sizes = (payload.get("sizes") or {}).get("model", {})
        dense = Row(**common, method="dense", setting="-", metrics=payload["dense"]["metrics"],
                    users=payload["dense"]["users"], model_dir=payload.get("dense_model_dir"),
                    model_bytes=sizes.get("bytes_before"))
        return [dense, Row(**common, method=payload["method"]["name"],
                           setting=setting(payload["method"], payload["ratio"]), metrics=payload["test"]["metrics"],
                           users=payload["test"]["users"], model_dir=payload.get("model_dir"), ratio=payload["ratio"],
                           model_bytes=sizes.get("bytes_after"), kl=payload["fidelity"]["kl"],
                           overlap=payload["fidelity"]["top10_overlap"])]
    about = payload.get("compression")  # evaluate.py of a compressed model
    method, tag = (about["method"], setting(about["settings"], about["ratio"])) if about else ("dense", "-")
    return [Row(**common, method=method, setting=tag, metrics=payload["test"]["metrics"],
                users=payload["test"]["users"], model_dir=payload.get("model_dir"),
                ratio=about["ratio"] if about else None)]


def setting(method: dict, ratio: float | None) -> str:
    return f"{ratio:g}" if ratio is not None else (model_tag(method, None) or "defaults")


def flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        out.update(flatten(value, f"{name}.") if isinstance(value, dict) else {name: value})
    return out


def merge_duplicates(rows: list[Row]) -> list[Row]:
    """One row per model and result: the dense parent that every job of a sweep re-scored, or a model scored by
    both compress.py and evaluate.py, keeps its first run and gains the others' sizes and fidelity."""
    kept: dict[tuple, Row] = {}
    for row in rows:
        key = (row.dataset, row.method, row.setting, row.model_dir, row.users, json.dumps(row.metrics, sort_keys=True))
        first = kept.setdefault(key, row)
        for name in ("model_bytes", "kl", "overlap"):
            if getattr(first, name) is None:
                setattr(first, name, getattr(row, name))
    return list(kept.values())


def swept(rows: Sequence[Row]) -> list[str]:
    """Config keys whose values differ among ``rows`` (what a sweep varied), bookkeeping keys left out."""
    keys = set().union(*(r.config for r in rows))
    return sorted(
        k for k in keys
        if not k.startswith(NOT_SWEPT) and len({json.dumps(r.config.get(k), sort_keys=True) for r in rows}) > 1
    )


def by(rows: Sequence[Row], attribute: str) -> dict[str, list[Row]]:
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(getattr(row, attribute), []).append(row)
    return groups


def x_key(rows: Sequence[Row]) -> str:
    """``ratio`` when it varies among a method's runs, else the first other key a method's sweep varied."""
    varied = sorted({k for group in by(rows, "method").values() for k in swept(group)})
    return "ratio" if "ratio" in varied or not varied else varied[0]


def x_value(row: Row, key: str):
    return row.ratio if key == "ratio" else row.config.get(key)


def _order(value) -> tuple:
    return (0, value, "") if isinstance(value, int | float) else (1, 0, str(value))


def metric_cell(metrics: dict, name: str) -> str:
    """``value ± stderr`` as the runs log it; "-" for a K the run did not score (``eval.ks``)."""
    return f"{metrics[name]['value']:.4f} ± {metrics[name]['stderr']:.4f}" if name in metrics else "-"


def _optional(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(rows: Sequence[Row], files: int, sources: Sequence[str | Path], plots: dict[str, list[Path]]) -> str:
    head = ["model", "setting", "swept", "whole-model MB", *METRICS, "KL to dense", "top-10 overlap", "users", "run"]
    lines = [
        "# Comparison report", "",
        f"{files} metrics.json files under {', '.join(f'`{s}`' for s in sources)}. Test "
        "metrics ± standard error over test users; whole-model MB = bytes held in memory (embeddings and lm_head "
        "included); KL to dense and top-10 overlap compare a compressed model with its dense parent on the test "
        "prompts; swept = the config keys that differ between the runs of one method.",
    ]
    for dataset, group in by(rows, "dataset").items():
        lines += ["", f"## {dataset}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method, runs in sorted(by(group, "method").items(), key=lambda item: (item[0] != "dense", item[0])):
            keys = [k for k in swept(runs) if k != "ratio"]
            for row in sorted(runs, key=lambda r: (_order(r.ratio), [_order(r.config.get(k)) for k in keys])):
                mb = None if row.model_bytes is None else row.model_bytes / 1e6
                cells = [method, row.setting, ", ".join(f"{k}={row.config.get(k)}" for k in keys) or "-",
                         _optional(mb, ".2f"), *(metric_cell(row.metrics, m) for m in METRICS),
                         _optional(row.kl, ".4f"), _optional(row.overlap, ".3f"), str(row.users),
                         f"`{row.path.parent}`"]
                lines.append("| " + " | ".join(cells) + " |")
        lines += [""] + [f"![{p.stem}]({p.name})" for p in plots.get(dataset, [])]
    return "\n".join(lines) + "\n"


def point(row: Row, metric: str) -> tuple[float | None, float]:
    """(value, standard error) of a test metric, or (KL to dense, 0) for ``metric="kl"``."""
    return (row.kl, 0.0) if metric == "kl" else (row.metrics[metric]["value"], row.metrics[metric]["stderr"])


def _draw(ax, lines: dict[str, list[Row]], metric: str, x) -> None:
    """One error-bar line per label, points ordered along the x axis; ``x`` maps a row to its x (None: skip)."""
    for label, runs in lines.items():
        runs = sorted((r for r in runs if x(r) is not None and point(r, metric)[0] is not None),
                      key=lambda r: _order(x(r)))
        if runs:
            values, errors = zip(*(point(r, metric) for r in runs), strict=True)
            ax.errorbar([x(r) for r in runs], values, yerr=errors, marker="o", ms=4, capsize=2, lw=1,
                        elinewidth=0.6, label=label)


def _dense_lines(ax, dense: Sequence[Row], metric: str) -> None:
    for i, row in enumerate(dense):
        value, err = point(row, metric)
        label = "dense" if len(dense) == 1 else f"dense {row.model_dir}"
        ax.axhline(value, color="black", lw=1, ls=("--", ":", "-.")[i % 3], label=label)
        ax.axhspan(value - err, value + err, color="grey", alpha=0.12, lw=0)


def _lines(rows: Sequence[Row], along: str) -> dict[str, list[Row]]:
    """One line per method and per value of every other key its runs varied (``along`` is the x axis)."""
    lines: dict[str, list[Row]] = {}
    for method, runs in by(rows, "method").items():
        keys = [k for k in swept(runs) if k != along]
        for row in runs:
            lines.setdefault(" ".join([method, *(f"{k}={x_value(row, k)}" for k in keys)]), []).append(row)
    return lines


def plot_dataset(rows: Sequence[Row], out: Path, x: str | None = None) -> list[Path]:
    """``<dataset>-<x>.png``: NDCG@10, HR@10 (dense as a line, its standard error shaded) and KL to dense against
    ``x``, one line per method (and per other swept value); ``<dataset>-bytes.png``, when the models differ in
    size: NDCG@10 against whole-model MB. Nothing when no model of the dataset is compressed."""
    from matplotlib.figure import Figure  # object API: no pyplot state, renders PNG with Agg

    compressed = [r for r in rows if r.method != "dense"]
    if not compressed:
        return []
    dataset, dense = rows[0].dataset, [r for r in rows if r.method == "dense"]
    x = x or x_key(compressed)
    lines = _lines(compressed, x)
    panels = ["ndcg@10", "hr@10"] + (["kl"] if any(r.kl is not None for r in compressed) else [])
    fig = Figure(figsize=(4.6 * len(panels), 4), layout="constrained")
    for ax, metric in zip(fig.subplots(1, len(panels)), panels, strict=True):
        _draw(ax, lines, metric, lambda r: x_value(r, x))
        if metric == "kl":
            ax.set_ylabel("KL to dense on the test prompts")
            if min(r.kl for r in compressed if r.kl is not None) > 0:
                ax.set_yscale("log")
        else:
            _dense_lines(ax, dense, metric)
            ax.set_ylabel(f"test {metric.upper()}")
        sizes = [x_value(r, x) for r in compressed]  # counts spanning octaves (calibration sizes): log2 axis
        if all(isinstance(v, int) and v > 0 for v in sizes) and max(sizes) >= 8 * min(sizes):
            ax.set_xscale("log", base=2)
        ax.set_xlabel(x)
        ax.set_title(f"{dataset}, {compressed[0].users} test users", fontsize=9)
        ax.legend(fontsize=7)
    paths = [out / f"{dataset}-{x}.png"]
    fig.savefig(paths[-1], dpi=120)

    if len({r.model_bytes for r in compressed if r.model_bytes}) > 1:  # one size (a calibration sweep): no plot
        fig = Figure(figsize=(6.4, 4.2), layout="constrained")
        ax = fig.subplots()
        _draw(ax, _lines(compressed, "ratio"), "ndcg@10", lambda r: r.model_bytes and r.model_bytes / 1e6)
        for row in dense:
            if row.model_bytes:
                ax.plot([row.model_bytes / 1e6], [point(row, "ndcg@10")[0]], "*", ms=12, color="black")
        _dense_lines(ax, dense, "ndcg@10")
        ax.set_xlabel("whole-model bytes in memory (MB)")
        ax.set_ylabel("test NDCG@10")
        ax.set_title(f"{dataset}: quality against size, {compressed[0].users} test users", fontsize=9)
        ax.legend(fontsize=7)
        paths.append(out / f"{dataset}-bytes.png")
        fig.savefig(paths[-1], dpi=120)
    return paths


def write_report(paths: Sequence[str | Path], out: str | Path, x: str | None = None) -> Path:
    """``<out>/report.md`` and the plots beside it; returns the Markdown file."""
    files = metrics_files(paths)
    rows = load_rows(files)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = {dataset: plot_dataset(group, out, x) for dataset, group in by(rows, "dataset").items()}
    report = out / "report.md"
    report.write_text(markdown(rows, len(files), paths, plots))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m odllm.bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="run directories, sweep (multirun) directories or metrics.json files")
    parser.add_argument("--out", help="output directory (default: <first path>/report)")
    parser.add_argument("--x", help="config key on the plots' x axis (default: ratio, else what the sweep varied)")
    args = parser.parse_args(argv)
    first = Path(args.paths[0])
    report = write_report(args.paths, args.out or (first if first.is_dir() else first.parent) / "report", args.x)
    print(report.read_text())
    print(f"written: {report} and its plots in {report.parent}")


if __name__ == "__main__":
    main()
