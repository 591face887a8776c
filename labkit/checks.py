"""Public validators the layers of labkit share (numbers, routing-trace pairs).

Each raises ``ValueError`` / ``TypeError`` with what was received, what is allowed and how to fix
it, naming the caller (``caller``) so the message points at the function the user called.
"""

from __future__ import annotations

from typing import Any

__all__ = ["check_int", "check_trace_pair", "describe_trace"]

_TRACE_FIELDS = ("topk_indices", "topk_weights", "prompt_index", "position", "layers", "n_experts", "top_k", "n_prompts")


def check_int(value: Any, name: str, *, caller: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an ``int`` within ``[minimum, maximum]``; bools and floats are refused.

    Raises:
        ValueError: not an integer, or outside the bounds (the message names ``name``).
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{caller}: {name} must be an int, got {value!r} of type {type(value).__name__}.")
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        low = "-inf" if minimum is None else minimum
        high = "inf" if maximum is None else maximum
        raise ValueError(f"{caller}: {name}={value} is outside the allowed range {low}..{high}.")
    return value


def describe_trace(trace: Any) -> str:
    """One line naming a routing trace's model, layers, routing shape and size (for messages)."""
    shape = tuple(getattr(getattr(trace, "topk_indices", None), "shape", ()))
    return (
        f"model {getattr(trace, 'model_name', '?')!r}, layers {tuple(getattr(trace, 'layers', ()))}, "
        f"{getattr(trace, 'n_experts', '?')} experts, top-{getattr(trace, 'top_k', '?')}, "
        f"{getattr(trace, 'n_prompts', '?')} prompts, topk_indices shape {shape}"
    )


def check_trace_pair(behavior: Any, control: Any, *, caller: str, paired: bool = False) -> None:
    """Refuse two routing traces that cannot be compared expert by expert.

    Args:
        behavior: the behaviour prompts' :class:`~labkit.moe.trace.RoutingTrace`.
        control: the control prompts' trace.
        caller: the public function's name, for the message.
        paired: the rule compares prompt *pairs* (SteerMoE): both traces must hold the same
            number of prompts, prompt ``i`` of one paired with prompt ``i`` of the other.

    Raises:
        TypeError: an argument is not a routing trace.
        ValueError: an empty trace; traces from different models, layers, expert counts or top-k
            (the message shows both); with ``paired``, different prompt counts.
    """
    for label, trace in (("behavior", behavior), ("control", control)):
        missing = [name for name in _TRACE_FIELDS if not hasattr(trace, name)]
        if missing:
            raise TypeError(
                f"{caller}: {label} is a {type(trace).__name__} without {missing}; pass a "
                "labkit.moe.RoutingTrace (from trace_routing)."
            )
        if trace.topk_indices.dim() != 3 or trace.topk_indices.shape[1] == 0 or trace.n_prompts == 0:
            raise ValueError(f"{caller}: the {label} trace is empty ({describe_trace(trace)}); trace at least one prompt.")
    for name, what in (
        ("model_name", "traces come from different models"),
        ("layers", "traces cover different layers"),
        ("n_experts", "traces have different expert counts"),
        ("top_k", "traces have different top-k"),
    ):
        if getattr(behavior, name) != getattr(control, name):
            raise ValueError(
                f"{caller}: {what}: behavior has {name}={getattr(behavior, name)!r}, control has "
                f"{name}={getattr(control, name)!r}. Trace both prompt sets with the same model and layers.\n"
                f"  behavior: {describe_trace(behavior)}\n  control:  {describe_trace(control)}"
            )
    if paired and behavior.n_prompts != control.n_prompts:
        raise ValueError(
            f"{caller}: this rule compares prompt pairs (behaviour prompt i against control prompt i), but "
            f"behavior has {behavior.n_prompts} prompts and control {control.n_prompts}. Trace paired prompt "
            "lists of equal length (each control prompt the minimal edit of its behaviour prompt), or use an "
            "unpaired rule (frequency_difference, npmi)."
        )
