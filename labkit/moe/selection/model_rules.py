"""The two expert-selection rules that read the model: the causal effect of switching an expert off.

Exact ablation and its first-order estimate (:func:`labkit.moe.causal.causal_attribution`), as
:class:`~labkit.moe.selection.ExpertSelection` with the filter ``effect > 0``.
"""

from __future__ import annotations

from typing import Any

from labkit.moe.selection.result import ExpertSelection

__all__ = ["ablation_effect", "first_order_effect"]


def _causal(rule: str, method: str, model, prompts, targets, source: str, kwargs) -> ExpertSelection:
    from labkit.moe.causal import causal_attribution
    from labkit.moe.families import find_routers

    result = causal_attribution(model, prompts, targets, method=method, **kwargs)
    effect = result.effect.double()
    return ExpertSelection(
        rule=rule, score=effect, eligible=effect > 0, layers=tuple(result.layers), n_experts=result.n_experts,
        top_k=int(find_routers(model)[0].top_k), model_name=result.model_name, filter="effect > 0", source=source,
        settings={"method": result.method, "score": result.score, "baseline": result.baseline, "n_prompts": result.n_prompts},
    )


def ablation_effect(model, prompts, targets, **kwargs: Any) -> ExpertSelection:
    """Exact causal effect of switching each expert off (one masked pass per expert).

    ``score(l, e) = S(no mask) - S(e off)``, ``S`` = mean over prompts of ``p(target | prompt)``
    (``score="logprob"``: mean log-probability per target token); "off" is
    :func:`~labkit.moe.masking.masked`'s rule (the next-best expert takes the slot). Filter:
    ``effect > 0``. This is :func:`~labkit.moe.causal.causal_attribution` with
    ``method="ablation"``; keyword arguments go to it (``score=``, ``layers=``, ``batch_size=``).

    Raises:
        ValueError / TypeError: as :func:`~labkit.moe.causal.causal_attribution`.
    """
    return _causal("ablation_effect", "ablation", model, prompts, targets,
                   "exact ablation: S(no mask) - S(expert off) (labkit.moe.causal)", kwargs)


def first_order_effect(model, prompts, targets, **kwargs: Any) -> ExpertSelection:
    """First-order estimate of the same effect from one forward and one backward pass.

    Attribution patching (Nanda 2023; Syed, Rager & Conmy 2023) of the mask:
    ``effect(l, e) ≈ -Σ_t g_t · Δh_t(e)``, ``g_t`` the gradient of the score at layer ``l``'s
    routed-expert output, ``Δh_t(e)`` the exact change of that output when ``e``'s slot is
    re-routed. :func:`~labkit.moe.causal.causal_attribution` with ``method="first_order"``.
    Filter: ``effect > 0``.

    Raises:
        ValueError / TypeError / NotImplementedError: as :func:`~labkit.moe.causal.causal_attribution`.
    """
    return _causal("first_order_effect", "first_order", model, prompts, targets,
                   "attribution patching of the mask (Syed, Rager & Conmy 2023) (labkit.moe.causal)", kwargs)


