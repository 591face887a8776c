"""The public validators every layer of labkit reuses: numbers, prompts, layers, scopes, token ids.

The bottom layer of the package (it imports nothing from labkit): the Hugging Face path, the
vLLM engine and the analysis functions all check their arguments here, so a bad argument gets the
same message on every backend. Each function raises ``TypeError`` / ``ValueError`` naming the
argument, what it received and what is allowed; none of them touches a model.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "check_int",
    "check_trace_pair",
    "describe_trace",
    "check_coefficient",
    "check_columns",
    "check_names",
    "check_out_dir",
    "check_path",
    "check_prompt",
    "check_context_lengths",
    "check_layer",
    "check_number",
    "check_per_prompt",
    "check_positive_int",
    "check_prompts",
    "check_scope",
    "check_token_ids",
    "layer_of",
    "named_errors",
]


def check_number(name: str, value: Any, low: float, high: float, *, low_open: bool = False, caller: str = "generate") -> float:
    """A finite real number in ``[low, high]`` (``(low, high]`` with ``low_open``), as a float.

    Raises:
        ValueError: not a finite real number (bools refused), or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{caller}: {name} must be a finite number, got {value!r}.")
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ValueError(f"{caller}: {name}={value!r} out of range; allowed {bracket}{low}, {high}].")
    return float(value)


