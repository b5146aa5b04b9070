"""Raw Amazon Reviews 2018 files -> LC-Rec format, on small gzip files written here, against a hand-computed 5-core."""

import gzip
import json

import pytest
from conftest import compose_config

from odllm.data.dataset import DatasetSource, load_dataset
from odllm.data.prepare import k_core, prepare, prepare_amazon
from odllm.data.readers import DataError

CORE_USERS = ["U1", "U2", "U3", "U4", "U5"]
CORE_ITEMS = ["B01", "B02", "B03", "B04", "B05"]


def write_gz(path, records):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def review(user, item, t):
    return {"overall": 5.0, "reviewerID": user, "asin": item, "unixReviewTime": t, "reviewText": "ok"}


def amazon_files(tmp_path, category="Toys"):
    """The 5-core is U1..U5 x B01..B05; everything else must go, most of it only after several rounds.

    - Round 1: B06 has 4 reviews (U6, U8, U9, U10) and falls, which leaves U6 (B01-B03, B06, B09) with 4.
    - Round 2: B09 had 5 reviews (U1-U4, U6); without U6 it has 4 and falls. U1-U4 keep their 5 core items.
    - U7 reviewed B01 twice, B02, B03, B04: 4 distinct items, so repeats do not count towards the core.
    - B07 has 5 reviews but no metadata, B08 an empty title: both dropped before the core is computed.
    - U1 wrote in reverse time order and reviewed B03 again later: the repeat keeps the first occurrence.
    """
    reviews = []
    for u, user in enumerate(CORE_USERS):
        for i, item in enumerate(CORE_ITEMS):
            t = 100 - 10 * i if user == "U1" else 10 * i + u  # U1: B05 first ... B01 last
            reviews.append(review(user, item, t))
    reviews.append(review("U1", "B03", 500))
    reviews += [review("U6", item, 1) for item in ["B01", "B02", "B03", "B06", "B09"]]
    reviews += [review(user, "B09", 2) for user in CORE_USERS[:4]]
    reviews += [review("U7", item, t) for t, item in enumerate(["B01", "B01", "B02", "B03", "B04"])]
    reviews += [review(user, "B06", 7) for user in ["U8", "U9", "U10"]]
    reviews += [review(user, "B07", 3) for user in CORE_USERS]
    reviews += [review(user, "B08", 4) for user in CORE_USERS]
    meta = [{"asin": a, "title": f"Toy {a} &amp; friends", "brand": "Acme", "category": ["Toys", "Blocks"],
             "description": ["<b>Fun</b>", "for all"]} for a in [*CORE_ITEMS, "B06", "B09"]]
    meta += [{"asin": "B08", "title": "   "}, {"asin": "B01", "title": "a later duplicate record"}]
    write_gz(tmp_path / f"{category}_5.json.gz", reviews)
    write_gz(tmp_path / f"meta_{category}.json.gz", meta)
    return tmp_path / f"{category}_5.json.gz", tmp_path / f"meta_{category}.json.gz"


def test_five_core_matches_the_hand_computed_result(tmp_path, caplog):
    caplog.set_level("INFO", logger="odllm.data.prepare")
    inter, item = prepare_amazon(*amazon_files(tmp_path), k=5)
    assert "5-core after 2 rounds: 5 users, 5 items, 25 interactions" in caplog.text
    assert inter == {
        "0": [4, 3, 2, 1, 0],  # U1, time order; its later repeat of B03 is gone
        "1": [0, 1, 2, 3, 4],
        "2": [0, 1, 2, 3, 4],
        "3": [0, 1, 2, 3, 4],
        "4": [0, 1, 2, 3, 4],
    }
    assert item["0"] == {"title": "Toy B01 & friends", "description": "Fun for all", "brand": "Acme",
                         "categories": "Toys, Blocks", "asin": "B01"}
    assert [item[str(n)]["asin"] for n in range(5)] == CORE_ITEMS


def test_k_core_iterates_to_a_fixed_point():
    # k=2. Round 1: item c (1 user) goes, so user z keeps only b and goes. Round 2: b now has 1 user and
    # goes, so y keeps only a and goes. Round 3: nothing changes.
    seqs = {"x": ["a", "d"], "w": ["a", "d"], "y": ["a", "b"], "z": ["b", "c"]}
    assert k_core(seqs, 2) == ({"x": ["a", "d"], "w": ["a", "d"]}, 2)
    assert k_core(seqs, 3) == ({}, 1)


def test_prepare_entry_writes_lcrec_files_that_load_with_item_text(tmp_path):
    (tmp_path / "raw").mkdir()
    amazon_files(tmp_path / "raw")
    cfg = compose_config([f"prepare.raw_dir={tmp_path / 'raw'}", "prepare.category=Toys", "prepare.name=ToyShop",
                          f"prepare.out_dir={tmp_path / 'data'}"], "prepare")
    p = cfg.prepare
    out = prepare(p.raw_dir, p.category, p.name, p.out_dir, p.k)
    assert sorted(p.name for p in out.iterdir()) == ["ToyShop.inter.json", "ToyShop.item.json"]
    ds = load_dataset(DatasetSource(**{"name": "ToyShop", "format": "lcrec", "dir": str(out), "min_interactions": 3,
                                        "require_index": False}))
    assert ds.stats.users == 5 and ds.stats.items == 5 and ds.stats.interactions == 25
    assert ds.item_text["0"] == "Toy B01 & friends; Toys, Blocks; Acme"


def test_full_review_file_is_used_without_a_5_core_file(tmp_path):
    five, meta = amazon_files(tmp_path)
    five.rename(tmp_path / "Toys.json.gz")
    cfg = compose_config([f"prepare.raw_dir={tmp_path}", "prepare.category=Toys", f"prepare.out_dir={tmp_path}"],
                         "prepare")
    p = cfg.prepare
    assert json.loads((prepare(p.raw_dir, p.category, p.name, p.out_dir, p.k) / "Toys.inter.json").read_text())["1"] \
        == [0, 1, 2, 3, 4]


def test_bad_files_name_the_path_and_line(tmp_path):
    five, meta = amazon_files(tmp_path)
    write_gz(five, [review("U1", "B01", 1), "{not json"])
    with pytest.raises(DataError, match=r"Toys_5.json.gz, line 2: not JSON"):
        prepare_amazon(five, meta)
    write_gz(five, [{"reviewerID": "U1", "asin": "B01"}])
    with pytest.raises(DataError, match=r"line 1: a review needs reviewerID, asin and a numeric unixReviewTime"):
        prepare_amazon(five, meta)
    with pytest.raises(DataError, match=r"meta_Nothing.json.gz not found; set prepare.raw_dir"):
        prepare_amazon(five, tmp_path / "meta_Nothing.json.gz")
