"""Backbones: a small LLaMA built from a config (the CPU default) or any local Hugging Face causal LM.

Either way the item tokens are added to the tokenizer and the embeddings resized. ``finetune: lora``
wraps the model with peft (LC-Rec's settings) and keeps the embedding and output rows trainable so new
item tokens actually learn; :func:`merge` folds LoRA back into plain ``nn.Linear`` layers after fit.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from odllm.checks import settings_from
from odllm.data.items import ItemCodes
from odllm.eval.generation import model_device
from odllm.model.tokenizer import add_item_tokens, train_tokenizer

log = logging.getLogger(__name__)
DROPOUT_AFTER = ("embed_tokens", "o_proj", "down_proj")  # LLaMA-family names of the embedding and residual outputs


@dataclass(frozen=True)
class BackboneSpec:
    """Which causal LM to build (the ``model`` config group)."""

    source: str = "scratch"  # scratch (a LLaMA from ``config``) or hf (a local checkpoint at ``path``)
    path: str | None = None
    # hf: the dtype the checkpoint is loaded in for training. float32 (default) keeps float32 master weights for
    # mixed precision (trainer.precision=bf16-mixed); "auto" keeps the checkpoint's own (bf16 base under LoRA)
    dtype: str = "float32"
    finetune: str = "full"  # full or lora
    tokenizer_vocab: int = 1024  # scratch: BPE vocabulary trained on the prompts
    config: dict = field(default_factory=dict)  # scratch: LlamaConfig fields
    lora: dict = field(default_factory=dict)  # lora: r, alpha, dropout, target_modules

    @classmethod
    def from_mapping(cls, values: Mapping) -> BackboneSpec:
        return settings_from(cls, values)


def build_model(spec: BackboneSpec, item_codes: ItemCodes, corpus: Iterable[str]):
    """Returns ``(model, tokenizer)`` with item tokens added; ``corpus`` trains a scratch tokenizer."""
    if spec.source == "scratch":
        tokenizer = train_tokenizer(corpus, vocab_size=spec.tokenizer_vocab)
        add_item_tokens(tokenizer, item_codes.tokens())
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **spec.config,
        )
        model = LlamaForCausalLM(config)
    elif spec.source == "hf":
        path = Path(spec.path or "")
        if not spec.path or not path.is_dir():
            raise FileNotFoundError(
                f"model.path={spec.path!r} is not a directory; point it at a local Hugging Face checkpoint "
                "(a folder with config.json, weights and tokenizer files); nothing is downloaded"
            )
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=training_dtype(spec.dtype))
        added = add_item_tokens(tokenizer, item_codes.tokens())
        model.resize_token_embeddings(len(tokenizer))
        log.info("added %d item tokens to %s (vocabulary now %d)", added, path, len(tokenizer))
    else:
        raise ValueError(f"unknown model.source {spec.source!r}; choose 'scratch' or 'hf'")
    model.config.pad_token_id = tokenizer.pad_token_id
    if spec.finetune == "lora":
        model = apply_lora(model, spec.lora)
    elif spec.finetune != "full":
        raise ValueError(f"unknown model.finetune {spec.finetune!r}; choose 'full' or 'lora'")
    return model, tokenizer


TRAINING_DTYPES = ("float32", "bfloat16", "float16", "auto")


def training_dtype(name: str) -> torch.dtype | str:
    """``model.dtype`` as transformers takes it: a torch dtype, or "auto" (the checkpoint's config.json)."""
    if name not in TRAINING_DTYPES:
        raise ValueError(f"model.dtype={name!r}; choose one of {TRAINING_DTYPES}")
    return name if name == "auto" else getattr(torch, name)


def memory_summary(model: torch.nn.Module) -> dict:
    """Where ``model`` ran, its dtype and the process's peaks: GPU memory (``torch.cuda.max_memory_allocated``)
    on CUDA, and peak resident memory (RSS; Linux reports it in KiB) everywhere, for metrics.json."""
    device = model_device(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    out = {"device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    if device.type == "cuda":
        out["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def apply_lora(model, lora: Mapping):
    from peft import LoraConfig, get_peft_model

    modules_to_save = ["embed_tokens"] if model.config.tie_word_embeddings else ["embed_tokens", "lm_head"]
    config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=list(lora["target_modules"]),
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def merge(model):
    """A plain transformers model: LoRA merged in, so compression sees ordinary ``nn.Linear`` layers."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def add_dropout(model: torch.nn.Module, p: float) -> list:
    """Dropout on the token embeddings and on each residual branch (attention and MLP outputs).

    LLaMA has no such dropout (only ``attention_dropout``); a small model on a small dataset (ml-100k has
    943 users) overfits within a few epochs without it. Forward hooks leave the saved model a plain LLaMA;
    they act only in training mode, and the returned handles remove them after fit.
    """
    if not 0 <= p < 1:
        raise ValueError(f"model.dropout={p} must lie in [0, 1)")
    if p == 0:
        return []

    def drop(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(output, p, module.training)

    targets = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in DROPOUT_AFTER]
    if not targets:
        raise ValueError(f"model.dropout={p}: the model has none of the modules {DROPOUT_AFTER}; set model.dropout=0")
    return [m.register_forward_hook(drop) for m in targets]


def parameter_summary(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable_parameters": trainable}
