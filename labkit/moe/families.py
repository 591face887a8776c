"""MoE routing of a model handle: its family, its MoE layers and their routers.

The routing rules themselves (one declarative :class:`~labkit.moe.routers.RouterFamily` per
architecture, the exact router math) live in :mod:`labkit.moe.routers`, which needs no model; the
functions here take any model handle labkit serves (a labkit bridge, a plain Hugging Face model,
the vLLM engine's weightless skeleton) through its backend and read its module tree.
Layers without experts keep their true layer numbers: :func:`moe_layers` of a Qwen3-MoE with
``mlp_only_layers=[1]`` and three layers is ``[0, 2]``.
"""

from __future__ import annotations

import torch

from labkit.backends import backend_of
from labkit.moe.routers import (  # noqa: F401  (re-exported: the family table is part of this module's API)
    FAMILIES,
    NOT_ROUTED,
    MoELayer,
    RouterFamily,
    Scheme,
    Selection,
    check_router,
    decoder_layers,
    family_of_config,
    find_routers_in,
    route,
    router_keys,
    supported_families,
)

__all__ = [
    "FAMILIES",
    "NOT_ROUTED",
    "MoELayer",
    "RouterFamily",
    "Scheme",
    "Selection",
    "family_of",
    "find_routers",
    "hf_of",
    "moe_layers",
    "n_layers_of",
    "route",
    "supported_families",
]


def hf_of(model) -> torch.nn.Module:
    """The Hugging Face module tree to route on: a bridge's plain twin, a plain model itself, the
    vLLM engine's weightless ``meta`` skeleton.

    Raises:
        TypeError: not a model handle labkit serves.
    """
    return backend_of(model).module


def family_of(model) -> RouterFamily:
    """The :class:`RouterFamily` of a model (any backend).

    Raises:
        ValueError: the model is dense, of a MoE family labkit does not route (the message says
            why), or of an unknown type; the message lists the supported ``model_type`` values.
    """
    return family_of_config(hf_of(model).config)


def n_layers_of(model) -> int:
    """Number of decoder layers (dense and MoE)."""
    return len(decoder_layers(hf_of(model)))


def find_routers(model) -> list[MoELayer]:
    """Every MoE layer of the model, with its true layer index and router module.

    Raises:
        ValueError: dense / unsupported model, a supported family with no MoE layer, or a
            router with routing configuration labkit does not know
            (:func:`labkit.moe.routers.check_router`).
    """
    return find_routers_in(hf_of(model))


def moe_layers(model) -> list[int]:
    """True layer indices of the model's MoE layers (dense layers skipped, numbers kept).

    Args:
        model: a labkit bridge, a Hugging Face model or a vLLM handle of a supported family.

    Returns:
        e.g. ``[1, 2, 3]`` for a DeepSeek-V3 with ``first_k_dense_replace=1`` and 4 layers.

    Raises:
        ValueError: the model is dense or of an unsupported family (the message lists the
            supported families).

    Example:
        >>> moe_layers(model)  # doctest: +SKIP
        [0, 1, 2, ..., 15]
    """
    return [moe_layer.layer for moe_layer in find_routers(model)]
