"""The seqrec task as token sequences: instruction templates, training windows and evaluation prompts.

Every template is an instruction followed by the user's history written as item codes; the next item's
code follows directly. Because the target continues the list, one causal forward pass over
``instruction + i1 i2 ... in`` learns every next-item position at once (``all_positions`` mode), and the
very same text is what LC-Rec's one-sample-per-prefix mode (``per_prefix``) trains on, one target at a time.

Where items have text, LC-Rec's alignment tasks (item text -> code, code -> text) add samples that tie each
item's code to what the item is; only seqrec is evaluated.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from odllm.data.batches import IGNORE_INDEX, Sample
from odllm.data.items import ItemCodes

SEQREC_TEMPLATES: tuple[str, ...] = (
    "The user has interacted with the following items in chronological order. "
    "Predict the next item the user will interact with.\nHistory:",
    "Here is the user's historical interaction sequence. Recommend the item the user is likely to "
    "choose next.\nHistory:",
    "Given the items below, listed in the order the user engaged with them, what item comes next?\n"
    "History:",
    "Based on this user's past interactions, predict the next item they will want.\nHistory:",
)

# LC-Rec's item-text alignment tasks; "{text}" is the item's text, "{item}" its code tokens.
ITEM2INDEX_TEMPLATES: tuple[str, ...] = (
    "Which item has the following title and description?\n{text}\nItem:",
    "An item is described as follows: {text}\nWhich item is it?\nItem:",
)
INDEX2ITEM_TEMPLATES: tuple[str, ...] = (
    "What are the title and description of item {item}?\n",
    "Describe the item {item}.\n",
)
ITEM_TEXT_TASKS = ("item2index", "index2item")





class SeqRecEncoder:
    """Turns histories and targets into token ids with a fixed tokenizer and item index."""

    def __init__(self, tokenizer, item_codes: ItemCodes, templates: Sequence[str] = SEQREC_TEMPLATES):
        self.item_codes = item_codes
        self.templates = tuple(templates)
        self.prefix_ids = [self._encode_prefix(tokenizer, t) for t in self.templates]
        ids = tokenizer.convert_tokens_to_ids(item_codes.tokens())
        self.token_id = dict(zip(item_codes.tokens(), ids, strict=True))
        unknown = [t for t, i in self.token_id.items() if i is None or i == tokenizer.unk_token_id]
        if unknown:
            raise ValueError(f"item tokens missing from the tokenizer, e.g. {unknown[:3]}")
        self.item_ids = {item: [self.token_id[t] for t in code] for item, code in item_codes.codes.items()}

    @staticmethod
    def _encode_prefix(tokenizer, template: str) -> list[int]:
        ids = tokenizer(template, add_special_tokens=False)["input_ids"]
        return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids

    def item(self, item: str) -> list[int]:
        try:
            return self.item_ids[item]
        except KeyError:
            raise KeyError(f"item {item!r} is not in the model's item index") from None

    def prompt(self, history: Sequence[str], template: int = 0) -> list[int]:
        ids = list(self.prefix_ids[template])
        for item in history:
            ids += self.item(item)
        return ids

    def per_prefix(self, history: Sequence[str], target: str, template: int) -> Sample:
        """LC-Rec's sample: one history, loss on the target's tokens only."""
        prompt = self.prompt(history, template)
        target_ids = self.item(target)
        return Sample(prompt + target_ids, [IGNORE_INDEX] * len(prompt) + target_ids)

    def window(self, items: Sequence[str], n_targets: int, template: int) -> Sample:
        """One pass over ``items``; loss on the codes of the last ``n_targets`` items."""
        ids = list(self.prefix_ids[template])
        labels = [IGNORE_INDEX] * len(ids)
        first_target = len(items) - n_targets
        for pos, item in enumerate(items):
            code = self.item(item)
            ids += code
            labels += code if pos >= first_target else [IGNORE_INDEX] * len(code)
        return Sample(ids, labels)


def tokenizer_corpus(item_text: Mapping[str, str], item_text_weights: Mapping[str, float]) -> list[str]:
    """What a scratch tokenizer learns: the seqrec templates, the item text, and the item-text templates when
    those tasks are on (so a run without them tokenizes exactly as before they existed)."""
    tasks_on = bool(item_text) and any(item_text_weights.get(t, 0) > 0 for t in ITEM_TEXT_TASKS)
    return [*SEQREC_TEMPLATES, *(ITEM2INDEX_TEMPLATES + INDEX2ITEM_TEMPLATES if tasks_on else ()), *item_text.values()]


class ItemTextEncoder:
    """LC-Rec's alignment tasks: item text -> item code (``item2index``) and item code -> item text (``index2item``).

    The loss is on the answer only: the code tokens, or the text tokens and end-of-sequence (so the model
    learns where a text ends). Item text is cut to ``max_text_tokens`` tokens.
    """

    def __init__(self, tokenizer, encoder: SeqRecEncoder, item_text: Mapping[str, str], max_text_tokens: int = 64):
        self.encoder, self.eos_id = encoder, tokenizer.eos_token_id
        self.text_ids = {
            item: tokenizer(item_text[item], add_special_tokens=False)["input_ids"][:max_text_tokens]
            for item in encoder.item_ids
            if item_text.get(item)
        }
        self.parts = {
            "item2index": [self._split(tokenizer, t, "{text}") for t in ITEM2INDEX_TEMPLATES],
            "index2item": [self._split(tokenizer, t, "{item}") for t in INDEX2ITEM_TEMPLATES],
        }

    @staticmethod
    def _split(tokenizer, template: str, slot: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the slot, with BOS in front as in the seqrec prompts."""
        before, after = template.split(slot)
        return SeqRecEncoder._encode_prefix(tokenizer, before), tokenizer(after, add_special_tokens=False)["input_ids"]

    @property
    def items(self) -> list[str]:
        return list(self.text_ids)

    def item2index(self, item: str, template: int) -> Sample:
        before, after = self.parts["item2index"][template]
        prompt, code = before + self.text_ids[item] + after, self.encoder.item(item)
        return Sample(prompt + code, [IGNORE_INDEX] * len(prompt) + code)

    def index2item(self, item: str, template: int) -> Sample:
        before, after = self.parts["index2item"][template]
        prompt, answer = before + self.encoder.item(item) + after, self.text_ids[item] + [self.eos_id]
        return Sample(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer)


