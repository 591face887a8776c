"""Where the residual stream enters a vLLM decoder layer, for every layer signature vLLM 0.32 uses.

vLLM's decoder layers take the residual stream in one of two forms:

* ``(positions, hidden_states, residual)`` and the orders GPT-OSS (``hidden_states, positions,
  residual``), Qwen3-Next and the hybrid (Mamba / conv) layers of Jamba, Nemotron-H, LFM2 and
  Granite-MoE-Hybrid (``hidden_states, residual, ...``) use: the stream entering the layer
  (TransformerLens ``blocks.L.hook_resid_pre``) is ``hidden_states + residual``, with ``residual
  is None`` at layer 0 (the fused add-RMSNorm adds them inside the layer);
* ``(positions, hidden_states)`` with no residual argument (Granite-MoE, Granite-MoE-Shared):
  ``hidden_states`` *is* the stream.

Either way adding a vector to ``hidden_states`` adds it to the residual stream.
:class:`LayerInputs` finds both arguments by name, positional or keyword.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["LayerInputs"]


class LayerInputs:
    """Read and replace ``hidden_states`` / ``residual`` in one decoder layer's call arguments.

    Raises:
        RuntimeError: the layer's ``forward`` has no ``hidden_states`` parameter.
    """

    def __init__(self, layer, index: int) -> None:
        names = [name for name, p in inspect.signature(layer.forward).parameters.items()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if "hidden_states" not in names:
            raise RuntimeError(
                f"labkit: decoder layer {index} ({type(layer).__name__}) takes {names}, with no hidden_states "
                "argument; labkit cannot find the residual stream entering it."
            )
        self.names = names
        self.has_residual = "residual" in names

    def get(self, args: tuple, kwargs: dict, name: str) -> Any:
        if name in kwargs:
            return kwargs[name]
        position = self.names.index(name) if name in self.names else len(args)
        return args[position] if position < len(args) else None

    def replace(self, args: tuple, kwargs: dict, name: str, value) -> tuple[tuple, dict]:
        if name in kwargs or self.names.index(name) >= len(args):
            return args, {**kwargs, name: value}
        position = self.names.index(name)
        return (*args[:position], value, *args[position + 1 :]), kwargs

    def stream(self, args: tuple, kwargs: dict):
        """The residual stream entering the layer: ``hidden_states + residual`` (or ``hidden_states``)."""
        hidden_states = self.get(args, kwargs, "hidden_states")
        residual = self.get(args, kwargs, "residual") if self.has_residual else None
        return hidden_states if residual is None else hidden_states + residual
