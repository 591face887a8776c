"""Causal expert attribution: what happens to a behaviour when one expert is switched off.

Frequency attribution (:mod:`labkit.moe.attribution`, MoTE's fTRI) asks which experts the router
*chooses* more on behaviour prompts; it cannot tell a redundant expert from a necessary one. This
module asks the interventional question directly. The behaviour is measured as the probability
of a target continuation under teacher forcing -- ``p(" I cannot" | prompt)`` for a refusal,
a language's own text for a language -- averaged over prompts (:func:`target_probability`); the
**causal effect** of ``(layer, expert)`` is

    effect = score(no mask) - score(that expert off)

where "off" is labkit's :func:`~labkit.moe.masking.masked` semantics: the next-best expert takes
the slot, weights as the family's own router computes them. A positive effect means the expert
carries the behaviour.

Two estimators, one result type (:class:`CausalAttribution`):

- ``method="ablation"``: exact, one masked pass over the prompts per expert
  (``n_layers * n_experts`` passes; right for small models and for checking the estimate).
- ``method="first_order"``: attribution patching (Nanda 2023; Syed, Rager & Conmy 2023,
  "Attribution Patching Outperforms Automated Circuit Discovery") applied to the mask itself.
  One forward and one backward pass give the gradient ``g_t`` of the score with respect to each
  MoE layer's routed-expert output at every token ``t``; switching expert ``e`` off changes that
  output by ``Δh_t(e) = experts(x_t, route_off_e) - experts(x_t, route)``, computed exactly
  (the family's routing with ``e`` excluded, the experts module re-run on the tokens whose
  selection changes). The estimate is ``effect ≈ -Σ_t g_t · Δh_t(e)``: first order in the
  change of the layer's output, exact in the routing. Experts of different layers are
  estimated from the same unmasked pass.

:func:`minimal_mask` searches the smallest set of experts whose removal cuts the behaviour by a
chosen fraction (greedy on exact masked scores, re-scored after every pick) and
:func:`validate_mask` checks a mask on held-out prompts against random masks of the same size and
layer profile.

The code lives in three modules: :mod:`labkit.moe.causal.target` (the behaviour score),
:mod:`labkit.moe.causal.effects` (the two estimators and :class:`CausalAttribution`) and
:mod:`labkit.moe.causal.mask_search` (:func:`minimal_mask`, :func:`validate_mask`); every name
is importable from here.
"""

from __future__ import annotations

from labkit.moe.causal.effects import KIND, METHODS, VERSION, CausalAttribution, Method, causal_attribution
from labkit.moe.causal.mask_search import MaskSearch, MaskValidation, minimal_mask, validate_mask
from labkit.moe.causal.target import SCORES, Score, target_logprobs, target_probability

__all__ = [
    "KIND", "METHODS", "SCORES", "VERSION", "CausalAttribution", "MaskSearch", "MaskValidation", "Method", "Score",
    "causal_attribution", "minimal_mask", "target_logprobs", "target_probability", "validate_mask",
]
