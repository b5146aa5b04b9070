"""Random-weight checkpoints of real shapes, built offline, to measure odllm at scale.

    python -m odllm.bench.checkpoint --shape llama-1b --out ckpt/llama-1b [--layers 16] [--dataset instruments]

writes a Hugging Face checkpoint (config.json, model.safetensors.index.json, bf16 shards of at most
``--shard-mb``) that ``AutoModelForCausalLM.from_pretrained`` loads, and a tokenizer of the real vocabulary size
(a byte-level BPE trained on the prompts, padded with unused tokens). With ``--dataset`` (a conf/dataset name;
``--override`` adds Hydra overrides such as dataset.path=...) the dataset's item tokens are added and the item
index and odllm.json written too, so the directory is what train.py saves: compress.py and evaluate.py take it
as ``model_dir=``.

Memory stays at one shard: tensors are made one at a time from their names and shapes (a model on the meta
device gives those, so every architecture's own names are used) and each shard is written with
``safetensors.torch.save_file`` and freed before the next is filled. Each tensor's values depend only on the
seed and its name (N(0, 0.02) as transformers initialises; norms 1), not on the sharding.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from odllm.compress.memory import peak_resident_bytes, resident_bytes
from odllm.model.tokenizer import SPECIAL_TOKENS, add_item_tokens, train_tokenizer

log = logging.getLogger(__name__)

# the architectures' published shapes (vocabulary before item tokens)
SHAPES: dict[str, dict] = {
    "llama-1b": dict(  # LLaMA-3.2-1B
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
        rms_norm_eps=1e-5, max_position_embeddings=131072,
    ),
    "llama-7b": dict(  # LLaMA-2-7B
        model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False, rms_norm_eps=1e-5,
        max_position_embeddings=4096,
    ),
    "qwen-0.5b": dict(  # Qwen2.5-0.5B: q/k/v biases
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
        rms_norm_eps=1e-6, max_position_embeddings=32768,
    ),
    "tiny": dict(  # for tests
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False, max_position_embeddings=512,
    ),
}
INIT_STD = 0.02  # transformers' initializer_range
TOKENIZER_VOCAB = 1024  # the trained part of the tokenizer; the rest up to the real vocabulary is unused tokens


def model_config(shape: str, layers: int | None = None, extra_vocab: int = 0):
    """The transformers config of ``shape`` in bf16 (``layers`` overrides the depth; ``extra_vocab`` item tokens)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown --shape {shape!r}; choose one of {sorted(SHAPES)}")
    values = dict(SHAPES[shape])
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers {layers}: a checkpoint needs at least one decoder layer")
        values["num_hidden_layers"] = layers
    values["vocab_size"] += extra_vocab
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    config.dtype = torch.bfloat16
    return config


