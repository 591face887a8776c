"""The four expert-selection rules that read routing traces: fTRI, SteerMoE, RICE, SAFEx.

Each takes the :class:`~labkit.moe.trace.RoutingTrace` of behaviour and control prompts and
returns an :class:`~labkit.moe.selection.ExpertSelection`; see :mod:`labkit.moe.selection` for the
table of rules and where labkit differs from the papers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from labkit.checks import check_int, check_trace_pair
from labkit.moe.selection.result import BaseRule, ExpertSelection, nan_as_lowest, selection_from_scores

__all__ = ["frequency_difference", "npmi", "risk_difference", "stability_selection", "trace_rules"]


# --- per-prompt counts of a trace ------------------------------------------------------------


@dataclass(frozen=True)
class _Counts:
    """Per prompt: tokens whose top-k held each expert, tokens counted, and the same restricted
    to marker tokens (RICE); numpy float64."""

    selected: np.ndarray  # (prompt, layer, expert)
    tokens: np.ndarray  # (prompt,)
    marker_selected: np.ndarray  # (prompt, layer, expert)
    marker_tokens: np.ndarray  # (prompt,)


def _counts(trace, last_tokens: int | None, marker_token_ids=None) -> _Counts:
    indices = trace.topk_indices.long()
    prompt_index, position = trace.prompt_index.long(), trace.position.long()
    n_layers, n_tokens, _ = indices.shape
    n_prompts, n_experts = int(trace.n_prompts), int(trace.n_experts)
    keep = torch.ones(n_tokens, dtype=torch.bool)
    if last_tokens is not None:
        length = torch.zeros(n_prompts, dtype=torch.long).scatter_reduce(0, prompt_index, position + 1, reduce="amax")
        keep = position >= length[prompt_index] - last_tokens
    is_marker = torch.zeros(n_tokens, dtype=torch.bool)
    if marker_token_ids is not None:
        is_marker = torch.isin(trace.token_ids.long(), torch.as_tensor(list(marker_token_ids), dtype=torch.long))
    layer_of = torch.arange(n_layers).view(n_layers, 1, 1).expand_as(indices)

    def per_prompt(mask: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Counts per (prompt, layer, expert) by one bincount (no dense token x expert tensor);
        an expert appears at most once in a token's top-k, so each count is a number of tokens."""
        chosen = keep & mask
        cell = (prompt_index[chosen].view(1, -1, 1) * n_layers + layer_of[:, chosen]) * n_experts + indices[:, chosen]
        size = n_prompts * n_layers * n_experts
        out = torch.bincount(cell.reshape(-1), minlength=size).double().view(n_prompts, n_layers, n_experts)
        tokens = torch.bincount(prompt_index[chosen], minlength=n_prompts).double()
        return out.numpy(), tokens.numpy()

    selected, tokens = per_prompt(torch.ones(n_tokens, dtype=torch.bool))
    marker_selected, marker_tokens = per_prompt(is_marker)
    return _Counts(selected, tokens, marker_selected, marker_tokens)


def _frequency_score(b: _Counts, c: _Counts, pick_b=None, pick_c=None) -> np.ndarray:
    """fTRI with prompt aggregation: mean per-prompt selection rate, B minus C (prompts without
    counted tokens are left out, as in attribute_experts)."""

    def rate(counts: _Counts, pick) -> np.ndarray:
        pick = np.arange(counts.tokens.shape[0]) if pick is None else pick
        tokens, selected = counts.tokens[pick], counts.selected[pick]
        present = tokens > 0
        return (selected[present] / tokens[present][:, None, None]).mean(axis=0)

    return rate(b, pick_b) - rate(c, pick_c)


def _risk_difference_score(b: _Counts, c: _Counts, pick_b=None, pick_c=None) -> np.ndarray:
    pick_b = slice(None) if pick_b is None else pick_b
    pick_c = slice(None) if pick_c is None else pick_c
    return b.selected[pick_b].sum(0) / b.tokens[pick_b].sum() - c.selected[pick_c].sum(0) / c.tokens[pick_c].sum()


