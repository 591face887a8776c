"""labkit.evals.topic: value tests that kill mutation survivors (issue 22), and the context check of
``topic_probability``. Tiny random-weight Llama (context 64 tokens); every expected number comes
from an independent computation (a by-hand loop over tokens, numpy)."""

from __future__ import annotations

import pytest
import torch

from labkit import evals
from labkit.models import lab_model, tokenizer_of

LONG = " ".join(["the cat sat on a mat"] * 20)


def _prompt_of(model, n_tokens: int) -> str:
    """A prompt of exactly ``n_tokens`` tokens with the model's BOS rule (" a" is one token)."""
    prompt = " ".join(["a"] * (n_tokens - 1))
    assert len(lab_model(model).encode(prompt)) == n_tokens
    return prompt


def test_topic_probability_refuses_prompt_plus_topic_prefix_past_the_context(shared_tiny_llama):
    """Prompt + the longest multi-token form's prefix must fit the window: " Wedding" is four
    tokens (Ġ, W, ed, ding), so its probability reads three positions after the prompt."""
    model = shared_tiny_llama
    forms = evals.topic_token_sequences(tokenizer_of(model), ["wedding"])
    longest = max(len(f) for f in forms) - 1
    assert longest == 3
    n_ctx = 64
    # a prompt longer than the window alone: the same message as perplexity
    with pytest.raises(ValueError, match=r"^topic_probability: prompt 0 is \d+ tokens; the model's context window is 64"):
        evals.topic_probability(model, [LONG], ["cat"], [None])
    # fits alone, not with the prefix: names the argument, the lengths and the window
    for n in (n_ctx - longest + 1, n_ctx):
        with pytest.raises(ValueError, match=rf"^topic_probability: prompts\[1\] is {n} tokens and the longest "
                           rf"topic-word form in topic_words needs {longest} more tokens after it \({n + longest} in all\); "
                           r"the model's context window is 64 tokens"):
            evals.topic_probability(model, ["a", _prompt_of(model, n)], ["wedding"], [None])
    # exactly the window: accepted, and the number equals the chain probability by hand
    prompt = _prompt_of(model, n_ctx - longest)
    got = evals.topic_probability(model, [prompt], ["wedding"], [None])[0]
    record = lab_model(model)
    expected = 0.0
    with torch.no_grad():
        for form in forms:
            ids = record.encode(prompt) + list(form[:-1])
            logp = torch.log_softmax(record.twin(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            start = len(ids) - len(form)
            expected += float(sum(logp[start + j, form[j]] for j in range(len(form))).exp())
    assert 0 < got == pytest.approx(expected, rel=1e-4)
