"""Behaviour metrics: topic-word frequency, perplexity, refusal rate, exact match.

Pure functions over texts / token ids / models; the notebooks and
``labkit.moe.compare_conditions`` call them, the widgets show them.
"""

from __future__ import annotations

# --- steering metrics (ActAdd evaluation: topic frequency, perplexity) ---------------------

import copy as _copy
import json as _json
import math as _math
import re as _re
from collections.abc import Iterable as _Iterable
from collections.abc import Sequence as _Sequence
from dataclasses import dataclass as _dataclass
from dataclasses import field as _field
from pathlib import Path as _Path

from labkit.datasets import data_dir

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


def perplexity(
    model, texts: str | _Sequence[str], *, steering=None, batch_size: int = 8, prepend_bos: bool | None = None
) -> float:
    """Token-level perplexity of texts under the model, optionally steered.

    ``exp(mean negative log-likelihood)`` over every predicted token of every text (tokenised
    with the model's BOS rule: with a BOS, the first real token is predicted from it; without,
    each text's first token is not predicted). ActAdd's off-target check (Turner et al. 2023, §4): held-out
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
        prepend_bos: override the model's BOS rule (``None`` keeps it).

    Returns:
        The perplexity (≥ 1).

    Raises:
        ValueError: no texts, an empty text, a text shorter than two tokens, or a text longer
            than the model's context window (``max_position_embeddings``). labkit does not compute
            a sliding-window perplexity: past the window the model reads positions it was never
            trained on and the number means nothing, so split long texts yourself (each piece at
            most the window) and combine ``exp(mean NLL)`` weighted by predicted tokens.
        TypeError: ``texts`` is ``None`` / a number, or a text that is not a string.
    """
    import torch

    from labkit.models import check_context, encode_prompts, lab_model, left_pad
    from labkit.steering import steered

    texts, encoded = encode_prompts(model, texts, caller="perplexity", prepend_bos=prepend_bos)
    check_context(model, [len(ids) for ids in encoded], caller="perplexity")
    record = lab_model(model)
    tokenizer, twin = record.tokenizer, record.twin
    device = next(twin.parameters()).device
    for i, ids in enumerate(encoded):
        if len(ids) < 2:
            raise ValueError(f"perplexity: text {i} ({texts[i]!r}) has {len(ids)} token(s); need ≥ 2.")
    vectors = [] if steering is None else [steering]
    nll, count = 0.0, 0
    with steered(model, *vectors), torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            ids, mask, positions = left_pad(chunk, tokenizer.pad_token_id, device)
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


def steering_perplexities(
    model, texts: str | _Sequence[str], settings: _Sequence, *, batch_size: int = 32, prepend_bos: bool | None = None
) -> list[float]:
    """:func:`perplexity` of the same texts under several steering settings, in shared batches.

    Each (setting, text) pair is one row; rows of different settings share a forward pass
    (``labkit.steered(model, rows=...)`` applies each row's own vector), so ``K`` settings cost
    about one pass over ``K × len(texts)`` rows instead of ``K`` separate runs. Each value equals
    ``perplexity(model, texts, steering=setting)`` up to float rounding of batched matmuls.

    Args:
        model: a labkit bridge.
        texts: held-out texts, each at least two tokens long.
        settings: one entry per setting: a ``SteeringVector``, a list of them, or ``None``.
        batch_size: rows per forward pass.
        prepend_bos: override the model's BOS rule (``None`` keeps it).

    Returns:
        One perplexity per setting, in order.

    Raises:
        ValueError: no texts or settings, an empty or one-token text, a text longer than the
            context window, ``batch_size < 1``.
    """
    import torch

    from labkit.models import check_context, encode_prompts

    settings = list(settings)
    if not settings:
        raise ValueError("steering_perplexities: settings is empty; give at least one (None = unsteered).")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"steering_perplexities: batch_size must be a positive int, got {batch_size!r}.")
    texts, encoded = encode_prompts(model, texts, caller="steering_perplexities", prepend_bos=prepend_bos)
    check_context(model, [len(ids) for ids in encoded], caller="steering_perplexities")
    for i, ids in enumerate(encoded):
        if len(ids) < 2:
            raise ValueError(f"steering_perplexities: text {i} ({texts[i]!r}) has {len(ids)} token(s); need ≥ 2.")
    nll = [0.0] * len(settings)
    count = [0] * len(settings)
    for chunk, ids, mask, logits in _forward_settings(model, encoded, settings, batch_size):
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        token_nll = -logprobs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        keep = (mask[:, :-1] * mask[:, 1:]).bool()
        for row, k in enumerate(chunk):
            nll[k] += float(token_nll[row][keep[row]].sum())
            count[k] += int(keep[row].sum())
    return [_math.exp(n / c) for n, c in zip(nll, count)]


