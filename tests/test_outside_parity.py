"""Outside parity: labkit's mean-difference steering vs the independent ``steering-vectors`` package.

``steering-vectors`` (0.12.2; Tan et al.'s library; installed ``--no-deps``, see pyproject's
test extra) extracts a vector with its own hooks (mean of per-pair differences at each
prompt's last token) and applies it with its own forward hook on the Hugging Face decoder
block. Its layer index ``L`` is the *output* of decoder block ``L``, which is the input of block
``L + 1``: labkit's ``blocks.{L+1}.hook_resid_pre``. Same model, same prompts, same layer, same
coefficient → the same vector and the same greedy tokens, at batch 1 and in one left-padded
batch of 8. Both read the prompts as the tokenizer encodes them (no BOS added:
``prepend_bos=False`` on the labkit side), so the two implementations see the same tokens.
"""

from __future__ import annotations

import pytest
import torch

import labkit
from labkit import evals
from labkit.models import hf_model_of, tokenizer_of

steering_vectors = pytest.importorskip("steering_vectors")

SV_LAYER = 7  # steering-vectors' decoder-block index = labkit blocks.8.hook_resid_pre
PROMPTS = [
    "the cat sat on a mat", "love and hate", "war", "the dog ran to the park while",
    "one two three", "what happened in the city", "peace and love", "the question",
]


def _outside_vector(model, positives, negatives):
    return steering_vectors.train_steering_vector(
        hf_model_of(model), tokenizer_of(model), list(zip(positives, negatives)),
        layers=[SV_LAYER], read_token_index=-1, batch_size=1,
    )


def _outside_generate(model, outside, prompts, coefficient, new_tokens):
    """Greedy ids from plain Hugging Face generate under steering-vectors' own hook."""
    tokenizer, twin = tokenizer_of(model), hf_model_of(model)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side  # never leave the shared tokenizer changed
    with outside.apply(twin, multiplier=coefficient, min_token_index=0), torch.no_grad():
        out = twin.generate(
            **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return [row.tolist() for row in out[:, batch.input_ids.shape[1]:]]


def _check_parity(model, positives, negatives, prompts, coefficient, new_tokens):
    vector = labkit.mean_difference(model, positives, negatives, layer=SV_LAYER + 1, prepend_bos=False)
    assert vector.hook_name == "blocks.8.hook_resid_pre"
    outside = _outside_vector(model, positives, negatives)
    torch.testing.assert_close(vector.activations, outside.layer_activations[SV_LAYER].float(), rtol=1e-4, atol=1e-5)
    steered = vector.with_coefficient(coefficient)
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, prepend_bos=False)
    ours_batch = labkit.generate(model, prompts, steering=steered, **settings).token_ids
    assert ours_batch == _outside_generate(model, outside, prompts, coefficient, new_tokens)  # batch 8
    for prompt, ours in zip(prompts, ours_batch):  # batch 1
        assert labkit.generate(model, [prompt], steering=steered, **settings).token_ids[0] == ours
        assert _outside_generate(model, outside, [prompt], coefficient, new_tokens)[0] == ours
    plain = labkit.generate(model, prompts, **settings).token_ids
    return sum(a != b for a, b in zip(plain, ours_batch))


def test_mean_difference_matches_steering_vectors_on_tiny_llama(tiny_tokenizer):
    from labkit.models import from_hf
    from tests.conftest import tiny_llama_hf

    model = from_hf(tiny_llama_hf(tiny_tokenizer, n_layers=10), tiny_tokenizer, name="tiny-llama-10")
    positives = ["love and peace", "the park", "love", "one two"]
    negatives = ["hate and war", "the city", "hate", "three four"]
    changed = _check_parity(model, positives, negatives, PROMPTS, coefficient=6.0, new_tokens=8)
    assert changed >= 4  # the vector really steers: most rows leave the unsteered path


@pytest.mark.slow
def test_mean_difference_matches_steering_vectors_on_smollm2(smollm2):
    data = evals.load_steering_data()
    positives, negatives = data.contrast_pairs["wedding"]
    prompts = list(data.neutral_prompts[:8])
    changed = _check_parity(smollm2, list(positives), list(negatives), prompts, coefficient=4.0, new_tokens=12)
    assert changed >= 1
