"""Constrained beam search: every beam is a real item's code.

A prefix trie over the item codes gives, for each partial code, the tokens that may follow; all other
tokens get -inf before the beams are ranked. Scores are log-probabilities under the model's full
vocabulary (as in Hugging Face's ``prefix_allowed_tokens_fn``), so the ranking of complete codes is the
model's own. The prompt is encoded once per user and its key/value cache is shared by all of that user's beams;
only the beams' own code tokens are cached per beam and regrouped as beams are chosen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from odllm.data.batches import left_pad


class ItemTrie:
    """Prefix trie over equal-length token-id sequences."""

    def __init__(self, codes: Sequence[Sequence[int]], vocab_size: int):
        self.codes = {tuple(c) for c in codes}
        if not self.codes:
            raise ValueError("the trie needs at least one item code")
        self.depth = len(next(iter(self.codes)))
        children: dict[tuple[int, ...], set[int]] = {}
        for code in self.codes:
            for t in range(self.depth):
                children.setdefault(code[:t], set()).add(code[t])
        self.vocab_size = vocab_size
        self._children = children
        self._allowed: dict[tuple[int, ...], torch.Tensor] = {}  # filled on first use: most prefixes never are
        self._empty = torch.empty(0, dtype=torch.long)

    def allowed(self, prefix: Sequence[int]) -> torch.Tensor:
        """The tokens that may follow ``prefix``, ascending (empty when ``prefix`` is no item's prefix)."""
        prefix = tuple(prefix)
        tokens = self._allowed.get(prefix)
        if tokens is None:
            if prefix not in self._children:
                return self._empty
            tokens = self._allowed[prefix] = torch.tensor(sorted(self._children[prefix]), dtype=torch.long)
        return tokens

    def mask(self, prefixes: torch.Tensor) -> torch.Tensor:
        """Additive mask (0 allowed, -inf not) for a batch of prefixes ``[rows, t]``, on their device."""
        mask = torch.full((prefixes.shape[0], self.vocab_size), float("-inf"))
        for row, prefix in enumerate(prefixes.tolist()):
            mask[row, self.allowed(prefix)] = 0.0
        return mask.to(prefixes.device)

    def candidates(self, prefixes: torch.Tensor, min_columns: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The allowed next tokens of each prefix ``[rows, t]``, padded to a common width of at least
        ``min_columns``: token ids ``[rows, C]`` (ascending; padding holds token 0) and which are real, on the
        prefixes' device (the trie's tensors stay on the CPU: the prefixes are read there anyway, by ``tolist``)."""
        allowed = [self.allowed(prefix) for prefix in prefixes.tolist()]
        ids = torch.nn.utils.rnn.pad_sequence(allowed, batch_first=True, padding_value=-1)
        if ids.shape[1] < min_columns:
            ids = torch.nn.functional.pad(ids, (0, min_columns - ids.shape[1]), value=-1)
        ids = ids.to(prefixes.device)
        valid = ids >= 0
        return ids.clamp_(min=0), valid




def beam_mask(prompt_mask: torch.Tensor, num_beams: int, past: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D mask ``[B, 1, W, P + W*past + W]`` for one new token per beam.

    The key layout is: the prompt, then ``past`` earlier tokens of each beam (beam-major), then the W new
    tokens; a beam's new token sees the prompt, its own earlier tokens and itself.
    """
    batch = prompt_mask.shape[0]
    eye = torch.eye(num_beams, dtype=torch.bool, device=prompt_mask.device)
    own = torch.cat([eye.repeat_interleave(past, dim=1), eye], dim=1)  # [W, W*past + W]
    allowed = torch.cat(
        [prompt_mask.bool()[:, None, :].expand(batch, num_beams, -1), own.expand(batch, -1, -1)], dim=-1
    )
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def reorder_beam_cache(cache, prompt_len: int, parent: torch.Tensor, past: int) -> None:
    """Regroup the beam part of the cache as ``[W, past + 1]`` per beam and keep the chosen parents' rows.

    Only the few code tokens move; the prompt part is shared by all beams of a user. One gather per cached
    tensor: position index = the prompt, then per beam its parent's ``past`` tokens and the parent's new token.
    """
    batch, width = parent.shape
    earlier = prompt_len + parent[..., None] * past + torch.arange(past, device=parent.device)  # [B, W, past]
    newest = prompt_len + width * past + parent[..., None]  # [B, W, 1]
    prompt = torch.arange(prompt_len, device=parent.device).expand(batch, -1)
    index = torch.cat([prompt, torch.cat([earlier, newest], dim=-1).reshape(batch, -1)], dim=1)
    for layer in cache.layers:
        for name in ("keys", "values"):
            states = getattr(layer, name)
            heads, dim = states.shape[1], states.shape[-1]
            setattr(layer, name, states.gather(2, index[:, None, :, None].expand(-1, heads, -1, dim)))


def select_beams(
    scores: torch.Tensor, logp: torch.Tensor, codes: torch.Tensor, trie: ItemTrie, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``width`` best extensions of the beams ``codes [B, W, t]`` (scores ``[B, W]``, next-token
    log-probabilities ``logp [B, W, V]``) by tokens the trie allows: new scores, codes and each one's parent beam.

    Only the allowed tokens are gathered and ranked (a few per beam instead of the whole vocabulary); their
    scores are exactly those of adding an additive -inf mask over the vocabulary. Slots beyond the allowed
    ones score -inf, as do beams that are not items (fewer items than beams).
    """
    batch, beams = scores.shape
    ids, valid = trie.candidates(codes.reshape(batch * beams, -1), min_columns=width)
    ids, valid = ids.view(batch, beams, -1), valid.view(batch, beams, -1)
    allowed = logp.gather(-1, ids).masked_fill_(~valid, float("-inf"))
    total = (scores[..., None] + allowed).view(batch, -1)
    scores, flat = total.topk(width, dim=-1)
    parent = torch.div(flat, ids.shape[-1], rounding_mode="floor")
    tokens = ids.view(batch, -1).gather(1, flat)
    codes = torch.cat([codes.gather(1, parent[..., None].expand(-1, -1, codes.shape[-1])), tokens[..., None]], dim=-1)
    return scores, codes, parent


@torch.no_grad()
def beam_search(
    model, prompts: Sequence[Sequence[int]], trie: ItemTrie, num_beams: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns codes ``[B, num_beams, depth]`` and scores ``[B, num_beams]``, best first.

    When fewer than ``num_beams`` codes exist, the surplus beams have score -inf and are not items.
    The prompt's key/value cache is computed once per user and shared by all its beams (a block mask keeps
    beams apart), so each code level costs one token per beam and no prompt state is ever copied per beam.
    Every tensor is made on the model's device; the attention mask is in the model's dtype.
    """
    ids, attn = left_pad(prompts, pad_id, model_device(model))
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=True, logits_to_keep=1)
    logp = torch.log_softmax(out.logits[:, -1:].float(), dim=-1)  # [B, 1, V]: one "beam", the empty code
    batch, prompt_len = ids.shape
    width = min(num_beams, trie.vocab_size)
    scores, codes, _ = select_beams(logp.new_zeros(batch, 1), logp, ids.new_empty(batch, 1, 0), trie, width)
    cache = out.cache
    for past in range(trie.depth - 1):
        out = model(
            input_ids=codes[:, :, -1],
            attention_mask=beam_mask(attn, width, past, model.dtype),
            position_ids=(positions[:, -1:] + 1 + past).expand(-1, width),
            cache=cache,
            use_cache=True,
        )
        logp = torch.log_softmax(out.logits.float(), dim=-1)  # [B, W, V]
        scores, codes, parent = select_beams(scores, logp, codes, trie, width)
        if past + 2 < trie.depth:
            reorder_beam_cache(cache, prompt_len, parent, past)
    return codes, scores


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s weights live (its first parameter's device): inputs are made there."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def ranked_codes(codes: torch.Tensor, scores: torch.Tensor) -> list[list[tuple[int, ...]]]:
    """Per prompt, the codes of its real beams (finite score), best first."""
    return [
        [tuple(c) for c, s in zip(row_codes, row_scores, strict=True) if s > float("-inf")]
        for row_codes, row_scores in zip(codes.tolist(), scores.tolist(), strict=True)
    ]


def rank_of(target: Sequence[int], ranked: list[tuple[int, ...]]) -> int:
    """1-based rank of the target's code, 0 when absent (shared codes: any item with it counts)."""
    target = tuple(target)
    return ranked.index(target) + 1 if target in ranked else 0


@dataclass
class Recommendations:
    ranks: torch.Tensor  # [N] 1-based rank of the target's code among the beams, 0 if absent
    invalid_beams: int  # finite-score beams that are not item codes (must be 0)
    short_beams: int  # beams left empty because fewer items than beams exist
    top_codes: list[list[tuple[int, ...]]]  # per example, the ranked codes (for overlap comparisons)


def recommend(
    model,
    prompts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    trie: ItemTrie,
    *,
    num_beams: int,
    batch_size: int,
    pad_id: int,
    progress: bool = True,
    desc: str = "beam search",
) -> Recommendations:
    """Ranks the item codes for every prompt; batches are formed from prompts of similar length."""
    was_training = model.training
    switch = any(m.training for m in model.modules())  # eval() and back walk every module: only when needed
    if switch:
        model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    ranks = torch.zeros(len(prompts), dtype=torch.long)
    top_codes: list[list[tuple[int, ...]]] = [[] for _ in prompts]
    invalid = short = 0
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for chunk in tqdm(batches, desc=desc, disable=not progress, leave=False):
        codes, scores = beam_search(model, [prompts[i] for i in chunk], trie, num_beams, pad_id)
        for i, ranked in zip(chunk, ranked_codes(codes, scores), strict=True):
            short += num_beams - len(ranked)
            invalid += sum(c not in trie.codes for c in ranked)
            top_codes[i] = ranked
            ranks[i] = rank_of(targets[i], ranked)
    if switch:
        model.train(was_training)
    return Recommendations(ranks, invalid, short, top_codes)
