"""Text generation on a labkit model: prompts in, completions (and token ids) out.

Generation is the plain Hugging Face twin's own ``generate()`` (KV cache, sampling, streaming)
— never the TransformerLens bridge, whose ~1,400 hook points would all run on every decode
step. Interventions are ``torch`` hooks on just the modules in use: ``steering=`` vectors are
attached here (:func:`labkit.steering.steered`), and any other labkit context already open on
the twin (``labkit.steered``, an expert mask, ...) applies as well, because the twin is what runs.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from labkit.models import check_context, encode_prompts, lab_model, left_pad
from labkit.steering import SteeringVector, steered

__all__ = ["Generation", "generate", "generate_token_ids", "eos_token_ids"]


@dataclass(frozen=True, eq=False)
class Generation:
    """The result of :func:`generate`; one entry per prompt, in order.

    Attributes:
        prompts: the prompts as given.
        texts: the completions (new tokens only, special tokens removed).
        token_ids: the new token ids of each completion, up to and including the first
            end-of-sequence token (padding after it removed).
        prompt_token_ids: the token ids each prompt was run as (chat template applied).
    """

    prompts: list[str]
    texts: list[str]
    token_ids: list[list[int]]
    prompt_token_ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.texts)


def _check_number(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"generate: {name} must be a finite number, got {value!r}.")
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ValueError(f"generate: {name}={value!r} out of range; allowed {bracket}{low}, {high}].")
    return float(value)


def _trim(ids: list[int], eos: set[int], pad: int | None) -> list[int]:
    """New ids up to and including the first end-of-sequence token; padding after a stop removed."""
    for i, token in enumerate(ids):
        if token in eos:
            return ids[: i + 1]
    while ids and pad is not None and ids[-1] == pad:
        ids = ids[:-1]
    return ids


def eos_token_ids(hf_model, tokenizer=None) -> set[int]:
    """The ids that end a completion: the model's generation config, else the tokenizer's EOS."""
    config = getattr(hf_model, "generation_config", None)
    eos = config.eos_token_id if config is not None else None
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}


def generate_token_ids(
    hf_model,
    rows: Sequence[Sequence[int]],
    *,
    pad_id: int,
    eos_ids: set[int],
    max_new_tokens: int,
    streamer: Any = None,
    **config: Any,
) -> list[list[int]]:
    """The one generation loop of labkit: Hugging Face ``generate`` on left-padded token rows.

    ``rows`` are prompt token ids (already validated and encoded, see
    :func:`labkit.models.encode_prompts`); they are left-padded into one batch with an attention
    mask (``generate`` derives position ids from it, so each row equals its solo run). Greedy
    unless ``config`` asks for sampling. Whatever hooks are attached to ``hf_model`` (steering,
    expert masks) apply; the caller opens them. Used by :func:`generate` and by
    :func:`labkit.moe.trace_routing` (``scope="generated"``).

    Args:
        hf_model: a Hugging Face causal LM (labkit's twin, or a plain model).
        rows: prompt token ids, one list per prompt.
        pad_id: the padding id.
        eos_ids: ids that end a completion (kept in the output; see :func:`eos_token_ids`).
        max_new_tokens: new tokens per row at most.
        streamer: a ``transformers`` streamer, or ``None``.
        **config: further ``transformers.GenerationConfig`` fields (``do_sample``, ...).

    Returns:
        The new token ids of each row, up to and including its first end-of-sequence token.
    """
    from transformers import GenerationConfig

    device = next(hf_model.parameters()).device
    input_ids, attention_mask, _ = left_pad(rows, pad_id, device)
    width = input_ids.shape[1]
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=sorted(eos_ids) or None,
        **{"do_sample": False, **config},
    )
    with torch.no_grad():
        sequences = hf_model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config, streamer=streamer
        )
    return [_trim(row.tolist(), eos_ids, pad_id) for row in sequences[:, width:].cpu()]


def generate(
    model,
    prompts: str | Sequence[str],
    *,
    steering: SteeringVector | Sequence[SteeringVector] | None = None,
    steering_per_row: Sequence[SteeringVector | Sequence[SteeringVector] | None] | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    chat: bool = False,
    prepend_bos: bool | None = None,
    streamer: Any = None,
    use_cache: bool = True,
    steering_per_prompt: Sequence[SteeringVector | Sequence[SteeringVector] | None] | None = None,
    **generate_kwargs: Any,
) -> Generation:
    """Generate completions with the model's plain twin, optionally steered.

    Prompts are left-padded into one batch (each row's result equals the prompt run alone);
    the twin's Hugging Face ``generate`` runs with the KV cache. Steering vectors are attached
    for the call (see :func:`labkit.steering.steered`): ActAdd vectors land on the prompt's front
    positions in the prompt pass, directions on their positions at every step. ``temperature=0``
    is greedy decoding; otherwise sampling with ``temperature`` / ``top_p`` / ``top_k``, made
    reproducible by ``seed`` (the global RNG is forked, so the caller's random state is left
    as it was).

    Args:
        model: a labkit bridge (``labkit.load_model``).
        prompts: a prompt or a list of prompts (non-empty strings).
        steering: a :class:`SteeringVector`, a list of them, or ``None``: applied to every prompt.
        steering_per_row: one entry per prompt (a vector, a list of vectors, or ``None``),
            applied to that prompt only, after ``steering`` — a one-batch sweep: different
            vectors and coefficients in one batched call, each row's greedy tokens equal to its
            solo run (``generate(model, [prompt], steering=entry)``), KV cache on or off.
        max_new_tokens: new tokens per prompt (≥ 1).
        temperature: 0 for greedy; > 0 samples.
        top_p: nucleus mass in (0, 1] (sampling only).
        top_k: keep the k most likely tokens (0 = no limit; sampling only).
        seed: seeds the sampler; same seed → same text, steered or not.
        chat: wrap each prompt as a user turn with the tokenizer's chat template.
        prepend_bos: override the model's BOS rule (``None`` keeps ``model.cfg.default_prepend_bos``).
        streamer: a ``transformers`` streamer (e.g. ``TextIteratorStreamer``), batch size 1.
        use_cache: use the KV cache (default); ``False`` recomputes every step (for checks).
        steering_per_prompt: one entry per prompt (a vector, a list of vectors, or ``None``),
            applied to that prompt only, on top of ``steering``. On the HF path prompts with the
            same entry run as one batch; on the vLLM engine every request carries its own.
        **generate_kwargs: passed on to ``GenerationConfig`` (e.g. ``min_new_tokens=48``,
            ``repetition_penalty=1.2``).

    Returns:
        A :class:`Generation` (``texts``, ``token_ids``, ``prompt_token_ids``).

    Raises:
        ValueError: an empty prompt or prompt list, ``max_new_tokens < 1``, a temperature /
            top_p out of range, ``chat=True`` without a chat template, a prompt that (with
            ``max_new_tokens``) exceeds the context window, an unknown keyword argument, a
            steering vector that does not fit the model, ``steering_per_row`` whose length
            is not the number of prompts, or both ``steering_per_row`` and ``steering_per_prompt``.

    Example:
        >>> out = generate(model, ["The weather today is"], max_new_tokens=8)  # doctest: +SKIP
        >>> out.texts  # doctest: +SKIP
    """
    from labkit.engines import is_engine_model

    if steering_per_row is not None and steering_per_prompt is not None:
        raise ValueError(
            "generate: give steering_per_row= (one batch) or steering_per_prompt=, not both; each is one "
            "entry per prompt."
        )
    if is_engine_model(model):
        return model.generate(
            prompts, steering=steering, steering_per_prompt=steering_per_prompt,
            steering_per_row=steering_per_row, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, chat=chat, prepend_bos=prepend_bos,
            streamer=streamer, use_cache=use_cache, **generate_kwargs,
        )
    if steering_per_prompt is not None:
        return _generate_per_prompt(
            model, prompts, steering, steering_per_prompt, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, seed=seed, chat=chat, prepend_bos=prepend_bos, streamer=streamer,
            use_cache=use_cache, **generate_kwargs,
        )
    from transformers import GenerationConfig

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be an int ≥ 1, got {max_new_tokens!r}.")
    temperature = _check_number("temperature", temperature, 0.0, math.inf)
    top_p = _check_number("top_p", top_p, 0.0, 1.0, low_open=True)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"generate: top_k must be an int ≥ 0 (0 = no limit), got {top_k!r}.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"generate: seed must be an int or None, got {seed!r}.")

    known = set(GenerationConfig().to_dict())
    unknown = sorted(set(generate_kwargs) - known)
    if unknown:
        close = {k: difflib.get_close_matches(k, [*known, "max_new_tokens", "temperature", "top_p", "top_k", "seed", "chat", "prepend_bos", "streamer", "use_cache", "steering", "steering_per_row"], n=1) for k in unknown}
        hints = ", ".join(f"{k!r}" + (f" (did you mean {c[0]!r}?)" if c else "") for k, c in close.items())
        raise ValueError(
            f"generate: unknown keyword argument(s) {hints}; extra keywords must be "
            "transformers GenerationConfig fields (e.g. min_new_tokens, repetition_penalty)."
        )

    record = lab_model(model)
    prompts, encoded = encode_prompts(model, prompts, caller="generate", chat=chat, prepend_bos=prepend_bos)
    tokenizer, twin = record.tokenizer, record.twin
    device = next(twin.parameters()).device
    check_context(model, [len(ids) for ids in encoded], new_tokens=max_new_tokens, caller="generate")
    width = max(len(ids) for ids in encoded)  # the left-padded prompt block every row shares
    sampling = temperature > 0
    vectors = [] if steering is None else [steering]
    if steering_per_row is not None:
        if isinstance(steering_per_row, (str, SteeringVector)) or not isinstance(steering_per_row, Sequence):
            raise TypeError(
                f"generate: steering_per_row must be a list with one entry per prompt, got "
                f"{type(steering_per_row).__name__}; for one vector on every prompt use steering=."
            )
        if len(steering_per_row) != len(encoded):
            raise ValueError(
                f"generate: steering_per_row has {len(steering_per_row)} entries for {len(encoded)} "
                "prompts; give exactly one entry (a vector, a list of vectors, or None) per prompt."
            )

    with contextlib.ExitStack() as stack:
        if seed is not None:
            devices = [device] if device.type == "cuda" else []
            stack.enter_context(torch.random.fork_rng(devices=devices))
            torch.manual_seed(seed)
        stack.enter_context(steered(model, *vectors, rows=steering_per_row))
        stack.enter_context(record.generating(width))
        new_ids = generate_token_ids(
            twin,
            encoded,
            pad_id=tokenizer.pad_token_id,
            eos_ids=eos_token_ids(twin, tokenizer),
            max_new_tokens=max_new_tokens,
            streamer=streamer,
            do_sample=sampling,
            temperature=temperature if sampling else None,
            top_p=top_p if sampling else None,
            top_k=top_k if sampling else None,
            bos_token_id=tokenizer.bos_token_id,
            use_cache=use_cache,
            **generate_kwargs,
        )
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in new_ids]
    return Generation(prompts=prompts, texts=texts, token_ids=new_ids, prompt_token_ids=encoded)


def _check_per_prompt(entries, n_prompts: int, *, name: str) -> None:
    """Refuse per-prompt steering (``name`` as the caller spelled it) that is not one entry per prompt.

    Raises:
        ValueError: ``entries`` is a string, not a sequence, or not ``n_prompts`` long.
    """
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence) or len(entries) != n_prompts:
        raise ValueError(
            f"generate: {name} needs one entry (a vector, a list of vectors or None) per prompt: "
            f"{n_prompts} prompts, got {entries!r:.80}."
        )


def _generate_per_prompt(model, prompts, steering, per_prompt, **options) -> Generation:
    """HF path of ``steering_per_prompt``: one :func:`generate` call per distinct entry, in order."""
    from labkit.models import check_prompts
    from labkit.steering import _flatten

    prompts = check_prompts(prompts, caller="generate")
    _check_per_prompt(per_prompt, len(prompts), name="steering_per_prompt")
    groups: dict[tuple[int, ...], list[int]] = {}
    entries = [_flatten([entry]) for entry in per_prompt]
    for i, entry in enumerate(entries):
        groups.setdefault(tuple(id(v) for v in entry), []).append(i)
    results: dict[int, tuple[str, list[int], list[int]]] = {}
    for rows in groups.values():
        vectors = _flatten([steering], interventions=True) + entries[rows[0]]
        out = generate(model, [prompts[i] for i in rows], steering=vectors or None, **options)
        for j, i in enumerate(rows):
            results[i] = (out.texts[j], out.token_ids[j], out.prompt_token_ids[j])
    order = range(len(prompts))
    return Generation(
        prompts=list(prompts),
        texts=[results[i][0] for i in order],
        token_ids=[results[i][1] for i in order],
        prompt_token_ids=[results[i][2] for i in order],
    )
