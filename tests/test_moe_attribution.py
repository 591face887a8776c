"""Expert attribution on synthetic routing traces with planted differences (no model needed)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from labkit.moe.attribution import ExpertAttribution, attribute_experts
from labkit.moe.trace import RoutingTrace

LAYERS = (1, 3)  # true model layers: row 0 is layer 1, row 1 is layer 3
N_EXPERTS = 8
TOP_K = 2


def make_trace(
    prompt_lengths,
    *,
    seed: int,
    boost: dict[tuple[int, int], float] | None = None,
    boosted_prompts=None,
    boosted_tokens=None,
    layers=LAYERS,
    n_experts=N_EXPERTS,
    top_k=TOP_K,
    model_name="synthetic",
) -> RoutingTrace:
    """Top-k draws (without replacement) from a uniform router, some (row, expert) boosted.

    ``boost[(row, expert)] = factor`` multiplies that expert's routing probability on the tokens
    of ``boosted_prompts`` (default: every prompt); ``boosted_tokens(position, length)`` narrows
    that to the tokens where it returns True (``length``: each token's prompt length).
    """
    generator = torch.Generator().manual_seed(seed)
    n_tokens = sum(prompt_lengths)
    prompt_index = torch.repeat_interleave(torch.arange(len(prompt_lengths)), torch.tensor(prompt_lengths))
    position = torch.cat([torch.arange(n) for n in prompt_lengths])
    probs = torch.ones(len(layers), n_tokens, n_experts)
    boosted = torch.ones(n_tokens, dtype=torch.bool)
    if boosted_prompts is not None:
        boosted = torch.isin(prompt_index, torch.tensor(list(boosted_prompts)))
    if boosted_tokens is not None:
        length = torch.tensor(prompt_lengths)[prompt_index]
        boosted = boosted & boosted_tokens(position, length)
    for (row, expert), factor in (boost or {}).items():
        probs[row, boosted, expert] *= factor
    flat = probs.reshape(-1, n_experts)
    indices = torch.multinomial(flat, top_k, replacement=False, generator=generator)
    weights = torch.softmax(torch.randn(indices.shape, generator=generator), dim=-1)
    return RoutingTrace(
        topk_indices=indices.reshape(len(layers), n_tokens, top_k),
        topk_weights=weights.reshape(len(layers), n_tokens, top_k),
        router_logits=None,
        token_ids=torch.zeros(n_tokens, dtype=torch.long),
        prompt_index=prompt_index,
        position=position,
        layers=tuple(layers),
        n_experts=n_experts,
        top_k=top_k,
        n_prompts=len(prompt_lengths),
        model_name=model_name,
    )


PLANTED = {(0, 5): 4.0, (1, 2): 4.0}


@pytest.fixture(scope="module")
def planted_pair():
    behavior = make_trace([12] * 40, seed=1, boost=PLANTED)
    control = make_trace([12] * 40, seed=2)
    return behavior, control


@pytest.mark.parametrize("metric", ["frequency", "weight", "log_odds"])
@pytest.mark.parametrize("aggregate", ["token", "prompt"])
def test_planted_experts_are_recovered_at_the_top_and_significant(planted_pair, metric, aggregate):
    attribution = attribute_experts(*planted_pair, metric=metric, aggregate=aggregate, n_bootstrap=200, seed=0)
    assert set(attribution.top(2)) == {(1, 5), (3, 2)}  # true layer numbers, not rows
    significant = attribution.significant()
    assert set(significant[:2]) == {(1, 5), (3, 2)}
    assert len(significant) == 2
    frame = attribution.to_frame()
    assert set(zip(frame.layer[:2], frame.expert[:2])) == {(1, 5), (3, 2)}
    assert frame.score.is_monotonic_decreasing
    assert (frame.score[:2] > attribution.noise_floor).all()
    assert len(frame) == len(LAYERS) * N_EXPERTS


def test_frequency_score_is_the_risk_difference(planted_pair):
    behavior, control = planted_pair
    attribution = attribute_experts(behavior, control, aggregate="token", n_bootstrap=0, n_splits=0)
    selected_b = torch.nn.functional.one_hot(behavior.topk_indices, N_EXPERTS).sum(2).float().mean(1)
    selected_c = torch.nn.functional.one_hot(control.topk_indices, N_EXPERTS).sum(2).float().mean(1)
    torch.testing.assert_close(attribution.score, (selected_b - selected_c).double())
    assert attribution.behavior_counts.sum() == behavior.n_tokens * len(LAYERS) * TOP_K
    assert math.isnan(attribution.noise_floor) and attribution.ci_low.isnan().all()


def test_same_distribution_gives_no_significant_expert():
    first = make_trace([10] * 30, seed=11)
    second = make_trace([10] * 30, seed=12)
    for aggregate in ("token", "prompt"):
        attribution = attribute_experts(first, second, aggregate=aggregate, n_bootstrap=0, seed=0)
        assert attribution.significant(direction="both") == []
        assert attribution.q_value.min() > 0.05
        # the largest observed |score| is within the noise-floor scale
        assert attribution.score.abs().max() < 2 * attribution.noise_floor


def test_prompt_aggregation_resists_one_long_prompt():
    # Behaviour: 20 short prompts with no signal plus one very long prompt that uses expert 6
    # in row 0 heavily. Pooled tokens make it look like a strong behaviour expert; per-prompt
    # averaging weighs the long prompt as 1 of 21.
    lengths = [8] * 20 + [800]
    behavior = make_trace(lengths, seed=3, boost={(0, 6): 30.0}, boosted_prompts=[20])
    control = make_trace([8] * 21, seed=4)
    token = attribute_experts(behavior, control, aggregate="token", n_bootstrap=0)
    prompt = attribute_experts(behavior, control, aggregate="prompt", n_bootstrap=0)
    assert token.top(1) == [(1, 6)] and token.score[0, 6] > 0.5
    assert prompt.score[0, 6] < 0.1
    assert (1, 6) not in prompt.significant()


def test_bootstrap_interval_covers_the_true_difference():
    # Planted boost of 4x for one of 8 experts, top-2 without replacement: the true selection
    # probability is estimated by a huge sample; the interval from a modest one must cover it.
    truth_b = make_trace([50] * 400, seed=21, boost={(0, 5): 4.0}, layers=(0,))
    truth_c = make_trace([50] * 400, seed=22, layers=(0,))
    truth = attribute_experts(truth_b, truth_c, aggregate="token", n_bootstrap=0, n_splits=0).score[0, 5]
    covered = 0
    for seed in range(10):
        sample_b = make_trace([10] * 30, seed=100 + seed, boost={(0, 5): 4.0}, layers=(0,))
        sample_c = make_trace([10] * 30, seed=200 + seed, layers=(0,))
        attribution = attribute_experts(sample_b, sample_c, aggregate="token", n_bootstrap=300, seed=seed)
        low, high = attribution.ci_low[0, 5], attribution.ci_high[0, 5]
        assert low < attribution.score[0, 5] < high
        covered += bool(low <= truth <= high)
    assert covered >= 8  # nominal 95 %


def test_last_tokens_counts_only_the_end_of_each_prompt(planted_pair):
    behavior, control = planted_pair
    attribution = attribute_experts(behavior, control, last_tokens=3, n_bootstrap=0, n_splits=0)
    assert attribution.behavior_tokens == 3 * behavior.n_prompts
    assert attribution.last_tokens == 3


def _subset(trace: RoutingTrace, keep: torch.Tensor) -> RoutingTrace:
    """The trace restricted to the tokens where ``keep`` is True (positions renumbered)."""
    prompt_index = trace.prompt_index[keep]
    position = torch.cat([torch.arange(int((prompt_index == p).sum())) for p in range(trace.n_prompts)])
    return dataclasses.replace(
        trace, topk_indices=trace.topk_indices[:, keep], topk_weights=trace.topk_weights[:, keep],
        token_ids=trace.token_ids[keep], prompt_index=prompt_index, position=position,
    )


def test_last_tokens_finds_behavior_planted_at_the_end_not_at_the_start():
    lengths = [8 + (i % 7) for i in range(40)]  # prompts of different lengths
    at_end = {(0, 5): 6.0}  # row 0 = layer 1: boosted on each prompt's last 3 tokens
    at_start = {(1, 2): 6.0}  # row 1 = layer 3: boosted on each prompt's first 3 tokens
    end = make_trace(lengths, seed=1, boost=at_end, boosted_tokens=lambda pos, n: pos >= n - 3)
    start = make_trace(lengths, seed=1, boost=at_start, boosted_tokens=lambda pos, n: pos < 3)
    # one behaviour trace: layer 1 from the end-planted draw, layer 3 from the start-planted one
    behavior = dataclasses.replace(
        end,
        topk_indices=torch.stack([end.topk_indices[0], start.topk_indices[1]]),
        topk_weights=torch.stack([end.topk_weights[0], start.topk_weights[1]]),
    )
    control = make_trace(lengths, seed=2)
    whole = attribute_experts(behavior, control, n_bootstrap=0, n_splits=20)
    assert set(whole.top(2)) == {(1, 5), (3, 2)}  # over all tokens both plants show
    last = attribute_experts(behavior, control, last_tokens=3, n_bootstrap=0, n_splits=20)
    assert last.top(1) == [(1, 5)] and (1, 5) in last.significant(above_noise_floor=True)
    assert (3, 2) not in last.significant(direction="both")
    assert abs(float(last.score[1, 2])) < last.noise_floor
    # the same numbers as attributing only each prompt's last 3 tokens
    def tail(trace):
        n = torch.tensor([int((trace.prompt_index == p).sum()) for p in range(trace.n_prompts)])
        return _subset(trace, trace.position >= n[trace.prompt_index] - 3)

    reference = attribute_experts(tail(behavior), tail(control), n_bootstrap=0, n_splits=20)
    for name in ("score", "behavior_counts", "control_counts", "p_value", "q_value"):
        assert torch.equal(getattr(last, name), getattr(reference, name)), name
    assert last.noise_floor == reference.noise_floor and last.behavior_tokens == 3 * len(lengths)


def test_top_with_per_layer_cap(planted_pair):
    attribution = attribute_experts(*planted_pair, n_bootstrap=0, n_splits=0)
    capped = attribution.top(4, per_layer_cap=1)
    assert capped[:2] == attribution.top(2) and len(capped) == 2  # only two layers
    assert len(attribution.top(16)) == 16
    with pytest.raises(ValueError, match="0..16"):
        attribution.top(17)


def test_save_load_round_trip(planted_pair, tmp_path):
    attribution = attribute_experts(*planted_pair, n_bootstrap=50, seed=3)
    path = attribution.save(tmp_path / "attribution")
    assert path.name == "attribution.json" and (tmp_path / "attribution.safetensors").is_file()
    loaded = ExpertAttribution.load(path)
    for name in ("score", "behavior_counts", "p_value", "q_value", "ci_low", "ci_high"):
        torch.testing.assert_close(getattr(loaded, name), getattr(attribution, name))
    assert loaded.layers == LAYERS and loaded.noise_floor == attribution.noise_floor
    assert loaded.top(3) == attribution.top(3)
    again = ExpertAttribution.from_dict(attribution.to_dict())
    torch.testing.assert_close(again.score, attribution.score)
    assert again.metric == "frequency" and again.aggregate == "prompt"
    with pytest.raises(ValueError, match="kind"):
        ExpertAttribution.from_dict({**attribution.to_dict(), "kind": "steering_vector"})
    # NaN intervals and noise floor (skipped) survive JSON as null
    bare = attribute_experts(*planted_pair, n_bootstrap=0, n_splits=0)
    restored = ExpertAttribution.from_dict(json.loads(json.dumps(bare.to_dict())))
    assert restored.ci_low.isnan().all() and math.isnan(restored.noise_floor)
    restored_file = ExpertAttribution.load(bare.save(tmp_path / "bare.safetensors"))
    assert math.isnan(restored_file.noise_floor)


def test_deterministic_for_a_seed(planted_pair):
    first = attribute_experts(*planted_pair, n_bootstrap=50, seed=7)
    second = attribute_experts(*planted_pair, n_bootstrap=50, seed=7)
    torch.testing.assert_close(first.ci_low, second.ci_low)
    assert first.noise_floor == second.noise_floor
    fewer = attribute_experts(*planted_pair, n_bootstrap=10, seed=7)
    assert fewer.noise_floor == first.noise_floor  # separate random streams


def test_bad_input_errors_name_what_was_received(planted_pair):
    behavior, control = planted_pair
    other_model = make_trace([5] * 3, seed=0, model_name="other")
    with pytest.raises(ValueError, match="different models.*'synthetic'.*'other'"):
        attribute_experts(behavior, other_model)
    with pytest.raises(ValueError, match=r"different layers.*\(1, 3\).*\(0, 1, 2\)"):
        attribute_experts(behavior, make_trace([5] * 3, seed=0, layers=(0, 1, 2)))
    with pytest.raises(ValueError, match="n_experts=8.*n_experts=16"):
        attribute_experts(behavior, make_trace([5] * 3, seed=0, n_experts=16))
    empty = RoutingTrace(
        topk_indices=torch.zeros(2, 0, TOP_K, dtype=torch.long),
        topk_weights=torch.zeros(2, 0, TOP_K),
        router_logits=None,
        token_ids=torch.zeros(0, dtype=torch.long),
        prompt_index=torch.zeros(0, dtype=torch.long),
        position=torch.zeros(0, dtype=torch.long),
        layers=LAYERS,
        n_experts=N_EXPERTS,
        top_k=TOP_K,
        n_prompts=0,
        model_name="synthetic",
    )
    with pytest.raises(ValueError, match="control trace is empty.*0 prompts"):
        attribute_experts(behavior, empty)
    with pytest.raises(ValueError, match="metric='kl'.*frequency"):
        attribute_experts(behavior, control, metric="kl")
    with pytest.raises(ValueError, match="aggregate='sequence'"):
        attribute_experts(behavior, control, aggregate="sequence")
    with pytest.raises(ValueError, match="cannot test metric='weight'"):
        attribute_experts(behavior, control, metric="weight", test="fisher")
    with pytest.raises(TypeError, match="RoutingTrace"):
        attribute_experts(behavior, {"topk_indices": None})


def test_loading_the_wrong_file_says_what_was_found(planted_pair, tmp_path):
    attribution = attribute_experts(*planted_pair, n_bootstrap=0, n_splits=0)
    path = attribution.save(tmp_path / "attribution")
    trace_path = planted_pair[0].save(tmp_path / "trace.safetensors")
    assert trace_path.name == "trace.json"
    with pytest.raises(ValueError, match=r"ExpertAttribution.load: '.*trace.json' is of kind 'labkit.RoutingTrace'; expected kind 'labkit.ExpertAttribution'. Load it with RoutingTrace.load"):
        ExpertAttribution.load(tmp_path / "trace.safetensors")
    (tmp_path / "notes.json").write_text('{"kind": "labkit.ExpertMask"}')
    with pytest.raises(ValueError, match=r"notes.json' is of kind 'labkit.ExpertMask'; expected kind 'labkit.ExpertAttribution'. Load it with ExpertMask.load"):
        ExpertAttribution.load(tmp_path / "notes.json")
    # half a pair: the tensors moved away from their JSON
    (tmp_path / "attribution.safetensors").rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(FileNotFoundError, match=r"attribution.json' names tensors .* but '.*attribution.safetensors' is missing"):
        ExpertAttribution.load(path)
    # a pair whose halves come from different saves
    (tmp_path / "trace.safetensors").rename(tmp_path / "attribution.safetensors")
    with pytest.raises(ValueError, match=r"attribution.safetensors' holds a 'labkit.RoutingTrace' but .* is a 'labkit.ExpertAttribution'"):
        ExpertAttribution.load(path)
    with pytest.raises(FileNotFoundError, match=r"no file at '.*missing'; expected missing.json .* written by ExpertAttribution.save"):
        ExpertAttribution.load(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="a directory at"):
        ExpertAttribution.load(tmp_path)
    # the loader in the error is right: the trace loads as a trace
    (tmp_path / "attribution.safetensors").rename(tmp_path / "trace.safetensors")
    assert RoutingTrace.load(trace_path).n_tokens == planted_pair[0].n_tokens


def test_from_dict_names_missing_fields(planted_pair):
    data = attribute_experts(*planted_pair, n_bootstrap=0, n_splits=0).to_dict()
    with pytest.raises(ValueError, match=r"ExpertAttribution.from_dict: the dict has no 'kind' key"):
        ExpertAttribution.from_dict({})
    del data["score"], data["noise_floor"]
    with pytest.raises(ValueError, match=r"lacks 'score', 'noise_floor'"):
        ExpertAttribution.from_dict(data)


# --- the statistics against an independent computation (plain loops + scipy) -----------------


def _per_token_values(trace: RoutingTrace):
    """(layer, token, expert) selection indicator and routing weight, by plain loops."""
    n_layers, n_tokens, _ = trace.topk_indices.shape
    selected = np.zeros((n_layers, n_tokens, trace.n_experts))
    weight = np.zeros_like(selected)
    for layer in range(n_layers):
        for token in range(n_tokens):
            for slot in range(trace.top_k):
                expert = int(trace.topk_indices[layer, token, slot])
                selected[layer, token, expert] = 1.0
                weight[layer, token, expert] += float(trace.topk_weights[layer, token, slot])
    return selected, weight


def _per_prompt_rates(trace: RoutingTrace, values: np.ndarray) -> np.ndarray:
    """(prompt, layer, expert): each prompt's mean over its tokens."""
    prompt_index = trace.prompt_index.numpy()
    return np.stack([values[:, prompt_index == p].mean(axis=1) for p in range(trace.n_prompts)])


def _reference_score(metric, aggregate, b_values, b_prompts, c_values, c_prompts):
    """The documented score of one behaviour set against one control set.

    ``*_values`` are (layer, token, expert) per-token values, ``*_prompts`` the (prompt, layer,
    expert) per-prompt rates of the same sets."""
    if aggregate == "prompt":
        rate_b, rate_c = b_prompts.mean(0), c_prompts.mean(0)
        n_b, n_c = b_prompts.shape[0], c_prompts.shape[0]
    else:
        rate_b, rate_c = b_values.mean(1), c_values.mean(1)
        n_b, n_c = b_values.shape[1], c_values.shape[1]
    if metric != "log_odds":
        return rate_b - rate_c
    # Haldane-Anscombe: +0.5 in every cell of (selected, not selected) x (behaviour, control)
    a, b = rate_b * n_b, n_b - rate_b * n_b
    c, d = rate_c * n_c, n_c - rate_c * n_c
    return np.log((a + 0.5) / (b + 0.5)) - np.log((c + 0.5) / (d + 0.5))


def _bh(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values by the textbook step-up rule."""
    flat = p.ravel()
    m = flat.size
    order = np.argsort(flat)
    adjusted = np.empty(m)
    running = 1.0
    for rank in range(m, 0, -1):  # from the largest p down
        i = order[rank - 1]
        running = min(running, flat[i] * m / rank)
        adjusted[i] = running
    return adjusted.reshape(p.shape)


@pytest.fixture(scope="module")
def uneven_pair():
    """Planted experts, prompts of different lengths, 23 behaviour vs 31 (odd) control prompts."""
    behavior = make_trace([6 + (i % 9) for i in range(23)], seed=5, boost={(0, 5): 2.5, (1, 2): 1.6})
    control = make_trace([5 + (i % 11) for i in range(31)], seed=6)
    return behavior, control


@pytest.mark.parametrize("aggregate", ["prompt", "token"])
@pytest.mark.parametrize("metric", ["frequency", "weight", "log_odds"])
def test_statistics_equal_an_independent_scipy_computation(uneven_pair, metric, aggregate):
    from scipy.stats import false_discovery_control, fisher_exact, ttest_ind

    behavior, control = uneven_pair
    seed, alpha, n_splits = 3, 0.1, 40
    result = attribute_experts(
        behavior, control, metric=metric, aggregate=aggregate, n_bootstrap=0, n_splits=n_splits, seed=seed, alpha=alpha
    )
    sel_b, weight_b = _per_token_values(behavior)
    sel_c, weight_c = _per_token_values(control)
    values_b, values_c = (weight_b, weight_c) if metric == "weight" else (sel_b, sel_c)
    prompts_b, prompts_c = _per_prompt_rates(behavior, values_b), _per_prompt_rates(control, values_c)

    # scores and rates
    score = _reference_score(metric, aggregate, values_b, prompts_b, values_c, prompts_c)
    np.testing.assert_allclose(result.score.numpy(), score, rtol=1e-12, atol=1e-12)
    rate_b = prompts_b.mean(0) if aggregate == "prompt" else values_b.mean(1)
    np.testing.assert_allclose(result.behavior_rate.numpy(), rate_b, rtol=1e-12, atol=1e-12)
    assert torch.equal(result.behavior_counts, torch.as_tensor(sel_b.sum(1).astype(np.int64)))

    # p-values: Welch on per-prompt (or per-token) values, Fisher's exact on token counts
    expected_test = "fisher" if aggregate == "token" and metric != "weight" else "welch"
    assert result.test == expected_test
    p = np.empty(score.shape)
    for layer in range(score.shape[0]):
        for expert in range(score.shape[1]):
            if expected_test == "welch":
                units_b = prompts_b[:, layer, expert] if aggregate == "prompt" else values_b[layer, :, expert]
                units_c = prompts_c[:, layer, expert] if aggregate == "prompt" else values_c[layer, :, expert]
                p[layer, expert] = ttest_ind(units_b, units_c, equal_var=False).pvalue
            else:
                a, c = sel_b[layer, :, expert].sum(), sel_c[layer, :, expert].sum()
                n_b, n_c = sel_b.shape[1], sel_c.shape[1]
                p[layer, expert] = fisher_exact([[a, n_b - a], [c, n_c - c]]).pvalue
    assert np.isfinite(p).all()
    np.testing.assert_allclose(result.p_value.numpy(), p, rtol=1e-9, atol=1e-12)
    # BH q-values over all layer x expert cells: scipy's and the textbook step-up rule agree
    q = false_discovery_control(p.ravel(), method="bh").reshape(p.shape)
    np.testing.assert_allclose(_bh(p), q, rtol=1e-12)
    np.testing.assert_allclose(result.q_value.numpy(), q, rtol=1e-9, atol=1e-12)
    assert result.p_value.min() < 0.01 and (result.q_value > result.p_value).any()  # a real test

    # split-half noise floor: the documented draws (control prompts permuted, two equal halves,
    # an odd prompt out), the 1 - alpha quantile over splits of the largest |half - half| score
    rng = np.random.default_rng([seed, 1])
    n_prompts, half = control.n_prompts, control.n_prompts // 2
    prompt_index = control.prompt_index.numpy()
    maxima = []
    for _ in range(n_splits):
        order = rng.permutation(n_prompts)
        first, second = order[:half], order[half : 2 * half]
        tokens_a, tokens_b = np.isin(prompt_index, first), np.isin(prompt_index, second)
        split = _reference_score(
            metric, aggregate, values_c[:, tokens_a], prompts_c[first], values_c[:, tokens_b], prompts_c[second]
        )
        maxima.append(np.abs(split).max())
    assert result.noise_floor == pytest.approx(float(np.quantile(maxima, 1 - alpha)), rel=1e-12)
    assert 0 < result.noise_floor < np.abs(score).max()


def test_two_proportion_z_test_equals_scipy_chi_square(uneven_pair):
    """test='z': the pooled two-proportion z test on token counts; its p equals the 2x2 chi-square
    test without continuity correction (chi2 = z^2), computed here by scipy."""
    from scipy.stats import chi2_contingency

    behavior, control = uneven_pair
    result = attribute_experts(behavior, control, aggregate="token", test="z", n_bootstrap=0, n_splits=4)
    assert result.test == "z"
    sel_b, _ = _per_token_values(behavior)
    sel_c, _ = _per_token_values(control)
    n_b, n_c = sel_b.shape[1], sel_c.shape[1]
    p = np.ones(result.score.shape)
    for layer in range(p.shape[0]):
        for expert in range(p.shape[1]):
            a, c = sel_b[layer, :, expert].sum(), sel_c[layer, :, expert].sum()
            if 0 < a + c < n_b + n_c:  # a column of zeros: no variance, p = 1 (z = 0)
                p[layer, expert] = chi2_contingency([[a, n_b - a], [c, n_c - c]], correction=False).pvalue
    np.testing.assert_allclose(result.p_value.numpy(), p, rtol=1e-9, atol=1e-12)
    assert result.p_value.min() < 1e-3 and (result.p_value == 1).sum() < result.p_value.numel()


def test_summary_reports_the_ranked_cells_and_their_statistics(uneven_pair):
    behavior, control = uneven_pair
    result = attribute_experts(behavior, control, n_bootstrap=50, n_splits=20, seed=0)
    lines = result.summary(3).splitlines()
    assert len(lines) == 2 + 3
    assert f"{behavior.n_prompts} behaviour / {control.n_prompts} control prompts" in lines[0]
    assert f"noise floor" in lines[1] and f"{result.noise_floor:.4f}" in lines[1]
    assert f"significant (q < {result.alpha}): {len(result.significant())}" in lines[1]
    top = result.to_frame().head(3)
    for line, row in zip(lines[2:], top.itertuples()):
        assert line.split()[:2] == [f"L{row.layer}", f"E{row.expert}"]
        assert f"score {row.score:+.4f}" in line and f"q={row.q_value:.2g}" in line
        assert line.endswith("  *") == bool(row.significant and row.above_noise_floor)


def test_to_frame_holds_every_cell_with_its_statistics(uneven_pair):
    behavior, control = uneven_pair
    result = attribute_experts(behavior, control, n_bootstrap=50, n_splits=20, seed=0)
    frame = result.to_frame()
    assert list(frame.columns) == ["layer", "expert", "score", "ci_low", "ci_high", "p_value", "q_value", "significant",
                                   "above_noise_floor", "behavior_count", "control_count", "behavior_rate", "control_rate"]
    assert len(frame) == len(result.layers) * result.n_experts
    for row in frame.itertuples():
        i, e = list(result.layers).index(row.layer), row.expert
        assert row.score == pytest.approx(float(result.score[i, e]))
        assert row.behavior_count == int(result.behavior_counts[i, e]) and row.control_count == int(result.control_counts[i, e])
        assert row.control_rate == pytest.approx(float(result.control_rate[i, e]))
        assert row.q_value == pytest.approx(float(result.q_value[i, e])) and row.significant == bool(result.q_value[i, e] < result.alpha)
    assert [(r.layer, r.expert) for r in frame.head(3).itertuples()] == result.top(3)


def test_default_noise_floor_is_100_split_halves(uneven_pair):
    """The default a user reads in every report: 100 splits, seed 0 (as documented)."""
    behavior, control = uneven_pair
    default = attribute_experts(behavior, control, n_bootstrap=0)
    assert default.noise_floor == attribute_experts(behavior, control, n_bootstrap=0, n_splits=100, seed=0).noise_floor
    assert default.noise_floor != attribute_experts(behavior, control, n_bootstrap=0, n_splits=101, seed=0).noise_floor


def test_the_attribution_records_its_seed_and_the_seed_fixes_the_intervals(planted_pair):
    """Provenance a reader relies on to reproduce an interval (a survivor of the mutation run)."""
    a = attribute_experts(*planted_pair, n_bootstrap=50, n_splits=5, seed=3)
    b = attribute_experts(*planted_pair, n_bootstrap=50, n_splits=5, seed=3)
    c = attribute_experts(*planted_pair, n_bootstrap=50, n_splits=5, seed=4)
    assert a.seed == 3 and c.seed == 4
    assert torch.equal(a.ci_low, b.ci_low) and not torch.equal(a.ci_low, c.ci_low)
