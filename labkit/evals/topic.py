"""The steering data and the deterministic topic measure: next-word topic probability, steerability, the layer × coefficient sweep."""

from __future__ import annotations

import copy as _copy
import json as _json
from collections.abc import Iterable as _Iterable
from collections.abc import Sequence as _Sequence
from dataclasses import dataclass as _dataclass
from dataclasses import field as _field
from pathlib import Path as _Path

from labkit.datasets import data_dir
from labkit.evals.perplexity import steering_perplexities
from labkit.evals.text import topic_word_fraction, words_of

@_dataclass(frozen=True)
class SteeringData:
    """The steering evaluation data shipped under ``data/steering/`` (see its README).

    Attributes:
        topic_words: ``{topic: (word, ...)}``, e.g. ``"wedding"``, ``"love"``, ``"hate"``.
        neutral_prompts: sentence openings to complete under steering.
        heldout_texts: neutral paragraphs for the perplexity (off-target) check.
        contrast_pairs: ``{topic: (positives, negatives)}`` for :func:`labkit.mean_difference`.
        topic_texts: ``{topic: (paragraph, ...)}``, on-topic paragraphs: their perplexity under a
            topic vector falls where the vector adds the topic (Turner et al. 2023, §4).
    """

    topic_words: dict[str, tuple[str, ...]]
    neutral_prompts: tuple[str, ...]
    heldout_texts: tuple[str, ...]
    contrast_pairs: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]
    topic_texts: dict[str, tuple[str, ...]] = _field(default_factory=dict)


def load_steering_data(directory: str | _Path | None = None) -> SteeringData:
    """Load ``topic_words.json``, ``neutral_prompts.jsonl``, ``heldout_neutral.jsonl``, ``contrast_pairs.jsonl``, ``topic_texts.jsonl``.

    Args:
        directory: defaults to ``data/steering`` of the data folder (:func:`labkit.datasets.data_dir`).

    Raises:
        FileNotFoundError: a file is missing (the message names it).
    """
    root = _Path(directory) if directory is not None else data_dir() / "steering"

    def read(name: str) -> str:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"load_steering_data: {str(path)!r} is missing.")
        return path.read_text()

    def jsonl(name: str, key: str) -> tuple[str, ...]:
        return tuple(_json.loads(line)[key] for line in read(name).splitlines() if line.strip())

    topics = {k: tuple(v) for k, v in _json.loads(read("topic_words.json")).items()}
    pairs: dict[str, tuple[list[str], list[str]]] = {}
    for line in read("contrast_pairs.jsonl").splitlines():
        if line.strip():
            row = _json.loads(line)
            positives, negatives = pairs.setdefault(row["topic"], ([], []))
            positives.append(row["positive"])
            negatives.append(row["negative"])
    topic_texts: dict[str, list[str]] = {}
    for line in read("topic_texts.jsonl").splitlines():
        if line.strip():
            row = _json.loads(line)
            topic_texts.setdefault(row["topic"], []).append(row["text"])
    return SteeringData(
        topic_words=topics,
        neutral_prompts=jsonl("neutral_prompts.jsonl", "prompt"),
        heldout_texts=jsonl("heldout_neutral.jsonl", "text"),
        contrast_pairs={k: (tuple(p), tuple(n)) for k, (p, n) in pairs.items()},
        topic_texts={k: tuple(v) for k, v in topic_texts.items()},
    )


def topic_token_sequences(tokenizer, topic_words: _Iterable[str]) -> list[tuple[int, ...]]:
    """The token sequences that spell a topic word after a space, sorted; none begins another.

    Each word's word-initial forms ``" " + word`` and ``" " + Word``, as the tokenizer splits
    them: ``" wedding"`` may be one token and ``" Wedding"`` two (``ĠWed``, ``ding``). A form
    whose tokens begin with another form's tokens is dropped (the shorter form's probability
    already contains it), so the sequences are disjoint events and their probabilities add.

    Args:
        tokenizer: a Hugging Face tokenizer.
        topic_words: the topic's words.

    Returns:
        Sorted tuples of token ids, one per kept form (at least one token each).

    Raises:
        ValueError: no topic words.
    """
    words = [w.strip() for w in topic_words if w.strip()]
    if not words:
        raise ValueError("topic_token_sequences: topic_words is empty; give the topic's words.")
    forms = set()
    for word in words:
        for form in (" " + word, " " + word[:1].upper() + word[1:]):
            encoded = tuple(int(t) for t in tokenizer(form, add_special_tokens=False).input_ids)
            if encoded:
                forms.add(encoded)
    return sorted(f for f in forms if not any(len(g) < len(f) and f[: len(g)] == g for g in forms))


