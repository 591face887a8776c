"""labkit's statistics against independent computations on noisy data (no model needed).

Exactly linear or noise-free data cannot tell a right estimator from a wrong one: a bootstrap
interval at quantiles alpha / 1-alpha (a 90 % interval labelled 95 %) and a slope fitted without
the unsteered (coefficient 0) point both passed the earlier tests. Here the data are noisy, the
reference is scipy / numpy, and each test also checks that the named mistake would be visible.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from labkit.evals import steerability
from labkit.moe.attribution import attribute_experts
from tests.test_moe_attribution import make_trace


def _per_prompt_rates(trace, layer_row: int, expert: int) -> np.ndarray:
    """Selection rate of one (layer, expert) in each prompt: selections / tokens (by hand)."""
    hits = (trace.topk_indices[layer_row] == expert).any(-1).double()
    n = int(trace.n_prompts)
    selected = torch.zeros(n, dtype=torch.float64).index_add_(0, trace.prompt_index, hits)
    tokens = torch.zeros(n, dtype=torch.float64).index_add_(0, trace.prompt_index, torch.ones_like(hits))
    return (selected / tokens).numpy()


@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_bootstrap_interval_equals_scipy_percentile_bootstrap(alpha):
    """attribute_experts(aggregate="prompt") resamples prompts within each set and reports the
    percentile interval of the score: scipy.stats.bootstrap(method="percentile") of the difference
    of mean per-prompt rates is the same estimator. Uneven prompt lengths make the rates noisy."""
    lengths = [3, 5, 8, 13, 4, 6, 9, 2, 7, 11] * 3
    behavior = make_trace(lengths, seed=31, boost={(0, 5): 3.0}, boosted_prompts=range(0, 30, 2), layers=(0,))
    control = make_trace(lengths[::-1], seed=32, layers=(0,))
    n_bootstrap = 6000
    attribution = attribute_experts(
        behavior, control, aggregate="prompt", n_bootstrap=n_bootstrap, n_splits=0, alpha=alpha, seed=0
    )
    rate_b, rate_c = _per_prompt_rates(behavior, 0, 5), _per_prompt_rates(control, 0, 5)
    assert float(attribution.score[0, 5]) == pytest.approx(rate_b.mean() - rate_c.mean(), abs=1e-12)
    reference = stats.bootstrap(
        (rate_b, rate_c),
        lambda b, c, axis: b.mean(axis=axis) - c.mean(axis=axis),
        n_resamples=n_bootstrap,
        confidence_level=1 - alpha,
        method="percentile",
        vectorized=True,
        random_state=np.random.default_rng(1),
    )
    spread = reference.standard_error
    low, high = float(attribution.ci_low[0, 5]), float(attribution.ci_high[0, 5])
    # Monte Carlo error of a tail quantile with 6000 draws is ~0.05 standard errors; an interval at
    # alpha / 1-alpha instead of alpha/2 / 1-alpha/2 moves each end by >= 0.28 standard errors.
    assert abs(low - reference.confidence_interval.low) < 0.12 * spread
    assert abs(high - reference.confidence_interval.high) < 0.12 * spread
    narrower = stats.bootstrap(
        (rate_b, rate_c), lambda b, c, axis: b.mean(axis=axis) - c.mean(axis=axis), n_resamples=n_bootstrap,
        confidence_level=1 - 2 * alpha, method="percentile", vectorized=True, random_state=np.random.default_rng(1),
    ).confidence_interval
    assert abs(low - narrower.low) > 0.25 * spread and abs(high - narrower.high) > 0.25 * spread


def test_noise_floor_is_the_one_minus_alpha_quantile_of_split_half_maxima():
    """The noise floor by hand: the same seeded permutations, the largest |score| per split,
    numpy's 1-alpha quantile."""
    lengths = [3, 5, 8, 13, 4, 6, 9, 2, 7, 11] * 2
    behavior = make_trace(lengths, seed=41, layers=(0, 1))
    control = make_trace(lengths, seed=42, layers=(0, 1))
    alpha, n_splits = 0.1, 50
    attribution = attribute_experts(behavior, control, n_bootstrap=0, n_splits=n_splits, alpha=alpha, seed=5)
    # per-prompt rates of every cell, by hand: (prompt, cell)
    rates = np.stack([_per_prompt_rates(control, row, e) for row in range(2) for e in range(8)], axis=1)
    rng = np.random.default_rng([5, 1])  # labkit's split stream (stream 1 of the seed)
    n = len(lengths)
    maxima = []
    for _ in range(n_splits):
        order = rng.permutation(n)
        first, second = rates[order[: n // 2]].mean(0), rates[order[n // 2 :]].mean(0)
        maxima.append(np.abs(first - second).max())
    assert attribution.noise_floor == pytest.approx(float(np.quantile(maxima, 1 - alpha)), abs=1e-12)
    assert attribution.noise_floor != pytest.approx(float(np.quantile(maxima, 1 - alpha / 2)), abs=1e-6)


def _noisy_sweep(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    prompts = [f"prompt {i}" for i in range(6)]
    for prompt in prompts:
        rows.append({"method": "unsteered", "layer": -1, "coefficient": 0.0, "prompt": prompt,
                     "topic_fraction": float(rng.uniform(0.0, 0.3))})
    for method, layer in (("actadd", 2), ("mean_difference", 4)):
        for prompt in prompts:
            slope = rng.normal(0.02, 0.03)
            for c in (1.0, 2.0, 4.0, 8.0):
                rows.append({"method": method, "layer": layer, "coefficient": c, "prompt": prompt,
                             "topic_fraction": float(0.1 + slope * c + rng.normal(0, 0.05))})
    return pd.DataFrame(rows)


def test_steerability_slope_equals_polyfit_including_the_unsteered_point():
    """Each slope is numpy.polyfit's over (0, unsteered fraction) and the swept (c, fraction)."""
    table = _noisy_sweep(seed=3)
    slopes = steerability(table)
    base = table[table.method == "unsteered"].set_index("prompt").topic_fraction
    assert len(slopes) == 12
    for row in slopes.itertuples():
        sweep = table[(table.method == row.method) & (table.layer == row.layer) & (table.prompt == row.prompt)]
        x = np.concatenate([[0.0], sweep.coefficient.to_numpy()])
        y = np.concatenate([[base[row.prompt]], sweep.topic_fraction.to_numpy()])
        assert row.slope == pytest.approx(np.polyfit(x, y, 1)[0], abs=1e-12)
        # without the coefficient-0 point the slope differs on this noisy data (the test has teeth)
        without = np.polyfit(sweep.coefficient.to_numpy(), sweep.topic_fraction.to_numpy(), 1)[0]
        assert abs(row.slope - without) > 1e-6
    # anti-steerable fraction as the docstring defines it
    assert (slopes.slope < 0).mean() == pytest.approx(
        np.mean([r.slope < 0 for r in slopes.itertuples()]), abs=0
    )
