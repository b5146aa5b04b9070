"""Backbones: a small LLaMA built from a config (the CPU default) or any local Hugging Face causal LM.

Either way the item tokens are added to the tokenizer and the embeddings resized. ``finetune: lora``
wraps the model with peft (LC-Rec's settings) and keeps the embedding and output rows trainable so new
item tokens actually learn; :func:`merge` folds LoRA back into plain ``nn.Linear`` layers after fit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from odllm.data.items import ItemCodes
from odllm.model.tokenizer import add_item_tokens, train_tokenizer

log = logging.getLogger(__name__)
DROPOUT_AFTER = ("embed_tokens", "o_proj", "down_proj")  # LLaMA-family names of the embedding and residual outputs


def build_model(cfg: DictConfig, item_codes: ItemCodes, corpus: Iterable[str]):
    """Returns ``(model, tokenizer)`` with item tokens added; ``corpus`` trains a scratch tokenizer."""
    if cfg.source == "scratch":
        tokenizer = train_tokenizer(corpus, vocab_size=cfg.tokenizer_vocab)
        add_item_tokens(tokenizer, item_codes.tokens())
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **OmegaConf.to_container(cfg.config, resolve=True),
        )
        model = LlamaForCausalLM(config)
    elif cfg.source == "hf":
        path = Path(cfg.path or "")
        if not cfg.path or not path.is_dir():
            raise FileNotFoundError(
                f"model.path={cfg.path!r} is not a directory; point it at a local Hugging Face checkpoint "
                "(a folder with config.json, weights and tokenizer files); nothing is downloaded"
            )
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        added = add_item_tokens(tokenizer, item_codes.tokens())
        model.resize_token_embeddings(len(tokenizer))
        log.info("added %d item tokens to %s (vocabulary now %d)", added, path, len(tokenizer))
    else:
        raise ValueError(f"unknown model.source {cfg.source!r}; choose 'scratch' or 'hf'")
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.finetune == "lora":
        model = apply_lora(model, cfg.lora)
    elif cfg.finetune != "full":
        raise ValueError(f"unknown model.finetune {cfg.finetune!r}; choose 'full' or 'lora'")
    return model, tokenizer


def apply_lora(model, cfg: DictConfig):
    from peft import LoraConfig, get_peft_model

    modules_to_save = ["embed_tokens"] if model.config.tie_word_embeddings else ["embed_tokens", "lm_head"]
    config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
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
