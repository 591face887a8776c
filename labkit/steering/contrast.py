"""What every vector builder shares: argument checks against the model, prompt encoding, reading
the residual stream, and the contrast-pair setup of the mean-difference / PCA / probe methods —
including :class:`ContrastReading`, the one argument type of where and how those methods read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from labkit.backends import backend_of
from labkit.checks import check_coefficient, check_layer, check_prompts
from labkit.models import check_context, encode_prompts
from labkit.steering.vector import Positions

__all__ = [
    "SPACE_HINT", "ContrastReading", "Token", "check_model_hook_point", "check_model_layer", "check_paired",
    "check_prompt_list", "check_reading", "contrast_setup", "encode_one", "prompt_activations", "residual_activations",
    "resolve_reading", "scaled_to_separation",
]

Token = Literal["last", "mean"]


def check_reading(where: str, *, positions: Any, token: Any, batch_size: Any) -> None:
    """Refuse reading options no contrast-pair builder supports.

    Raises:
        ValueError: ``positions`` not ``"all"`` / ``"prompt"`` / ``"generated"``, ``token`` not
            ``"last"`` / ``"mean"``, ``batch_size`` not a positive int; the message names ``where``.
    """
    if positions not in ("all", "prompt", "generated"):
        raise ValueError(
            f"{where}: positions={positions!r} is not allowed; a direction applies at 'all', "
            "'prompt' or 'generated' positions (use actadd for front positions)."
        )
    if token not in ("last", "mean"):
        raise ValueError(f"{where}: token={token!r} is not allowed; use 'last' or 'mean'.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{where}: batch_size must be a positive int, got {batch_size!r}.")


@dataclass(frozen=True)
class ContrastReading:
    """Where and how a contrast-pair builder reads activations, and where its vector applies.

    The options :func:`~labkit.steering.mean_difference`, :func:`~labkit.steering.pca_direction`,
    :func:`~labkit.steering.probe_direction` and :func:`~labkit.steering.builders.contrast_vector`
    share, as one value: build it once and pass ``reading=`` to each builder (a method
    comparison reads every method the same way), instead of repeating five keywords. The
    builders still take the keywords themselves; give one or the other.

    Attributes:
        hook_point: residual hook inside the block, e.g. ``"hook_resid_pre"`` (the stream
            entering block ``layer``).
        token: ``"last"`` (each prompt's final token, CAA's choice) or ``"mean"`` (mean over
            its tokens).
        positions: where the vector is added: ``"all"``, ``"prompt"`` or ``"generated"``.
        batch_size: prompts per forward pass.
        prepend_bos: override the model's BOS rule (``None`` keeps it).

    Raises:
        ValueError: an option outside the allowed values (named).

    Example:
        >>> reading = ContrastReading(token="mean", positions="generated")
        >>> reading.token
        'mean'
    """

    hook_point: str = "hook_resid_pre"
    token: Token = "last"
    positions: Positions = "all"
    batch_size: int = 16
    prepend_bos: bool | None = None

    def __post_init__(self) -> None:
        # hook_point is checked against the model when a builder uses it (the model knows its hook names)
        check_reading("ContrastReading", positions=self.positions, token=self.token, batch_size=self.batch_size)


def resolve_reading(where: str, reading: ContrastReading | None, **keywords: Any) -> ContrastReading:
    """The builder's :class:`ContrastReading`: ``reading`` if given, else one made from its keywords.

    Raises:
        TypeError: ``reading`` is not a ``ContrastReading``.
        ValueError: ``reading`` given together with a keyword changed from its default (one
            place only), or a keyword outside the allowed values.
    """
    if reading is None:
        check_reading(where, positions=keywords["positions"], token=keywords["token"], batch_size=keywords["batch_size"])
        return ContrastReading(**keywords)
    if not isinstance(reading, ContrastReading):
        raise TypeError(f"{where}: reading must be a labkit.steering.ContrastReading, got {type(reading).__name__}.")
    defaults = {f.name: f.default for f in fields(ContrastReading)}
    changed = {name: value for name, value in keywords.items() if value != defaults[name]}
    if changed:
        raise ValueError(
            f"{where}: got reading={reading!r} and also {changed}; pass the reading options in one place, "
            "either reading=ContrastReading(...) or the keywords."
        )
    return reading

def check_model_layer(model, layer: Any, where: str) -> int:
    return check_layer(layer, backend_of(model).n_layers, where)


def check_model_hook_point(model, hook_name: str, where: str) -> None:
    backend_of(model).check_hook_point(hook_name, where)


# --------------------------------------------------------------------------------------------
# Building vectors
# --------------------------------------------------------------------------------------------


SPACE_HINT = " ActAdd's neutral side is usually a space, ' '."


def check_prompt_list(prompts: Any, where: str, argument: str) -> list[str]:
    return check_prompts(prompts, caller=where, argument=argument, hint=SPACE_HINT)


def encode_one(model, text: str, where: str, prepend_bos: bool | None, argument: str = "") -> list[int]:
    """One prompt's token ids; a prompt longer than the model's context window is refused (its
    activations past the window would be read at positions the model was never trained on)."""
    (_text,), (ids,) = encode_prompts(model, [text], caller=where, prepend_bos=prepend_bos)
    check_context(model, [len(ids)], caller=f"{where} ({argument})" if argument else where)
    return ids


@torch.no_grad()
def residual_activations(
    model, token_ids: Sequence[Sequence[int]], hook_name: str
) -> list[Float[Tensor, "pos d_model"]]:
    """Activations at one hook point for each token sequence (left-padded batch, pads dropped).

    Args:
        model: a labkit bridge, or a vLLM handle (``load_model(..., engine="vllm")``; residual
            hook points only, recorded inside the workers).
        token_ids: one list of token ids per sequence.
        hook_name: e.g. ``"blocks.6.hook_resid_pre"``.

    Returns:
        One ``(len(seq), d_model)`` float tensor per sequence (on the CPU).
    """
    return backend_of(model).residual_activations(token_ids, hook_name)



def contrast_setup(model, positive_prompts, negative_prompts, layer, coefficient, where, reading: ContrastReading | None,
                   **keywords: Any) -> tuple[list[str], list[str], float, str, ContrastReading]:
    """Validate the arguments every contrast-pair method shares.

    Returns:
        ``(positive, negative, coefficient, hook_name, reading)``.
    """
    positive = check_prompt_list(positive_prompts, where, "positive_prompts")
    negative = check_prompt_list(negative_prompts, where, "negative_prompts")
    coefficient = check_coefficient(coefficient, where)
    layer = check_model_layer(model, layer, where)
    reading = resolve_reading(where, reading, **keywords)
    hook_name = f"blocks.{layer}.{reading.hook_point}"
    check_model_hook_point(model, hook_name, where)
    return positive, negative, coefficient, hook_name, reading


def prompt_activations(model, prompts, hook_name, token, batch_size, prepend_bos, where) -> Tensor:
    """``(n_prompts, d_model)``: each prompt's activation at its last token, or its token mean."""
    rows = []
    for start in range(0, len(prompts), batch_size):
        chunk = [encode_one(model, p, where, prepend_bos) for p in prompts[start:start + batch_size]]
        for acts in residual_activations(model, chunk, hook_name):
            rows.append(acts[-1] if token == "last" else acts.mean(0))
    return torch.stack(rows)


def check_paired(positive: list[str], negative: list[str], where: str) -> None:
    if len(positive) != len(negative):
        raise ValueError(
            f"{where}: needs paired prompts (positive i belongs with negative i), got "
            f"{len(positive)} positive and {len(negative)} negative prompts; give equal counts."
        )


def scaled_to_separation(unit: Tensor, acts_positive: Tensor, acts_negative: Tensor) -> Tensor:
    """``unit`` oriented and scaled so that coefficient 1 moves the negative mean onto the positive
    mean along it: ``((mean_pos - mean_neg)·û) û`` with the sign making that projection positive."""
    unit = unit / unit.norm()
    separation = float((acts_positive.mean(0) - acts_negative.mean(0)) @ unit)
    if separation < 0:
        unit, separation = -unit, -separation
    return unit * separation


