"""Logit lens and residual norms on a tiny model."""

from __future__ import annotations

import pytest
import torch

from labkit.cache import cache_activations
from labkit.lens import answer_rank_by_layer, logit_lens, logit_lens_table, residual_norms
from labkit.models import hf_model_of

PROMPTS = ["the cat sat on the", "love and"]
HOOKS = ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]


def test_last_layer_lens_equals_model_logits(tiny_llama):
    cache = cache_activations(tiny_llama, PROMPTS[:1], ["blocks.2.hook_resid_post"], positions="last", progress=False)
    probs, tokens = logit_lens(tiny_llama, cache.stack("blocks.2.hook_resid_post"), k=3)
    ids = tiny_llama.to_tokens(PROMPTS[0])
    with torch.no_grad():
        logits = hf_model_of(tiny_llama)(input_ids=ids).logits[0, -1]
    expected_p, expected_ids = logits.softmax(-1).topk(3)
    torch.testing.assert_close(probs[0], expected_p, atol=1e-5, rtol=1e-4)
    assert tokens[0] == [tiny_llama.tokenizer.decode([int(i)]) for i in expected_ids]


def test_tables_have_one_row_per_hook(tiny_llama):
    cache = cache_activations(tiny_llama, PROMPTS, HOOKS, progress=False)
    table = logit_lens_table(tiny_llama, cache, HOOKS, prompt=1, k=2)
    assert list(table["layer"]) == [0, 2]
    norms = residual_norms(cache, HOOKS)
    assert set(norms["hook"]) == set(HOOKS)
    n_positions = tiny_llama.to_tokens(PROMPTS[0]).shape[1]
    assert norms[norms.hook == HOOKS[0]]["position"].max() == n_positions - 1
    ranks = answer_rank_by_layer(tiny_llama, cache, HOOKS, answers=[" mat", " hate"])
    assert list(ranks.index) == [0, 2]  # values: test_answer_rank_by_layer_equals_ranks_from_hugging_face_hidden_states
    with pytest.raises(ValueError, match="got 1 answers for 2"):
        answer_rank_by_layer(tiny_llama, cache, HOOKS, answers=[" mat"])


def test_lens_rejects_wrong_width(tiny_llama):
    with pytest.raises(ValueError, match=r"must be \[n, 32\]"):
        logit_lens(tiny_llama, torch.zeros(2, 7))


def test_answer_rank_by_layer_equals_ranks_from_hugging_face_hidden_states(tiny_llama):
    """Rank, top-1 rate and p(answer) per layer, recomputed from the twin's own hidden states."""
    twin = hf_model_of(tiny_llama)
    tokenizer = tiny_llama.tokenizer
    ids = [tiny_llama.to_tokens(p)[0].tolist() for p in PROMPTS]  # the lab's BOS rule, as the cache tokenises
    with torch.no_grad():
        hidden = [twin(input_ids=torch.tensor([row]), output_hidden_states=True).hidden_states for row in ids]

    def lens_logits(layer: int) -> torch.Tensor:  # (prompt, vocab): final norm + unembedding
        with torch.no_grad():
            return torch.stack([twin.lm_head(twin.model.norm(h[layer + 1][0, -1])) for h in hidden])

    def answer(row: int, skip: int) -> tuple[int, str]:
        """The ``skip``-th best final-layer token of prompt ``row`` that survives decode/encode."""
        found = []
        for token in final[row].topk(40).indices.tolist():
            text = tokenizer.decode([token])
            if tokenizer(text, add_special_tokens=False)["input_ids"][:1] == [token]:
                found.append((token, text))
        return found[skip]

    final = lens_logits(2)
    (first, first_text), (second, second_text) = answer(0, 0), answer(1, 2)
    targets, answers = [first, second], [first_text, second_text]
    cache = cache_activations(tiny_llama, PROMPTS, HOOKS, progress=False)
    ranks = answer_rank_by_layer(tiny_llama, cache, HOOKS, answers=answers)
    for layer in (0, 2):
        logits = lens_logits(layer)
        target = torch.tensor(targets)
        rank = (logits > logits.gather(1, target[:, None])).sum(-1).float()
        prob = logits.softmax(-1).gather(1, target[:, None]).squeeze(1)
        row = ranks.loc[layer]
        assert row["top-1 rate"] == float((rank == 0).float().mean())
        assert row["median rank"] == float(rank.median())
        assert row["mean p(answer)"] == pytest.approx(float(prob.mean()), rel=1e-3)  # batched vs alone
    final_rank = (final > final.gather(1, torch.tensor(targets)[:, None])).sum(-1)
    assert final_rank[1] > 0 and ranks.loc[2, "top-1 rate"] == float((final_rank == 0).float().mean())
