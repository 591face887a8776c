"""labkit.generate: KV-cache parity under steering, batch = rows alone, seeds, inputs, streaming."""

from __future__ import annotations

import pytest
import torch

import labkit
from labkit.hooks import count_hooks
from labkit.models import hf_model_of

PROMPTS = ["the cat sat on a mat and the dog", "love", "what happened in the city during the war"]


@pytest.fixture()
def vectors(tiny_llama):
    """One vector of each kind, strong enough to change greedy tokens on the tiny model."""
    front = labkit.actadd(tiny_llama, " wedding party", " ", layer=1, coefficient=8.0)
    direction = labkit.mean_difference(tiny_llama, ["love", "peace"], ["hate", "war"], layer=2, coefficient=6.0)
    return {
        "front": front,
        "all": direction,
        "prompt": direction.with_positions("prompt"),
        "generated": direction.with_positions("generated"),
    }


def test_unsteered_generate_equals_plain_hf_generate(tiny_llama):
    tokenizer = labkit.models.tokenizer_of(tiny_llama)
    out = labkit.generate(tiny_llama, PROMPTS, max_new_tokens=6)
    # the bridge's BOS rule: TransformerLens prepends the BOS string to each prompt
    batch = tokenizer([tokenizer.bos_token + p for p in PROMPTS], return_tensors="pt", padding=True)
    reference = hf_model_of(tiny_llama).generate(
        **batch, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    width = batch.input_ids.shape[1]
    assert out.token_ids == [row[width:].tolist()[: len(ids)] for row, ids in zip(reference, out.token_ids)]
    assert all(len(ids) == 6 or ids[-1] == tokenizer.eos_token_id for ids in out.token_ids)
    assert out.prompt_token_ids[1] == tiny_llama.to_tokens("love")[0].tolist() and out.prompts == PROMPTS


@pytest.mark.parametrize("kind", ["front", "all", "prompt", "generated"])
def test_steered_greedy_with_cache_equals_without_and_batch_equals_rows(tiny_llama, vectors, kind):
    vector = vectors[kind]
    plain = labkit.generate(tiny_llama, PROMPTS, max_new_tokens=8)
    cached = labkit.generate(tiny_llama, PROMPTS, steering=vector, max_new_tokens=8)
    uncached = labkit.generate(tiny_llama, PROMPTS, steering=vector, max_new_tokens=8, use_cache=False)
    alone = [labkit.generate(tiny_llama, p, steering=vector, max_new_tokens=8).token_ids[0] for p in PROMPTS]
    assert cached.token_ids == uncached.token_ids
    assert cached.token_ids == alone
    assert cached.token_ids != plain.token_ids  # the vector does something


def test_zero_coefficient_is_bit_identical_to_unsteered(tiny_llama, vectors):
    plain = labkit.generate(tiny_llama, PROMPTS, max_new_tokens=8)
    zeroed = [v.with_coefficient(0.0) for v in vectors.values()]
    assert labkit.generate(tiny_llama, PROMPTS, steering=zeroed, max_new_tokens=8).token_ids == plain.token_ids
    sampled = dict(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    assert (
        labkit.generate(tiny_llama, PROMPTS, steering=zeroed, **sampled).token_ids
        == labkit.generate(tiny_llama, PROMPTS, **sampled).token_ids
    )


def test_steered_context_equals_steering_argument(tiny_llama, vectors):
    with labkit.steered(tiny_llama, vectors["front"], vectors["generated"]):
        inside = labkit.generate(tiny_llama, PROMPTS, max_new_tokens=8)
    argument = labkit.generate(tiny_llama, PROMPTS, steering=[vectors["front"], vectors["generated"]], max_new_tokens=8)
    assert inside.token_ids == argument.token_ids


def test_seeds_make_sampling_reproducible(tiny_llama, vectors):
    sampled = dict(max_new_tokens=10, temperature=1.0, seed=123)
    for steering in (None, vectors["all"]):
        first = labkit.generate(tiny_llama, PROMPTS, steering=steering, **sampled)
        second = labkit.generate(tiny_llama, PROMPTS, steering=steering, **sampled)
        assert first.texts == second.texts and first.token_ids == second.token_ids
    state = torch.random.get_rng_state()
    labkit.generate(tiny_llama, PROMPTS, **sampled)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    # temperature > 0 really samples: another seed draws other tokens, and neither is the greedy run
    greedy = labkit.generate(tiny_llama, PROMPTS, max_new_tokens=10).token_ids
    draws = [labkit.generate(tiny_llama, PROMPTS, max_new_tokens=10, temperature=1.0, seed=s).token_ids for s in (123, 124)]
    assert draws[0] != draws[1] and greedy not in draws


def test_steering_per_prompt_follows_the_generation_settings(tiny_llama, vectors):
    """Per-prompt steering (grouped batches) is each prompt's solo run, under every setting."""
    entries = [vectors["front"], None, [vectors["all"], vectors["generated"]]]
    for settings in (dict(max_new_tokens=3), dict(max_new_tokens=9), dict(max_new_tokens=5, temperature=1.0, seed=4)):
        out = labkit.generate(tiny_llama, PROMPTS, steering_per_prompt=entries, **settings)
        assert out.prompts == PROMPTS and all(len(ids) <= settings["max_new_tokens"] for ids in out.token_ids)
        if "temperature" not in settings:
            alone = [labkit.generate(tiny_llama, [p], steering=e, **settings).token_ids[0] for p, e in zip(PROMPTS, entries)]
            assert out.token_ids == alone
            assert max(len(ids) for ids in out.token_ids) == settings["max_new_tokens"]
    with pytest.raises(ValueError, match="not both"):
        labkit.generate(tiny_llama, PROMPTS, steering_per_prompt=entries, steering_per_row=entries)
    with pytest.raises(ValueError, match="prompt 1"):
        labkit.generate(tiny_llama, ["ok", ""], steering_per_prompt=[None, None])


def test_generate_runs_inside_other_twin_contexts(tiny_llama):
    calls = []

    def observe(activation, _site):
        calls.append(activation.shape[1])

    with labkit.hooks.attach(tiny_llama, {"blocks.0.hook_mlp_out": observe}):
        out = labkit.generate(tiny_llama, "love", max_new_tokens=4)
    assert len(calls) == len(out.token_ids[0]) and calls[1:] == [1] * (len(calls) - 1)
    assert count_hooks(hf_model_of(tiny_llama)) == 0


def test_streamer_passthrough(tiny_llama):
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.ended = True

    streamer = Collect()
    out = labkit.generate(tiny_llama, "the cat", max_new_tokens=5, streamer=streamer)
    assert streamer.ended and sum(streamer.chunks[1:], []) == out.token_ids[0]


def test_bad_input(tiny_llama):
    with pytest.raises(ValueError, match=r"prompt 1 is empty"):
        labkit.generate(tiny_llama, ["love", ""])
    with pytest.raises(ValueError, match=r"non-empty list of prompts, got \[\]"):
        labkit.generate(tiny_llama, [])
    with pytest.raises(ValueError, match=r"max_new_tokens must be an int ≥ 1, got 0"):
        labkit.generate(tiny_llama, "love", max_new_tokens=0)
    with pytest.raises(ValueError, match=r"temperature must be a finite number, got nan"):
        labkit.generate(tiny_llama, "love", temperature=float("nan"))
    with pytest.raises(ValueError, match=r"top_p=1.5 out of range; allowed \(0.0, 1.0\]"):
        labkit.generate(tiny_llama, "love", temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match=r"generate: chat=True but this tokenizer has no chat template"):
        labkit.generate(tiny_llama, "love", chat=True)
    with pytest.raises(TypeError, match=r"expected SteeringVector objects, got str"):
        labkit.generate(tiny_llama, "love", steering="wedding")
    assert count_hooks(hf_model_of(tiny_llama)) == 0


def test_chat_template_wraps_prompts(tiny_llama):
    tokenizer = labkit.models.tokenizer_of(tiny_llama)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} and{% endfor %}"
    try:
        out = labkit.generate(tiny_llama, "love", chat=True, max_new_tokens=2)
    finally:
        tokenizer.chat_template = None
    assert out.prompt_token_ids[0] == tokenizer("love and").input_ids


def test_smollm2_steering_behavior_and_parity(smollm2):
    """The real model: zero coefficient and KV-cache parity for ActAdd; a mean-difference
    wedding direction raises wedding words in greedy completions."""
    from labkit.evals import load_steering_data, topic_word_fraction

    data = load_steering_data()
    prompts = list(data.neutral_prompts[:2])
    words = data.topic_words["wedding"]
    plain = labkit.generate(smollm2, prompts, max_new_tokens=16)
    actadd = labkit.actadd(smollm2, " wedding", " ", layer=6, coefficient=8.0)
    assert labkit.generate(smollm2, prompts, steering=actadd.with_coefficient(0), max_new_tokens=16).token_ids == plain.token_ids
    cached = labkit.generate(smollm2, prompts, steering=actadd, max_new_tokens=16)
    assert cached.token_ids == labkit.generate(smollm2, prompts, steering=actadd, max_new_tokens=16, use_cache=False).token_ids
    assert cached.token_ids != plain.token_ids
    positives, negatives = data.contrast_pairs["wedding"]
    # with the BOS rule, layer 6 at c=2 is where this direction raises wedding words (0.034 vs 0.000)
    direction = labkit.mean_difference(smollm2, positives, negatives, layer=6, coefficient=2.0, token="mean")
    steered = labkit.generate(smollm2, prompts, steering=direction, max_new_tokens=16)
    assert topic_word_fraction(steered.texts, words) > topic_word_fraction(plain.texts, words)


def test_prompt_beyond_context_window_is_refused(tiny_llama):
    long_prompt = "one two " * 40  # > 64 tokens for the tiny model's window
    with pytest.raises(ValueError, match=r"generate: prompt 0 is \d+ tokens.*context window is 64"):
        labkit.generate(tiny_llama, long_prompt, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"\+ 64 new tokens.*lower max_new_tokens"):
        labkit.generate(tiny_llama, "love", max_new_tokens=64)


def test_unknown_generate_keyword_is_refused(tiny_llama):
    with pytest.raises(ValueError, match=r"'max_new_token' \(did you mean 'max_new_tokens'\?\)"):
        labkit.generate(tiny_llama, "love", max_new_token=3)


def test_vector_applies_to_the_same_model_under_another_spelling(tiny_llama):
    import dataclasses

    from labkit.models import same_model

    vector = labkit.actadd(tiny_llama, "love", "hate", layer=1, coefficient=1.0)
    assert same_model("smollm2-135m-instruct", "SmolLM2-135M-Instruct")
    assert not same_model("smollm2-135m-instruct", "moe-organism")
    relabelled = dataclasses.replace(vector, model_name=vector.model_name.upper())
    relabelled.check_compatible(tiny_llama)


# --- from the mutation survivors (issue 15): settings the per-prompt path must pass on ---------


def test_steering_per_prompt_keeps_the_shared_steering_and_every_setting(tiny_llama, vectors):
    """``steering=`` beside ``steering_per_prompt=`` applies to every prompt; ``chat``, ``seed``
    and extra Hugging Face keywords reach each prompt's group (solo runs compared exactly)."""
    tokenizer = labkit.models.tokenizer_of(tiny_llama)
    entries = [None, vectors["front"], vectors["generated"]]
    shared = vectors["all"]
    out = labkit.generate(tiny_llama, PROMPTS, steering=shared, steering_per_prompt=entries, max_new_tokens=6)
    alone = [labkit.generate(tiny_llama, [p], steering=[shared] + ([e] if e else []), max_new_tokens=6).token_ids[0]
             for p, e in zip(PROMPTS, entries)]
    assert out.token_ids == alone
    assert out.token_ids != labkit.generate(tiny_llama, PROMPTS, steering_per_prompt=entries, max_new_tokens=6).token_ids
    sampled = dict(max_new_tokens=6, temperature=1.0, seed=7)
    out = labkit.generate(tiny_llama, PROMPTS, steering_per_prompt=[None] * 3, **sampled)
    assert out.token_ids == labkit.generate(tiny_llama, PROMPTS, **sampled).token_ids
    assert out.token_ids != labkit.generate(tiny_llama, PROMPTS, steering_per_prompt=[None] * 3, **{**sampled, "seed": 8}).token_ids
    penalised = dict(max_new_tokens=8, repetition_penalty=5.0)
    out = labkit.generate(tiny_llama, PROMPTS, steering_per_prompt=entries, **penalised)
    alone = [labkit.generate(tiny_llama, [p], steering=e, **penalised).token_ids[0] for p, e in zip(PROMPTS, entries)]
    assert out.token_ids == alone
    assert out.token_ids != labkit.generate(tiny_llama, PROMPTS, steering_per_prompt=entries, max_new_tokens=8).token_ids
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} and{% endfor %}"
    try:
        out = labkit.generate(tiny_llama, ["love"], steering_per_prompt=[vectors["front"]], chat=True, max_new_tokens=2)
    finally:
        tokenizer.chat_template = None
    assert out.prompt_token_ids[0] == tokenizer("love and").input_ids


