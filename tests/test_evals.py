"""labkit.evals: metric functions."""

from __future__ import annotations

import math

import pytest
import torch

import labkit
from labkit import evals
from labkit.models import hf_model_of, tokenizer_of

# --- steering metrics ----------------------------------------------------------------------


def test_topic_word_fraction_counts_whole_words_pooled():
    words = ["wedding", "bride"]
    assert evals.topic_word_fraction(["The Wedding, the bride!", "a b"], words) == pytest.approx(2 / 6)
    assert evals.topic_word_fraction("weddings bridegroom", words) == 0.0  # whole words only
    assert evals.topic_word_fraction(["", "  "], words) == 0.0
    assert evals.words_of("It's the bride's day") == ["it's", "the", "bride's", "day"]
    with pytest.raises(ValueError, match="topic_words is empty"):
        evals.topic_word_fraction("text", [])


def test_perplexity_matches_manual_computation(tiny_llama):
    texts = ["the cat sat on a mat", "love and hate"]
    tokenizer, twin = tokenizer_of(tiny_llama), hf_model_of(tiny_llama)
    nll, count = 0.0, 0
    for text in texts:
        ids = tiny_llama.to_tokens(text)  # the lab's BOS rule: the first real token is predicted too
        with torch.no_grad():
            logprobs = torch.log_softmax(twin(input_ids=ids).logits[0, :-1], dim=-1)
        nll -= logprobs.gather(-1, ids[0, 1:, None]).sum().item()
        count += ids.shape[1] - 1
    assert evals.perplexity(tiny_llama, texts) == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert evals.perplexity(tiny_llama, texts, batch_size=1) == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_perplexity_under_steering(tiny_llama):
    texts = ["the cat sat on a mat", "love and hate"]
    vector = labkit.actadd(tiny_llama, " wedding party", " ", layer=1, coefficient=8.0)
    plain = evals.perplexity(tiny_llama, texts)
    assert evals.perplexity(tiny_llama, texts, steering=vector.with_coefficient(0)) == plain
    steered = evals.perplexity(tiny_llama, texts, steering=vector)
    assert steered != plain
    with labkit.steered(tiny_llama, vector):  # a context opened by the caller applies too
        assert evals.perplexity(tiny_llama, texts) == steered
    with pytest.raises(ValueError, match="has 1 token"):
        evals.perplexity(tiny_llama, ["the"], prepend_bos=False)


def test_steering_data_loads():
    data = evals.load_steering_data()
    assert {"wedding", "love", "hate"} <= set(data.topic_words)
    assert len(data.neutral_prompts) >= 8 and len(data.heldout_texts) >= 8
    positives, negatives = data.contrast_pairs["wedding"]
    assert len(positives) == len(negatives) >= 4
    assert evals.topic_word_fraction(data.heldout_texts, data.topic_words["wedding"]) == 0.0
    # on-topic paragraphs: each is about its topic, by the topic's own word list
    for topic in ("wedding", "love", "hate"):
        texts = data.topic_texts[topic]
        assert len(texts) >= 6
        assert all(evals.topic_word_fraction(t, data.topic_words[topic]) >= 0.05 for t in texts), topic


def test_topic_steering_sweep_table(tiny_llama):
    data = evals.load_steering_data()
    vector = labkit.actadd(tiny_llama, " wedding", " ", layer=1)
    # the tiny model's context is 64 tokens: the held-out paragraphs are cut to fit (longer texts are refused)
    heldout = tuple(" ".join(text.split()[:12]) for text in data.heldout_texts[:2])
    table, per_prompt = evals.topic_steering_sweep(
        tiny_llama, [vector], [0, 4],
        prompts=data.neutral_prompts[:2], topic_words=["wedding"],
        heldout_texts=heldout, samples_per_prompt=1, max_new_tokens=4, per_prompt=True,
    )
    assert list(table.columns) == [
        "method", "layer", "coefficient", "topic_fraction", "perplexity", "n_words", "anti_steerable_fraction"
    ]
    assert table["layer"].tolist() == [-1, 1, 1]
    assert table["method"].tolist() == ["unsteered", "actadd", "actadd"]
    baseline, zero = table.iloc[0], table.iloc[1]
    assert baseline["perplexity"] == zero["perplexity"] and baseline["topic_fraction"] == zero["topic_fraction"]
    assert table.iloc[2]["perplexity"] != baseline["perplexity"]
    # the batched perplexity of each setting is the solo perplexity under that vector
    torch.testing.assert_close(baseline["perplexity"], evals.perplexity(tiny_llama, heldout), rtol=1e-5, atol=0)
    solo = evals.perplexity(tiny_llama, heldout, steering=vector.with_coefficient(4.0))
    torch.testing.assert_close(table.iloc[2]["perplexity"], solo, rtol=1e-5, atol=0)
    assert len(per_prompt) == 3 * 2 and set(per_prompt.prompt) == set(data.neutral_prompts[:2])
    assert math.isnan(baseline["anti_steerable_fraction"]) and 0 <= table.iloc[2]["anti_steerable_fraction"] <= 1


