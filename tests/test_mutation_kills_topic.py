"""labkit.evals.topic: value tests that kill mutation survivors (issue 22), and the context check of
``topic_probability``. Tiny random-weight Llama (context 64 tokens); every expected number comes
from an independent computation (a by-hand loop over tokens, numpy)."""

from __future__ import annotations

import math
import re

import numpy as np
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


# --- topic_steering_sweep: every cell against solo greedy runs counted by hand -------------------

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def _count(texts, topic):
    words = [w for text in texts for w in _WORD.findall(text.lower())]
    return sum(w in topic for w in words), len(words)


def test_topic_steering_sweep_every_cell_equals_solo_greedy_runs_counted_by_hand(shared_tiny_llama):
    """Greedy rows (``temperature=0``) equal their solo runs, so every cell of both tables can be
    recomputed from one ``generate`` per (setting, prompt): topic fraction pooled over the
    setting's texts (each prompt's text counted ``samples_per_prompt`` times), word counts, the
    coefficient-0 row reusing the baseline, a list of vectors labelled layer -1, the
    anti-steerable fraction from a least-squares slope per prompt (numpy.polyfit on
    ``[0, coefficients]``), all across batches of 5 rows."""
    import labkit
    from labkit.steering import SteeringVector, steered

    model = shared_tiny_llama
    prompts = ["the cat sat on the", "a dog ran to", "my friend said that"]
    torch.manual_seed(1)
    first = labkit.actadd(model, " wedding", " ", layer=1)
    second = SteeringVector("blocks.2.hook_resid_pre", 0.003 * torch.randn(32), coefficient=1.0, model_name="tiny-llama")
    vectors = [first, second, [first, second]]
    coefficients = [0, 2.0, -3.0]
    samples, new = 2, 10

    texts = {}  # (vector index or None, coefficient, prompt) -> solo greedy completion
    for p in prompts:
        texts[None, 0.0, p] = labkit.generate(model, p, max_new_tokens=new, temperature=0).texts[0]
        for v, vector in enumerate(vectors):
            for c in coefficients[1:]:
                applied = [x.with_coefficient(c) for x in (vector if isinstance(vector, list) else [vector])]
                with steered(model, *applied):
                    texts[v, c, p] = labkit.generate(model, p, max_new_tokens=new, temperature=0).texts[0]
    counts = {}
    for text in texts.values():
        for w in _WORD.findall(text.lower()):
            counts[w] = counts.get(w, 0) + 1
    topic = sorted(counts, key=lambda w: (-counts[w], w))[:3]  # words that do occur, unevenly

    table, per_prompt = evals.topic_steering_sweep(
        model, vectors, coefficients, prompts=prompts, topic_words=topic, samples_per_prompt=samples,
        max_new_tokens=new, temperature=0.0, batch_size=5, per_prompt=True,
    )
    labels = [("unsteered", -1, 0.0, None)]
    labels += [(m, layer, float(c), v) for v, (m, layer) in enumerate([("actadd", 1), ("custom", 2), ("actadd", -1)])
               for c in coefficients]
    assert list(zip(table.method, table.layer, table.coefficient)) == [(m, layer, c) for m, layer, c, _ in labels]
    fractions = {}
    for row, (method, layer, c, v) in zip(table.itertuples(), labels):
        key = (None, 0.0) if c == 0 else (v, c)
        setting_texts = [texts[(*key, p)] for p in prompts for _ in range(samples)]
        hits, total = _count(setting_texts, set(topic))
        assert row.n_words == total, (method, layer, c)
        assert row.topic_fraction == pytest.approx(hits / total if total else 0.0), (method, layer, c)
        assert math.isnan(row.perplexity)
        for p in prompts:
            h, t = _count([texts[(*key, p)]] * samples, set(topic))
            fractions[v, c, p] = h / t if t else 0.0
    assert 0 < table.topic_fraction.max() and len(set(table.topic_fraction)) > 2
    # the per-prompt table, cell by cell
    assert len(per_prompt) == len(labels) * len(prompts)
    for row in per_prompt.itertuples():
        v = next(v for m, layer, c, v in labels if (m, layer, c) == (row.method, row.layer, row.coefficient))
        key = (None, 0.0) if row.coefficient == 0 else (v, row.coefficient)
        h, t = _count([texts[(*key, row.prompt)]] * samples, set(topic))
        assert row.n_words == t and row.topic_fraction == pytest.approx(h / t if t else 0.0)
    # the anti-steerable fraction: share of prompts with a negative least-squares slope
    assert math.isnan(table.anti_steerable_fraction.iloc[0])
    for v in range(len(vectors)):
        negative = []
        for p in prompts:
            base = fractions[None, 0.0, p]
            x = [0.0] + [float(c) for c in coefficients]
            y = [base] + [base if c == 0 else fractions[v, float(c), p] for c in coefficients]
            negative.append(np.polyfit(x, y, 1)[0] < -1e-12)
        rows = table[[lv == v for *_, lv in labels]]
        assert rows.anti_steerable_fraction.tolist() == pytest.approx([np.mean(negative)] * 3), v
    # one batch of everything gives the same table
    whole = evals.topic_steering_sweep(
        model, vectors, coefficients, prompts=prompts, topic_words=topic, samples_per_prompt=samples,
        max_new_tokens=new, temperature=0.0,
    )
    assert whole.drop(columns="perplexity").equals(table.drop(columns="perplexity"))


