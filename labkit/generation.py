"""Text generation on any backend: prompts in, completions (and token ids) out.

:func:`generate` validates its arguments, tokenises with the backend's one rule, opens
``steering=`` with :func:`labkit.steering.steered` and asks the backend for the new token ids
(:meth:`labkit.backends.Backend.generate_ids`). On the Hugging Face path that is the plain twin's
own ``generate()`` (KV cache, sampling, streaming) — never the TransformerLens bridge, whose ~1,400
hook points would all run on every decode step — with every labkit context open on the model
applied; on the vLLM engine every request carries its interventions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from labkit import tokens
from labkit.backends import backend_of
from labkit.checks import check_number, check_per_prompt, check_positive_int, check_prompts
from labkit.steering import SteeringVector, flatten_vectors, steered

__all__ = ["Generation", "generate", "eos_token_ids"]


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


def eos_token_ids(hf_model, tokenizer=None) -> set[int]:
    """The ids that end a completion of a Hugging Face model (:func:`labkit.tokens.eos_token_ids`)."""
    return tokens.eos_token_ids(getattr(hf_model, "generation_config", None), tokenizer)


#: The smallest sampling temperature accepted (found by the property test: 1e-300 made NaN probabilities).
MIN_TEMPERATURE = 1e-5


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
    mask: Any = None,
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
        mask: an :class:`labkit.moe.ExpertMask` for this call only (as ``with labkit.moe.masked(model, mask)``).
        **generate_kwargs: passed on to ``GenerationConfig`` (e.g. ``min_new_tokens=48``,
            ``repetition_penalty=1.2``).

    Returns:
        A :class:`Generation` (``texts``, ``token_ids``, ``prompt_token_ids``).

    Raises:
        ValueError: an empty prompt or prompt list, ``max_new_tokens < 1``, a temperature /
            top_p out of range (a temperature in (0, 1e-5) too), ``chat=True`` without a chat template, a prompt that (with
            ``max_new_tokens``) exceeds the context window, an unknown keyword argument, a
            steering vector that does not fit the model, ``steering_per_row`` whose length
            is not the number of prompts, or both ``steering_per_row`` and ``steering_per_prompt``.

    Example:
        >>> out = generate(model, ["The weather today is"], max_new_tokens=8)  # doctest: +SKIP
        >>> out.texts  # doctest: +SKIP
    """
    backend = backend_of(model)
    backend.require("generate", "generate")
    if steering_per_row is not None and steering_per_prompt is not None:
        raise ValueError(
            "generate: give steering_per_row= (one batch) or steering_per_prompt=, not both; each is one "
            "entry per prompt."
        )
    check_positive_int("max_new_tokens", max_new_tokens, caller="generate")
    temperature = check_number("temperature", temperature, 0.0, math.inf)
    if 0.0 < temperature < MIN_TEMPERATURE:
        raise ValueError(
            f"generate: temperature={temperature!r} is below {MIN_TEMPERATURE:g}: logits / temperature overflow "
            "float32 (inf, then NaN probabilities). Use temperature=0 for greedy decoding."
        )
    top_p = check_number("top_p", top_p, 0.0, 1.0, low_open=True)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"generate: top_k must be an int ≥ 0 (0 = no limit), got {top_k!r}.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"generate: seed must be an int or None, got {seed!r}.")
    options = dict(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
        streamer=streamer, use_cache=use_cache, **generate_kwargs,
    )
    if mask is not None:
        from labkit.moe.masking import masked

        with masked(model, mask):
            return generate(
                model, prompts, steering=steering, steering_per_row=steering_per_row, chat=chat, prepend_bos=prepend_bos,
                steering_per_prompt=steering_per_prompt, **options,
            )
    if steering_per_prompt is not None and not backend.schedules_batches:
        return _generate_per_prompt(model, prompts, steering, steering_per_prompt, chat=chat, prepend_bos=prepend_bos, **options)
    prompts, encoded = backend.encode_prompts(prompts, caller="generate", chat=chat, prepend_bos=prepend_bos)
    backend.check_context([len(ids) for ids in encoded], new_tokens=max_new_tokens, caller="generate")
    name, entries = (
        ("steering_per_row", steering_per_row) if steering_per_row is not None else ("steering_per_prompt", steering_per_prompt)
    )
    per_row = None
    if entries is not None:
        if isinstance(entries, (str, SteeringVector)):
            raise TypeError(
                f"generate: {name} must be a list with one entry per prompt, got "
                f"{type(entries).__name__}; for one vector on every prompt use steering=."
            )
        check_per_prompt(entries, len(encoded), name=name)
        per_row = [flatten_vectors([entry], f"generate({name}=...)") for entry in entries]
    with steered(model, steering):
        new_ids = backend.generate_ids(encoded, steering_per_row=per_row, **options)
    tokenizer = backend.tokenizer
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in new_ids]
    return Generation(prompts=prompts, texts=texts, token_ids=new_ids, prompt_token_ids=encoded)


def _generate_per_prompt(model, prompts, steering, per_prompt, **options) -> Generation:
    """HF path of ``steering_per_prompt``: one :func:`generate` call per distinct entry, in order."""
    prompts = check_prompts(prompts, caller="generate")
    check_per_prompt(per_prompt, len(prompts), name="steering_per_prompt")
    groups: dict[tuple[int, ...], list[int]] = {}
    entries = [flatten_vectors([entry]) for entry in per_prompt]
    for i, entry in enumerate(entries):
        groups.setdefault(tuple(id(v) for v in entry), []).append(i)
    results: dict[int, tuple[str, list[int], list[int]]] = {}
    for rows in groups.values():
        vectors = flatten_vectors([steering], interventions=True) + entries[rows[0]]
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
