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
    assert list(ranks.index) == [0, 2] and (ranks["top-1 rate"].between(0, 1)).all()
    with pytest.raises(ValueError, match="got 1 answers for 2"):
        answer_rank_by_layer(tiny_llama, cache, HOOKS, answers=[" mat"])


def test_lens_rejects_wrong_width(tiny_llama):
    with pytest.raises(ValueError, match=r"must be \[n, 32\]"):
        logit_lens(tiny_llama, torch.zeros(2, 7))
