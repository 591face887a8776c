"""Mixture-of-experts tools: routing traces, expert attribution (frequency and causal), expert masks.

Routing traces run on the plain Hugging Face twin with plain ``torch`` forward hooks on each
layer's router module; expert masks hook the twin's routers and the original routers the
TransformerLens bridge calls, so ``model(tokens)``, ``run_with_cache`` and ``model.generate`` are
masked too. Supported families: 48 (every MoE text-generation family of transformers 5.23 but the
11 model types in ``NOT_ROUTED``, each named with the reason); ``supported_families()`` lists them and
:mod:`labkit.moe.families` gives each family's routing rule.
"""

from labkit.moe.attribution import ExpertAttribution, attribute_experts
from labkit.moe.causal import CausalAttribution, causal_attribution, minimal_mask, target_probability, validate_mask
from labkit.moe.evaluate import compare_conditions
from labkit.moe.families import FAMILIES, NOT_ROUTED, moe_layers, supported_families
from labkit.moe.masking import ExpertMask, masked
from labkit.moe.scorecard import ScoreSet, difference_interval, selection_scorecard
from labkit.moe.selection import (
    ExpertSelection,
    ablation_effect,
    first_order_effect,
    frequency_difference,
    npmi,
    risk_difference,
    rule_agreement,
    stability_selection,
    trace_rules,
)
from labkit.moe.trace import RoutingTrace, trace_routing

__all__ = [
    "RoutingTrace",
    "trace_routing",
    "ExpertMask",
    "masked",
    "moe_layers",
    "FAMILIES",
    "NOT_ROUTED",
    "supported_families",
    "attribute_experts",
    "ExpertAttribution",
    "compare_conditions",
    "CausalAttribution",
    "causal_attribution",
    "minimal_mask",
    "validate_mask",
    "target_probability",
    "ExpertSelection",
    "frequency_difference",
    "risk_difference",
    "npmi",
    "stability_selection",
    "ablation_effect",
    "first_order_effect",
    "trace_rules",
    "rule_agreement",
    "ScoreSet",
    "selection_scorecard",
    "difference_interval",
]
