"""Applying steering vectors: :func:`steered`, on any backend."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from labkit.backends import backend_of
from labkit.steering.vector import SteeringVector, flatten_vectors

__all__ = ["steered"]


@contextlib.contextmanager
def steered(model, *vectors: SteeringVector, rows: Sequence[Any] | None = None) -> Iterator[torch.nn.Module]:
    """Apply steering vectors to every forward pass of the model inside the block.

    Every way of running the model sees the vectors: the bridge's ``model(tokens)``,
    ``run_with_cache`` and ``generate``, and every labkit function (``labkit.generate``,
    ``cache_activations``, ``perplexity``, ``trace_routing``, the widgets). Hooks go only on the
    hook points the vectors name (plus one observer that reads attention masks and cache
    lengths), so a steered pass costs what the additions cost.
    Vectors are checked against the model first (name, width, layer range). Contexts nest and
    compose with other labkit contexts (``ExitStack``); every hook is removed on exit, on an
    exception and on ``KeyboardInterrupt``.

    ``rows`` makes a one-batch sweep: entry ``b`` (a vector, a list of vectors, or ``None``) is
    applied to batch row ``b`` only, so different vectors and coefficients share one batched
    forward pass or ``generate`` call; each row gets exactly what its solo run would get
    (``vectors`` apply to every row, before the row's own). Every forward pass inside the block
    must then have ``len(rows)`` rows.

    Args:
        model: a labkit bridge.
        *vectors: :class:`SteeringVector` objects for every row (lists are flattened; ``None``
            ignored), and interventions such as :class:`labkit.sae.FeatureClamp` (in-process
            backends only).
        rows: optional, one entry per batch row.

    Yields:
        The plain twin (``torch.nn.Module``), for callers that want the fast path directly;
        the model itself is steered as well.

    Raises:
        ValueError: a vector made for another model or width, or at a layer out of range; with
            ``rows``, a forward pass whose batch size is not ``len(rows)``.
        TypeError: an entry that is not a vector, a list of vectors or ``None``.

    Example:
        >>> with steered(model, actadd(model, "Love", "Hate", layer=6, coefficient=5)):  # doctest: +SKIP
        ...     labkit.generate(model, "I think dogs are").texts
    """
    everything = flatten_vectors(vectors, interventions=True)
    flat = [item for item in everything if isinstance(item, SteeringVector)]
    others = [item for item in everything if not isinstance(item, SteeringVector)]
    per_row = None
    if rows is not None:
        if isinstance(rows, (str, bytes, SteeringVector)) or not isinstance(rows, Sequence):
            raise TypeError(
                f"steered: rows must be a list with one entry per batch row (a SteeringVector, a list "
                f"of them, or None), got {type(rows).__name__}."
            )
        per_row = [flatten_vectors([entry], "steered(rows=...)") for entry in rows]
    backend = backend_of(model)
    if others and not backend.supports("forward"):
        raise ValueError(others[0].refusal("steered"))
    for other in others:
        other.check_compatible(model)
    with backend.steered(flat, rows=per_row) as handle, contextlib.ExitStack() as stack:
        for other in others:  # e.g. a FeatureClamp: after this call's vectors, in the given order
            stack.enter_context(other.applied(model))
        yield handle
