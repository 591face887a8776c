"""Topic-word frequency of generated text (ActAdd's sampled measure, Turner et al. 2023, §4)."""

from __future__ import annotations

import re as _re
from collections.abc import Iterable as _Iterable



_WORD = _re.compile(r"[a-z]+(?:'[a-z]+)?")


def words_of(text: str) -> list[str]:
    """Lower-case words of a text (letters and inner apostrophes), as the topic metric counts them."""
    return _WORD.findall(text.lower())


def topic_word_fraction(texts: str | _Iterable[str], topic_words: _Iterable[str]) -> float:
    """Fraction of all words in ``texts`` that are topic words (ActAdd's topic-steering metric).

    Turner et al. 2023 (§4, the "wedding" experiment) steer with ``" wedding" - " "`` and report
    the frequency of wedding-related words in completions of neutral prompts against the
    coefficient. This counts whole lower-case words: ``sum(topic words) / sum(words)`` pooled
    over all texts (long and short completions weigh by their length).

    Args:
        texts: a completion or a list of completions.
        topic_words: the topic's words (case-insensitive, whole words).

    Returns:
        A fraction in [0, 1]; 0.0 when the texts hold no words.

    Example:
        >>> topic_word_fraction(["The bride and groom", "smiled"], ["bride", "groom"])
        0.4
    """
    if isinstance(texts, str):
        texts = [texts]
    topic = {word.lower() for word in topic_words}
    if not topic:
        raise ValueError("topic_word_fraction: topic_words is empty; give at least one word.")
    total = hits = 0
    for text in texts:
        words = words_of(text)
        total += len(words)
        hits += sum(word in topic for word in words)
    return hits / total if total else 0.0


