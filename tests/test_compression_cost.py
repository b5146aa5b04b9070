"""The compression-cost benchmark: one record measured in-process on a tiny model, and the Markdown tables."""

import time

import torch

from odllm.bench.cost import SIZE_SWEEP_N, SWEEP_SIZE, TINY, calibration_batches, markdown_tables, measure, plan


def test_measure_records_sane_costs():
    torch.manual_seed(0)
    n, seq_len = 8, 60
    started = time.perf_counter()
    record = measure("tiny", TINY, n, seq_len=seq_len, warm_up=False)
    elapsed = time.perf_counter() - started
    hidden, inter = TINY["hidden_size"], TINY["intermediate_size"]
    assert record["calibration_sequences"] == n
    assert record["calibration_tokens"] == n * seq_len
    assert 0.1 * elapsed < record["seconds"] <= elapsed  # seconds (not ms), and the compression is most of the call
    # two float32 streams (original and compressed) of the hidden state of every calibration token
    tokens = sum(int(b["attention_mask"].sum()) for b in calibration_batches(n, seq_len=seq_len))
    assert record["stream_bytes"] == tokens * hidden * 4 * 2
    # q, k, v, o, gate, up read hidden features, down reads intermediate ones
    assert record["covariance_bytes"] == (6 * hidden**2 + inter**2) * 8
    assert 0 < record["decoder_linear_params"] < record["model_params"]
    assert record["model_weight_bytes"] == record["model_params"] * 4
    assert record["peak_rss_delta_mib"] >= 0
    assert record["layers"] == TINY["num_hidden_layers"]
    assert 0 < record["decoder_params_kept"] <= 0.5


def _record(size: str, n: int, params: int) -> dict:
    return {"size": size, "layers": 2, "hidden": 32, "intermediate": 64, "decoder_linear_params": params,
            "model_params": params + 100, "model_weight_bytes": 4 * (params + 100), "calibration_sequences": n,
            "calibration_tokens": 60 * n, "seconds": 1.5, "peak_rss_delta_mib": 12.0, "stream_bytes": 2**20,
            "covariance_bytes": 2**20, "layer_copy_bytes": 2**20}


def _rows(table: str) -> list[str]:
    """The body rows of a Markdown table (header and rule dropped)."""
    return [line for line in table.splitlines() if line.startswith("| ")][1:]


def test_markdown_has_one_row_per_record_in_each_table():
    records = [_record(SWEEP_SIZE, n, 10) for n in (64, SIZE_SWEEP_N, 1024)]
    records += [_record("medium", SIZE_SWEEP_N, 20), _record("large", SIZE_SWEEP_N, 30)]
    text = markdown_tables(records)
    by_size, by_n = text.split("## ")[1:]
    assert [row.split(" | ")[0] for row in _rows(by_size)] == [f"| {SWEEP_SIZE}", "| medium", "| large"]
    assert [row.split(" | ")[5] for row in _rows(by_n)] == ["64", str(SIZE_SWEEP_N), "1024"]
    assert len(_rows(by_size)) + len(_rows(by_n)) == len(records) + 1  # the shared (small, 256) run is in both


def test_plan_runs_each_configuration_once():
    assert plan(["small", "medium"], [64, 256]) == [("small", 64), ("small", 256), ("medium", 256)]
