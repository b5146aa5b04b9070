"""LC-Rec's item-text tasks: sample construction, per-epoch mixing weights, and their place in the datamodule."""

import pytest
from conftest import compose_config

from odllm.data.batches import IGNORE_INDEX
from odllm.data.datamodule import SeqRecDataModule
from odllm.data.dataset import Split
from odllm.data.items import atomic_codes, build_item_codes
from odllm.data.prompts import (
    SEQREC_TEMPLATES,
    ItemTextEncoder,
    SeqRecEncoder,
    build_item_text_samples,
    build_training_samples,
    tokenizer_corpus,
)
from odllm.model.tokenizer import add_item_tokens, train_tokenizer
from odllm.runner.train import train

TEXT = {"1": "Toy Story; 1995; Animation", "2": "Heat; 1995; Crime", "3": ""}


def encoders(codes, item_text=TEXT, max_text_tokens=64):
    tok = train_tokenizer(tokenizer_corpus(item_text, {"item2index": 1.0}) * 3, vocab_size=300)
    add_item_tokens(tok, codes.tokens())
    seqrec = SeqRecEncoder(tok, codes)
    return tok, seqrec, ItemTextEncoder(tok, seqrec, item_text, max_text_tokens)


def answer(sample):
    return [t for t in sample.labels if t != IGNORE_INDEX]


def test_samples_put_the_loss_on_the_answer_only():
    codes = build_item_codes("semantic", ["1", "2", "3"], {
        "1": ["<a_1>", "<b_1>"], "2": ["<a_1>", "<b_2>"], "3": ["<a_2>", "<b_1>"]})
    tok, seqrec, text = encoders(codes)
    assert text.items == ["1", "2"]  # "3" has empty text: no samples
    to_code = text.item2index("1", template=0)
    assert answer(to_code) == seqrec.item("1") and to_code.input_ids[-2:] == seqrec.item("1")
    assert tok.decode(to_code.input_ids[: -2], skip_special_tokens=True).count("Toy Story; 1995; Animation") == 1
    assert to_code.input_ids[0] == tok.bos_token_id
    to_text = text.index2item("2", template=1)
    assert tok.decode(answer(to_text)[:-1]) == "Heat; 1995; Crime" and answer(to_text)[-1] == tok.eos_token_id
    prompt = to_text.input_ids[: len(to_text.input_ids) - len(answer(to_text))]
    assert seqrec.item("2") == [t for t in prompt if t in seqrec.token_id.values()]


def test_long_text_is_cut():
    codes = atomic_codes(["1"])
    _, _, text = encoders(codes, {"1": "word " * 200}, max_text_tokens=10)
    assert len(answer(text.index2item("1", 0))) == 11  # 10 text tokens + end of sequence


def test_weights_are_samples_per_item_and_epoch():
    items = [str(i) for i in range(200)]
    item_text = {i: f"item {i}" for i in items}
    _, _, text = encoders(atomic_codes(items), item_text)
    def count(weights, seed=0):
        samples = build_item_text_samples(text, weights, seed)
        return sum(s.labels[-1] == text.eos_id for s in samples), sum(s.labels[-1] != text.eos_id for s in samples)
    assert count({"item2index": 1.0, "index2item": 2.0}) == (400, 200)
    assert count({"item2index": 0.0, "index2item": 0.0}) == (0, 0)
    to_text, to_code = count({"item2index": 0.25, "index2item": 1.5})
    assert to_code == pytest.approx(50, abs=20) and to_text == pytest.approx(300, abs=20)
    assert count({"item2index": 0.25, "index2item": 1.5}) == (to_text, to_code)  # seeded
    with pytest.raises(ValueError, match="item2index must be >= 0"):
        build_item_text_samples(text, {"item2index": -1}, 0)


def test_datamodule_mixes_item_text_into_training_only():
    items = [str(i) for i in range(6)]
    tok, seqrec, text = encoders(atomic_codes(items), {i: f"item {i}" for i in items})
    split = Split(train={"u": items}, valid=[], test=[])
    kw = dict(mode="all_positions", max_history=8, window_stride=4, batch_size=4, valid_examples=[],
              eval_batch_size=4, seed=0)
    plain = SeqRecDataModule(seqrec, split, tok.pad_token_id, **kw)
    mixed = SeqRecDataModule(seqrec, split, tok.pad_token_id, **kw, item_text=text,
                             item_text_weights={"item2index": 1.0, "index2item": 1.0})
    def rows(dm):
        return sum(b["input_ids"].shape[0] for b in dm.train_dataloader())
    seqrec_samples = len(build_training_samples(seqrec, split.train, mode="all_positions", max_history=8, stride=4,
                                                seed=0))
    assert rows(plain) == seqrec_samples and rows(mixed) == seqrec_samples + 12


def test_no_item_text_no_tasks():
    _, _, text = encoders(atomic_codes(["1", "2"]), {})
    assert text.items == [] and build_item_text_samples(text, {"item2index": 1.0, "index2item": 1.0}, 0) == []
    assert tokenizer_corpus({}, {"item2index": 1.0, "index2item": 1.0}) == list(SEQREC_TEMPLATES)
    assert tokenizer_corpus(TEXT, {"item2index": 0.0}) == [*SEQREC_TEMPLATES, *TEXT.values()]  # as without the tasks


def test_defaults_off_and_training_runs_with_the_tasks(tmp_path, tiny_run_overrides):
    assert compose_config([]).task.item_text.item2index == 0.0  # off until measured over seeds
    assert compose_config(["dataset.item_text_tasks=1.0"]).task.item_text.index2item == 1.0
    assert compose_config(["dataset=instruments"]).task.item_text.index2item == 0.0
    assert compose_config(tiny_run_overrides).task.item_text.item2index == 0.0
    cfg = compose_config([*tiny_run_overrides, "trainer.max_epochs=1", "task.item_text.item2index=1.0",
                          "task.item_text.index2item=0.5"])
    assert train(cfg, tmp_path / "run")["test"]["invalid_beams"] == 0
