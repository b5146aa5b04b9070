"""The low-bit kernel benchmark: its shape option and the error it reports per path."""

import argparse

import pytest

from odllm.bench.kernels import measure, parse_shapes


def test_parse_shapes_reads_in_by_out_pairs_and_names_a_bad_entry():
    assert parse_shapes("256x64,96X688") == [(256, 64), (96, 688)]
    with pytest.raises(argparse.ArgumentTypeError, match="INxOUT"):
        parse_shapes("256-64")


def test_every_path_computes_the_dequantized_product():
    rows = measure(64, 48, rows=20, repeats=2)
    paths = {(r["layout"], r["path"]) for r in rows}
    assert ("int8 row", "kernel bf16") in paths and ("int4 g32", "kernel fp32") in paths
    for r in rows:
        assert r["us"]["median"] > 0
        if r["path"] == "kernel fp32":  # exact conversion of the grid: float32 rounding only
            assert r["relative_error"] < 1e-5, r
        elif r["path"] in ("kernel bf16", "dense bf16"):
            assert r["relative_error"] < 1e-2, r
