"""Inference engines beyond the single-process Hugging Face path.

``labkit.load_model(name, engine="vllm", tensor_parallel_size=N)`` returns a
:class:`labkit.engines.vllm.VLLMModel`; ``labkit.generate``, ``labkit.steered``,
``labkit.moe.masked`` and ``labkit.moe.trace_routing`` accept it and dispatch to it. Importing
this package imports no engine (vLLM is an optional dependency).
"""

from __future__ import annotations

__all__ = ["is_engine_model"]


def is_engine_model(model) -> bool:
    """Whether ``model`` is a labkit engine handle (not a TransformerLens bridge)."""
    return isinstance(getattr(type(model), "labkit_engine", None), str)