def test_steerability_slopes_and_anti_steerable_fraction():
    import pandas as pd

    rows = [("unsteered", -1, 0.0, "a", 0.1), ("unsteered", -1, 0.0, "b", 0.2), ("unsteered", -1, 0.0, "c", 0.0)]
    # prompt a rises 0.1 -> 0.3 -> 0.5 (slope 0.05 per unit), b falls, c does not move
    rows += [("actadd", 3, 4.0, "a", 0.3), ("actadd", 3, 8.0, "a", 0.5)]
    rows += [("actadd", 3, 4.0, "b", 0.1), ("actadd", 3, 8.0, "b", 0.0)]
    rows += [("actadd", 3, 4.0, "c", 0.0), ("actadd", 3, 8.0, "c", 0.0)]
    table = pd.DataFrame(rows, columns=["method", "layer", "coefficient", "prompt", "topic_fraction"])
    slopes = evals.steerability(table).set_index("prompt").slope
    assert slopes["a"] == pytest.approx(0.05) and slopes["b"] == pytest.approx(-0.025) and slopes["c"] == 0
    assert (slopes < 0).mean() == pytest.approx(1 / 3)  # the anti-steerable fraction
    with pytest.raises(ValueError, match="no unsteered rows"):
        evals.steerability(table[table.method != "unsteered"])
    with pytest.raises(ValueError, match="needs columns"):
        evals.steerability(table.drop(columns="prompt"))


# --- behaviour detectors and task accuracy -------------------------------------------------


def test_perplexity_bad_input(tiny_llama):
    from labkit.evals import perplexity

    with pytest.raises(ValueError, match="perplexity: need a prompt or a non-empty list"):
        perplexity(tiny_llama, [])
    with pytest.raises(ValueError, match="perplexity: text 0 .* need ≥ 2"):
        perplexity(tiny_llama, ["a"], prepend_bos=False)


def test_topic_token_sequences_spell_each_form_and_drop_those_a_shorter_form_begins(tiny_tokenizer):
    def enc(form):
        return tuple(tiny_tokenizer(form, add_special_tokens=False).input_ids)

    got = evals.topic_token_sequences(tiny_tokenizer, ["cat", "catalog", "mat"])
    # " cat" is two tokens (Ġc, at) and " Cat" three: kept whole, never as the fragment Ġc alone.
    assert len(enc(" cat")) == 2 and len(enc(" Cat")) == 3 and len(enc(" mat")) == 1
    assert got == sorted({enc(" cat"), enc(" Cat"), enc(" mat"), enc(" Mat")})
    # " catalog" begins with " cat"'s tokens: the shorter form's probability already holds it.
    assert enc(" catalog")[:2] == enc(" cat") and enc(" catalog") not in got
    assert (enc(" cat")[0],) not in got
    with pytest.raises(ValueError, match="topic_words is empty"):
        evals.topic_token_sequences(tiny_tokenizer, [" "])


def test_topic_probability_is_the_chain_probability_of_each_word_under_its_steering(tiny_llama):
    """Shared batches give each setting's probability that the next word is a topic word: for
    every form, the product of its tokens' probabilities, checked one setting, prompt and form at
    a time by stepping a KV cache by hand (so the form's later tokens are generated positions:
    a ``"prompt"`` vector misses them, ``"generated"`` reaches them); a zero coefficient gives the
    unsteered value (to the rounding of other batch neighbours); a split word is not counted through its first fragment."""
    from labkit.models import lab_model
    from labkit.steering import SteeringVector, steered

    prompts = ["the cat sat on the", "a dog ran", "the bird"]
    words = ["cat", "dog", "mat", "wedding"]
    torch.manual_seed(0)
    vectors = {
        positions: SteeringVector("blocks.1.hook_resid_pre", torch.randn(32), coefficient=3.0,
                                  positions=positions, model_name="tiny-llama")
        for positions in ("all", "prompt", "generated")
    }
    front = labkit.actadd(tiny_llama, " cat", " ", layer=0, coefficient=4.0)
    settings = [None, vectors["all"], vectors["prompt"], vectors["generated"], front,
                [vectors["generated"], front], vectors["all"].with_coefficient(0.0)]
    got = evals.topic_probability(tiny_llama, prompts, words, settings, batch_size=5)
    forms = evals.topic_token_sequences(tokenizer_of(tiny_llama), words)
    assert any(len(f) > 1 for f in forms) and any(len(f) == 1 for f in forms)
    record = lab_model(tiny_llama)
    twin = record.twin

    def by_hand(setting, prompt, form):
        applied = [] if setting is None else (setting if isinstance(setting, list) else [setting])
        with steered(tiny_llama, *applied), torch.no_grad():
            out = twin(input_ids=torch.tensor([record.encode(prompt)]), use_cache=True)
            probability = 1.0
            for j, token in enumerate(form):
                probability *= float(torch.softmax(out.logits[0, -1].float(), -1)[token])
                if j + 1 < len(form):
                    out = twin(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
        return probability

    for k, setting in enumerate(settings):
        expected = sum(by_hand(setting, prompt, form) for prompt in prompts for form in forms) / len(prompts)
        assert got[k] == pytest.approx(expected, rel=1e-4, abs=1e-12), k
    assert got[6] == pytest.approx(got[0], rel=1e-6)  # other batch neighbours, same values
    assert evals.topic_probability(tiny_llama, prompts, words, settings, batch_size=10_000) == pytest.approx(got, rel=1e-5)
    assert len(set(got[:6])) == 6, got  # every setting moved the probability, each its own way
    # The old first-fragment count: " wedding" (Ġw, ed, ding) counted as every word starting Ġw.
    with torch.no_grad():
        first = torch.softmax(twin(input_ids=torch.tensor([record.encode(prompts[0])])).logits[0, -1].float(), -1)
    only = evals.topic_probability(tiny_llama, prompts[:1], ["wedding"], [None])[0]
    fragment = sum(float(first[f[0]]) for f in evals.topic_token_sequences(tokenizer_of(tiny_llama), ["wedding"]))
    assert 0 < only < fragment / 10
    with pytest.raises(ValueError, match="settings is empty"):
        evals.topic_probability(tiny_llama, prompts, words, [])
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        evals.topic_probability(tiny_llama, prompts, words, [None], batch_size=0)
