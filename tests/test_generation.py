"""Constrained beam search and the item trie."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from odllm.eval.generation import ItemTrie, beam_search, rank_of, recommend

V = 40


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


CODES = [(10 + a, 20 + b, 30 + c) for a in range(3) for b in range(3) for c in range(3) if (a + b + c) % 2 == 0]
PROMPTS = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 1, 2, 3, 4, 5, 6]]


def brute_force_scores(model, prompt, codes):
    scores = {}
    for code in codes:
        logp = torch.log_softmax(model(torch.tensor([prompt + list(code)])).logits[0], -1)
        scores[code] = sum(logp[len(prompt) - 1 + t, code[t]].item() for t in range(len(code)))
    return scores


def test_every_beam_is_an_item_and_matches_exhaustive_ranking():
    model, trie = tiny_model(), ItemTrie(CODES, V)
    codes, scores = beam_search(model, PROMPTS, trie, num_beams=len(CODES), pad_id=0)
    for row, prompt in enumerate(PROMPTS):
        beams = [tuple(c) for c in codes[row].tolist()]
        assert set(beams) == set(CODES)  # all items, each exactly once
        exact = brute_force_scores(model, prompt, CODES)
        # with as many beams as items the search is exhaustive: same order, same scores (left padding ok)
        assert beams == sorted(exact, key=exact.get, reverse=True)
        torch.testing.assert_close(scores[row], torch.tensor([exact[b] for b in beams]), atol=1e-4, rtol=0)


def test_more_beams_than_items_leaves_short_beams_not_fake_items():
    model, trie = tiny_model(), ItemTrie(CODES[:3], V)
    recs = recommend(model, PROMPTS, [CODES[0]] * 3, trie, num_beams=5, batch_size=2, pad_id=0, progress=False)
    assert recs.invalid_beams == 0
    assert recs.short_beams == 3 * 2
    assert all(len(r) == 3 and set(r) == set(CODES[:3]) for r in recs.top_codes)
    assert all(1 <= r <= 3 for r in recs.ranks.tolist())


def test_atomic_codes_single_step():
    model = tiny_model()
    trie = ItemTrie([(t,) for t in range(10, 30)], V)
    codes, scores = beam_search(model, PROMPTS, trie, num_beams=20, pad_id=0)
    assert codes.shape == (3, 20, 1)
    logits = model(torch.tensor([PROMPTS[1]])).logits[0, -1]
    expected = torch.log_softmax(logits, -1)[10:30].argsort(descending=True) + 10
    assert codes[1, :, 0].tolist() == expected.tolist()


def test_shared_codes_form_one_beam_and_count_for_every_item_that_carries_them():
    # two items with the same code appear as one trie leaf; a hit on the code is a hit for both
    trie = ItemTrie([(10, 20), (10, 20), (11, 21)], V)
    assert len(trie.codes) == 2
    ranked = [(11, 21), (10, 20)]
    assert rank_of((10, 20), ranked) == 2
    assert rank_of((12, 22), ranked) == 0