def check_positive_int(name: str, value: Any, *, caller: str, low: int = 1) -> int:
    """An int ``>= low`` (bools refused).

    Raises:
        ValueError: not an int, or below ``low``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < low:
        raise ValueError(f"{caller}: {name} must be an int ≥ {low}, got {value!r}.")
    return int(value)


def check_coefficient(coefficient: Any, where: str) -> float:
    """A steering coefficient: a finite real number (unitless multiplier of the vector).

    Raises:
        TypeError: not a real number (bools refused).
        ValueError: infinite or NaN.
    """
    if isinstance(coefficient, bool) or not isinstance(coefficient, numbers.Real):
        raise TypeError(
            f"{where}: coefficient must be a finite real number, got "
            f"{type(coefficient).__name__} {coefficient!r}."
        )
    if not math.isfinite(float(coefficient)):
        raise ValueError(
            f"{where}: coefficient must be finite, got {coefficient!r}. Use a finite number such "
            "as 4.0 (0 = no steering)."
        )
    return float(coefficient)


def check_columns(table: Any, needed: set[str], where: str) -> None:
    """Check that a table (a ``pandas.DataFrame`` or anything with ``.columns``) has the ``needed`` columns.

    Raises:
        ValueError: a column is missing; the message names ``where``, the needed and the present columns.
    """
    columns = set(getattr(table, "columns", ()))
    if not needed <= columns:
        raise ValueError(f"{where}: the table needs columns {sorted(needed)}, got {sorted(columns)}.")


def layer_of(hook_name: str) -> int | None:
    """The block index of a TransformerLens hook name (``"blocks.6.hook_resid_pre"`` → 6), else ``None``."""
    parts = hook_name.split(".")
    if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None


def check_layer(layer: Any, n_layers: int, where: str) -> int:
    """A layer index in ``0..n_layers-1``.

    Raises:
        TypeError: not an int (bools refused).
        ValueError: out of range.
    """
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise TypeError(f"{where}: layer must be an int in 0..{n_layers - 1}, got {layer!r}.")
    if not 0 <= int(layer) < n_layers:
        raise ValueError(
            f"{where}: layer {layer} out of range; model has {n_layers} layers (0..{n_layers - 1})."
        )
    return int(layer)


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__}: {text if len(text) <= 80 else text[:77] + '...'}"


def _is_token_row(value: Any) -> bool:
    """A list / tuple of ints (token ids)."""
    return (
        isinstance(value, Sequence)
        and not isinstance(value, (str, bytes))
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )


def check_prompts(
    prompts: Any, *, caller: str, argument: str = "prompts", hint: str = "", token_ids: bool = False
) -> list:
    """Validate a prompt or a collection of prompts; return them as a new list.

    The one prompt rule of every labkit entry point (``generate``, ``cache_activations``,
    ``trace_routing``, ``perplexity``, the vector builders, the MoE evaluations): **a bare string
    is one prompt** (never iterated as characters); any other iterable (a list, a tuple, a
    generator, a ``datasets`` column) is a collection of prompts.

    Args:
        prompts: a string, or a non-empty iterable of non-empty strings (with ``token_ids=True``
            an item may also be a non-empty list of token ids).
        caller: the function name for messages, e.g. ``"cache_activations"``.
        argument: the argument's name for messages (default ``"prompts"``).
        hint: appended to the empty-prompt message (e.g. ActAdd's ``' '`` convention).
        token_ids: accept token-id lists as items (``trace_routing``).

    Returns:
        ``list`` of the prompts (a bare string becomes a one-item list).

    Raises:
        TypeError: ``prompts`` is ``None``, a number, bytes, a mapping or another non-iterable;
            an item is not a string (or not a token-id list where those are allowed).
        ValueError: no prompts, or an empty string / empty token list.

    Example:
        >>> check_prompts("Hello there", caller="cache_activations")
        ['Hello there']
    """
    allowed = "a string or a non-empty list of strings" + (" or of token-id lists" if token_ids else "")
    if isinstance(prompts, str):
        prompts = [prompts]
    elif prompts is None or isinstance(prompts, (bytes, bytearray, Mapping)) or not isinstance(prompts, Iterable):
        raise TypeError(f"{caller}: {argument} must be {allowed}, got {_describe(prompts)}.")
    elif token_ids and _is_token_row(prompts) and len(prompts) > 0:
        raise TypeError(
            f"{caller}: {argument} is one list of token ids; pass a list of prompts, e.g. [{_describe(prompts)}]."
        )
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"{caller}: need a prompt or a non-empty list of prompts, got [] ({argument} is empty).")
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if prompt == "":
                raise ValueError(
                    f"{caller}: prompt {i} is empty ('') in {argument}; give at least one character (e.g. ' ')." + hint
                )
        elif token_ids and _is_token_row(prompt):
            if len(prompt) == 0:
                raise ValueError(f"{caller}: prompt {i} is an empty token-id list in {argument}.")
        else:
            what = "a str or a list of token ids" if token_ids else "a str"
            raise TypeError(f"{caller}: prompt {i} must be {what}, got {_describe(prompt)} (in {argument}).")
    return prompts


def check_prompt(prompt: Any, *, caller: str, argument: str, hint: str = "") -> str:
    """Validate one prompt string (e.g. ActAdd's ``plus``); return it.

    Raises:
        TypeError: not a string.
        ValueError: the empty string.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"{caller}: {argument} must be one prompt string, got {_describe(prompt)}.")
    return check_prompts(prompt, caller=caller, argument=argument, hint=hint)[0]


def check_context_lengths(lengths: Sequence[int], n_ctx: int | None, *, new_tokens: int = 0, caller: str = "labkit") -> None:
    """Refuse prompts that do not fit a context window of ``n_ctx`` tokens (``None``: no limit).

    Raises:
        ValueError: a prompt (plus ``new_tokens``) is longer than the window; the message names
            the prompt, its length and the window.
    """
    if n_ctx is None:
        return
    for i, length in enumerate(lengths):
        if length + new_tokens > n_ctx:
            extra = f" + {new_tokens} new tokens" if new_tokens else ""
            raise ValueError(
                f"{caller}: prompt {i} is {length} tokens{extra}; the model's context window is "
                f"{n_ctx} tokens. Shorten the prompt" + (" or lower max_new_tokens." if new_tokens else ".")
            )


def check_token_ids(rows: Sequence[Sequence[int]], vocab_size: int | None, *, caller: str = "trace_routing") -> None:
    """Refuse token ids outside ``0..vocab_size-1`` (torch would raise a bare IndexError).

    Raises:
        ValueError: an id below 0 or at / above ``vocab_size``.
    """
    for i, row in enumerate(rows):
        bad = [t for t in row if t < 0 or (vocab_size is not None and t >= vocab_size)]
        if bad:
            allowed = f"0..{vocab_size - 1}" if vocab_size is not None else "≥ 0"
            raise ValueError(
                f"{caller}: prompt {i} has token id {bad[0]} outside the model's vocabulary "
                f"({allowed}; {len(bad)} such id(s) in this prompt). Pass ids from this model's tokenizer, "
                "or pass text."
            )


def check_scope(scope: Any, *, caller: str = "trace_routing") -> tuple[str, int]:
    """A routing-trace scope: ``"all"``, ``"generated"`` or ``("last", k)``; returns ``(kind, k)``.

    Raises:
        ValueError: anything else.
    """
    if scope in ("all", "generated"):
        return scope, 0
    if (
        isinstance(scope, tuple)
        and len(scope) == 2
        and scope[0] == "last"
        and isinstance(scope[1], int)
        and not isinstance(scope[1], bool)
        and scope[1] >= 1
    ):
        return "last", scope[1]
    raise ValueError(f"{caller}: scope {scope!r} is not allowed; use 'all', 'generated', or ('last', k) with k ≥ 1.")


def check_per_prompt(entries: Any, n_prompts: int, *, name: str, caller: str = "generate") -> None:
    """Refuse per-prompt steering (``name`` as the caller spelled it) that is not one entry per prompt.

    Raises:
        ValueError: ``entries`` is a string, not a sequence, or not ``n_prompts`` long.
    """
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence):
        raise TypeError(
            f"{caller}: {name} must be a list with one entry per prompt, got {type(entries).__name__} "
            f"{entries!r:.80}; for one vector on every prompt use steering=."
        )
    if len(entries) != n_prompts:
        raise ValueError(
            f"{caller}: {name} has {len(entries)} entries for {n_prompts} prompts; {name} needs one entry "
            f"(a vector, a list of vectors or None) per prompt: {n_prompts} prompts."
        )