def _check_topic_context(model, encoded: _Sequence[_Sequence[int]], prefixes: _Sequence[tuple[int, ...]]) -> None:
    """Refuse a prompt that, with the longest topic-word prefix after it, overruns the context window.

    The forward passes read the prompt's tokens and then a form's tokens but its last, so the
    positions used are ``len(prompt) + len(longest prefix)``; past the window the probabilities
    would be computed at positions the model never saw (a number, silently wrong).
    """
    from labkit.models import check_context, context_length

    check_context(model, [len(ids) for ids in encoded], caller="topic_probability")
    longest = max((len(p) for p in prefixes), default=0)
    n_ctx = context_length(model)
    if not longest or n_ctx is None:
        return
    for i, ids in enumerate(encoded):
        if len(ids) + longest > n_ctx:
            raise ValueError(
                f"topic_probability: prompts[{i}] is {len(ids)} tokens and the longest topic-word form in "
                f"topic_words needs {longest} more tokens after it ({len(ids) + longest} in all); the model's "
                f"context window is {n_ctx} tokens. Shorten the prompt or drop the long topic word."
            )


def topic_probability(
    model,
    prompts: _Sequence[str],
    topic_words: _Iterable[str],
    settings: _Sequence,
    *,
    batch_size: int = 256,
    prepend_bos: bool | None = None,
) -> list[float]:
    """Probability that the next word is a topic word, per steering setting (deterministic).

    For each prompt, the probability (under the setting's steering) that the tokens after the
    prompt spell one of the topic's word forms (:func:`topic_token_sequences`): for a form of
    tokens ``t_1 … t_n``, ``∏_j P(t_j | prompt, t_<j)``, summed over the forms, then averaged
    over prompts. Multi-token forms are scored through their tokens, with steering applied to
    ``t_<j`` as in generation (they are generated positions: ``positions="prompt"`` does not
    reach them, ``"generated"`` does), so a word the tokenizer splits counts as that word, never
    as its first fragment. It is the expectation, at the next word, of what the topic-word
    fraction of Turner et al. 2023 (§4) counts in samples: no sampling noise, so a sweep over
    layer × coefficient can tell a 1.5× effect from none with a handful of prompts, where
    sampled fractions of a few hundred words cannot. A form is counted whatever follows it
    (``" wed"`` followed by ``"nesday"`` would count), a small overcount where a form is also
    the start of other words. All settings share batches (``labkit.steered(model, rows=...)``).

    Args:
        model: a labkit bridge.
        prompts: neutral prompts (non-empty strings).
        topic_words: the topic's words.
        settings: one entry per setting: a ``SteeringVector``, a list of them, or ``None``.
        batch_size: rows per forward pass of the forms' later tokens (one row per setting,
            prompt and distinct multi-token prefix; the prompt pass takes ``batch_size // prefixes``).
        prepend_bos: override the model's BOS rule (``None`` keeps it).

    Returns:
        One probability in ``[0, 1]`` per setting, in order.

    Raises:
        ValueError: no prompts, settings or topic words; ``batch_size < 1``; a prompt longer
            than the context window, or one that with the longest topic-word form's prefix after
            it (all of a form's tokens but its last) is; what :func:`labkit.steered` raises for a
            vector that does not fit.
    """
    import torch

    from labkit.models import encode_prompts, lab_model, left_pad, tokenizer_of
    from labkit.steering import steered

    settings = list(settings)
    if not settings:
        raise ValueError("topic_probability: settings is empty; give at least one (None = unsteered).")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"topic_probability: batch_size must be a positive int, got {batch_size!r}.")
    sequences = topic_token_sequences(tokenizer_of(model), topic_words)
    prompts, encoded = encode_prompts(model, prompts, caller="topic_probability", prepend_bos=prepend_bos)
    # The prompt runs once per (setting, prompt) with a KV cache; the cache is then repeated for
    # each distinct multi-token prefix, whose tokens run as generated positions after it.
    finals: dict[tuple[int, ...], list[int]] = {}
    for seq in sequences:
        finals.setdefault(seq[:-1], []).append(seq[-1])
    prefixes = sorted((p for p in finals if p), key=lambda p: (len(p), p))
    _check_topic_context(model, encoded, prefixes)
    rows = [(k, i) for k in range(len(settings)) for i in range(len(encoded))]
    step = max(1, batch_size // max(1, len(prefixes)))
    record = lab_model(model)
    device = next(record.twin.parameters()).device
    pad = record.tokenizer.pad_token_id
    total = [0.0] * len(settings)
    with torch.no_grad():
        for start in range(0, len(rows), step):
            chunk = rows[start:start + step]
            row_settings = [settings[k] for k, _ in chunk]
            ids, mask, positions = left_pad([encoded[i] for _, i in chunk], pad, device)
            width = int(ids.shape[1])  # every prompt ends here; prefix tokens are generated positions
            with steered(model, rows=row_settings), record.generating(width):
                out = record.twin(input_ids=ids, attention_mask=mask, position_ids=positions,
                                  use_cache=bool(prefixes), logits_to_keep=1)
            first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (rows, vocab)
            for row, (k, _) in enumerate(chunk):
                if () in finals:
                    total[k] += float(first[row, finals[()]].exp().sum())
            if not prefixes:
                continue
            for length in sorted({len(p) for p in prefixes}):  # one tail width per pass, no padding
                group = [p for p in prefixes if len(p) == length]
                n = len(group)
                cache = _copy.deepcopy(out.past_key_values)
                cache.reorder_cache(torch.arange(len(chunk), device=device).repeat_interleave(n))
                tail = torch.tensor([p for _ in chunk for p in group], dtype=torch.long, device=device)
                tail_positions = mask.sum(-1).repeat_interleave(n)[:, None] + torch.arange(length, device=device)
                with steered(model, rows=[s for s in row_settings for _ in range(n)]), record.generating(width):
                    later = record.twin(input_ids=tail, attention_mask=torch.cat([mask.repeat_interleave(n, 0), torch.ones_like(tail)], 1),
                                        position_ids=tail_positions, past_key_values=cache, use_cache=True).logits
                later = torch.log_softmax(later.float(), dim=-1)  # (rows × prefixes, length, vocab)
                for row, (k, _) in enumerate(chunk):
                    for j, p in enumerate(group):
                        r = row * n + j
                        logp = float(first[row, p[0]]) + sum(float(later[r, m - 1, p[m]]) for m in range(1, length))
                        total[k] += float((logp + later[r, length - 1, finals[p]]).exp().sum())
    return [t / len(encoded) for t in total]


def steerability(per_prompt) -> "pandas.DataFrame":
    """Per-prompt steerability and the anti-steerable fraction (Tan et al. 2024), per vector.

    "Analyzing the generalization and reliability of steering vectors" (Tan et al. 2024, §3)
    measures, for each prompt, the slope of the behaviour's propensity against the steering
    multiplier, and reports the fraction of prompts whose slope is negative — prompts the vector
    moves the *wrong way* (anti-steerable), which a mean over prompts hides. Here the
    propensity is the prompt's topic-word fraction (pooled over its samples), and the slope is
    the least-squares slope over the swept coefficients, with the unsteered run as coefficient 0.

    Args:
        per_prompt: the per-prompt table of :func:`topic_steering_sweep` (``per_prompt=True``):
            columns ``method, layer, coefficient, prompt, topic_fraction``; the unsteered rows
            have ``method="unsteered"``.

    Returns:
        A ``pandas.DataFrame``, one row per (method, layer, prompt): ``slope`` (topic fraction
        per unit coefficient). Summaries: ``(frame.slope < 0).mean()`` per vector is the
        anti-steerable fraction.

    Raises:
        ValueError: the table lacks the unsteered rows or a column.
    """
    import numpy as np
    import pandas as pd

    need = {"method", "layer", "coefficient", "prompt", "topic_fraction"}
    if not need <= set(per_prompt.columns):
        raise ValueError(f"steerability: per_prompt needs columns {sorted(need)}, got {list(per_prompt.columns)}.")
    base = per_prompt[per_prompt.method == "unsteered"].set_index("prompt")["topic_fraction"]
    if base.empty:
        raise ValueError("steerability: per_prompt has no unsteered rows (method='unsteered').")
    rows = []
    for (method, layer, prompt), group in per_prompt[per_prompt.method != "unsteered"].groupby(
        ["method", "layer", "prompt"], sort=False
    ):
        group = group[group.coefficient != 0]
        x = np.concatenate([[0.0], group.coefficient.to_numpy(float)])
        y = np.concatenate([[float(base[prompt])], group.topic_fraction.to_numpy(float)])
        slope = float(np.polyfit(x, y, 1)[0]) if len(set(x)) > 1 else float("nan")
        rows.append({"method": method, "layer": layer, "prompt": prompt, "slope": slope})
    return pd.DataFrame(rows, columns=["method", "layer", "prompt", "slope"])


def _describe_vector(vector) -> tuple[str, int]:
    """``(method, layer)`` of a vector or a list of vectors (layer ``-1``: several layers or none)."""
    first = vector[0] if isinstance(vector, (list, tuple)) else vector
    method = first.source.get("method", "custom")
    layer = -1 if (isinstance(vector, (list, tuple)) and len(vector) > 1) or first.layer is None else first.layer
    return method, layer


def _scaled(vector, coefficient: float):
    """The vector (or each vector of a list) at ``coefficient``."""
    if isinstance(vector, (list, tuple)):
        return [v.with_coefficient(coefficient) for v in vector]
    return vector.with_coefficient(coefficient)


def _sweep_settings(vectors, coefficients) -> tuple[list, list[tuple[str, int, float, int]]]:
    """The steering settings of a sweep and a label per (vector, coefficient).

    Setting 0 is unsteered (every zero coefficient points at it); then one per vector and
    non-zero coefficient. Labels are ``(method, layer, coefficient, setting index)``.
    """
    settings: list = [None]
    labels: list[tuple[str, int, float, int]] = []
    for vector in vectors:
        method, layer = _describe_vector(vector)
        for coefficient in coefficients:
            if coefficient == 0:
                labels.append((method, layer, 0.0, 0))
            else:
                settings.append(_scaled(vector, float(coefficient)))
                labels.append((method, layer, float(coefficient), len(settings) - 1))
    return settings, labels


def topic_steering_sweep(
    model,
    vectors,
    coefficients: _Sequence[float],
    *,
    prompts: _Sequence[str],
    topic_words: _Iterable[str],
    heldout_texts: _Sequence[str] = (),
    samples_per_prompt: int = 2,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 0.9,
    seed: int = 0,
    batch_size: int = 96,
    per_prompt: bool = False,
):
    """ActAdd's topic measurement: topic-word fraction (and perplexity) against coefficient.

    The signature experiment of Turner et al. 2023 (§4): for each steering vector (e.g. one
    ``actadd(model, " wedding", " ", layer)`` per layer) and each coefficient, sample
    ``samples_per_prompt`` completions of every neutral prompt, and measure
    :func:`topic_word_fraction` and, if ``heldout_texts`` are given, the off-target cost:
    perplexity of held-out text under the same vector (:func:`steering_perplexities`). The
    unsteered baseline is the first row (``method="unsteered"``, ``layer=-1``,
    ``coefficient=0``); coefficient 0 reuses it (a zero vector changes no token).

    The whole sweep is one batch: every (setting, prompt, sample) is a row of batched
    ``labkit.generate`` calls (``steering_per_row``; at most ``batch_size`` rows per call), so
    a sweep of ``K`` settings costs about one generation over ``K ×`` the rows, not ``K``
    generations. Sampled rows draw their own random numbers (one ``seed`` per call), so a
    setting's texts are not the same draws as a solo run of that setting; greedy rows
    (``temperature=0``) equal their solo runs exactly.

    With every sweep comes the per-prompt steerability (:func:`steerability`): the column
    ``anti_steerable_fraction`` is, for each vector, the fraction of prompts whose topic
    fraction falls with the coefficient (Tan et al. 2024), so a mean does not hide them.

    Args:
        model: a labkit bridge.
        vectors: a ``SteeringVector`` or a list of them (a list entry may itself be a list of
            vectors applied together, e.g. :func:`labkit.directional_ablation`); each is swept
            over ``coefficients`` (its own coefficient is replaced).
        coefficients: the coefficients to try.
        prompts: neutral prompts to complete.
        topic_words: the topic's words.
        heldout_texts: neutral texts for perplexity (empty: perplexity is NaN).
        samples_per_prompt, max_new_tokens, temperature, top_p, seed: sampling settings.
        batch_size: rows per batched generate call.
        per_prompt: also return the per-prompt table.

    Returns:
        A ``pandas.DataFrame`` with columns ``method, layer, coefficient, topic_fraction,
        perplexity, n_words, anti_steerable_fraction`` (``n_words``: words in all completions
        of the setting; ``anti_steerable_fraction`` NaN on the unsteered row). With
        ``per_prompt=True``, ``(table, per_prompt_table)``; the latter has columns ``method,
        layer, coefficient, prompt, topic_fraction, n_words``.

    Raises:
        ValueError: no prompts, ``samples_per_prompt < 1`` or ``batch_size < 1``, and what
            :func:`labkit.generate` raises.
    """
    import pandas as pd

    from labkit.generation import generate
    from labkit.steering import SteeringVector

    vectors = [vectors] if isinstance(vectors, SteeringVector) else list(vectors)
    topic = tuple(topic_words)
    from labkit.checks import check_prompts

    prompts = check_prompts(prompts, caller="topic_steering_sweep")
    for name, value in (("samples_per_prompt", samples_per_prompt), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"topic_steering_sweep: {name} must be a positive int, got {value!r}.")

    settings, labels = _sweep_settings(vectors, coefficients)
    rows = [(k, p) for k in range(len(settings)) for p in range(len(prompts)) for _ in range(samples_per_prompt)]
    texts: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        out = generate(
            model, [prompts[p] for _, p in chunk], steering_per_row=[settings[k] for k, _ in chunk],
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
        )
        texts.extend(out.texts)
    by_setting: dict[int, list[str]] = {}
    by_prompt: dict[tuple[int, int], list[str]] = {}
    for (k, p), text in zip(rows, texts):
        by_setting.setdefault(k, []).append(text)
        by_prompt.setdefault((k, p), []).append(text)
    ppl = steering_perplexities(model, heldout_texts, settings) if heldout_texts else [float("nan")] * len(settings)

    def measure(k: int) -> dict:
        n_words = sum(len(words_of(t)) for t in by_setting[k])
        return {"topic_fraction": topic_word_fraction(by_setting[k], topic), "perplexity": ppl[k], "n_words": n_words}

    prompt_rows = []
    for method, layer, coefficient, k in [("unsteered", -1, 0.0, 0), *labels]:
        for p, prompt in enumerate(prompts):
            group = by_prompt[(k, p)]
            prompt_rows.append({
                "method": method, "layer": layer, "coefficient": coefficient, "prompt": prompt,
                "topic_fraction": topic_word_fraction(group, topic), "n_words": sum(len(words_of(t)) for t in group),
            })
    prompt_table = pd.DataFrame(prompt_rows)
    slopes = steerability(prompt_table)
    anti = {key: float((group.slope < 0).mean()) for key, group in slopes.groupby(["method", "layer"])}

    table_rows = [{"method": "unsteered", "layer": -1, "coefficient": 0.0, **measure(0), "anti_steerable_fraction": float("nan")}]
    for method, layer, coefficient, k in labels:
        table_rows.append({
            "method": method, "layer": layer, "coefficient": coefficient, **measure(k),
            "anti_steerable_fraction": anti.get((method, layer), float("nan")),
        })
    table = pd.DataFrame(table_rows)
    return (table, prompt_table) if per_prompt else table


