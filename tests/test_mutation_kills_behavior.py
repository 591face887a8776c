"""labkit.evals.behavior: value tests that kill mutation survivors (issue 22). Expected values come
from scipy (Wilson interval) or are spelled out by hand."""

from __future__ import annotations

import pytest

from labkit.evals import RefusalDetector, behavior_rate, exact_match_accuracy, normalize_answer, wilson_rate


def test_truncated_refusal_at_exactly_the_minimum_length():
    detector = RefusalDetector(phrases=("I cannot",), truncated_min_chars=4)
    assert detector("I ca") and detector("I ca ")  # 4 characters: counts
    assert not detector("I c")  # 3: too short
    assert RefusalDetector(phrases=("I cannot",), truncated_min_chars=1)("I")


@pytest.mark.parametrize("confidence", [0.8, 0.9, 0.95, 0.99])
def test_wilson_interval_equals_scipy(confidence):
    from scipy.stats import binomtest

    for count, n in [(0, 1), (1, 1), (1, 3), (2, 7), (5, 10), (13, 40), (39, 40), (0, 40)]:
        rate = wilson_rate(count, n, confidence=confidence)
        reference = binomtest(count, n).proportion_ci(confidence_level=confidence, method="wilson")
        assert rate.count == count and rate.n == n and rate.confidence == confidence
        assert rate.rate == pytest.approx(count / n)
        assert rate.ci_low == pytest.approx(reference.low, abs=1e-12)
        assert rate.ci_high == pytest.approx(reference.high, abs=1e-12)
    assert str(wilson_rate(1, 3, confidence=confidence)).endswith(" (1/3)")


def test_behavior_rate_and_accuracy_pass_their_confidence_on():
    texts = ["I cannot say", "Sure", "I can't", "ok"]
    rate = behavior_rate(texts, RefusalDetector(), confidence=0.8)
    assert (rate.count, rate.n, rate.confidence) == (2, 4, 0.8)
    assert (rate.ci_low, rate.ci_high) == pytest.approx(wilson_rate(2, 4, confidence=0.8).ci)
    accuracy = exact_match_accuracy(["Paris", "rome"], ["paris", "Oslo"], confidence=0.9)
    assert (accuracy.count, accuracy.n, accuracy.confidence) == (1, 2, 0.9)
    assert accuracy.ci == pytest.approx(wilson_rate(1, 2, confidence=0.9).ci)
    assert normalize_answer("   ") == "" and normalize_answer("A  b!?\nc") == "a b"