def _npmi_score(b: _Counts, c: _Counts, markers: bool, pick_b=None, pick_c=None) -> np.ndarray:
    """nPMI of (expert chosen, x) over the pooled tokens; x = behaviour token, or marker token."""
    pick_b = slice(None) if pick_b is None else pick_b
    pick_c = slice(None) if pick_c is None else pick_c
    total = b.tokens[pick_b].sum() + c.tokens[pick_c].sum()
    n_y = b.selected[pick_b].sum(0) + c.selected[pick_c].sum(0)
    if markers:
        n_x = b.marker_tokens[pick_b].sum() + c.marker_tokens[pick_c].sum()
        n_xy = b.marker_selected[pick_b].sum(0) + c.marker_selected[pick_c].sum(0)
    else:
        n_x, n_xy = b.tokens[pick_b].sum(), b.selected[pick_b].sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        p_xy, p_x, p_y = n_xy / total, n_x / total, n_y / total
        value = np.log(p_xy / (p_x * p_y)) / -np.log(p_xy)
    value = np.where(n_xy == 0, -1.0, value)  # never together: nPMI = -1 by definition
    return np.where(n_xy == total, 1.0, value)  # x and y on every token: complete co-occurrence


def _check_last_tokens(last_tokens, caller):
    if last_tokens is not None:
        check_int(last_tokens, "last_tokens", caller=caller, minimum=1)


# --- the trace rules ----------------------------------------------------------------------------


def frequency_difference(behavior, control, *, last_tokens: int | None = None) -> ExpertSelection:
    """fTRI (MoTE 2025, §3): how much more often the router picks each expert for the behaviour.

    ``score = mean_{p in B} A_p(e)/N_p - mean_{p in C} A_p(e)/N_p`` per layer, where ``A_p(e)``
    counts the tokens of prompt ``p`` whose top-k holds expert ``e`` and ``N_p`` the prompt's
    counted tokens. MoTE compares how often each expert is activated on the two prompt sets;
    labkit averages per-prompt rates so that each prompt weighs the same and one long prompt
    cannot dominate (pooled token counts: :func:`risk_difference`). Filter: ``score > 0``. This is
    :func:`~labkit.moe.attribution.attribute_experts` with ``metric="frequency",
    aggregate="prompt"``; use that function for p-values, intervals and the noise floor.

    Args:
        behavior: :class:`~labkit.moe.trace.RoutingTrace` of the behaviour prompts.
        control: trace of the control prompts (same model and layers; need not be paired).
        last_tokens: count only each prompt's last this many tokens (``None``: all).

    Returns:
        An :class:`ExpertSelection` named ``"frequency_difference"``.

    Raises:
        ValueError: traces from different models / layers / expert counts / top-k, an empty
            trace, or a bad ``last_tokens``.
        TypeError: an argument is not a routing trace.

    Example:
        >>> selection = frequency_difference(behavior_trace, control_trace, last_tokens=3)  # doctest: +SKIP
        >>> selection.top(2)  # doctest: +SKIP
        [(1, 13), (2, 5)]
    """
    from labkit.moe.attribution import attribute_experts

    check_trace_pair(behavior, control, caller="frequency_difference")
    _check_last_tokens(last_tokens, "frequency_difference")
    attribution = attribute_experts(
        behavior, control, metric="frequency", aggregate="prompt", n_bootstrap=0, n_splits=0, last_tokens=last_tokens
    )
    score = attribution.score.double().numpy()
    return selection_from_scores(
        "frequency_difference", score, score > 0, behavior, filter="score > 0",
        source="MoTE (2025) §3, fTRI: mean per-prompt selection rate on behaviour minus control prompts",
        settings={"last_tokens": last_tokens, "aggregate": "prompt"},
    )


def risk_difference(behavior, control, *, last_tokens: int | None = None) -> ExpertSelection:
    """SteerMoE's risk difference (Fayyaz et al. 2025, §3.1, eq. 1) over paired prompts.

    ``Δ(l, e) = A_B / N_B - A_C / N_C``: ``A`` counts the tokens (pooled over all prompts of a
    set) whose top-k at layer ``l`` holds ``e``, ``N`` the tokens. SteerMoE builds the two sets
    as *pairs* that differ only in the behaviour, so the rule refuses traces of unequal prompt
    counts. Differences from the paper: the signed ``Δ`` is ranked (SteerMoE ranks ``|Δ|`` and
    uses the sign to pick activation or deactivation); filter ``Δ > 0``.

    Args:
        behavior: trace of the behaviour prompts (prompt ``i`` paired with control prompt ``i``).
        control: trace of the paired control prompts.
        last_tokens: count only each prompt's last this many tokens.

    Returns:
        An :class:`ExpertSelection` named ``"risk_difference"``.

    Raises:
        ValueError: unpaired traces (different prompt counts), traces of different models /
            layers / routing shapes, an empty trace, or a bad ``last_tokens``.
        TypeError: an argument is not a routing trace.
    """
    check_trace_pair(behavior, control, caller="risk_difference", paired=True)
    _check_last_tokens(last_tokens, "risk_difference")
    score = _risk_difference_score(_counts(behavior, last_tokens), _counts(control, last_tokens))
    return selection_from_scores(
        "risk_difference", score, score > 0, behavior, filter="Δ > 0",
        source="SteerMoE (Fayyaz et al. 2025) §3.1 eq. 1: A_B/N_B - A_C/N_C over paired prompts, tokens pooled",
        settings={"last_tokens": last_tokens},
    )


