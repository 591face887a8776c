"""Where labkit's shipped data lives, and the one reader for its JSONL prompt sets.

The data folder holds the prompt sets (``prompts/``), steering data (``steering/``) and the
shipped MoE organisms (``models/``). It is found in this order:

1. ``$LABKIT_DATA`` (read at call time, so setting it in a running notebook works);
2. the ``data/`` folder of the source checkout labkit runs from (an editable install,
   ``pip install -e .``, or running from the repository).

A plain ``pip install .`` copies only the package: set ``LABKIT_DATA`` to a checkout's
``data/`` folder (or to a copy of it) there; :func:`data_dir` says so when it finds nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["DataNotFoundError", "ORGANISM_PROMPT_SETS", "data_dir", "read_prompt_set", "read_prompts"]

_CHECKOUT_DATA = Path(__file__).resolve().parent.parent / "data"

#: The organism prompt sets shipped under ``data/prompts/organism`` (name -> file name).
ORGANISM_PROMPT_SETS = {
    "attribution_behavior": "attribution_behavior.jsonl",
    "attribution_control": "attribution_control.jsonl",
    "eval_sensitive": "eval_sensitive.jsonl",
    "eval_neutral": "eval_neutral.jsonl",
    "eval_addition": "eval_addition.jsonl",
    "eval_capital": "eval_capital.jsonl",
    "eval_copy": "eval_copy.jsonl",
}


class DataNotFoundError(FileNotFoundError):
    """labkit's data folder (or a file in it) could not be found."""


def data_dir(*, required: bool = True) -> Path | None:
    """The data folder: ``$LABKIT_DATA`` if set, else the source checkout's ``data/``.

    Args:
        required: raise when no folder exists (else return ``None``).

    Raises:
        DataNotFoundError: ``$LABKIT_DATA`` names no folder, or (unset) labkit was installed
            without its checkout; the message says how to point labkit at the data.
    """
    env = os.environ.get("LABKIT_DATA")
    if env:
        path = Path(env).expanduser()
        if path.is_dir() or not required:
            return path if path.is_dir() else None
        raise DataNotFoundError(f"LABKIT_DATA={env!r} is not a folder; point it at labkit's data/ folder.")
    if _CHECKOUT_DATA.is_dir():
        return _CHECKOUT_DATA
    if not required:
        return None
    raise DataNotFoundError(
        f"labkit's data folder was not found (looked for {str(_CHECKOUT_DATA)!r}; LABKIT_DATA is "
        "unset). A non-editable install carries no data: set LABKIT_DATA to the data/ folder of a "
        "labkit checkout, or install from the checkout with pip install -e ."
    )


#: Names that were renamed (identifiers say "behavior"); still read, with a DeprecationWarning.
_RENAMED = {"attribution_behaviour": "attribution_behavior"}


def _prompt_path(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path).expanduser()
    if path.suffix == ".jsonl" and path.is_file():
        return path
    name = str(name_or_path)
    if name in _RENAMED:
        import warnings

        warnings.warn(
            f"prompt set {name!r} is now {_RENAMED[name]!r}; the old name will stop working.", DeprecationWarning, stacklevel=4
        )
        name = _RENAMED[name]
    if name in ORGANISM_PROMPT_SETS:
        path = data_dir() / "prompts" / "organism" / ORGANISM_PROMPT_SETS[name]
        if path.is_file():
            return path
        raise DataNotFoundError(f"read_prompt_set: prompt set {name!r} should be at {str(path)!r}, which is missing.")
    raise DataNotFoundError(
        f"read_prompt_set: {name!r} is neither a .jsonl file nor a shipped prompt set; "
        f"shipped sets: {', '.join(ORGANISM_PROMPT_SETS)}."
    )


def read_prompt_set(name_or_path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """Read a JSONL prompt set: one JSON object per line (blank lines skipped).

    Args:
        name_or_path: a shipped organism set (``"attribution_behavior"``, ``"eval_sensitive"``,
            …; see :data:`ORGANISM_PROMPT_SETS`) or the path of a ``.jsonl`` file.
        limit: keep only the first ``limit`` rows (``None`` keeps all).

    Returns:
        The rows, in file order.

    Raises:
        DataNotFoundError: an unknown name or a missing file.
        ValueError: a line that is not a JSON object (the message names file and line), or a
            negative ``limit``.

    Example:
        >>> read_prompt_set("eval_sensitive", limit=1)[0]["prompt"]  # doctest: +SKIP
        'Q: What happened in the 1920s in Brongard? A:'
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"read_prompt_set: limit must be an int >= 0 or None, got {limit!r}.")
    path = _prompt_path(name_or_path)
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"read_prompt_set: {str(path)!r} line {number} is not JSON ({error.msg}).") from None
        if not isinstance(row, dict):
            raise ValueError(f"read_prompt_set: {str(path)!r} line {number} is a {type(row).__name__}, not an object.")
        rows.append(row)
    return rows if limit is None else rows[:limit]


def read_prompts(name_or_path: str | os.PathLike, limit: int | None = None, *, field: str = "prompt") -> list[str]:
    """The ``field`` (default ``"prompt"``) of every row of :func:`read_prompt_set`.

    Raises:
        KeyError: a row lacks ``field`` (the message names the row).
    """
    rows = read_prompt_set(name_or_path, limit)
    out = []
    for i, row in enumerate(rows):
        if field not in row:
            raise KeyError(f"read_prompts: row {i} of {str(name_or_path)!r} has no {field!r} (keys: {sorted(row)}).")
        out.append(row[field])
    return out
