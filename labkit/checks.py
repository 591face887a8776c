"""Public validators every layer of labkit reuses: one rule per kind of input, in one place.

Each validator raises labkit's own ``TypeError`` / ``ValueError`` whose message names the
function (``caller``), the argument, what was received and what is allowed, so a bad input fails
at the entry point instead of deep inside tokenisation or a forward pass.

This module imports nothing from labkit (every other module may import it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "check_names", "check_out_dir", "check_path", "check_positive_int", "check_prompt", "check_prompts", "named_errors",
]


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


def check_positive_int(value: Any, *, caller: str, argument: str) -> int:
    """``value`` if it is an int ≥ 1 (``bool`` is refused).

    Raises:
        ValueError: not an int, or < 1.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{caller}: {argument} must be a positive int, got {value!r}.")
    return value
