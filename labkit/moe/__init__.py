"""Mixture-of-experts tools: routing traces, expert attribution (frequency and causal), expert masks.

Routing traces run on the plain Hugging Face twin with plain ``torch`` forward hooks on each
layer's router module; expert masks hook the twin's routers and the original routers the
TransformerLens bridge calls, so ``model(tokens)``, ``run_with_cache`` and ``model.generate`` are
masked too. Supported families: 48 (every MoE text-generation family of transformers 5.23 but the
11 model types in ``NOT_ROUTED``, each named with the reason); ``supported_families()`` lists them and
:mod:`labkit.moe.families` gives each family's routing rule.
"""

import importlib

# Names resolve on first use (PEP 562): importing one submodule (the backends read
# ``labkit.moe.routers``) does not import the analysis layers above it.
_WHERE = {
    "ExpertAttribution": "attribution", "attribute_experts": "attribution",
    "CausalAttribution": "causal", "causal_attribution": "causal", "minimal_mask": "causal",
    "validate_mask": "causal", "target_probability": "causal",
    "compare_conditions": "evaluate",
    "FAMILIES": "families", "NOT_ROUTED": "families", "moe_layers": "families", "supported_families": "families",
    "ExpertMask": "masking", "masked": "masking",
    "RoutingTrace": "trace", "trace_routing": "trace",
    "ScoreSet": "scorecard", "difference_interval": "scorecard", "selection_scorecard": "scorecard",
    "ExpertSelection": "selection", "ablation_effect": "selection", "first_order_effect": "selection",
    "frequency_difference": "selection", "npmi": "selection", "risk_difference": "selection",
    "rule_agreement": "selection", "stability_selection": "selection", "trace_rules": "selection",
}


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'labkit.moe' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"labkit.moe.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


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
