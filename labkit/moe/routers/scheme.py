"""The routing math: one :class:`Scheme` per rule and one function, :func:`route`, that applies it.

:func:`route` recomputes ``(topk_indices, topk_weights)`` from a router's own logits with the exact
tensor ops of ``transformers`` 5.23 for the family's scheme, under an optional expert selection
(off / on / bias). The named schemes below are shared by the families of
:mod:`labkit.moe.routers.table`; the module table of :mod:`labkit.moe.routers` lists them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from labkit.interventions import Selection

__all__ = [
    "DEEPSEEK_V3", "GRANITE", "LLAMA4", "MIXTRAL", "SIGMOID_BIAS_SCALED", "SOFTMAX_ALWAYS", "SOFTMAX_FLAG",
    "SOFTMAX_NEVER_INPUT", "TOPK_SOFTMAX", "Scheme", "read_llama4", "read_standard", "route", "write_llama4",
    "write_standard",
]


@dataclass(frozen=True)
class Scheme:
    """The routing rule of a family, as data (see the module table).

    Attributes:
        score: ``"softmax"`` / ``"sigmoid"`` over all experts before the choice, or ``"none"``
            (top-k runs on the logits themselves).
        softmax_float: softmax computed in float32 (``dtype=torch.float``), else in the
            logits' dtype.
        upcast: logits cast to float32 before scoring (Mixtral's ``router_logits.float()``).
        correction: where the selection-only correction bias comes from: ``None``; ``"attr:<name>"``
            a router attribute / buffer (dotted path allowed; squeezed); ``"input"`` the router's
            second forward argument (the block's ``e_score_correction_bias`` / ``expert_bias``).
        choose_plus_bias: the plain softmax families rank by ``probs * exp(user bias)``; the
            others by ``score + user bias``.
        groups: ``None``; ``"top2_sum"`` (DeepSeek-V3: group score = sum of its top-2 choice
            scores); ``"max"`` (DeepSeek-V2: max score in the group).
        group_fill: value given to experts outside the chosen groups (``-inf`` or ``0.0``).
        group_sorted: ``sorted=`` of the group top-k (irrelevant to the set chosen).
        sorted: ``sorted=`` of the final top-k.
        weight: ``"score"`` (gather the unbiased scores), ``"softmax_of_chosen"`` /
            ``"sigmoid_of_chosen"`` (of the chosen logits).
        weight_float: the softmax / sigmoid over the chosen is computed in float32 (else in the
            logits' dtype).
        renormalise: ``True``, ``False`` or the router attribute holding the flag.
        eps: added to the renormalisation denominator.
        clamp_attr: router attribute whose value clamps the denominator from below (ERNIE).
        scale: router attribute holding a scaling factor applied after renormalisation.
        cast: final dtype of the weights: ``"logits"``, ``"input"`` (hidden states) or ``None``.
    """

    score: str = "softmax"
    softmax_float: bool = True
    upcast: bool = False
    correction: str | None = None
    choose_plus_bias: bool = False
    groups: str | None = None
    group_fill: float = -math.inf
    group_sorted: bool = False
    sorted: bool = True
    weight: str = "score"
    weight_float: bool = False
    renormalise: bool | str = False
    eps: float = 0.0
    clamp_attr: str | None = None
    scale: str | None = None
    cast: str | None = "logits"


def _correction(scheme: Scheme, router: torch.nn.Module, args: tuple, kwargs: dict) -> Tensor | None:
    if scheme.correction is None:
        return None
    if scheme.correction == "input":
        if len(args) > 1:
            return args[1]
        for name in ("expert_bias", "e_score_correction_bias"):
            if name in kwargs:
                return kwargs[name]
        raise ValueError(f"{type(router).__name__} was called without its correction-bias argument.")
    owner: Any = router
    for part in scheme.correction.removeprefix("attr:").split("."):
        owner = getattr(owner, part)
    return owner.squeeze()


def route(
    scheme: Scheme,
    router: torch.nn.Module,
    router_logits: Float[Tensor, "token expert"],
    selection: Selection | None = None,
    args: tuple = (),
    kwargs: dict | None = None,
) -> tuple[Int[Tensor, "token k"], Float[Tensor, "token k"]]:
    """Recompute ``(topk_indices, topk_weights)`` from the router's logits under a selection.

    With ``selection=None`` these are the family router's own tensor ops (transformers 5.23),
    bit for bit. Under a selection, off experts score ``-inf`` and on experts ``+inf`` in the
    choice (group-limited families: every group holding an on expert is forced into the chosen
    groups, and off experts stay ``-inf`` even where unchosen groups are filled with 0); the
    weights are gathered from the unadjusted scores.

    Args:
        scheme: the family's :class:`Scheme`.
        router: the Hugging Face router module (its ``top_k``, flags and buffers are read).
        router_logits: ``[token, expert]`` logits the router returned.
        selection: per-expert off / on / bias, or ``None``.
        args, kwargs: the router's forward inputs (for a correction bias passed as an argument,
            and the hidden-state dtype).

    Returns:
        ``topk_indices`` ``[token, k]`` (int64) and ``topk_weights`` ``[token, k]``.
    """
    kwargs = kwargs or {}
    k = int(router.top_k)
    logits = router_logits.float() if scheme.upcast else router_logits
    scores = _scores(scheme, logits)
    correction = _correction(scheme, router, args, kwargs)
    choice = scores if correction is None else scores + correction
    if selection is not None and selection.bias is not None:
        if scheme.score == "softmax" and not scheme.choose_plus_bias:
            choice = choice * selection.bias.to(choice).exp()
        else:
            choice = choice + selection.bias.to(choice)
    off = on = None
    if selection is not None:
        off = selection.off.to(choice.device) if selection.off.any() else None
        on = selection.on.to(choice.device) if selection.on.any() else None
    if off is not None:
        choice = choice.masked_fill(off, -math.inf)
    weight_source = scores
    if scheme.groups is not None:
        choice, weight_source = _limit_to_groups(scheme, router, choice, scores, off, on)
    if on is not None:
        choice = choice.masked_fill(on, math.inf)
    if selection is None and scheme.groups == "max":
        topk_weights, topk_indices = torch.topk(choice, k=k, dim=-1, sorted=scheme.sorted)
    else:
        topk_indices = torch.topk(choice, k=k, dim=-1, sorted=scheme.sorted)[1]
        topk_weights = weight_source.gather(1, topk_indices)
    return topk_indices, _final_weights(scheme, router, topk_weights, router_logits, args)


def _scores(scheme: Scheme, logits: Tensor) -> Tensor:
    """The scores the choice starts from: softmax / sigmoid over all experts, or the logits themselves."""
    if scheme.score == "softmax":
        if scheme.softmax_float:
            return torch.nn.functional.softmax(logits, dim=-1, dtype=torch.float)
        return torch.nn.functional.softmax(logits, dim=-1, dtype=logits.dtype)
    if scheme.score == "sigmoid":
        return logits.sigmoid()
    return logits


def _limit_to_groups(scheme: Scheme, router, choice: Tensor, scores: Tensor, off, on) -> tuple[Tensor, Tensor]:
    """Group-limited routing: keep the ``topk_group`` best of ``num_group`` groups (an on expert's group always).

    Returns the choice with unchosen groups filled with ``scheme.group_fill`` (off experts stay
    ``-inf``), and the tensor the weights are gathered from (DeepSeek-V2: the group-masked scores).
    """
    weight_source = scores
    n_group, n_experts = int(router.num_group), choice.shape[-1]
    grouped = choice.view(-1, n_group, n_experts // n_group)
    if scheme.groups == "top2_sum":
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
    else:
        group_scores = grouped.max(dim=-1).values
    if on is not None:
        group_scores = group_scores.masked_fill(on.view(n_group, -1).any(dim=-1), math.inf)
    group_idx = torch.topk(group_scores, k=int(router.topk_group), dim=-1, sorted=scheme.group_sorted)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, n_experts // n_group).reshape(-1, n_experts)
    choice = choice.masked_fill(~score_mask.bool(), scheme.group_fill)
    if scheme.groups == "max":  # DeepSeek-V2 weights with the group-masked scores themselves
        weight_source = scores.masked_fill(~score_mask.bool(), scheme.group_fill)
    if off is not None and scheme.group_fill != -math.inf:
        choice = choice.masked_fill(off, -math.inf)
    return choice, weight_source


def _final_weights(scheme: Scheme, router, topk_weights: Tensor, router_logits: Tensor, args: tuple) -> Tensor:
    """The chosen experts' weights: softmax / sigmoid of the chosen, renormalised, scaled and cast as the family does."""
    if scheme.weight == "softmax_of_chosen":
        dtype = torch.float if scheme.weight_float else topk_weights.dtype
        topk_weights = torch.nn.functional.softmax(topk_weights, dim=-1, dtype=dtype)
    elif scheme.weight == "sigmoid_of_chosen":
        topk_weights = (topk_weights.float() if scheme.weight_float else topk_weights).sigmoid()
    norm = scheme.renormalise
    if isinstance(norm, str):
        norm = bool(getattr(router, norm))
    if norm:
        denominator = topk_weights.sum(dim=-1, keepdim=True)
        if scheme.clamp_attr is not None:
            denominator = torch.clamp(denominator, min=getattr(router, scheme.clamp_attr))
        elif scheme.eps:
            denominator = denominator + scheme.eps
        topk_weights = topk_weights / denominator
    if scheme.scale is not None:
        topk_weights = topk_weights * getattr(router, scheme.scale)
    if scheme.cast == "logits":
        topk_weights = topk_weights.to(router_logits.dtype)
    elif scheme.cast == "input" and args:
        topk_weights = topk_weights.to(args[0].dtype)
    return topk_weights


# --- router output protocols ------------------------------------------------------------------


def read_standard(output, router) -> tuple[Tensor, Tensor, Tensor]:
    """``(router_logits, topk_weights, topk_indices, ...)``: the transformers 5.x router output."""
    return output[0], output[1], output[2]


def write_standard(output, router, topk_indices, topk_weights):
    """The router output with new weights and indices (logits and any further entries kept)."""
    return (output[0], topk_weights, topk_indices, *output[3:])


def read_llama4(output, router) -> tuple[Tensor, Tensor, Tensor]:
    """Llama 4 returns ``(router_scores [token, expert], router_logits)``; scores are 0 off the top-k.

    The chosen experts are those with a non-zero score, in the router's order (by logit).
    """
    router_scores, router_logits = output
    ranked = router_logits.masked_fill(router_scores == 0, -math.inf)
    topk_indices = torch.topk(ranked, int(router.top_k), dim=-1)[1]
    return router_logits, router_scores.gather(1, topk_indices), topk_indices


def write_llama4(output, router, topk_indices, topk_weights):
    """Llama 4's ``(router_scores, router_logits)`` with the new choice scattered into the scores."""
    router_scores, router_logits = output
    scores = torch.zeros_like(router_scores).scatter_(1, topk_indices, topk_weights.to(router_scores.dtype))
    return scores, router_logits


# --- schemes (the routing rules, shared by the families that use them) ------------------------

SOFTMAX_FLAG = Scheme("softmax", renormalise="norm_topk_prob")
SOFTMAX_ALWAYS = Scheme("softmax", renormalise=True)
SOFTMAX_NEVER_INPUT = Scheme("softmax", renormalise=False, cast="input")
MIXTRAL = Scheme("softmax", upcast=True, renormalise=True, cast=None)
TOPK_SOFTMAX = Scheme("none", weight="softmax_of_chosen", cast=None)
GRANITE = Scheme("none", upcast=True, weight="softmax_of_chosen", cast="input")
LLAMA4 = Scheme("none", weight="sigmoid_of_chosen", weight_float=True)
DEEPSEEK_V3 = Scheme(
    "sigmoid", correction="attr:e_score_correction_bias", groups="top2_sum", sorted=False,
    renormalise="norm_topk_prob", eps=1e-20, scale="routed_scaling_factor", cast=None,
)
SIGMOID_BIAS_SCALED = Scheme(
    "sigmoid", correction="attr:e_score_correction_bias", sorted=False, renormalise=True, eps=1e-20,
    scale="routed_scaling_factor", cast=None,
)