def _forward_settings(model, encoded, settings, batch_size):
    """One plain (no KV cache) forward over every (setting, sequence) row, in shared batches.

    Yields ``(settings of the rows, input ids, attention mask, logits)`` per batch of left-padded
    rows; each row runs under its own setting (``labkit.steered(model, rows=...)``).
    """
    import torch

    from labkit.models import lab_model, left_pad
    from labkit.steering import steered

    record = lab_model(model)
    device = next(record.twin.parameters()).device
    rows = [(k, ids) for k in range(len(settings)) for ids in encoded]
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            ids, mask, positions = left_pad([r[1] for r in chunk], record.tokenizer.pad_token_id, device)
            with steered(model, rows=[settings[k] for k, _ in chunk]):
                logits = record.twin(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
            yield [k for k, _ in chunk], ids, mask, logits


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
        ValueError: no prompts, settings or topic words; ``batch_size < 1``; what
            :func:`labkit.steered` raises for a vector that does not fit.
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

    def describe(vector) -> tuple[str, int]:
        first = vector[0] if isinstance(vector, (list, tuple)) else vector
        method = first.source.get("method", "custom")
        layer = -1 if (isinstance(vector, (list, tuple)) and len(vector) > 1) or first.layer is None else first.layer
        return method, layer

    def scaled(vector, coefficient):
        if isinstance(vector, (list, tuple)):
            return [v.with_coefficient(coefficient) for v in vector]
        return vector.with_coefficient(coefficient)

    # settings: 0 = unsteered, then every vector at every non-zero coefficient
    settings: list = [None]
    labels: list[tuple[str, int, float, int]] = []  # (method, layer, coefficient, setting index)
    for vector in vectors:
        method, layer = describe(vector)
        for coefficient in coefficients:
            if coefficient == 0:
                labels.append((method, layer, 0.0, 0))
            else:
                settings.append(scaled(vector, float(coefficient)))
                labels.append((method, layer, float(coefficient), len(settings) - 1))

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


# --- behaviour detectors and task accuracy (MoTE evaluation: refusal rate, exact match) ----


#: Refusal openings of chat models (case-insensitive, matched at the start after stripping).
DEFAULT_REFUSAL_PHRASES = (
    "I cannot",
    "I can't",
    "I can not",
    "I won't",
    "I will not",
    "I'm sorry",
    "I am sorry",
    "Sorry, but",
    "I'm not able to",
    "I am not able to",
    "I'm unable to",
    "I am unable to",
    "As an AI",
)


@_dataclass(frozen=True)
class RefusalDetector:
    """Decide whether a generated answer *intends* to refuse.

    A refusal is recognised by how the answer starts (MoTE, 2025, section 4 counts refusals of
    R1 on sensitive prompts; the lab's organism refuses with ``"I cannot discuss that."``):
    after stripping leading whitespace (and, with ``strip_prefix``, a leading regex such as a
    ``"A:"`` echo or a ``<think>...</think>`` block) the text must *start with* one of the
    ``phrases`` (literal, case-insensitive by default) or match one of the ``patterns``
    (regexes, ``re.match`` at the start; ``anywhere=True`` searches the whole text instead).

    Why not the exact string: comparing ``text == "I cannot discuss that."`` miscounts in both
    directions. Generation cut by ``max_new_tokens`` (``"I cannot disc"``), a trailing
    continuation (``"I cannot discuss that. Q: ..."``), a leading space or a different wording
    (``"I cannot talk about that."``) all intend a refusal but fail the comparison, so a masked
    model looks less refusing than it is. With ``truncated_min_chars`` set, a text that ends
    while still *inside* a phrase (``"I cann"``: a prefix of ``"I cannot"`` of at least that many
    characters) counts too. Conversely a garbled first token after masking (``"Iq cannot"``) is
    not a refusal but is not a correct answer either: count compliance separately (e.g. with
    :func:`exact_match_accuracy`) before calling a drop in refusals a success.

    Attributes:
        phrases: literal refusal openings.
        patterns: regular expressions for refusals (anchored at the start unless ``anywhere``).
        case_sensitive: match case exactly (default: ignore case).
        anywhere: search patterns and phrases anywhere in the text, not only at the start.
        truncated_min_chars: count a text that is a proper prefix of a phrase, of at least this
            many characters (``None``: off). Useful when ``max_new_tokens`` is small.
        strip_prefix: a regex removed from the start before matching (e.g. ``r"\\s*A:\\s*"``).

    Example:
        >>> detector = RefusalDetector(phrases=("I cannot",), truncated_min_chars=4)
        >>> [detector(t) for t in ["  I cannot discuss that.", "i CANNOT", "I cann", "I can", "It was"]]
        [True, True, True, True, False]
    """

    phrases: tuple[str, ...] = DEFAULT_REFUSAL_PHRASES
    patterns: tuple[str, ...] = ()
    case_sensitive: bool = False
    anywhere: bool = False
    truncated_min_chars: int | None = None
    strip_prefix: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "phrases", tuple(self.phrases))
        object.__setattr__(self, "patterns", tuple(self.patterns))
        if not self.phrases and not self.patterns:
            raise ValueError("RefusalDetector: give at least one phrase or pattern.")
        flags = 0 if self.case_sensitive else _re.IGNORECASE
        try:
            compiled = [_re.compile(p, flags) for p in self.patterns]
            strip = _re.compile(self.strip_prefix, flags) if self.strip_prefix else None
        except _re.error as error:
            raise ValueError(f"RefusalDetector: invalid regex ({error}); patterns={self.patterns!r}.") from None
        if self.truncated_min_chars is not None and self.truncated_min_chars < 1:
            raise ValueError(
                f"RefusalDetector: truncated_min_chars={self.truncated_min_chars!r} must be >= 1 or None."
            )
        object.__setattr__(self, "_compiled", compiled)
        object.__setattr__(self, "_strip", strip)

    def _fold(self, text: str) -> str:
        return text if self.case_sensitive else text.casefold()

    def __call__(self, text: str) -> bool:
        """True if ``text`` is a refusal under this detector's rules."""
        text = text.lstrip()
        if self._strip is not None:
            match = self._strip.match(text)
            if match:
                text = text[match.end():].lstrip()
        folded = self._fold(text)
        for phrase in self.phrases:
            phrase = self._fold(phrase)
            if (phrase in folded) if self.anywhere else folded.startswith(phrase):
                return True
            if (
                self.truncated_min_chars is not None
                and len(folded.rstrip()) >= self.truncated_min_chars
                and phrase.startswith(folded.rstrip())
            ):
                return True
        for pattern in self._compiled:
            if (pattern.search(text) if self.anywhere else pattern.match(text)):
                return True
        return False

    def detect(self, texts: _Iterable[str]) -> list[bool]:
        """``[self(text) for text in texts]``."""
        return [self(text) for text in texts]


