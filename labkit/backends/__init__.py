"""Backends: one protocol (:class:`Backend`) that every model handle labkit serves implements.

:func:`backend_of` is the one place labkit asks what kind of object a model handle is; every
public function calls it once and then calls methods. See :mod:`labkit.backends.base` for the
protocol, the capabilities and the contract of an open intervention on each backend.
"""

from __future__ import annotations

from typing import Any

from labkit.backends.base import CAPABILITIES, Backend, NotOnBackendError

__all__ = ["CAPABILITIES", "Backend", "NotOnBackendError", "backend_of"]


def backend_of(model: Any) -> Backend:
    """The backend of a model handle: the one backend type test of labkit.

    Args:
        model: a labkit bridge (``labkit.load_model``), its :class:`~labkit.backends.hf.LabModel`,
            a vLLM handle (``load_model(..., engine="vllm")``), or a plain Hugging Face
            ``PreTrainedModel`` (MoE traces and masks only).

    Returns:
        The :class:`Backend` serving it.

    Raises:
        TypeError: anything else (the message says how to load a model with labkit).
    """
    if isinstance(model, Backend):
        return model
    record = getattr(model, "__dict__", {}).get("labkit")
    if isinstance(record, Backend):
        return record
    from labkit.backends.hf import plain_backend

    return plain_backend(model)
