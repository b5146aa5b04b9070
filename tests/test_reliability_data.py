"""Data that must be refused (non-finite timestamps, blank ids, wrong types), encodings and spreadsheet exports,
and messages that name no one's machine."""

import json
import re
from pathlib import Path

import pytest

from odllm.data.dataset import DatasetSource, load_dataset
from odllm.data.readers import DataError

ROWS = [("u", "a", "1"), ("u", "b", "2"), ("u", "c", "3"), ("v", "c", "1"), ("v", "a", "2"), ("v", "b", "3")]
EXPECTED = {"u": ["a", "b", "c"], "v": ["c", "a", "b"]}


def csv_source(path: Path) -> DatasetSource:
    return DatasetSource(name="mine", format="csv", path=str(path))


def atomic_source(directory: Path) -> DatasetSource:
    return DatasetSource(name="toy", format="atomic", dir=str(directory))


def lcrec_source(directory: Path, require_index: bool = True) -> DatasetSource:
    return DatasetSource(name="Toy", format="lcrec", dir=str(directory), require_index=require_index)


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity"])
def test_non_finite_timestamps_are_refused(tmp_path, value):
    rows = [*ROWS[:4], ("v", "a", value), ROWS[5]]
    path = tmp_path / "mine.csv"
    path.write_text("user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
    with pytest.raises(DataError, match=rf"mine\.csv, line 6: timestamp '{value}' is not a finite number"):
        load_dataset(csv_source(path))
    (tmp_path / "toy.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n"
                                        + "".join(f"{u}\t{i}\t{t}\n" for u, i, t in rows))
    with pytest.raises(DataError, match=r"toy\.inter, line 6: timestamp .* not a finite number"):
        load_dataset(atomic_source(tmp_path))


@pytest.mark.parametrize("column", [0, 1])
@pytest.mark.parametrize("cell", ["", "  "])
def test_blank_user_or_item_cells_are_refused(tmp_path, column, cell):
    rows = [list(r) for r in ROWS]
    rows[2][column] = cell
    path = tmp_path / "mine.csv"
    path.write_text("user,item,timestamp\n" + "".join(",".join(r) + "\n" for r in rows))
    name = ("user", "item")[column]
    with pytest.raises(DataError, match=rf"mine\.csv, line 4: the {name} cell is blank; fill it in or delete"):
        load_dataset(csv_source(path))
    (tmp_path / "toy.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n"
                                        + "".join("\t".join(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"toy\.inter, line 4: the {name}_id cell is blank"):
        load_dataset(atomic_source(tmp_path))


def spreadsheet_exports() -> dict[str, bytes]:
    plain = "user,item,timestamp,title\n" + "".join(f"{u},{i},{t},Title {i}\n" for u, i, t in ROWS)
    semicolon = "User;Item;Timestamp;Title\r\n" + "".join(f'{u};{i};{t};"Title {i}; the sequel"\r\n'
                                                         for u, i, t in ROWS)
    quoted = '"user","item","timestamp","title"\r\n' + "".join(f'"{u}","{i}","{t}","Title, {i}"\r\n'
                                                              for u, i, t in ROWS)
    return {
        "utf-8 with BOM": b"\xef\xbb\xbf" + plain.encode(),
        "CRLF": plain.replace("\n", "\r\n").encode(),
        "BOM, CRLF, quoted, commas in titles": b"\xef\xbb\xbf" + quoted.encode(),
        "semicolons (European Excel), semicolons in titles": b"\xef\xbb\xbf" + semicolon.encode(),
        "tabs": plain.replace(",", "\t").encode(),
        "trailing blank lines": (plain + "\n\n").encode(),
        "non-ASCII titles": plain.replace("Title a", "Título ä 東京").encode(),
    }


@pytest.mark.parametrize("case", list(spreadsheet_exports()))
def test_spreadsheet_exports_read_the_same(tmp_path, case):
    path = tmp_path / "mine.csv"
    path.write_bytes(spreadsheet_exports()[case])
    ds = load_dataset(csv_source(path))
    assert ds.sequences == EXPECTED
    assert set(ds.item_text) == {"a", "b", "c"}
    assert all("\ufeff" not in t and "\r" not in t for t in ds.item_text.values())
    if "semicolon" in case:
        assert ds.item_text["a"] == "Title a; the sequel"
    if "quoted" in case:
        assert ds.item_text["a"] == "Title, a"


def test_unknown_separator_says_what_it_expects(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("user|item|timestamp\nu|a|1\n")
    with pytest.raises(DataError, match="separated by commas, tabs or semicolons .*the first line reads 'user|item"):
        load_dataset(csv_source(path))


def test_atomic_files_with_bom_and_crlf(tmp_path):
    body = "user_id:token\titem_id:token\ttimestamp:float\r\n" + "".join(f"{u}\t{i}\t{t}\r\n" for u, i, t in ROWS)
    (tmp_path / "toy.inter").write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert load_dataset(atomic_source(tmp_path)).sequences == EXPECTED


def test_text_that_is_not_utf8_names_the_file_the_byte_and_the_fix(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_bytes("user,item,timestamp,title\nu,a,1,Café\n".encode("latin-1"))
    message = r"mine\.csv is not UTF-8 text: byte offset 35 \(line 2\) starts b'\\xe9.*re-save it as UTF-8"
    with pytest.raises(DataError, match=message):
        load_dataset(csv_source(path))
    path.write_bytes("user,item,timestamp\nu,a,1\n".encode("utf-16"))
    with pytest.raises(DataError, match=r"mine\.csv is UTF-16 text .* re-save it as UTF-8"):
        load_dataset(csv_source(path))
    (tmp_path / "toy.inter").write_bytes(b"user_id:token\titem_id:token\ttimestamp:float\n1\t\xff\t1\n")
    with pytest.raises(DataError, match=r"toy\.inter is not UTF-8 text: byte offset 46 \(line 2\)"):
        load_dataset(atomic_source(tmp_path))
    (tmp_path / "Toy.inter.json").write_bytes('{"ü": [1, 2, 3]}'.encode("latin-1"))
    with pytest.raises(DataError, match=r"Toy\.inter\.json is not UTF-8 text"):
        load_dataset(lcrec_source(tmp_path))


INDEX = {str(i): [f"<a_{i}>", f"<b_{i}>"] for i in range(6)}


@pytest.mark.parametrize(
    "inter,index,message",
    [
        ({"": [0, 1, 2]}, INDEX, "a blank user id ''"),
        ({" ": [0, 1, 2]}, INDEX, "a blank user id ' '"),
        ({"0": [0, " ", 2]}, INDEX, r"user '0' holds the item id ' '; item ids are non-blank"),
        ({"0": [0, True, 2]}, INDEX, "holds the item id True"),
        ({"0": [0, 1.5, 2]}, INDEX, "holds the item id 1.5"),
        ({"0": [0, None, 2]}, INDEX, "holds the item id None"),
        ({"0": {"a": 1}}, INDEX, "must map to a list of item ids, found dict"),
        ({"0": [0, 1, 2]}, {**INDEX, " ": ["<a_9>", "<b_9>"]}, r"a key holds the item id ' '"),
        ({"0": [0, 1, 2]}, {**INDEX, "1": ["<a_1>", " "]}, "non-blank token strings"),
        ({"0": [0, 1, 2]}, {**INDEX, "1": []}, "non-empty list"),
    ],
)
def test_lcrec_blank_ids_and_wrong_types_are_refused(tmp_path, inter, index, message):
    (tmp_path / "Toy.inter.json").write_text(json.dumps(inter))
    (tmp_path / "Toy.index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=message):
        load_dataset(lcrec_source(tmp_path))


def test_lcrec_with_bom_reads(tmp_path):
    (tmp_path / "Toy.inter.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"0": [0, 1, 2], "1": [3, 4, 5]}).encode())
    (tmp_path / "Toy.index.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(INDEX).encode())
    assert load_dataset(lcrec_source(tmp_path)).sequences == {"0": ["0", "1", "2"], "1": ["3", "4", "5"]}


def test_a_missing_index_names_the_two_ways_on(tmp_path):
    (tmp_path / "Toy.inter.json").write_text(json.dumps({"0": [0, 1, 2]}))
    with pytest.raises(DataError) as e:
        load_dataset(lcrec_source(tmp_path))
    message = str(e.value)
    assert "Toy.index.json not found" in message
    assert "python -m odllm.index dataset=toy" in message and "dataset.item_tokens=atomic" in message
    assert "shared" not in message and "here:" not in message
    assert load_dataset(lcrec_source(tmp_path, require_index=False)).sequences == {"0": ["0", "1", "2"]}


def test_no_message_is_written_for_one_machine():
    """Strings in the package must not name a development path ('../shared', '/work/', 'here: ...')."""
    pattern = re.compile(r"""["'][^"'\n]*(\.\./shared|/work/|this machine|\(here: )[^"'\n]*["']""")
    found = [f"{p}: {m.group(0)}" for p in Path(__file__).parents[1].joinpath("odllm").rglob("*.py")
             for m in pattern.finditer(p.read_text())]
    assert not found, found
