"""Behaviour metrics: topic-word frequency, perplexity, the topic probability and sweep, refusal rate, exact match.

Pure functions over texts / token ids / models, in four small modules: :mod:`~labkit.evals.text`
(topic-word frequency), :mod:`~labkit.evals.perplexity` (perplexity under steering),
:mod:`~labkit.evals.topic` (the steering data, the next-word topic probability, steerability, the
layer × coefficient sweep) and :mod:`~labkit.evals.behavior` (refusal detection, Wilson rates,
exact match). The notebooks and ``labkit.moe.compare_conditions`` call them, the widgets show them.
"""

from labkit.evals.text import words_of, topic_word_fraction
from labkit.evals.perplexity import perplexity, steering_perplexities
from labkit.evals.topic import SteeringData, load_steering_data, topic_token_sequences, topic_probability, steerability, topic_steering_sweep
from labkit.evals.behavior import DEFAULT_REFUSAL_PHRASES, RefusalDetector, Rate, wilson_rate, behavior_rate, normalize_answer, exact_match_accuracy

__all__ = [
    "words_of",
    "topic_word_fraction",
    "perplexity",
    "steering_perplexities",
    "SteeringData",
    "load_steering_data",
    "topic_token_sequences",
    "topic_probability",
    "steerability",
    "topic_steering_sweep",
    "DEFAULT_REFUSAL_PHRASES",
    "RefusalDetector",
    "Rate",
    "wilson_rate",
    "behavior_rate",
    "normalize_answer",
    "exact_match_accuracy",
]