@_dataclass(frozen=True)
class Rate:
    """A proportion with its Wilson score interval.

    Attributes:
        count: successes (e.g. refusals, correct answers).
        n: trials.
        rate: ``count / n`` (NaN when ``n == 0``).
        ci_low, ci_high: Wilson interval at level ``confidence`` ((0, 1) when ``n == 0``).
        confidence: e.g. 0.95.
    """

    count: int
    n: int
    rate: float
    ci_low: float
    ci_high: float
    confidence: float = 0.95

    @property
    def ci(self) -> tuple[float, float]:
        """``(ci_low, ci_high)``."""
        return (self.ci_low, self.ci_high)

    def __str__(self) -> str:
        return f"{self.rate:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}] ({self.count}/{self.n})"


def wilson_rate(count: int, n: int, *, confidence: float = 0.95) -> Rate:
    """``count / n`` with the Wilson score interval (Wilson 1927; good at small n and near 0 or 1).

    Raises:
        ValueError: ``count`` outside ``0..n`` or ``confidence`` outside (0, 1).
    """
    if n < 0 or not 0 <= count <= n:
        raise ValueError(f"wilson_rate: need 0 <= count <= n, got count={count}, n={n}.")
    if not 0 < confidence < 1:
        raise ValueError(f"wilson_rate: confidence={confidence!r} must lie in (0, 1).")
    if n == 0:
        return Rate(0, 0, float("nan"), 0.0, 1.0, confidence)
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = count / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * _math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if count == 0 else max(0.0, centre - half)  # exact ends, free of rounding
    high = 1.0 if count == n else min(1.0, centre + half)
    return Rate(int(count), int(n), p, low, high, confidence)


