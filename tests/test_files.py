"""Atomic writes: a failed write keeps the old file and leaves no temp file behind."""

import os

import pytest

from odllm import files
from odllm.files import write_directory_atomically, write_file_atomically, write_json


def test_failed_file_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"ndcg@10": 0.05})

    def broken(tmp):
        tmp.write_text('{"ndcg')  # half written, then the run dies
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        write_file_atomically(path, broken)
    assert path.read_text() == '{\n  "ndcg@10": 0.05\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_failed_directory_write_keeps_the_old_directory(tmp_path):
    target = tmp_path / "model"
    write_directory_atomically(target, lambda d: (d.mkdir(), (d / "w").write_text("good")))

    def broken(d):
        d.mkdir()
        (d / "w").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        write_directory_atomically(target, broken)
    assert (target / "w").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_output_path_keeps_dots_in_the_stem(tmp_path):
    from odllm.files import output_path

    assert output_path(tmp_path / "Instruments-ratio-0.5", ".json") == tmp_path / "Instruments-ratio-0.5.json"
    assert output_path("out/ml-100k-inference", ".md").name == "ml-100k-inference.md"


def test_exclusive_refuses_a_second_writer_and_frees_on_exit(tmp_path):
    lock = tmp_path / ".model.lock"
    with files.exclusive(lock, "the model"):
        with pytest.raises(files.BusyError, match=rf"the model is being written by pid {os.getpid()}"):
            with files.exclusive(lock, "the model"):
                pass
    with files.exclusive(lock, "the model"):  # released: taken again
        pass