def padded_tokenizer(corpus: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``corpus`` whose vocabulary is filled up to ``vocab_size`` with ``<unused_i>``
    tokens that no text produces: the real model's embedding size without the real model's tokenizer."""
    trained = train_tokenizer(corpus, vocab_size=min(TOKENIZER_VOCAB, vocab_size))
    data = json.loads(trained.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise RuntimeError("the trained BPE vocabulary is not numbered 0..n-1; cannot pad it")
    vocab.update({f"<unused_{i}>": i for i in range(len(vocab), vocab_size)})
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), **SPECIAL_TOKENS)


def tensor_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every tensor the checkpoint holds, as the architecture names them (tied ones once)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    specs = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    for name, buffer in model.named_buffers():
        owner, _, short = name.rpartition(".")
        if short not in model.get_submodule(owner)._non_persistent_buffers_set:
            specs.append((name, tuple(buffer.shape)))
    return specs


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """bf16 values for ``name``: 1 for norm weights, else N(0, 0.02); seeded by ``seed`` and the name only."""
    if len(shape) == 1 and "norm" in name:
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=g, dtype=torch.bfloat16).mul_(INIT_STD)


def shards(specs: list[tuple[str, tuple[int, ...]]], max_bytes: int) -> Iterator[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive groups of tensors of at most ``max_bytes`` (bf16) each; a larger tensor gets a shard alone."""
    group, size = [], 0
    for name, shape in specs:
        nbytes = 2 * torch.Size(shape).numel()
        if group and size + nbytes > max_bytes:
            yield group
            group, size = [], 0
        group.append((name, shape))
        size += nbytes
    if group:
        yield group


def write_weights(config, out: Path, seed: int = 0, shard_mb: float = 512) -> dict:
    """Writes the shards and model.safetensors.index.json, one shard in memory at a time; returns their sizes."""
    groups = list(shards(tensor_specs(config), int(shard_mb * 2**20)))
    weight_map, total = {}, 0
    for i, group in enumerate(groups, start=1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: random_tensor(name, shape, seed) for name, shape in group}
        save_file(tensors, out / file, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
        log.info("wrote %s (%d tensors)", file, len(group))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {"bytes": total, "shards": len(groups), "tensors": len(weight_map)}


def build_checkpoint(shape: str, out: str | Path, *, layers: int | None = None, corpus: Sequence[str] = (),
                     item_codes=None, meta: dict | None = None, seed: int = 0, shard_mb: float = 512) -> dict:
    """The whole directory: tokenizer (+ item tokens, item index and odllm.json when ``item_codes`` is given),
    config.json and the shards. Returns what was written, the time and the process's peak RSS."""
    from odllm.data.prompts import SEQREC_TEMPLATES  # the prompts every run tokenizes

    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = padded_tokenizer([*SEQREC_TEMPLATES, *corpus], SHAPES[shape]["vocab_size"])
    added = add_item_tokens(tokenizer, item_codes.tokens()) if item_codes is not None else 0
    tokenizer.padding_side = "left"
    config = model_config(shape, layers, extra_vocab=added)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    if len(tokenizer) != config.vocab_size:
        raise RuntimeError(f"tokenizer holds {len(tokenizer)} tokens, the config {config.vocab_size}")
    tokenizer.save_pretrained(out)
    config.save_pretrained(out)
    if item_codes is not None:
        item_codes.save(out)
        (out / "odllm.json").write_text(json.dumps({**(meta or {}), "random_weights": True, "shape": shape}, indent=2))
    rss_before = resident_bytes()
    written = write_weights(config, out, seed, shard_mb)
    peak = peak_resident_bytes()
    return {"shape": shape, "layers": config.num_hidden_layers, "vocab_size": config.vocab_size,
            "item_tokens": added, **written, "seconds": time.perf_counter() - started,
            "rss_before_weights_bytes": rss_before, "peak_rss_bytes": peak}


def dataset_items(name: str, overrides: Sequence[str]) -> tuple[list[str], object, dict]:
    """``(tokenizer corpus, item codes, odllm.json meta)`` of a conf/dataset entry, read as train.py reads it."""
    from hydra import compose, initialize_config_dir

    from odllm import config as odllm_config
    from odllm.data.dataset import load_dataset
    from odllm.data.prompts import tokenizer_corpus

    with initialize_config_dir(config_dir=str(odllm_config.CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"dataset={name}", *overrides])
    dataset = load_dataset(odllm_config.dataset_source(cfg))
    codes = odllm_config.item_codes(cfg, dataset)
    corpus = tokenizer_corpus(dataset.item_text, cfg.task.item_text)
    meta = {"dataset": cfg.dataset.name, "item_tokens": codes.kind, "max_history": cfg.task.max_history}
    return corpus, codes, meta


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's own)")
    parser.add_argument("--dataset", default=None, help="a conf/dataset name: add its item tokens and index")
    parser.add_argument("--override", action="append", default=[], help="Hydra override for --dataset, repeatable")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-mb", type=float, default=512, help="largest shard in MiB (default 512)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    corpus, codes, meta = dataset_items(args.dataset, args.override) if args.dataset else ([], None, None)
    summary = build_checkpoint(args.shape, args.out, layers=args.layers, corpus=corpus, item_codes=codes, meta=meta,
                               seed=args.seed, shard_mb=args.shard_mb)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
