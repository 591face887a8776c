"""Per-family router specs: where each MoE layer's router lives and how it chooses experts.

One declarative :class:`RouterFamily` entry per architecture (the TransformerLens adapter idea:
one dict per family), built from a handful of shared :class:`Scheme` values: a family that is a
variant of another (DeepSeek-V3 routing reused by GLM-4.5, dots1, Kimi, MiMo, ...) is the same
``Scheme`` with its own model types and router class, not a copy of code. The Hugging Face router
module of every supported family is called once per MoE layer on the flattened ``batch * pos``
tokens; labkit hooks that module with a plain ``torch`` forward hook on the plain twin
(:func:`labkit.moe.families.hf_of`): tracing reads its output, masking replaces it.

Each family's routing is recomputed from the router's own logits by one function,
:func:`route`, driven by the family's :class:`Scheme` — the *exact* tensor ops of
``transformers`` 5.23 (read from ``transformers/models/<family>/modeling_<family>.py``), so that
with no selection adjustment the recomputation equals the router's output bit for bit (tested
for every family). The schemes:

===================  ==========================================================================
scheme               router math (transformers 5.23)
===================  ==========================================================================
softmax top-k        softmax over all experts (float32) → top-k → renormalise per flag /
                     always / never (OLMoE, Qwen-MoE, Mixtral, MiniMax, Jamba, Hunyuan, ...)
top-k then softmax   top-k on the logits → softmax over the k chosen (GPT-OSS, Granite-MoE,
                     Aria, Cohere2-MoE ``expert_selection_fn="softmax"``)
top-k then sigmoid   top-k on the logits (+ correction bias) → sigmoid of the k chosen
                     (Llama 4, Kolibri, Cohere2-MoE ``"sigmoid"``)
sigmoid (+bias)      sigmoid scores; choose on scores + ``e_score_correction_bias`` (a router
                     buffer or a block tensor passed to the router); optionally within the
                     top ``topk_group`` of ``n_group`` groups (group score = sum of its top-2;
                     AXK2 fills unchosen groups with 0, not -inf); weight with the unbiased
                     scores; renormalise; × a scaling factor (DeepSeek-V3 and its variants,
                     MiniMax-M2, Hunyuan-V3, AFMoE, LFM2-MoE, Laguna, Flint, ...)
DeepSeek-V2          softmax; greedy or group-limited greedy (group score = max), never
                     renormalised, × ``routed_scaling_factor``
ERNIE 4.5            softmax; choose on probabilities + ``moe_statics`` correction bias;
                     renormalise with the sum clamped at ``moe_norm_min``
LongCat-Flash        softmax over routed + zero (identity) experts; choose on + correction
                     bias; × ``routed_scaling_factor``; zero experts are indices ≥ ``n_routed``
===================  ==========================================================================

A family's entry also names every attribute, parameter, buffer and submodule of its router
that the scheme accounts for; :func:`find_routers` refuses a router with any other (a routing
option a future ``transformers`` adds must never be silently ignored), and option values the
scheme does not implement (DeepSeek-V2 ``topk_method``, Cohere2 ``expert_selection_fn``,
Inkling-2 ``scoring_func``) are refused by name.

Families of the pinned ``transformers`` that labkit does *not* route are listed with the reason
in :data:`NOT_ROUTED`; ``tests/test_moe_families.py`` lists every MoE text-generation family
``transformers`` ships and fails on one that is in neither table.

TransformerLens 4.3 boots most of these families (its ``MoEBridge`` wraps the Hugging Face block
and calls its forward); labkit never routes through the bridge, only through the plain twin.

Layers without experts keep their true layer numbers: :func:`moe_layers` of a Qwen3-MoE with
``mlp_only_layers=[1]`` and three layers is ``[0, 2]``.

The code: :mod:`labkit.moe.routers.scheme` (:class:`Scheme`, :func:`route`, the router output
protocols) and :mod:`labkit.moe.routers.table` (:class:`RouterFamily`, the family table, router
lookup and checks); every name is importable from here.
"""

from __future__ import annotations

from labkit.interventions import Selection
from labkit.moe.routers.scheme import Scheme, route
from labkit.moe.routers.table import (
    FAMILIES,
    NOT_ROUTED,
    MoELayer,
    RouterFamily,
    check_router,
    decoder_layers,
    family_of_config,
    find_routers_in,
    router_keys,
    supported_families,
)

__all__ = [
    "RouterFamily",
    "Scheme",
    "Selection",
    "FAMILIES",
    "NOT_ROUTED",
    "MoELayer",
    "check_router",
    "decoder_layers",
    "family_of_config",
    "find_routers_in",
    "route",
    "router_keys",
    "supported_families",
]
