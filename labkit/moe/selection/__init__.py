"""Expert-selection rules as one family: six published ways to pick "the experts of a behaviour".

Every rule scores each routed ``(layer, expert)`` cell and returns the same result type,
:class:`ExpertSelection` (a score per cell, the rule's own filter of eligible cells, the source
equation); ``selection.top(n)`` is the set a paper would switch off or force on, and
:func:`labkit.moe.scorecard.selection_scorecard` compares the rules against matched random sets.

Four rules read routing traces (:func:`~labkit.moe.trace.trace_routing` of behaviour and control
prompts), two read the model:

============================  ===================================================================
rule                          score of cell ``(l, e)`` (B: behaviour tokens, C: control tokens)
============================  ===================================================================
``frequency_difference``      fTRI, MoTE (2025) §3: mean over B prompts of the share of the
                              prompt's tokens whose top-k holds ``e``, minus the same over C
                              (labkit's :func:`~labkit.moe.attribution.attribute_experts`).
``risk_difference``           SteerMoE (Fayyaz et al. 2025, §3.1, eq. 1): ``A_B/N_B - A_C/N_C``,
                              ``A`` = tokens whose top-k holds ``e``, ``N`` = tokens, pooled over
                              *paired* prompts.
``npmi``                      RICE (Wang et al. 2025, §3.1): normalised pointwise mutual
                              information between "expert ``e`` chosen" and "the token is a
                              behaviour token", ``ln(p(x,y) / p(x) p(y)) / -ln p(x,y)``.
``stability_selection``       SAFEx (Lai et al. 2025, §2.2) after Meinshausen & Bühlmann (2010):
                              share of half-subsamples of the prompts in which the cell is among
                              a base rule's top ``top`` positive cells.
``ablation_effect``           exact causal effect: ``score(no mask) - score(e off)``
                              (:func:`~labkit.moe.causal.causal_attribution`).
``first_order_effect``        attribution patching of the mask: one forward + backward pass.
============================  ===================================================================

Where labkit differs from the papers (each function says so too): SteerMoE ranks ``|Δ|`` and
uses the sign to decide on/off, here the signed ``Δ`` is ranked (the experts that carry the
behaviour); RICE's ``x`` is the occurrence of a marker token (``<think>``) in generated text,
here ``x`` is "a token of a behaviour prompt" unless ``marker_token_ids`` names marker tokens;
SAFEx's base statistic is its own activation-frequency ranking on harmful prompts, here any
trace rule of this module (default fTRI).

The code: :mod:`labkit.moe.selection.result` (:class:`ExpertSelection`, :func:`rule_agreement`),
:mod:`labkit.moe.selection.trace_rules` and :mod:`labkit.moe.selection.model_rules`; every name is
importable from here.
"""

from __future__ import annotations

from labkit.moe.selection.model_rules import ablation_effect, first_order_effect
from labkit.moe.selection.result import KIND, RULES, VERSION, BaseRule, ExpertSelection, rule_agreement
from labkit.moe.selection.trace_rules import frequency_difference, npmi, risk_difference, stability_selection, trace_rules

__all__ = [
    "KIND",
    "VERSION",
    "BaseRule",
    "ExpertSelection",
    "RULES",
    "ablation_effect",
    "first_order_effect",
    "frequency_difference",
    "npmi",
    "risk_difference",
    "rule_agreement",
    "stability_selection",
    "trace_rules",
]
