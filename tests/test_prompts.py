"""Item codes, training windows and sample construction."""

import pytest

from odllm.data.batches import IGNORE_INDEX
from odllm.data.items import ItemCodes, atomic_codes, build_item_codes
from odllm.data.prompts import SeqRecEncoder, build_training_samples, training_windows
from odllm.model.tokenizer import add_item_tokens, train_tokenizer


@pytest.mark.parametrize("n", [2, 3, 11, 21, 22, 40, 57])
@pytest.mark.parametrize("max_history,stride", [(20, 10), (20, 20), (5, 1), (3, 2)])
def test_windows_cover_each_target_once_with_enough_history(n, max_history, stride):
    windows = training_windows(list(range(n)), max_history, stride)
    targets = [t for start, end, k in windows for t in range(end - k, end)]
    assert sorted(targets) == list(range(1, n))  # every position but the first, exactly once
    for start, end, k in windows:
        assert end - start <= max_history + 1
        if start > 0:  # only the earliest window may give short histories
            assert (end - k) - start >= max_history + 1 - stride


def test_bad_stride():
    with pytest.raises(ValueError, match="stride"):
        training_windows([1, 2, 3], 5, 6)


def make_encoder(codes: ItemCodes) -> SeqRecEncoder:
    tok = train_tokenizer(["predict the next item History:"] * 3, vocab_size=300)
    add_item_tokens(tok, codes.tokens())
    return SeqRecEncoder(tok, codes)


def test_item_tokens_are_single_tokens_and_labels_cover_targets_only():
    codes = build_item_codes("semantic", ["1", "2", "3"], {
        "1": ["<a_1>", "<b_1>"], "2": ["<a_1>", "<b_2>"], "3": ["<a_2>", "<b_1>"]})
    enc = make_encoder(codes)
    assert len(set(enc.token_id.values())) == 4  # <a_1> <a_2> <b_1> <b_2>
    s = enc.window(["1", "2", "3"], n_targets=2, template=0)
    prefix = len(enc.prefix_ids[0])
    assert s.input_ids[prefix:] == enc.item("1") + enc.item("2") + enc.item("3")
    assert s.labels[: prefix + 2] == [IGNORE_INDEX] * (prefix + 2)
    assert s.labels[prefix + 2 :] == enc.item("2") + enc.item("3")
    p = enc.per_prefix(["1", "2"], "3", template=1)
    assert p.labels.count(IGNORE_INDEX) == len(p.labels) - 2 and p.labels[-2:] == enc.item("3")


def test_both_modes_train_the_same_targets():
    codes = atomic_codes([str(i) for i in range(30)])
    enc = make_encoder(codes)
    train = {"u1": [str(i) for i in range(25)], "u2": ["3", "4", "5"]}
    kw = dict(max_history=8, stride=4, seed=0)
    windows = build_training_samples(enc, train, mode="all_positions", **kw)
    prefixes = build_training_samples(enc, train, mode="per_prefix", **kw)
    def labelled(samples):
        return sorted(t for s in samples for t in s.labels if t != IGNORE_INDEX)
    assert labelled(windows) == labelled(prefixes)
    assert len(prefixes) == 24 + 2 and len(windows) < len(prefixes)


def test_unequal_code_lengths_and_unknown_items_are_errors():
    with pytest.raises(ValueError, match="same non-zero length"):
        ItemCodes({"1": ("<a>",), "2": ("<a>", "<b>")})
    with pytest.raises(ValueError, match="no semantic code"):
        build_item_codes("semantic", ["1", "2"], {"1": ["<a_1>"]})
    enc = make_encoder(atomic_codes(["1"]))
    with pytest.raises(KeyError, match="not in the model's item index"):
        enc.item("99")


def test_item_codes_round_trip(tmp_path):
    codes = build_item_codes("semantic", ["1", "2"], {"1": ["<a_1>", "<b_1>"], "2": ["<a_1>", "<b_1>"]})
    assert codes.collisions == 2 and codes.distinct_codes == 1
    codes.save(tmp_path)
    back = ItemCodes.load(tmp_path)
    assert back.codes == codes.codes and back.kind == "semantic"
