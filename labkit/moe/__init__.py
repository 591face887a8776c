"""Mixture-of-experts tools: routing traces, expert attribution (frequency and causal), expert masks.

Routing traces run on the plain Hugging Face twin with plain ``torch`` forward hooks on each
layer's router module; expert masks hook the twin's routers and the original routers the
TransformerLens bridge calls, so ``model(tokens)``, ``run_with_cache`` and ``model.generate`` are
masked too. Supported families (OLMoE, Qwen2-MoE, Qwen3-MoE, Mixtral, GPT-OSS, DeepSeek-V3): see
:mod:`labkit.moe.families`.
"""

from labkit.moe.attribution import ExpertAttribution, attribute_experts
from labkit.moe.causal import CausalAttribution, causal_attribution, minimal_mask, target_probability, validate_mask
from labkit.moe.evaluate import compare_conditions
from labkit.moe.families import moe_layers
from labkit.moe.masking import ExpertMask, masked
from labkit.moe.trace import RoutingTrace, trace_routing

__all__ = [
    "RoutingTrace",
    "trace_routing",
    "ExpertMask",
    "masked",
    "moe_layers",
    "attribute_experts",
    "ExpertAttribution",
    "compare_conditions",
    "CausalAttribution",
    "causal_attribution",
    "minimal_mask",
    "validate_mask",
    "target_probability",
]
