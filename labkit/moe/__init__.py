"""Mixture-of-experts tools: routing traces, expert attribution, expert masks (one module each).

All MoE work runs on the plain Hugging Face twin (:func:`labkit.models.hf_model_of`) with plain
``torch`` forward hooks on each layer's router module, for every supported family (OLMoE,
Qwen2-MoE, Qwen3-MoE, Mixtral, GPT-OSS, DeepSeek-V3); see :mod:`labkit.moe.families`.
"""

from labkit.moe.attribution import ExpertAttribution, attribute_experts
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
]