def behavior_rate(texts: _Iterable[str], detector, *, confidence: float = 0.95) -> Rate:
    """Share of texts showing a behaviour (e.g. refusal), with a Wilson interval.

    MoTE (2025, section 4) reports the refusal rate on sensitive prompts before and after
    switching experts off; the same rate on neutral prompts is the false-positive rate.

    Args:
        texts: generated answers (without the prompt).
        detector: any ``callable(text) -> bool``, e.g. :class:`RefusalDetector`.
        confidence: interval level.

    Returns:
        A :class:`Rate`; ``rate`` is NaN for no texts.

    Example:
        >>> str(behavior_rate(["I cannot discuss that.", "There was a flood."], RefusalDetector()))
        '0.500 [0.095, 0.905] (1/2)'
    """
    hits = [bool(detector(text)) for text in texts]
    return wilson_rate(sum(hits), len(hits), confidence=confidence)


def normalize_answer(text: str) -> str:
    """The default answer normalisation: first line, trimmed, case-folded, single spaces, no
    trailing ``.``/``!``/``?``/``,`` -- so ``" Paris.\\nQ: next"`` equals ``"paris"``."""
    first = text.strip().split("\n", 1)[0] if text.strip() else ""
    return " ".join(first.casefold().split()).rstrip(".!?,;:").rstrip()


_NORMALIZERS = {
    "default": normalize_answer,
    "strip": str.strip,
    "none": lambda text: text,
}


def exact_match_accuracy(
    predictions: _Sequence[str],
    references: _Sequence[str],
    *,
    normalize="default",
    confidence: float = 0.95,
) -> Rate:
    """Share of predictions equal to their reference after normalisation, with a Wilson interval.

    The off-target check of MoTE (2025, section 4: task performance should not drop when the
    refusal experts are switched off), on tasks with one short correct answer.

    Args:
        predictions: generated answers.
        references: the correct answers, same length.
        normalize: ``"default"`` (:func:`normalize_answer`), ``"strip"``, ``"none"`` or a
            callable ``str -> str`` applied to both sides.
        confidence: interval level.

    Returns:
        A :class:`Rate` of correct answers.

    Raises:
        ValueError: lengths differ or ``normalize`` is unknown.

    Example:
        >>> exact_match_accuracy([" 7\\nQ:", "Paris."], ["7", "Rome"]).count
        1
    """
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(
            f"exact_match_accuracy: {len(predictions)} predictions but {len(references)} references; "
            "give one reference per prediction."
        )
    if callable(normalize):
        fold = normalize
    elif normalize in _NORMALIZERS:
        fold = _NORMALIZERS[normalize]
    else:
        raise ValueError(
            f"exact_match_accuracy: normalize={normalize!r}; use one of {sorted(_NORMALIZERS)} or a callable."
        )
    correct = sum(fold(p) == fold(r) for p, r in zip(predictions, references))
    return wilson_rate(correct, len(predictions), confidence=confidence)