def build_item_text_samples(text_encoder: ItemTextEncoder, weights: Mapping[str, float], seed: int) -> list[Sample]:
    """``weights[task]`` samples per item with text and epoch: the integer part for every item, the fraction
    for that share of the items (drawn with ``seed``); each sample's template drawn with ``seed`` too."""
    rng = random.Random(seed)
    samples: list[Sample] = []
    for task in ITEM_TEXT_TASKS:
        weight = weights.get(task, 0)
        if weight < 0:
            raise ValueError(f"task.item_text.{task} must be >= 0 (samples per item and epoch), got {weight}")
        build, n_templates = getattr(text_encoder, task), len(text_encoder.parts[task])
        for item in text_encoder.items:
            for _ in range(int(weight) + (rng.random() < weight % 1)):
                samples.append(build(item, rng.randrange(n_templates)))
    return samples


def training_windows(sequence: Sequence[str], max_history: int, stride: int) -> list[tuple[int, int, int]]:
    """Cover every target position 1..n-1 exactly once with windows of at most ``max_history + 1`` items.

    Returns ``(start, end, n_targets)`` slices. Windows are laid out from the end, ``stride`` targets
    each, so every target but those of the earliest window sees at least ``max_history + 1 - stride``
    items of history.
    """
    if not 1 <= stride <= max_history:
        raise ValueError(f"window stride must be in [1, max_history={max_history}], got {stride}")
    n = len(sequence)
    windows = []
    end = n
    while end > 1:
        start = max(0, end - max_history - 1)
        first_target = max(1, end - stride) if start > 0 else 1
        windows.append((start, end, end - first_target))
        end = first_target
    return windows[::-1]


def build_training_samples(
    encoder: SeqRecEncoder,
    train: dict[str, list[str]],
    *,
    mode: str,
    max_history: int,
    stride: int | None,
    seed: int,
) -> list[Sample]:
    """All training samples of one epoch's worth of data, each with a template drawn with ``seed``.

    ``stride=None`` takes half the history: every target sees at least ``max_history // 2`` items.
    """
    stride = max(1, max_history // 2) if stride is None else stride
    rng = random.Random(seed)
    samples: list[Sample] = []
    for user in train:
        seq = train[user]
        if mode == "all_positions":
            for start, end, n_targets in training_windows(seq, max_history, stride):
                t = rng.randrange(len(encoder.templates))
                samples.append(encoder.window(seq[start:end], n_targets, t))
        elif mode == "per_prefix":
            for j in range(1, len(seq)):
                t = rng.randrange(len(encoder.templates))
                samples.append(encoder.per_prefix(seq[max(0, j - max_history) : j], seq[j], t))
        else:
            raise ValueError(f"unknown task.mode {mode!r}; choose 'all_positions' or 'per_prefix'")
    return samples
