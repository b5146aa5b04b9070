"""The inference benchmark's results for people: a Markdown table and a PNG of every model relative to dense.

Apart from the driver, which measures: these only read its results payload (the JSON as saved).
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure  # object API: no pyplot, no global backend; PNG renders with Agg

from odllm.bench.profile import profile_table


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"  # MB of 10^6 bytes, as in the compression tables


def markdown_report(payload: dict) -> str:
    m, p = payload["machine"], payload["protocol"]
    lines = [
        f"# Inference benchmark: {payload['dataset']}", "",
        f"{m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']}, {m['threads']} thread(s) per process; "
        f"load average {m['load_average_before'][0]:.2f} before, {m['load_average_after'][0]:.2f} after (other jobs "
        "inflate every number alike; ratios are paired: models interleaved call by call)"
        + {True: "; q/k/v and gate/up fused in every model (odllm.bench.fusion).",
           "both": "; '+fused' rows: the same model with q/k/v and gate/up fused (odllm.bench.fusion)."
           }.get(p["fuse"], "."),
        f"Latency: batch 1, {p['num_beams']} beams, history (up to {p['max_history']} items) -> top items, mean over "
        f"{p['latency_users']} seeded test users per repeat, median [IQR] over {p['repeats']} repeats; CPU ms: process "
        f"CPU time of the same calls. Throughput: {p['throughput_users']} seeded test users at the batch size shown. "
        f"Peak RSS: one process per model; 'over baseline' subtracts a process with the same imports and no model "
        f"({_mb(payload['baseline_maxrss_bytes'])} MB). Weights: parameters + persistent buffers in memory (shared "
        "tensors once), safetensors bytes on disk.", "",
    ]
    head = ["model", "what it holds", "latency ms", "x dense", "CPU ms (x dense)", "users/s (batch)", "x dense",
            "peak RSS MB", "over baseline MB (batch 1 / peak)", "weights in memory MB (model / decoder linears)",
            "x dense", "on disk MB (model / decoder linears)", "x dense", "top-10 overlap"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in payload["rows"]:
        lat, ratio, thr, r = row["latency_ms"], row["latency_ratio"], row["throughput_users_per_s"], row["ratios"]
        mem, disk, over = row["memory_bytes"], row["disk_bytes"], row["maxrss_over_baseline_bytes"]
        cells = [
            row["label"], row["description"], f"{lat['median']:.1f} [{lat['q1']:.1f}-{lat['q3']:.1f}]",
            f"{ratio['median']:.3f} [{ratio['q1']:.3f}-{ratio['q3']:.3f}]",
            f"{row['cpu_ms']['median']:.1f} ({row['cpu_ratio']['median']:.3f})",
            f"{thr['median']:.1f} ({row['batch_size']})", f"{row['throughput_ratio']['median']:.3f}",
            _mb(row["maxrss_bytes"]["peak"]), f"{_mb(over['batch1'])} / {_mb(over['peak'])}",
            f"{_mb(mem['model']['bytes'])} / {_mb(mem['decoder_linear']['bytes'])}",
            f"{r['memory_model']:.3f} / {r['memory_decoder_linear']:.3f}",
            f"{_mb(disk['model']['bytes'])} / {_mb(disk['decoder_linear']['bytes'])}",
            f"{r['disk_model']:.3f} / {r['disk_decoder_linear']:.3f}", f"{row['top10_overlap_with_dense']:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if any("kernels:" in row["description"] for row in payload["rows"]):
        lines += ["", "'kernels:' = the matmul each QuantLinear ran: int8pack_mm / int4pack_mm are torch's packed CPU "
                  "kernels, dequantize rebuilds the float32 weight per forward (ODLLM_KERNELS, "
                  "docs/inference-benchmark.md)."]
    simulated = [row["label"] for row in payload["rows"] if row["simulated"]]
    if simulated:
        lines += ["", f"SIMULATED compression (dense storage, no saving in bytes or time): {', '.join(simulated)}."]
    lines += ["", f"Run took {payload['seconds']:.0f} s. Per-call latency percentiles, per-repeat values and "
              "RSS after load are in the JSON."]
    if "profile" in payload:
        lines += ["", *profile_table(payload["profile"])]
    return "\n".join(lines) + "\n"


def plot(payload: dict, path: Path) -> None:
    """Per model: latency, 1/throughput, weights (memory, disk) and peak RSS over baseline, relative to dense."""
    rows = payload["rows"]
    series = [
        ("batch-1 latency", lambda r: r["latency_ratio"]["median"]),
        ("time per user at batch (1/throughput)", lambda r: 1 / r["throughput_ratio"]["median"]),
        ("weights in memory (whole model)", lambda r: r["ratios"]["memory_model"]),
        ("weights in memory (decoder linears)", lambda r: r["ratios"]["memory_decoder_linear"]),
        ("weights on disk (whole model)", lambda r: r["ratios"]["disk_model"]),
        ("peak RSS over baseline", lambda r: r["ratios"]["peak_rss_over_baseline"] or 0.0),
    ]
    fig = Figure(figsize=(max(6, 1.6 * len(rows) + 3), 4.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(series)
    for i, (name, value) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))]
        errors = None
        if i == 0:  # the latency IQR
            q = [r["latency_ratio"] for r in rows]
            errors = [[max(0.0, x["median"] - x["q1"]) for x in q], [max(0.0, x["q3"] - x["median"]) for x in q]]
        ax.bar(xs, [value(r) for r in rows], width, label=name, yerr=errors, capsize=2)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(0.65, color="tab:red", linestyle="--", linewidth=0.8, label="latency target 0.65")
    ax.axhline(0.55, color="tab:purple", linestyle=":", linewidth=0.8, label="weights target 0.55")
    ax.set_xticks(range(len(rows)), [r["label"] + (" (simulated)" if r["simulated"] else "") for r in rows],
                  rotation=20, ha="right")
    ax.set_ylabel("relative to dense")
    ax.set_title(f"{payload['dataset']}: inference cost relative to dense (threads={payload['machine']['threads']})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.savefig(path, dpi=120)