def check_out_dir(out_dir: Any, *, caller: str, argument: str = "out_dir") -> tuple[Path, bool]:
    """Validate a directory to write into: ``(path, existed)``; nothing is created here.

    It may be missing (the caller creates it, and may remove it again on failure) or an existing
    **empty** directory (the caller must then leave it in place on failure: ``existed`` is True).

    Raises:
        TypeError: not a ``str`` / ``os.PathLike``.
        ValueError: the path is an existing file (or other non-directory), a non-empty directory,
            or lies under a file.
    """
    if isinstance(out_dir, bool) or not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"{caller}: {argument} must be a path (str or os.PathLike), got {_describe(out_dir)}.")
    path = Path(out_dir)
    if str(out_dir) == "":
        raise ValueError(f"{caller}: {argument} is the empty string; give a directory path.")
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            where = "is" if parent == path else f"lies under {str(parent)!r}, which is"
            raise ValueError(
                f"{caller}: {argument} {str(path)!r} {where} an existing file, not a directory; "
                "choose a new directory path."
            )
        if parent.exists():
            break
    existed = path.is_dir()
    if existed and any(path.iterdir()):
        raise ValueError(f"{caller}: {argument} {str(path)!r} exists and is not empty; choose a new directory.")
    return path, existed


def check_names(names: Any, *, caller: str, argument: str) -> list[str]:
    """A name or an iterable of names (e.g. hook names) as a list of strings (may be empty).

    Raises:
        TypeError: ``None``, a number or another non-iterable; an item that is not a string.
    """
    if isinstance(names, str):
        return [names]
    if names is None or isinstance(names, (bytes, bytearray, Mapping)) or not isinstance(names, Iterable):
        raise TypeError(f"{caller}: {argument} must be a string or a list of strings, got {_describe(names)}.")
    names = list(names)
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"{caller}: {argument}[{i}] must be a str, got {_describe(name)}.")
    return names


def check_path(path: Any, *, caller: str, argument: str = "path") -> Path:
    """A ``str`` / ``os.PathLike`` as a :class:`~pathlib.Path`.

    Raises:
        TypeError: anything else (``None``, a number, bytes, ...).
        ValueError: the empty string.
    """
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{caller}: {argument} must be a path (str or os.PathLike), got {_describe(path)}.")
    if str(path) == "":
        raise ValueError(f"{caller}: {argument} is the empty string; give a file or directory path.")
    return Path(path)


@contextlib.contextmanager
def named_errors(caller: str) -> Iterator[None]:
    """Prefix a ``TypeError`` / ``ValueError`` raised by a shared validator inside the block with
    ``"{caller}: "`` (unless it already names ``caller``), so the user reads which entry point
    refused the input. Use it around argument validation only, never around a forward pass."""
    try:
        yield
    except (TypeError, ValueError) as error:
        if type(error) not in (TypeError, ValueError) or str(error).startswith(caller):
            raise
        raise type(error)(f"{caller}: {error}") from None


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
