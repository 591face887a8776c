"""The contrast builders' shared argument type (ContrastReading) and aggregator pipeline (contrast_vector).

Values are checked against the model's own hidden states (``output_hidden_states``), not against
another labkit path.
"""

from __future__ import annotations

import pytest
import torch

import labkit
from labkit.models import hf_model_of
from labkit.steering import ContrastReading, Direction, contrast_vector, mean_aggregator, pca_aggregator

POSITIVE, NEGATIVE = ["love", "love and peace", "joy"], ["hate", "hate and war", "war"]


def _states(model, prompt: str, layer: int, token: str) -> torch.Tensor:
    """The residual stream entering block ``layer`` (hook_resid_pre), last token or token mean."""
    ids = model.to_tokens(prompt)[0].tolist()
    with torch.no_grad():
        hidden = hf_model_of(model)(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0]
    return hidden[-1] if token == "last" else hidden.mean(0)


def test_reading_is_one_value_for_every_contrast_builder(tiny_llama):
    reading = ContrastReading(token="mean", positions="generated", batch_size=2)
    expected = torch.stack([_states(tiny_llama, p, 2, "mean") for p in POSITIVE]).mean(0) - torch.stack(
        [_states(tiny_llama, p, 2, "mean") for p in NEGATIVE]
    ).mean(0)
    vector = labkit.mean_difference(tiny_llama, POSITIVE, NEGATIVE, 2, reading=reading)
    torch.testing.assert_close(vector.activations, expected, rtol=1e-4, atol=1e-5)
    assert vector.positions == "generated" and vector.source["token"] == "mean"
    for build in (labkit.pca_direction, labkit.probe_direction):
        by_reading = build(tiny_llama, POSITIVE, NEGATIVE, 2, reading=reading)
        by_keywords = build(tiny_llama, POSITIVE, NEGATIVE, 2, token="mean", positions="generated", batch_size=2)
        assert torch.equal(by_reading.activations, by_keywords.activations)
        assert by_reading.source == by_keywords.source and by_reading.positions == "generated"


def test_contrast_vector_takes_any_aggregator(tiny_llama):
    def median_aggregator(acts_positive, acts_negative):
        return Direction(acts_positive.median(0).values - acts_negative.median(0).values, {"method": "median", "rows": 3})

    vector = contrast_vector(tiny_llama, POSITIVE, NEGATIVE, 1, 2.0, aggregator=median_aggregator)
    positive = torch.stack([_states(tiny_llama, p, 1, "last") for p in POSITIVE])
    negative = torch.stack([_states(tiny_llama, p, 1, "last") for p in NEGATIVE])
    torch.testing.assert_close(vector.activations, positive.median(0).values - negative.median(0).values, rtol=1e-4, atol=1e-5)
    assert vector.coefficient == 2.0 and vector.hook_name == "blocks.1.hook_resid_pre"
    assert vector.source == {"method": "median", "token": "last", "positive_prompts": POSITIVE,
                             "negative_prompts": NEGATIVE, "rows": 3}
    mean = contrast_vector(tiny_llama, POSITIVE, NEGATIVE, 1, aggregator=mean_aggregator())
    torch.testing.assert_close(mean.activations, positive.mean(0) - negative.mean(0), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"contrast_vector: needs paired prompts .* 3 positive and 2 negative"):
        contrast_vector(tiny_llama, POSITIVE, NEGATIVE[:2], 1, aggregator=pca_aggregator(), paired=True)


def test_reading_errors_name_the_place_and_the_allowed_values(tiny_llama):
    with pytest.raises(ValueError, match=r"ContrastReading: token='first' is not allowed; use 'last' or 'mean'"):
        ContrastReading(token="first")
    with pytest.raises(ValueError, match=r"ContrastReading: positions='front' is not allowed"):
        ContrastReading(positions="front")
    with pytest.raises(ValueError, match=r"ContrastReading: batch_size must be a positive int, got 0"):
        ContrastReading(batch_size=0)
    with pytest.raises(ValueError, match=r"mean_difference: got reading=.* and also \{'token': 'mean'\}; pass the reading options in one place"):
        labkit.mean_difference(tiny_llama, POSITIVE, NEGATIVE, 1, token="mean", reading=ContrastReading())
    with pytest.raises(TypeError, match=r"pca_direction: reading must be a labkit.steering.ContrastReading, got dict"):
        labkit.pca_direction(tiny_llama, POSITIVE, NEGATIVE, 1, reading={"token": "mean"})
    with pytest.raises(TypeError, match=r"contrast_vector: reading must be"):
        contrast_vector(tiny_llama, POSITIVE, NEGATIVE, 1, aggregator=mean_aggregator(), reading="last")
