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

The stream leaving the layer (``blocks.{L}.hook_resid_post``) is the sum of the layer's two
outputs ``(hidden_states, residual)`` (the next layer's fused add-RMSNorm adds them), or its one
output where the layer takes no residual. The attention block's output (``hook_attn_out``) and
the MLP / MoE block's output (``hook_mlp_out``) are the outputs of the layer's attention and
feed-forward child modules, found by name (:func:`block_children`); under tensor parallelism both
are already all-reduced (their last projection is row-parallel with ``reduce_results=True``, or
the MoE block reduces before it returns), which the TP=2 tests check.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["ATTENTION_NAMES", "FEED_FORWARD_NAMES", "LayerInputs", "block_children", "layer_output_stream", "add_to_output"]

#: Child names vLLM 0.32's decoder layers give their attention block (first match wins).
ATTENTION_NAMES: tuple[str, ...] = ("self_attn", "attn", "attention", "self_attention")
#: Child names of the feed-forward (MLP or MoE) block.
FEED_FORWARD_NAMES: tuple[str, ...] = ("mlp", "block_sparse_moe", "feed_forward", "moe", "ffn")


def block_children(layer) -> dict[str, Any]:
    """``{"hook_attn_out": module, "hook_mlp_out": module}`` for the children this layer has.

    A hybrid layer (Mamba / conv mixer) has no attention child; its ``hook_attn_out`` is absent.
    """
    out = {}
    for site, names in (("hook_attn_out", ATTENTION_NAMES), ("hook_mlp_out", FEED_FORWARD_NAMES)):
        for name in names:
            child = getattr(layer, name, None)
            if child is not None and callable(child):
                out[site] = child
                break
    return out


def layer_output_stream(output):
    """The residual stream leaving a decoder layer, from its output (see the module docstring)."""
    if isinstance(output, tuple):
        hidden_states = output[0]
        residual = output[1] if len(output) > 1 else None
        if residual is None or not hasattr(residual, "shape") or residual.shape != hidden_states.shape:
            return hidden_states
        return hidden_states + residual
    return output


def add_to_output(output, delta):
    """A module output with ``delta`` added to its (first) tensor; a new tensor, never in place."""
    if isinstance(output, tuple):
        first = output[0]
        return (first + delta.to(first.dtype).view(first.shape), *output[1:])
    return output + delta.to(output.dtype).view(output.shape)


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
