"""Expert attribution: which (layer, expert) fire more for a behaviour than for control prompts.

This is the analysis step of MoTE's *functional Token Resonance Imaging* (fTRI; "Mixture of
Tunable Experts -- Behavior Modification of DeepSeek-R1 at Inference Time", 2025, section 3):
run prompts that elicit a behaviour (``What happened {time}{place}?`` -> refusal) and control
prompts, record the router's top-k choices (:func:`labkit.moe.trace.trace_routing`), and rank
every routed expert by how much more it is selected for the behaviour. SteerMoE ("Steering MoE
LLMs via Expert (De)Activation", Fayyaz et al., 2025, section 3.1) ranks experts by the same
*risk difference* of activation frequencies. Both papers then switch the top experts off or on
(:mod:`labkit.moe.masking`).

labkit adds what a ranking needs before anyone acts on it:

* three scores -- selection-frequency difference (``"frequency"``, the SteerMoE risk
  difference), routing-weight mass difference (``"weight"``) and log-odds ratio with a
  Haldane-Anscombe +0.5 continuity correction (``"log_odds"``);
* two aggregations -- pool all tokens (``"token"``) or average per-prompt rates
  (``"prompt"``), so one long prompt cannot dominate;
* a test per cell (Fisher's exact test or a two-proportion z test on token counts, or Welch's
  t test on per-prompt values), Benjamini-Hochberg q-values over *all* layer x expert cells,
  bootstrap confidence intervals that resample prompts, and a split-half noise floor (the
  largest |score| two random halves of the *control* prompts reach against each other).

The data flow::

    behavior = trace_routing(model, behavior_prompts)
    control = trace_routing(model, control_prompts)
    attribution = attribute_experts(behavior, control, aggregate="prompt")
    mask = ExpertMask.from_attribution(attribution, 10, mode="off")

The result type, :class:`ExpertAttribution`, lives in :mod:`labkit.moe.expert_attribution`
(re-exported here); this module computes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from labkit.moe.expert_attribution import (
    AGGREGATES,
    METRICS,
    TESTS,
    Aggregate,
    ExpertAttribution,
    Metric,
    Test,
)

if TYPE_CHECKING:  # the trace type is only needed for annotations; attribution reads fields
    from labkit.moe.trace import RoutingTrace

__all__ = ["ExpertAttribution", "attribute_experts"]

# --- per-prompt sums --------------------------------------------------------------------------


@dataclass(frozen=True)
class _PromptSums:
    """Sufficient statistics of one trace, per prompt: everything the scores need."""

    selected: np.ndarray  # (prompt, layer, expert) tokens whose top-k held the expert
    weight: np.ndarray  # (prompt, layer, expert) summed routing weight
    weight_sq: np.ndarray  # (prompt, layer, expert) summed squared routing weight
    tokens: np.ndarray  # (prompt,) tokens counted per prompt


def _describe(trace) -> str:
    shape = tuple(getattr(trace, "topk_indices", torch.empty(0)).shape)
    return (
        f"model {getattr(trace, 'model_name', '?')!r}, layers {tuple(getattr(trace, 'layers', ()))}, "
        f"{getattr(trace, 'n_experts', '?')} experts, top-{getattr(trace, 'top_k', '?')}, "
        f"{getattr(trace, 'n_prompts', '?')} prompts, topk_indices shape {shape}"
    )


def _validate(behavior, control) -> None:
    for label, trace in (("behavior", behavior), ("control", control)):
        missing = [
            name
            for name in ("topk_indices", "topk_weights", "prompt_index", "position", "layers", "n_experts", "n_prompts")
            if not hasattr(trace, name)
        ]
        if missing:
            raise TypeError(
                f"attribute_experts: {label} is a {type(trace).__name__} without {missing}; pass a "
                "labkit.moe.trace.RoutingTrace (from trace_routing)."
            )
        n_tokens = trace.topk_indices.shape[1] if trace.topk_indices.dim() == 3 else 0
        if trace.topk_indices.dim() != 3 or n_tokens == 0 or trace.n_prompts == 0:
            raise ValueError(
                f"attribute_experts: the {label} trace is empty ({_describe(trace)}); trace at least "
                "one prompt with at least one token."
            )
        if tuple(trace.topk_weights.shape) != tuple(trace.topk_indices.shape):
            raise ValueError(
                f"attribute_experts: {label} trace has topk_weights {tuple(trace.topk_weights.shape)} but "
                f"topk_indices {tuple(trace.topk_indices.shape)}; they must match (layer, token, k)."
            )
        if trace.topk_indices.shape[0] != len(trace.layers):
            raise ValueError(
                f"attribute_experts: {label} trace has {trace.topk_indices.shape[0]} layers of indices but "
                f"layers={tuple(trace.layers)}."
            )
        low, high = int(trace.topk_indices.min()), int(trace.topk_indices.max())
        if low < 0 or high >= trace.n_experts:
            raise ValueError(
                f"attribute_experts: {label} trace selects experts {low}..{high} but says n_experts="
                f"{trace.n_experts} (allowed 0..{trace.n_experts - 1})."
            )
        prompts = trace.prompt_index
        if prompts.numel() != n_tokens or int(prompts.min()) < 0 or int(prompts.max()) >= trace.n_prompts:
            raise ValueError(
                f"attribute_experts: {label} trace prompt_index must have one entry per token "
                f"({n_tokens}) in 0..{trace.n_prompts - 1}; got {prompts.numel()} entries in "
                f"{int(prompts.min())}..{int(prompts.max())}."
            )
    checks = (
        ("model_name", "traces come from different models"),
        ("layers", "traces cover different layers"),
        ("n_experts", "traces have different expert counts"),
        ("top_k", "traces have different top-k"),
    )
    for name, what in checks:
        if getattr(behavior, name, None) != getattr(control, name, None):
            raise ValueError(
                f"attribute_experts: {what}: behavior has {name}={getattr(behavior, name, None)!r}, control "
                f"has {name}={getattr(control, name, None)!r}. Trace both prompt sets with the same model "
                f"and the same layers.\n  behavior: {_describe(behavior)}\n  control:  {_describe(control)}"
            )


def _prompt_sums(trace, last_tokens: int | None) -> _PromptSums:
    indices = trace.topk_indices.long()
    weights = trace.topk_weights.double()
    prompt_index = trace.prompt_index.long()
    n_layers, n_tokens, _ = indices.shape
    n_prompts, n_experts = int(trace.n_prompts), int(trace.n_experts)
    keep = torch.ones(n_tokens, dtype=torch.bool)
    if last_tokens is not None:
        position = trace.position.long()
        length = torch.zeros(n_prompts, dtype=torch.long).scatter_reduce(
            0, prompt_index, position + 1, reduce="amax"
        )
        keep = position >= (length[prompt_index] - last_tokens)
    indices, weights, prompt_index = indices[:, keep], weights[:, keep], prompt_index[keep]
    # (layer, token, expert) selection indicator and routing weight; an expert appears at most
    # once in a token's top-k, so the sums over k are 0/1 and the weight of that expert.
    one_hot = torch.nn.functional.one_hot(indices, n_experts).double()  # layer token k expert
    selected = one_hot.sum(dim=2)
    weight = (one_hot * weights.unsqueeze(-1)).sum(dim=2)
    tokens = torch.zeros(n_prompts, dtype=torch.float64).index_add_(
        0, prompt_index, torch.ones(prompt_index.numel(), dtype=torch.float64)
    )

    def per_prompt(values: Tensor) -> np.ndarray:  # layer token expert -> prompt layer expert
        out = torch.zeros(n_prompts, n_layers, n_experts, dtype=torch.float64)
        out.index_add_(0, prompt_index, values.permute(1, 0, 2))
        return out.numpy()

    return _PromptSums(
        selected=per_prompt(selected),
        weight=per_prompt(weight),
        weight_sq=per_prompt(weight * weight),
        tokens=tokens.numpy(),
    )


# --- scores -----------------------------------------------------------------------------------


def _rates(values: np.ndarray, tokens: np.ndarray, counts: np.ndarray, aggregate: str) -> tuple[np.ndarray, np.ndarray]:
    """Aggregated rate and effective sample size from resampling weights.

    Args:
        values: (prompt, layer, expert) per-prompt sums (selections or weight).
        tokens: (prompt,) tokens per prompt.
        counts: (draw, prompt) how often each prompt is drawn (all ones: the observed set).
        aggregate: ``"token"`` pools tokens; ``"prompt"`` averages per-prompt rates.

    Returns:
        ``(rate, size)``: rate (draw, layer, expert), size (draw,) -- tokens or prompts counted.
    """
    flat = values.reshape(values.shape[0], -1)
    present = tokens > 0
    if aggregate == "token":
        size = counts @ tokens
        rate = (counts @ flat) / np.maximum(size, 1e-300)[:, None]
    else:
        per_prompt = np.divide(flat, tokens[:, None], out=np.zeros_like(flat), where=present[:, None])
        size = counts @ present.astype(np.float64)
        rate = (counts @ per_prompt) / np.maximum(size, 1e-300)[:, None]
    return rate.reshape(counts.shape[0], *values.shape[1:]), size


def _score(metric: str, rate_b, size_b, rate_c, size_c) -> np.ndarray:
    if metric in ("frequency", "weight"):
        return rate_b - rate_c
    # log-odds ratio with the Haldane-Anscombe correction: +0.5 to every cell of the 2x2 table
    # (for prompt aggregation the "counts" are rate x number of prompts).
    sb, sc = size_b.reshape(-1, 1, 1), size_c.reshape(-1, 1, 1)
    hits_b, hits_c = rate_b * sb, rate_c * sc
    return np.log((hits_b + 0.5) / (sb - hits_b + 0.5)) - np.log((hits_c + 0.5) / (sc - hits_c + 0.5))


def _observed(sums: _PromptSums, metric: str, aggregate: str) -> tuple[np.ndarray, np.ndarray]:
    values = sums.weight if metric == "weight" else sums.selected
    rate, size = _rates(values, sums.tokens, np.ones((1, sums.tokens.shape[0])), aggregate)
    return rate[0], size


# --- tests ------------------------------------------------------------------------------------


def _fisher(count_b: np.ndarray, n_b: int, count_c: np.ndarray, n_c: int) -> np.ndarray:
    from scipy.stats import fisher_exact

    p = np.ones(count_b.size)
    cache: dict[tuple[int, int], float] = {}
    for i, (a, c) in enumerate(zip(count_b.astype(np.int64).ravel(), count_c.astype(np.int64).ravel())):
        key = (int(a), int(c))
        if key not in cache:
            cache[key] = float(fisher_exact([[a, n_b - a], [c, n_c - c]]).pvalue)
        p[i] = cache[key]
    return p.reshape(count_b.shape)


def _two_proportion_z(count_b: np.ndarray, n_b: int, count_c: np.ndarray, n_c: int) -> np.ndarray:
    from scipy.stats import norm

    p_b, p_c = count_b / n_b, count_c / n_c
    pooled = (count_b + count_c) / (n_b + n_c)
    se = np.sqrt(pooled * (1 - pooled) * (1 / n_b + 1 / n_c))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, (p_b - p_c) / se, 0.0)
    return 2 * norm.sf(np.abs(z))


def _welch(mean_b, var_b, n_b, mean_c, var_c, n_c) -> np.ndarray:
    """Two-sided Welch t test from unit means and unbiased variances (vectorised over cells)."""
    from scipy.stats import t as student_t

    se_b, se_c = var_b / n_b, var_c / n_c
    se = np.sqrt(se_b + se_c)
    diff = mean_b - mean_c
    with np.errstate(divide="ignore", invalid="ignore"):
        df = (se_b + se_c) ** 2 / (se_b**2 / max(n_b - 1, 1) + se_c**2 / max(n_c - 1, 1))
        t = diff / se
    p = 2 * student_t.sf(np.abs(t), np.where(np.isfinite(df), df, 1.0))
    # zero variance in both sets: the difference is exact -- p = 1 if equal, else 0
    degenerate = ~(se > 0)
    return np.where(degenerate, np.where(np.isclose(diff, 0.0), 1.0, 0.0), p)


def _unit_moments(sums: _PromptSums, metric: str, aggregate: str):
    """Mean, unbiased variance and count of the test units (tokens or prompts) per cell."""
    if aggregate == "token":
        n = float(sums.tokens.sum())
        total = (sums.weight if metric == "weight" else sums.selected).sum(0)
        # an indicator squared is itself, so the selections double as their own squares
        total_sq = (sums.weight_sq if metric == "weight" else sums.selected).sum(0)
        mean = total / n
        var = np.maximum(total_sq - n * mean**2, 0.0) / max(n - 1, 1)
        return mean, var, n
    values = sums.weight if metric == "weight" else sums.selected
    present = sums.tokens > 0
    per_prompt = values[present] / sums.tokens[present][:, None, None]
    n = float(per_prompt.shape[0])
    var = per_prompt.var(axis=0, ddof=1) if n > 1 else np.zeros(per_prompt.shape[1:])
    return per_prompt.mean(axis=0), var, n


def _p_values(test: str, metric: str, aggregate: str, behavior: _PromptSums, control: _PromptSums) -> np.ndarray:
    if test in ("fisher", "z"):
        n_b, n_c = int(behavior.tokens.sum()), int(control.tokens.sum())
        count_b, count_c = behavior.selected.sum(0), control.selected.sum(0)
        return (_fisher if test == "fisher" else _two_proportion_z)(count_b, n_b, count_c, n_c)
    return _welch(*_unit_moments(behavior, metric, aggregate), *_unit_moments(control, metric, aggregate))


def _resolve_test(test: str, metric: str, aggregate: str) -> str:
    if test != "auto":
        if test in ("fisher", "z") and metric == "weight":
            raise ValueError(
                f"attribute_experts: test={test!r} compares selection counts and cannot test "
                "metric='weight'; use test='welch' or 'auto'."
            )
        return test
    return "fisher" if aggregate == "token" and metric != "weight" else "welch"


# --- bootstrap and noise floor ----------------------------------------------------------------


def _draw_counts(rng: np.random.Generator, n_draws: int, n_prompts: int) -> np.ndarray:
    """(draw, prompt) multiplicities of a with-replacement resample of the prompts."""
    picks = rng.integers(0, n_prompts, size=(n_draws, n_prompts))
    counts = np.zeros((n_draws, n_prompts))
    np.add.at(counts, (np.repeat(np.arange(n_draws), n_prompts), picks.ravel()), 1.0)
    return counts


def _bootstrap(behavior: _PromptSums, control: _PromptSums, metric, aggregate, n_bootstrap, alpha, rng):
    values = (lambda s: s.weight) if metric == "weight" else (lambda s: s.selected)
    scores = []
    chunk = 200  # bound memory: (chunk, layer, expert) at a time
    for start in range(0, n_bootstrap, chunk):
        size = min(chunk, n_bootstrap - start)
        counts_b = _draw_counts(rng, size, behavior.tokens.shape[0])
        counts_c = _draw_counts(rng, size, control.tokens.shape[0])
        rate_b, size_b = _rates(values(behavior), behavior.tokens, counts_b, aggregate)
        rate_c, size_c = _rates(values(control), control.tokens, counts_c, aggregate)
        scores.append(_score(metric, rate_b, size_b, rate_c, size_c))
    stacked = np.concatenate(scores, axis=0)
    return np.quantile(stacked, alpha / 2, axis=0), np.quantile(stacked, 1 - alpha / 2, axis=0)


def _noise_floor(control: _PromptSums, metric, aggregate, n_splits, alpha, rng) -> float:
    n_prompts = control.tokens.shape[0]
    if n_prompts < 2 or n_splits < 1:
        return float("nan")
    values = control.weight if metric == "weight" else control.selected
    half = n_prompts // 2
    maxima = []
    for _ in range(n_splits):
        order = rng.permutation(n_prompts)
        a = np.zeros((1, n_prompts))
        b = np.zeros((1, n_prompts))
        a[0, order[:half]] = 1.0
        b[0, order[half : 2 * half]] = 1.0  # equal halves; an odd prompt out sits out
        rate_a, size_a = _rates(values, control.tokens, a, aggregate)
        rate_b, size_b = _rates(values, control.tokens, b, aggregate)
        maxima.append(float(np.abs(_score(metric, rate_a, size_a, rate_b, size_b)).max()))
    return float(np.quantile(maxima, 1 - alpha))


# --- entry point ------------------------------------------------------------------------------


def attribute_experts(
    behavior: "RoutingTrace",
    control: "RoutingTrace",
    *,
    metric: Metric = "frequency",
    aggregate: Aggregate = "prompt",
    test: Test = "auto",
    n_bootstrap: int = 1000,
    n_splits: int = 100,
    seed: int = 0,
    alpha: float = 0.05,
    last_tokens: int | None = None,
) -> ExpertAttribution:
    """Rank every routed expert by how much more the router picks it for a behaviour (fTRI).

    Method: MoTE's fTRI (2025, section 3) and SteerMoE's risk difference (Fayyaz et al., 2025,
    section 3.1). For each traced layer ``l`` and expert ``e`` let ``p_B`` and ``p_C`` be the
    share of behaviour / control tokens whose top-k holds ``e``. Scores:

    * ``"frequency"``: ``p_B - p_C`` (risk difference, SteerMoE eq. 1);
    * ``"weight"``: mean routing weight of ``e`` (0 where not selected) on B minus on C;
    * ``"log_odds"``: ``log[(a+.5)/(b+.5)] - log[(c+.5)/(d+.5)]`` for the 2x2 table of
      selected / not selected counts (Haldane-Anscombe correction; finite when a cell is 0).

    ``aggregate="token"`` pools all tokens of a set; ``aggregate="prompt"`` first computes each
    prompt's rate and averages over prompts, so a long prompt counts as much as a short one
    (the default: the unit of replication is the prompt). Per cell a test gives a p-value:
    ``"fisher"`` (exact) or ``"z"`` (two-proportion) on pooled token counts, or ``"welch"``
    (Welch's t on per-unit values: per-prompt rates for ``aggregate="prompt"``, per-token
    values for ``"token"``); ``"auto"`` picks Fisher for token-level counts and Welch
    otherwise. Tokens of one prompt are correlated, so token-level p-values are optimistic; the
    prompt-level bootstrap and noise floor are the honest guards. q-values are
    Benjamini-Hochberg (``scipy.stats.false_discovery_control``) over all ``layer x expert``
    cells. Bootstrap intervals resample prompts with replacement within each set. The noise
    floor splits the control prompts into random equal halves ``n_splits`` times, scores half
    against half, and reports the ``1 - alpha`` quantile of the largest |score| over cells; a
    half has half the prompts, so the floor errs on the conservative side.

    Args:
        behavior: routing trace of the behaviour prompts (``trace_routing``).
        control: routing trace of the control prompts, same model and layers.
        metric: ``"frequency"``, ``"weight"`` or ``"log_odds"``.
        aggregate: ``"prompt"`` or ``"token"``.
        test: ``"auto"``, ``"fisher"``, ``"z"`` or ``"welch"``.
        n_bootstrap: bootstrap resamples for the intervals (0 skips them: NaN intervals).
        n_splits: control split-halves for the noise floor (0 skips it: NaN).
        seed: seeds the bootstrap and the splits (``numpy.random.default_rng``).
        alpha: FDR level for :meth:`ExpertAttribution.significant`, intervals at ``1 - alpha``.
        last_tokens: count only the last this many tokens of each prompt (e.g. ``3``: the
            tokens just before the answer, where a refusal decision is routed); ``None``: all.

    Returns:
        An :class:`ExpertAttribution` with ``(layer, expert)`` tensors.

    Raises:
        ValueError: an unknown metric/aggregate/test, an empty trace, or traces from different
            models, layers, expert counts or top-k (the message shows both traces).
        TypeError: an argument is not a routing trace.

    Example:
        >>> attribution = attribute_experts(behavior_trace, control_trace)  # doctest: +SKIP
        >>> attribution.top(5)  # doctest: +SKIP
        [(1, 7), (2, 3), ...]
    """
    if metric not in METRICS:
        raise ValueError(f"attribute_experts: metric={metric!r}; allowed: {METRICS}.")
    if aggregate not in AGGREGATES:
        raise ValueError(f"attribute_experts: aggregate={aggregate!r}; allowed: {AGGREGATES}.")
    if test not in TESTS:
        raise ValueError(f"attribute_experts: test={test!r}; allowed: {TESTS}.")
    if not 0 < alpha < 1:
        raise ValueError(f"attribute_experts: alpha={alpha!r} must lie in (0, 1).")
    if n_bootstrap < 0 or n_splits < 0:
        raise ValueError(f"attribute_experts: n_bootstrap={n_bootstrap}, n_splits={n_splits} must be >= 0.")
    if last_tokens is not None and last_tokens < 1:
        raise ValueError(f"attribute_experts: last_tokens={last_tokens!r} must be >= 1 or None.")
    _validate(behavior, control)
    test = _resolve_test(test, metric, aggregate)

    sums_b = _prompt_sums(behavior, last_tokens)
    sums_c = _prompt_sums(control, last_tokens)
    rate_b, size_b = _observed(sums_b, metric, aggregate)
    rate_c, size_c = _observed(sums_c, metric, aggregate)
    score = _score(metric, rate_b[None], size_b, rate_c[None], size_c)[0]

    from scipy.stats import false_discovery_control

    p_value = np.clip(_p_values(test, metric, aggregate, sums_b, sums_c), 0.0, 1.0)
    q_value = false_discovery_control(p_value.ravel(), method="bh").reshape(p_value.shape)

    # independent streams: the noise floor does not change with n_bootstrap and vice versa
    bootstrap_rng, split_rng = (np.random.default_rng([seed, stream]) for stream in (0, 1))
    if n_bootstrap > 0:
        ci_low, ci_high = _bootstrap(sums_b, sums_c, metric, aggregate, n_bootstrap, alpha, bootstrap_rng)
    else:
        ci_low, ci_high = np.full(score.shape, np.nan), np.full(score.shape, np.nan)
    noise_floor = _noise_floor(sums_c, metric, aggregate, n_splits, alpha, split_rng)

    def as_float(array) -> Tensor:
        return torch.as_tensor(np.asarray(array, dtype=np.float64))

    return ExpertAttribution(
        score=as_float(score),
        behavior_counts=torch.as_tensor(sums_b.selected.sum(0).round().astype(np.int64)),
        control_counts=torch.as_tensor(sums_c.selected.sum(0).round().astype(np.int64)),
        behavior_rate=as_float(rate_b),
        control_rate=as_float(rate_c),
        p_value=as_float(p_value),
        q_value=as_float(q_value),
        ci_low=as_float(ci_low),
        ci_high=as_float(ci_high),
        noise_floor=noise_floor,
        behavior_tokens=int(sums_b.tokens.sum()),
        control_tokens=int(sums_c.tokens.sum()),
        behavior_prompts=int(behavior.n_prompts),
        control_prompts=int(control.n_prompts),
        metric=metric,
        aggregate=aggregate,
        test=test,
        alpha=float(alpha),
        n_bootstrap=int(n_bootstrap),
        seed=int(seed),
        layers=tuple(int(layer) for layer in behavior.layers),
        n_experts=int(behavior.n_experts),
        top_k=int(behavior.top_k),
        model_name=str(behavior.model_name),
        last_tokens=last_tokens,
    )
