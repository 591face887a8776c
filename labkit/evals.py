"""Behaviour metrics: topic-word frequency, perplexity, refusal rate, exact match.

Pure functions over texts / token ids / models; the notebooks and
``labkit.moe.compare_conditions`` call them, the widgets show them.
"""

from __future__ import annotations

# --- steering metrics (ActAdd evaluation: topic frequency, perplexity) ---------------------

import json as _json
import math as _math
import re as _re
from collections.abc import Iterable as _Iterable
from collections.abc import Sequence as _Sequence
from dataclasses import dataclass as _dataclass
from pathlib import Path as _Path

_WORD = _re.compile(r"[a-z]+(?:'[a-z]+)?")
STEERING_DATA_DIR = _Path(__file__).resolve().parent.parent / "data" / "steering"


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
        >>> topic_word_fraction(["The bride and groom", "said hello"], ["bride", "groom"])
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


def perplexity(model, texts: str | _Sequence[str], *, steering=None, batch_size: int = 8) -> float:
    """Token-level perplexity of texts under the model, optionally steered.

    ``exp(mean negative log-likelihood)`` over every predicted token of every text (each text's
    first token is not predicted). ActAdd's off-target check (Turner et al. 2023, §4): held-out
    neutral text should be about as likely steered as unsteered. Runs the plain twin on
    left-padded batches; with ``steering`` the vectors are applied as in a prompt pass (an
    ActAdd vector lands on each text's first tokens, a direction on every token, except
    ``positions="generated"``, which never applies to a plain pass). Any steering context the
    caller has open applies too.

    Args:
        model: a labkit bridge.
        texts: a text or a list of texts, each at least two tokens long.
        steering: a ``SteeringVector``, a list of them, or ``None``.
        batch_size: texts per forward pass.

    Returns:
        The perplexity (≥ 1).

    Raises:
        ValueError: no texts, or a text shorter than two tokens.
    """
    import torch

    from labkit.models import hf_model_of, tokenizer_of
    from labkit.steering import steered

    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ValueError("perplexity: texts is empty; give at least one text.")
    tokenizer = tokenizer_of(model)
    twin = hf_model_of(model)
    device = next(twin.parameters()).device
    encoded = [tokenizer(text).input_ids for text in texts]
    for i, ids in enumerate(encoded):
        if len(ids) < 2:
            raise ValueError(f"perplexity: text {i} ({texts[i]!r}) has {len(ids)} token(s); need ≥ 2.")
    vectors = [] if steering is None else [steering]
    nll, count = 0.0, 0
    with steered(model, *vectors), torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            width = max(len(ids) for ids in chunk)
            pad = tokenizer.pad_token_id
            ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk], device=device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = twin(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
            logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            target = ids[:, 1:]
            token_nll = -logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            keep = (mask[:, :-1] * mask[:, 1:]).bool()
            nll += float(token_nll[keep].sum())
            count += int(keep.sum())
    return _math.exp(nll / count)


@_dataclass(frozen=True)
class SteeringData:
    """The steering evaluation data shipped under ``data/steering/`` (see its README).

    Attributes:
        topic_words: ``{topic: (word, ...)}``, e.g. ``"wedding"``, ``"love"``, ``"hate"``.
        neutral_prompts: sentence openings to complete under steering.
        heldout_texts: neutral paragraphs for the perplexity (off-target) check.
    """

    topic_words: dict[str, tuple[str, ...]]
    neutral_prompts: tuple[str, ...]
    heldout_texts: tuple[str, ...]


def load_steering_data(directory: str | _Path | None = None) -> SteeringData:
    """Load ``topic_words.json``, ``neutral_prompts.jsonl`` and ``heldout_neutral.jsonl``.

    Args:
        directory: defaults to the repository's ``data/steering``.

    Raises:
        FileNotFoundError: a file is missing (the message names it).
    """
    root = _Path(directory) if directory is not None else STEERING_DATA_DIR

    def read(name: str) -> str:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"load_steering_data: {str(path)!r} is missing.")
        return path.read_text()

    def jsonl(name: str, key: str) -> tuple[str, ...]:
        return tuple(_json.loads(line)[key] for line in read(name).splitlines() if line.strip())

    topics = {k: tuple(v) for k, v in _json.loads(read("topic_words.json")).items()}
    return SteeringData(
        topic_words=topics,
        neutral_prompts=jsonl("neutral_prompts.jsonl", "prompt"),
        heldout_texts=jsonl("heldout_neutral.jsonl", "text"),
    )


def topic_steering_sweep(
    model,
    plus: str,
    minus: str,
    *,
    layers: _Sequence[int],
    coefficients: _Sequence[float],
    prompts: _Sequence[str],
    topic_words: _Iterable[str],
    heldout_texts: _Sequence[str] = (),
    samples_per_prompt: int = 2,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 0.9,
    seed: int = 0,
):
    """ActAdd's topic measurement: topic-word fraction (and perplexity) against coefficient.

    For each layer and coefficient, build ``actadd(model, plus, minus, layer, coefficient)``,
    sample ``samples_per_prompt`` completions of every prompt (one seed for every setting, so
    settings differ only by the steering), and measure :func:`topic_word_fraction` and, if
    ``heldout_texts`` are given, :func:`perplexity` of them under the same vector. The
    unsteered baseline is a row with ``layer = -1`` and ``coefficient = 0``; coefficient 0 at
    any layer reuses it (a zero vector changes no token).

    Returns:
        A ``pandas.DataFrame`` with columns ``layer, coefficient, topic_fraction, perplexity,
        n_words``, the baseline row first.
    """
    import pandas as pd

    from labkit.generation import generate
    from labkit.steering import actadd

    topic = tuple(topic_words)
    batch = [p for p in prompts for _ in range(samples_per_prompt)]

    def measure(vector) -> dict:
        out = generate(
            model, batch, steering=vector, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, seed=seed,
        )
        ppl = perplexity(model, heldout_texts, steering=vector) if heldout_texts else float("nan")
        n_words = sum(len(words_of(t)) for t in out.texts)
        return {"topic_fraction": topic_word_fraction(out.texts, topic), "perplexity": ppl, "n_words": n_words}

    baseline = measure(None)
    rows = [{"layer": -1, "coefficient": 0.0, **baseline}]
    for layer in layers:
        base = actadd(model, plus, minus, layer, 1.0)
        for coefficient in coefficients:
            result = baseline if coefficient == 0 else measure(base.with_coefficient(coefficient))
            rows.append({"layer": int(layer), "coefficient": float(coefficient), **result})
    return pd.DataFrame(rows)


# --- behaviour detectors and task accuracy (MoTE evaluation: refusal rate, exact match) ----