def test_temperature_is_passed_to_the_sampler(tiny_llama):
    """A near-zero temperature samples the greedy tokens (temperature 1 does not: see above)."""
    greedy = labkit.generate(tiny_llama, PROMPTS, max_new_tokens=10).token_ids
    for seed in (123, 124):
        assert labkit.generate(tiny_llama, PROMPTS, max_new_tokens=10, temperature=1e-4, seed=seed).token_ids == greedy


def test_completion_text_drops_special_tokens_and_stops_at_the_generation_configs_eos(tiny_llama):
    """Generation stops at the generation config's EOS (kept in ``token_ids``, not in the text)."""
    from labkit.generation import eos_token_ids

    hf = hf_model_of(tiny_llama)
    tokenizer = labkit.models.tokenizer_of(tiny_llama)
    free = labkit.generate(tiny_llama, PROMPTS[:1], max_new_tokens=8).token_ids[0]
    stop = free[2]  # make the third greedy token an EOS of the generation config only
    before = hf.generation_config.eos_token_id
    hf.generation_config.eos_token_id = [before, stop] if before is not None else [stop]
    try:
        assert stop in eos_token_ids(hf, tokenizer) and stop != tokenizer.eos_token_id
        out = labkit.generate(tiny_llama, PROMPTS[:1], max_new_tokens=8)
    finally:
        hf.generation_config.eos_token_id = before
    assert out.token_ids[0] == free[: free.index(stop) + 1]
    eos = tokenizer.eos_token_id
    hf.generation_config.eos_token_id = [eos]
    try:
        # a prompt ending where the model is made to emit EOS first: its text must not show it
        out = labkit.generate(tiny_llama, PROMPTS[:1], max_new_tokens=4,
                              suppress_tokens=[t for t in range(len(tokenizer)) if t != eos])
    finally:
        hf.generation_config.eos_token_id = before
    assert out.token_ids[0] == [eos] and out.texts[0] == "" and tokenizer.decode([eos]) != ""


def test_unknown_keywords_are_named_with_their_nearest_setting(tiny_llama):
    with pytest.raises(ValueError, match=r"'temprature' \(did you mean 'temperature'\?\), 'top_kk' \(did you mean 'top_k'\?\)"):
        labkit.generate(tiny_llama, "love", temprature=1.0, top_kk=3)
