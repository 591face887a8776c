"""Behaviour detectors and task accuracy (second section of labkit.evals)."""

from __future__ import annotations

import math

import pytest

from labkit.evals import (
    Rate,
    RefusalDetector,
    behavior_rate,
    exact_match_accuracy,
    normalize_answer,
    wilson_rate,
)


def test_refusal_detector_matches_intent_at_the_start():
    detector = RefusalDetector()
    assert detector("I cannot discuss that.")
    assert detector("  i can't help with that")
    assert detector("I cannot discuss that. Q: What is 2+3? A: 5")  # continuation after the refusal
    assert not detector("There was a flood. I cannot say more.")  # not at the start
    assert not detector("It was a parade.")
    assert not detector("")


def test_exact_string_comparison_miscounts_what_the_detector_counts():
    texts = ["I cannot discuss that.", " I cannot discuss that.", "I cannot disc", "I cannot talk about that."]
    exact = sum(text == "I cannot discuss that." for text in texts)
    assert exact == 1
    assert behavior_rate(texts, RefusalDetector(phrases=("I cannot",))).count == 4


def test_truncated_refusal_counts_only_when_configured():
    plain = RefusalDetector(phrases=("I cannot",))
    lenient = RefusalDetector(phrases=("I cannot",), truncated_min_chars=4)
    assert not plain("I cann") and lenient("I cann") and lenient("i cann  ")
    assert not lenient("I c")  # shorter than 4 characters
    assert not lenient("I can do that")  # diverges from the phrase: not a truncation


def test_patterns_case_and_strip_prefix():
    detector = RefusalDetector(phrases=(), patterns=(r"(sorry|unable)\b",), anywhere=True)
    assert detector("Well, I am unable to") and not detector("It was a parade.")
    strict = RefusalDetector(phrases=("I cannot",), case_sensitive=True)
    assert strict("I cannot") and not strict("i cannot")
    echo = RefusalDetector(phrases=("I cannot",), strip_prefix=r"A:")
    assert echo(" A: I cannot discuss that.")
    with pytest.raises(ValueError, match="invalid regex"):
        RefusalDetector(patterns=("(",))
    with pytest.raises(ValueError, match="at least one phrase or pattern"):
        RefusalDetector(phrases=(), patterns=())


def test_wilson_interval_known_values():
    rate = wilson_rate(1, 2)
    assert (round(rate.ci_low, 3), round(rate.ci_high, 3)) == (0.095, 0.905)
    zero = wilson_rate(0, 20)
    assert zero.rate == 0.0 and zero.ci_low == 0.0 and round(zero.ci_high, 3) == 0.161
    full = wilson_rate(20, 20)
    assert full.ci_high == 1.0 and round(full.ci_low, 3) == 0.839
    empty = wilson_rate(0, 0)
    assert math.isnan(empty.rate) and empty.ci == (0.0, 1.0)
    with pytest.raises(ValueError, match="count=3, n=2"):
        wilson_rate(3, 2)


def test_behavior_rate_accepts_any_callable():
    rate = behavior_rate(["a", "bb", "ccc", "dddd"], lambda text: len(text) > 2)
    assert isinstance(rate, Rate) and (rate.count, rate.n, rate.rate) == (2, 4, 0.5)
    assert rate.ci_low < 0.5 < rate.ci_high
    assert str(rate).startswith("0.500 [")


def test_exact_match_accuracy_normalisation():
    predictions = [" 7\nQ: next", "Paris.", "new  york", "Rome"]
    references = ["7", "paris", "New York", "Oslo"]
    assert exact_match_accuracy(predictions, references).count == 3
    assert exact_match_accuracy(predictions, references, normalize="strip").count == 0
    assert exact_match_accuracy(["7 "], ["7"], normalize="none").count == 0
    assert exact_match_accuracy(["x7"], ["7"], normalize=lambda s: s[-1]).count == 1
    assert normalize_answer("  The Cat sat.\nmore") == "the cat sat"
    with pytest.raises(ValueError, match="3 predictions but 2 references"):
        exact_match_accuracy(["a", "b", "c"], ["a", "b"])
    with pytest.raises(ValueError, match="normalize='lower'"):
        exact_match_accuracy(["a"], ["a"], normalize="lower")