def npmi(behavior, control, *, last_tokens: int | None = None, marker_token_ids=None) -> ExpertSelection:
    """RICE's normalised pointwise mutual information (Wang et al. 2025, §3.1).

    Over the pooled tokens of both traces (``T`` of them), per layer ``l`` and expert ``e``:
    ``y`` = "the token's top-k holds ``e``", ``x`` = "the token belongs to a behaviour prompt"
    (or, with ``marker_token_ids``, "the token is one of these marker tokens" -- RICE's
    ``<think>``), ``p(·)`` = counts / ``T``, and

        nPMI(x, y) = ln[p(x, y) / (p(x) p(y))] / -ln p(x, y)      (in [-1, 1])

    with ``-1`` where the two never co-occur and ``1`` where they co-occur on every token. RICE
    uses ``log2`` (the ratio is base-free) and markers in generated reasoning; here the default
    ``x`` is set membership, so the score asks how exclusively ``e`` serves behaviour tokens.
    Filter: ``nPMI > 0``.

    Args:
        behavior: trace of the behaviour prompts.
        control: trace of the control prompts (need not be paired).
        last_tokens: count only each prompt's last this many tokens.
        marker_token_ids: token ids that define ``x`` (``None``: behaviour-set membership).

    Returns:
        An :class:`ExpertSelection` named ``"npmi"``.

    Raises:
        ValueError: traces of different models / layers / routing shapes, an empty trace, a bad
            ``last_tokens``, or marker ids that occur in no counted token.
        TypeError: an argument is not a routing trace.
    """
    check_trace_pair(behavior, control, caller="npmi")
    _check_last_tokens(last_tokens, "npmi")
    markers = marker_token_ids is not None
    counts_b, counts_c = _counts(behavior, last_tokens, marker_token_ids), _counts(control, last_tokens, marker_token_ids)
    if markers and counts_b.marker_tokens.sum() + counts_c.marker_tokens.sum() == 0:
        raise ValueError(
            f"npmi: none of marker_token_ids={list(marker_token_ids)[:8]} occurs in the counted tokens of either "
            "trace; pass ids of tokens the traces contain (tokenizer.encode(marker, add_special_tokens=False))."
        )
    score = _npmi_score(counts_b, counts_c, markers)
    return selection_from_scores(
        "npmi", score, score > 0, behavior, filter="nPMI > 0",
        source="RICE (Wang et al. 2025) §3.1: nPMI(x, y) = ln[p(x,y)/(p(x)p(y))] / -ln p(x,y)",
        settings={"last_tokens": last_tokens, "x": "marker tokens" if markers else "behaviour-set tokens",
                  "marker_token_ids": None if not markers else [int(t) for t in marker_token_ids]},
    )


def _subsample(rng: np.random.Generator, n: int, fraction: float) -> np.ndarray:
    return np.sort(rng.choice(n, size=max(1, int(math.floor(fraction * n))), replace=False))


