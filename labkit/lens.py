"""Reading the residual stream: the logit lens and residual-stream norms.

The logit lens (nostalgebraist, 2020, "interpreting GPT: the logit lens") decodes an intermediate
residual-stream vector with the model's own final normalisation and unembedding, showing which
next tokens a layer already "has in mind".
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from labkit.backends import backend_of
from labkit.cache import ActivationCache
from labkit.hooks import resolve_hook
from labkit.models import tokenizer_of

__all__ = ["answer_rank_by_layer", "logit_lens", "logit_lens_table", "residual_norms"]

#: Why the lens refuses the vLLM engine, and what to do instead.
ENGINE_ALTERNATIVE = (
    "The lens decodes residual vectors with the model's final norm and unembedding, which on the vLLM engine "
    "live inside its worker processes. Cache the residual stream on the engine (cache_activations) and decode "
    "that cache with the Hugging Face bridge of the same model: logit_lens_table(load_model(name), cache, ...)."
)


def _require_in_process(model, caller: str) -> None:
    """Raise :class:`labkit.backends.NotOnBackendError` unless the model runs in this process."""
    backend_of(model).require("forward", caller, ENGINE_ALTERNATIVE)


def logit_lens(
    model, resid: Float[Tensor, "n d_model"], *, k: int = 5
) -> tuple[Float[Tensor, "n k"], list[list[str]]]:
    """Decode residual-stream vectors through the final norm and unembedding.

    Args:
        model: a bridge from :func:`labkit.load_model`.
        resid: residual-stream vectors, ``[n, d_model]`` (any float dtype).
        k: how many top tokens to return per vector (>= 1).

    Returns:
        ``(probabilities [n, k], tokens)`` where ``tokens[i]`` are the k decoded strings.

    Raises:
        ValueError: ``resid`` is not ``[n, d_model]`` for this model, or ``k < 1``.
        NotOnBackendError: a vLLM engine handle (the message says how to decode an engine cache).
    """
    _require_in_process(model, "logit_lens")
    d_model = model.cfg.d_model
    if resid.dim() != 2 or resid.shape[1] != d_model:
        raise ValueError(f"resid must be [n, {d_model}] for this model; got {tuple(resid.shape)}.")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    weight = next(model.parameters())
    with torch.inference_mode():
        x = resid.to(device=weight.device, dtype=weight.dtype)
        logits = model.unembed(model.ln_final(x.unsqueeze(0))).squeeze(0)
        probs, ids = logits.softmax(-1).topk(k, dim=-1)
    tokenizer = tokenizer_of(model)
    return probs, [[tokenizer.decode([int(t)]) for t in row] for row in ids]


def logit_lens_table(
    model, cache: ActivationCache, hook_names: Sequence[str], *, prompt: int = 0, position: int = -1, k: int = 3
) -> pd.DataFrame:
    """One row per hook point: the top-k logit-lens tokens at one prompt position.

    Args:
        model: the bridge the cache came from.
        cache: an :class:`~labkit.cache.ActivationCache` holding the residual-stream hook points.
        hook_names: which cached hook points to decode (e.g. every layer's ``hook_resid_post``).
        prompt: prompt index in the cache.
        position: kept position within that prompt (negative counts from the end).
        k: tokens per row.

    Returns:
        DataFrame with columns ``hook``, ``layer``, ``top tokens`` and ``p(top-1)``.
    """
    _require_in_process(model, "logit_lens_table")
    rows = []
    vectors = torch.stack([cache.per_prompt(name)[prompt][position] for name in hook_names])
    probs, tokens = logit_lens(model, vectors, k=k)
    for name, p, toks in zip(hook_names, probs, tokens):
        rows.append(
            {"hook": name, "layer": resolve_hook(model, name).layer, "top tokens": " | ".join(map(repr, toks)), "p(top-1)": round(float(p[0]), 3)}
        )
    return pd.DataFrame(rows)


def residual_norms(cache: ActivationCache, hook_names: Sequence[str]) -> pd.DataFrame:
    """Mean L2 norm of cached residual-stream vectors per hook point and position.

    Returns:
        DataFrame with columns ``hook``, ``position``, ``mean_norm``, ``n`` (prompts averaged).
    """
    frames = []
    for name in hook_names:
        norms = cache[name].float().norm(dim=-1)
        frame = pd.DataFrame({"hook": name, "position": cache.position.numpy(), "norm": norms.numpy()})
        frames.append(frame.groupby(["hook", "position"], as_index=False).agg(mean_norm=("norm", "mean"), n=("norm", "size")))
    return pd.concat(frames, ignore_index=True)


def answer_rank_by_layer(
    model, cache: ActivationCache, hook_names: Sequence[str], *, answers: Sequence[str]
) -> pd.DataFrame:
    """Logit-lens rank and probability of each prompt's expected answer token, per layer.

    Decodes the last kept position of every prompt at every hook point and looks up the first
    token of ``answers[i]`` (e.g. ``" Paris"``).

    Args:
        model: the bridge the cache came from.
        cache: cache holding ``hook_names`` (last position of each prompt must be kept).
        hook_names: residual-stream hook points, in layer order.
        answers: one expected continuation per cached prompt.

    Returns:
        DataFrame indexed by ``layer`` with ``median rank`` (0 = top-1), ``top-1 rate`` and
        ``mean p(answer)`` over prompts.

    Raises:
        ValueError: ``len(answers)`` differs from the number of cached prompts.
    """
    _require_in_process(model, "answer_rank_by_layer")
    if len(answers) != cache.n_prompts:
        raise ValueError(f"got {len(answers)} answers for {cache.n_prompts} cached prompts.")
    tokenizer = tokenizer_of(model)
    answer_ids = torch.tensor([tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in answers])
    weight = next(model.parameters())
    rows = []
    for name in hook_names:
        last = torch.stack([per[-1] for per in cache.per_prompt(name)]).to(weight.device, weight.dtype)
        with torch.inference_mode():
            logits = model.unembed(model.ln_final(last.unsqueeze(0))).squeeze(0)
        target = logits.gather(1, answer_ids[:, None].to(logits.device))
        rank = (logits > target).sum(-1).float()
        prob = logits.softmax(-1).gather(1, answer_ids[:, None].to(logits.device)).squeeze(1)
        rows.append(
            {
                "layer": resolve_hook(model, name).layer,
                "median rank": float(rank.median()),
                "top-1 rate": float((rank == 0).float().mean()),
                "mean p(answer)": float(prob.mean()),
            }
        )
    return pd.DataFrame(rows).set_index("layer")