def test_topic_steering_sweep_arguments_named_and_seed_reproducible(shared_tiny_llama):
    import labkit

    model = shared_tiny_llama
    vector = labkit.actadd(model, " wedding", " ", layer=1)
    with pytest.raises(ValueError, match=r"^topic_steering_sweep: samples_per_prompt must be a positive int, got 0"):
        evals.topic_steering_sweep(model, vector, [1.0], prompts=["a"], topic_words=["a"], samples_per_prompt=0)
    with pytest.raises(ValueError, match=r"^topic_steering_sweep: batch_size must be a positive int, got True"):
        evals.topic_steering_sweep(model, vector, [1.0], prompts=["a"], topic_words=["a"], batch_size=True)
    # sampled rows: the same seed gives the same table, and it is the seeded generate call's texts
    kwargs = dict(prompts=["the cat sat", "a dog"], topic_words=["the", "a", "cat"], samples_per_prompt=3,
                  max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    first = evals.topic_steering_sweep(model, vector, [2.0], **kwargs)
    again = evals.topic_steering_sweep(model, vector, [2.0], **kwargs)
    assert first.drop(columns="perplexity").equals(again.drop(columns="perplexity"))
    steered = vector.with_coefficient(2.0)
    rows = [None] * 6 + [steered] * 6
    prompts = [p for p in kwargs["prompts"] for _ in range(3)] * 2
    out = labkit.generate(model, prompts, steering_per_row=rows, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    for k, row in enumerate(first.itertuples()):
        hits, total = _count(out.texts[6 * k:6 * k + 6], {"the", "a", "cat"})
        assert row.n_words == total and row.topic_fraction == pytest.approx(hits / total if total else 0.0)


def test_topic_probability_on_a_padded_batch_of_an_absolute_position_model(tiny_tokenizer):
    """GPT-2 adds a learned embedding per absolute position, so a left-padded row must get
    positions counted from its first real token (a rotary model would not notice): each prompt's
    probability in one padded batch equals the prompt run alone, by hand."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from labkit.models import from_hf

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
                        architectures=["GPT2LMHeadModel"])
    hf = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        hf.transformer.wpe.weight.mul_(50)  # positions matter a lot
    model = from_hf(hf, tiny_tokenizer, name="tiny-gpt2")
    prompts = ["the cat sat on the mat and", "a dog", "we went"]
    words = ["wedding", "cat"]
    got = evals.topic_probability(model, prompts, words, [None], batch_size=64)[0]
    forms = evals.topic_token_sequences(tiny_tokenizer, words)
    record = lab_model(model)
    expected = 0.0
    with torch.no_grad():
        for prompt in prompts:
            for form in forms:
                ids = record.encode(prompt) + list(form[:-1])
                logp = torch.log_softmax(hf(input_ids=torch.tensor([ids])).logits[0].float(), -1)
                start = len(ids) - len(form)
                expected += float(sum(logp[start + j, form[j]] for j in range(len(form))).exp())
    assert got == pytest.approx(expected / len(prompts), rel=1e-4)