def stability_selection(
    behavior,
    control,
    *,
    base: BaseRule = "frequency_difference",
    n_resamples: int = 100,
    fraction: float = 0.5,
    top: int = 10,
    threshold: float = 0.6,
    seed: int = 0,
    last_tokens: int | None = None,
) -> ExpertSelection:
    """SAFEx's stability-based expert selection (Lai et al. 2025, §2.2; Meinshausen & Bühlmann 2010).

    ``n_resamples`` times, draw ``floor(fraction x n)`` prompts without replacement from each set
    (the same indices in both for the paired ``risk_difference`` base), score the cells with the
    ``base`` rule on that subsample, and mark its ``top`` best cells with a positive score. The
    score of a cell is its **selection probability** ``Π(l, e)`` = the share of resamples that
    marked it; ties break by the base rule's full-data score. Filter: ``Π >= threshold``
    (Meinshausen & Bühlmann take 0.6-0.9). SAFEx keeps experts that stay among the most
    frequently activated on harmful prompts across resampled prompt sets; here the base is any
    trace rule of this module (default fTRI). The draws use ``numpy.random.default_rng(seed)``:
    per resample, the behaviour indices, then (unpaired) the control indices.

    Args:
        behavior, control: the two routing traces.
        base: ``"frequency_difference"``, ``"risk_difference"`` (needs paired traces) or ``"npmi"``.
        n_resamples: subsamples drawn (≥ 1).
        fraction: share of each set's prompts per subsample, in (0, 1].
        top: cells each subsample marks (≥ 1).
        threshold: selection probability an expert needs to be eligible, in (0, 1].
        seed: seeds the subsamples.
        last_tokens: count only each prompt's last this many tokens.

    Returns:
        An :class:`ExpertSelection` named ``"stability_selection"``; ``tiebreak`` holds the
        base rule's full-data score.

    Raises:
        ValueError: an unknown ``base``, bad numbers, traces that do not match (or are unpaired
            for ``base="risk_difference"``).
        TypeError: an argument is not a routing trace.
    """
    caller = "stability_selection"
    bases = ("frequency_difference", "risk_difference", "npmi")
    if base not in bases:
        raise ValueError(f"{caller}: base={base!r}; allowed: {bases}.")
    paired = base == "risk_difference"
    check_trace_pair(behavior, control, caller=caller, paired=paired)
    check_int(n_resamples, "n_resamples", caller=caller, minimum=1)
    check_int(top, "top", caller=caller, minimum=1, maximum=len(behavior.layers) * behavior.n_experts)
    check_int(seed, "seed", caller=caller)
    for name, value in (("fraction", fraction), ("threshold", threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"{caller}: {name}={value!r} must be a number in (0, 1].")
    _check_last_tokens(last_tokens, caller)
    counts_b, counts_c = _counts(behavior, last_tokens), _counts(control, last_tokens)
    score_of = {
        "frequency_difference": _frequency_score,
        "risk_difference": _risk_difference_score,
        "npmi": lambda b, c, pb=None, pc=None: _npmi_score(b, c, False, pb, pc),
    }[base]
    rng = np.random.default_rng(seed)
    hits = np.zeros(counts_b.selected.shape[1:])
    for _ in range(n_resamples):
        pick_b = _subsample(rng, counts_b.tokens.shape[0], fraction)
        pick_c = pick_b if paired else _subsample(rng, counts_c.tokens.shape[0], fraction)
        flat = score_of(counts_b, counts_c, pick_b, pick_c).ravel()
        order = sorted(range(flat.size), key=lambda i: (-nan_as_lowest(float(flat[i])), i))[:top]
        for i in order:
            if flat[i] > 0:
                hits.flat[i] += 1
    probability = hits / n_resamples
    full = score_of(counts_b, counts_c)
    return selection_from_scores(
        "stability_selection", probability, probability >= threshold, behavior, tiebreak=full,
        filter=f"selection probability >= {threshold}",
        source="SAFEx (Lai et al. 2025) §2.2 stability-based selection; Meinshausen & Bühlmann (2010)",
        settings={"base": base, "n_resamples": n_resamples, "fraction": fraction, "top": top,
                  "threshold": threshold, "seed": seed, "last_tokens": last_tokens},
    )


def trace_rules(behavior, control, *, last_tokens: int | None = None, paired: bool | None = None, **stability) -> dict[str, ExpertSelection]:
    """The four trace rules on one pair of traces, as ``{rule: ExpertSelection}``.

    ``risk_difference`` runs only on paired traces (``paired=None``: when the prompt counts are
    equal); keyword arguments go to :func:`stability_selection`.
    """
    paired = behavior.n_prompts == control.n_prompts if paired is None else paired
    out = {"frequency_difference": frequency_difference(behavior, control, last_tokens=last_tokens)}
    if paired:
        out["risk_difference"] = risk_difference(behavior, control, last_tokens=last_tokens)
    out["npmi"] = npmi(behavior, control, last_tokens=last_tokens)
    out["stability_selection"] = stability_selection(behavior, control, last_tokens=last_tokens, **stability)
    return out


