"""Perplexity under steering: ActAdd's off-target check (Turner et al. 2023, §4)."""

from __future__ import annotations

import math as _math
from collections.abc import Sequence as _Sequence


def perplexity(
    model, texts: str | _Sequence[str], *, steering=None, batch_size: int = 8, prepend_bos: bool | None = None
) -> float:
    """Token-level perplexity of texts under the model, optionally steered.

    ``exp(mean negative log-likelihood)`` over every predicted token of every text (tokenised
    with the model's BOS rule: with a BOS, the first real token is predicted from it; without,
    each text's first token is not predicted). ActAdd's off-target check (Turner et al. 2023, §4): held-out
    neutral text should be about as likely steered as unsteered. Runs the plain twin on
    left-padded batches (on the vLLM engine: vLLM's prompt logprobs, one request per text, equal
    to the HF path's to float32 precision); with ``steering`` the vectors are applied as in a prompt pass (an
    ActAdd vector lands on each text's first tokens, a direction on every token, except
    ``positions="generated"``, which never applies to a plain pass). Any steering context the
    caller has open applies too.

    Args:
        model: a labkit bridge or vLLM engine handle.
        texts: a text or a list of texts, each at least two tokens long.
        steering: a ``SteeringVector``, a list of them, or ``None``.
        batch_size: texts per forward pass (per engine call on the engine).
        prepend_bos: override the model's BOS rule (``None`` keeps it).

    Returns:
        The perplexity (≥ 1).

    Raises:
        ValueError: no texts, an empty text, a text shorter than two tokens, ``batch_size < 1``, or a text longer
            than the model's context window (``max_position_embeddings``). labkit does not compute
            a sliding-window perplexity: past the window the model reads positions it was never
            trained on and the number means nothing, so split long texts yourself (each piece at
            most the window) and combine ``exp(mean NLL)`` weighted by predicted tokens.
        TypeError: ``texts`` is ``None`` / a number, or a text that is not a string.
    """
    from labkit.backends import backend_of
    from labkit.checks import check_positive_int
    from labkit.models import check_context, encode_prompts
    from labkit.steering import steered

    check_positive_int("batch_size", batch_size, caller="perplexity")
    backend = backend_of(model)
    backend.require("logprobs", "perplexity")
    texts, encoded = encode_prompts(model, texts, caller="perplexity", prepend_bos=prepend_bos)
    check_context(model, [len(ids) for ids in encoded], caller="perplexity")
    for i, ids in enumerate(encoded):
        if len(ids) < 2:
            raise ValueError(f"perplexity: text {i} ({texts[i]!r}) has {len(ids)} token(s); need ≥ 2.")
    vectors = [] if steering is None else [steering]
    nll, count = 0.0, 0
    with steered(model, *vectors):
        for start in range(0, len(encoded), batch_size):
            for logprobs in backend.token_logprobs(encoded[start:start + batch_size]):
                nll -= float(logprobs.double().sum())
                count += int(logprobs.numel())
    return _math.exp(nll / count)


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


