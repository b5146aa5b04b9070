"""SASRec baseline: learns a deterministic next-item rule; train.py model=sasrec writes the LLM's metrics.json."""

import json

import pytest
import torch
from conftest import compose_config, tiny_overrides

from odllm import config
from odllm.data.dataset import Example, load_dataset
from odllm.index.build import IndexSettings, item_embeddings
from odllm.model.sasrec import (
    ItemVocab,
    SASRec,
    SASRecData,
    SASRecModule,
    SASRecSettings,
    check_not_sasrec,
    example_tensors,
    target_ranks,
    window_tensors,
)
from odllm.runner.train import train


def cycle_split(users: int = 120, items: int = 30, length: int = 12):
    """Item i is always followed by i+1 mod ``items``; users start at every item."""
    seqs = {f"u{u}": [f"i{(u + t) % items}" for t in range(length)] for u in range(users)}
    train = {u: s[:-2] for u, s in seqs.items()}
    valid = [Example(u, s[:-2], s[-2]) for u, s in seqs.items()]
    test = [Example(u, s[:-1], s[-1]) for u, s in seqs.items()]
    return train, valid, test, [f"i{i}" for i in range(items)]


def test_learns_next_item_rule(one_thread):
    import lightning as L

    L.seed_everything(0)
    train_seqs, valid, test, items = cycle_split()
    vocab, max_history = ItemVocab(items), 10
    settings = SASRecSettings(batch_size=256, max_epochs=25, lr=5e-3, hidden_dropout=0.1, attn_dropout=0.1,
                              window_stride=5)
    module = SASRecModule(len(vocab), max_history, settings)
    data = SASRecData(train_seqs, valid, vocab, max_history, settings, seed=0)
    trainer = L.Trainer(max_epochs=settings.max_epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        check_val_every_n_epoch=settings.max_epochs)
    trainer.fit(module, datamodule=data)
    module.eval()
    ranks = target_ranks(module.net, *example_tensors(test, vocab, max_history))
    assert (ranks == 1).float().mean() >= 0.95
    assert trainer.callback_metrics["val/hr@1"] >= 0.95


def test_windows_cover_every_target_once():
    train_seqs = {"a": [f"i{i}" for i in range(9)], "b": ["i1", "i2", "i3"]}
    vocab = ItemVocab([f"i{i}" for i in range(9)])
    for stride in (1, 2, 4):
        inputs, labels = window_tensors(train_seqs, vocab, max_history=4, stride=stride)
        assert inputs.shape[1] == labels.shape[1] == 4
        targets = sorted(labels[labels != 0].tolist())
        assert targets == sorted(vocab.encode(train_seqs["a"][1:] + train_seqs["b"][1:]))
    # stride 1 is RecBole's per-prefix sample: the last target of a long user sees exactly its last 4 items
    inputs, labels = window_tensors({"a": train_seqs["a"]}, vocab, max_history=4, stride=1)
    last = labels[:, -1] == vocab.index["i8"]
    assert inputs[last].tolist() == [vocab.encode(["i4", "i5", "i6", "i7"])]


def test_ranks_are_full_and_pessimistic_on_ties():
    net = SASRec(n_items=5, max_len=3, s=SASRecSettings(hidden_size=4, n_heads=2, inner_size=8))
    with torch.no_grad():
        net.items.weight.zero_()  # every item scores 0: a tie with all 4 other items -> the worst rank, 5
    net.eval()
    ranks = target_ranks(net, torch.tensor([[1, 2, 0]]), torch.tensor([2]), torch.tensor([3]))
    assert ranks.tolist() == [5]


def test_compression_is_refused():
    with pytest.raises(ValueError, match="LLM recommenders"):
        check_not_sasrec("sasrec", "compress.py")
    check_not_sasrec(None, "compress.py")


def test_train_py_model_sasrec_writes_metrics(tmp_path, one_thread):
    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith("model.")]
    cfg = compose_config([*overrides, "model=sasrec", "model.max_epochs=2", "model.batch_size=64",
                          "model.eval_batch_size=16"])
    payload = train(cfg, tmp_path / "run")
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["test"]["metrics"] == payload["test"]["metrics"]
    for key in ("dataset", "test", "popularity", "train_seconds", "best_valid_ndcg@10", "config", "epochs_run"):
        assert key in written
    assert set(written["test"]["metrics"]) == {"hr@1", "hr@5", "ndcg@5", "hr@10", "ndcg@10"}
    assert set(written["test"]["metrics"]["ndcg@10"]) == {"value", "stderr"}
    assert written["test"]["users"] == 48 and written["config"]["model"]["kind"] == "sasrec"
    assert written["popularity"].keys() == written["test"]["metrics"].keys()
    epochs = written["valid_by_epoch"]
    assert [row["epoch"] for row in epochs] == [1, 2] == list(range(1, written["epochs_run"] + 1))
    assert max(row["ndcg@10"] for row in epochs) == pytest.approx(written["best_valid_ndcg@10"])
    assert (tmp_path / "run" / "sasrec.pt").exists()
    dataset = load_dataset(config.dataset_source(cfg))  # its item table can seed a learned index
    sasrec = IndexSettings(sasrec={"path": str(tmp_path / "run" / "sasrec.pt")})
    emb = item_embeddings(sasrec, dataset, "sasrec", cfg.task.max_history, cfg.seed)
    assert emb.shape == (len(dataset.items), cfg.model.hidden_size) and torch.isfinite(emb).all()
    assert not (tmp_path / "models").exists()  # never where compress.py / evaluate.py look for LLMs
    with pytest.raises(ValueError, match="LLM recommender"):
        train(compose_config([*overrides, "model=sasrec", "compress=odllm"]), tmp_path / "run2")


def test_compress_and_evaluate_refuse_a_sasrec_config_before_any_work(tmp_path):
    from odllm import config

    for check, job in ((config.check_compress, "compress.py"), (config.check_evaluate, "evaluate.py")):
        overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith("model.")]
        cfg = compose_config([*overrides, "model=sasrec"])
        with pytest.raises(ValueError, match=f"{job} works on LLM recommenders"):
            check(cfg)
