"""int8 embedding table and lm_head: lookups, true bytes, tied embeddings, save and load."""

import json

import pytest
import torch
from test_compression import batches, logits, sequences, tiny_model

from odllm.compress.embeddings import QuantEmbedding, QuantHead, TiedHead, compress_embeddings
from odllm.compress.registry import build_algorithm, compress_with
from odllm.compress.saved import load_compressed, save_compression_config
from odllm.model.recommender import COMPRESSION_FILE

pytestmark = pytest.mark.usefixtures("one_thread")


def report_of(model) -> dict:
    """What compress_layers reports about the whole model before compressing anything."""
    held = sum(t.numel() * t.element_size() for t in {id(t): t for t in model.parameters()}.values())
    numbers = sum(p.numel() for p in model.parameters())
    return {"settings": {}, "totals": {"model": {"params_before": numbers, "bytes_before": held}}}


def test_lookup_dequantizes_exactly_the_gathered_rows():
    embedding = torch.nn.Embedding(40, 24)
    table = QuantEmbedding.from_linear(embedding, 8)
    ids = torch.tensor([[3, 0, 39], [7, 7, 1]])
    assert torch.equal(table(ids), table.dequantized_weight()[ids])
    error = (table(ids) - embedding(ids)).abs().max() / embedding.weight.abs().max()
    assert 0 < error < 1 / 255  # half a grid step of the row's range, at most
    assert (table.num_embeddings, table.embedding_dim) == (40, 24)
    assert table.storage()["bytes"] == 40 * (24 + 2 + 1)  # codes + float16 scale + zero point per row


@pytest.mark.parametrize("tie", [False, True])
def test_int8_embeddings_save_load_and_count_their_bytes(tmp_path, tie):
    data = batches(sequences())
    dense, model = tiny_model(tie=tie, seed=2), tiny_model(tie=tie, seed=2)
    report = report_of(model)
    compress_embeddings(model, "int8", report)
    vocab, hidden = dense.model.embed_tokens.weight.shape
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    assert isinstance(model.lm_head, TiedHead if tie else QuantHead)
    table_bytes = vocab * (hidden + 3)
    float_bytes = sum(p.numel() * 4 for p in dense.parameters())
    saved = vocab * hidden * 4 * (1 if tie else 2) - table_bytes * (1 if tie else 2)
    assert report["totals"]["model"]["bytes_after"] == float_bytes - saved
    assert report["embeddings"]["lm_head"]["tied"] is tie
    assert all(entry["relative_error"] < 0.01 for entry in report["embeddings"].values())
    for batch in data:
        torch.testing.assert_close(logits(model, batch), logits(dense, batch), atol=0.05, rtol=0)

    model.save_pretrained(tmp_path, safe_serialization=True)
    save_compression_config(model, tmp_path)
    specs = json.loads((tmp_path / COMPRESSION_FILE).read_text())
    assert specs["model.embed_tokens"]["kind"] == "quant_embedding"
    assert specs["lm_head"] == ({"kind": "tied_head", "embedding": "model.embed_tokens"} if tie else
                                {"kind": "quant_head", "bits": 8, "group_size": -1, "scale_dtype": "float16"})
    loaded = load_compressed(tmp_path)
    assert all(torch.equal(logits(loaded, batch), logits(model, batch)) for batch in data)
    assert loaded.get_output_embeddings().weight.shape == (vocab, hidden)  # Recommender reads the vocabulary size
    on_disk = (tmp_path / "model.safetensors").stat().st_size
    assert on_disk < report["totals"]["model"]["bytes_after"] + 16_384


def test_with_int8_factors_and_unknown_choices():
    data = batches(sequences())
    model = tiny_model(seed=4)
    report = compress_with(model, data, {"name": "odllm_int8", "factor_bits": 8, "embeddings": "int8"}, 0.5,
                           progress=False)
    compress_embeddings(model, "int8", report)
    assert report["totals"]["model"]["bytes_kept"] < 0.3
    compress_embeddings(model, None, report)  # null leaves the model as it is
    with pytest.raises(ValueError, match="method.embeddings='int4'"):
        compress_embeddings(model, "int4", report)
    with pytest.raises(ValueError, match="method.embeddings='int4'"):
        build_algorithm({"name": "odllm", "embeddings": "int4"}, 0.5)
