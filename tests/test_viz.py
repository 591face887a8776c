"""Figures are pure and deterministic: same result in, same figure data out."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from labkit.moe import ExpertMask, attribute_experts
from labkit.viz import condition_plot, expert_heatmap
from tests.test_moe_attribution import PLANTED, make_trace


@pytest.fixture(scope="module")
def attribution():
    behavior = make_trace([12] * 30, seed=1, boost=PLANTED)
    control = make_trace([12] * 30, seed=2)
    return attribute_experts(behavior, control, n_bootstrap=50, seed=0)


def _snapshot(figure) -> str:
    return json.dumps(figure.to_plotly_json(), sort_keys=True, default=str)


def test_heatmap_is_deterministic_and_labelled_with_true_layers(attribution):
    mask = ExpertMask.from_attribution(attribution, 2)
    first, second = expert_heatmap(attribution, mask=mask), expert_heatmap(attribution, mask=mask)
    assert _snapshot(first) == _snapshot(second)
    heatmap = first.data[0]
    assert list(heatmap.y) == ["L1", "L3"] and list(heatmap.x) == list(range(8))
    np.testing.assert_allclose(np.array(heatmap.z), attribution.score.numpy())
    assert heatmap.zmin == -heatmap.zmax and heatmap.zmid == 0
    assert len(heatmap.customdata[0][0]) == 8  # counts, rates, p, q, interval on hover
    significant = first.data[1]
    # both directions are ringed: the planted experts take top-k slots from the others
    expected = {(f"L{layer}", expert) for layer, expert in attribution.significant(direction="both")}
    assert {("L1", 5), ("L3", 2)} <= set(zip(significant.y, significant.x)) == expected
    off = first.data[2]
    assert off.name == "mask: off" and set(zip(off.y, off.x)) == {("L1", 5), ("L3", 2)}
    assert "noise floor" in first.layout.title.text


def test_heatmap_mask_modes_and_plain_pairs(attribution):
    mask = ExpertMask(
        edits=((1, 0, "on", 0.0), (3, 7, "bias", -2.0), (9, 1, "off", 0.0))
    )
    figure = expert_heatmap(attribution, mask=mask)
    names = [trace.name for trace in figure.data]
    assert names == ["score", "q < 0.05", "mask: on", "mask: bias"]  # layer 9 is not traced
    pairs = expert_heatmap(attribution, mask=[(1, 4)])
    assert pairs.data[-1].name == "mask: off"
    with pytest.raises(ValueError, match="ExpertMask or"):
        expert_heatmap(attribution, mask=[1, 2])


def _table() -> pd.DataFrame:
    rows = [
        dict(condition="baseline", n=0, seed=np.nan, bias=np.nan, behavior_rate=0.9, behavior_ci_low=0.8,
             behavior_ci_high=0.95, control_rate=0.05, control_ci_low=0.01, control_ci_high=0.1,
             add_accuracy=0.7, add_ci_low=0.6, add_ci_high=0.8),
        dict(condition="top_off", n=2, seed=np.nan, bias=np.nan, behavior_rate=0.1, behavior_ci_low=0.05,
             behavior_ci_high=0.2, control_rate=0.0, control_ci_low=0.0, control_ci_high=0.05,
             add_accuracy=0.7, add_ci_low=0.6, add_ci_high=0.8),
        dict(condition="random_off", n=2, seed=0, bias=np.nan, behavior_rate=0.85, control_rate=0.05, add_accuracy=0.6),
        dict(condition="random_off", n=2, seed=1, bias=np.nan, behavior_rate=0.75, control_rate=0.1, add_accuracy=0.7),
        dict(condition="random_off_mean", n=2, seed=np.nan, bias=np.nan, behavior_rate=0.8, behavior_sd=0.07,
             control_rate=0.075, control_sd=0.035, add_accuracy=0.65, add_sd=0.07),
        dict(condition="top_on", n=2, seed=np.nan, bias=np.nan, control_rate=0.4, control_ci_low=0.3, control_ci_high=0.5),
    ]
    return pd.DataFrame(rows)


def test_condition_plot_is_deterministic_with_one_panel_per_measure():
    table = _table()
    first, second = condition_plot(table), condition_plot(table)
    assert _snapshot(first) == _snapshot(second)
    titles = [a.text for a in first.layout.annotations]
    assert titles == ["behaviour rate", "control (false-positive) rate", "add accuracy"]
    behavior_bars = first.data[0]
    assert list(behavior_bars.x) == ["baseline", "top-2 off", "random-2 off"]  # top-2 on: no behaviour
    assert list(behavior_bars.y) == [0.9, 0.1, 0.8]
    np.testing.assert_allclose(behavior_bars.error_y.array, [0.05, 0.1, 0.07])
    seeds = first.data[1]
    assert list(seeds.y) == [0.85, 0.75]
    control_bars = first.data[2]
    assert list(control_bars.x)[-1] == "top-2 on"
    with pytest.raises(ValueError, match="lacks columns"):
        condition_plot(pd.DataFrame({"x": [1]}))


def test_wrong_input_types_raise_clear_type_errors(attribution):
    import torch

    from labkit.viz import residual_norm_heatmap

    with pytest.raises(TypeError, match=r"expert_heatmap: attribution is a dict; expected a labkit.moe.ExpertAttribution"):
        expert_heatmap({})
    with pytest.raises(TypeError, match=r"residual_norm_heatmap: norms is a Tensor; expected the pandas DataFrame returned by labkit.lens.residual_norms"):
        residual_norm_heatmap(torch.ones(3))
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['mean_norm'\]"):
        residual_norm_heatmap(pd.DataFrame({"hook": ["blocks.0.hook_resid_pre"], "position": [0]}))
    with pytest.raises(ValueError, match=r"hook 'embed' names no layer"):
        residual_norm_heatmap(pd.DataFrame({"hook": ["embed"], "position": [0], "mean_norm": [1.0]}))
    norms = pd.DataFrame(
        {"hook": ["blocks.2.hook_resid_pre", "blocks.0.hook_resid_pre"] * 2, "position": [0, 0, 1, 1], "mean_norm": [1.0, 2.0, 3.0, 4.0]}
    )
    figure = residual_norm_heatmap(norms)
    assert list(figure.data[0].y) == [0, 2] and figure.data[0].z.tolist() == [[2.0, 4.0], [1.0, 3.0]]


def _sweep_table():
    import pandas as pd

    rows = [("unsteered", -1, 0.0, 0.0, 33.0)]
    for layer in (2, 6):
        for c, frac, ppl in ((2.0, 0.01, 34.0), (4.0, 0.02, 36.0), (8.0, 0.015, 50.0)):
            rows.append(("actadd", layer, c, frac + layer / 1000, ppl + layer))
    rows += [("pca", 6, 2.0, 0.03, 80.0), ("pca", 6, 4.0, 0.05, 200.0)]
    return pd.DataFrame(rows, columns=["method", "layer", "coefficient", "topic_fraction", "perplexity"])


def test_steering_figures_are_deterministic_and_show_the_values():
    import pandas as pd

    from labkit.viz import steerability_plot, steering_tradeoff, sweep_heatmap

    table = _sweep_table()
    actadd = table[table.method.isin(["unsteered", "actadd"])]
    heat = sweep_heatmap(actadd, title="wedding")
    assert heat.to_dict() == sweep_heatmap(actadd, title="wedding").to_dict()
    fraction, perplexity = heat.data
    assert list(fraction.y) == ["L2", "L6"] and list(fraction.x) == ["c=2", "c=4", "c=8"]
    assert fraction.z[1][1] == pytest.approx(0.026) and fraction.text[1][1] == "0.026"
    assert perplexity.z[0][2] == pytest.approx(52.0) and "unsteered: fraction 0.000, perplexity 33.0" in heat.layout.title.text

    trade = steering_tradeoff(table)
    assert trade.to_dict() == steering_tradeoff(table).to_dict()
    names = [trace.name for trace in trade.data]
    assert names == ["actadd L2", "actadd L6", "pca L6", "unsteered"]
    assert list(trade.data[2].x) == [80.0, 200.0] and list(trade.data[2].y) == [0.03, 0.05]

    slopes = pd.DataFrame({"method": ["actadd"] * 3, "layer": [6] * 3, "prompt": list("abc"), "slope": [0.01, -0.02, 0.0]})
    plot = steerability_plot(slopes)
    assert plot.to_dict() == steerability_plot(slopes).to_dict()
    assert plot.data[0].name == "actadd L6<br>anti 0.33" and list(plot.data[0].y) == [0.01, -0.02, 0.0]
    with pytest.raises(ValueError, match=r"needs columns \['layer', 'method', 'prompt', 'slope'\]"):
        steerability_plot(slopes.drop(columns="slope"))
    with pytest.raises(ValueError, match="no steered rows"):
        sweep_heatmap(table[table.method == "unsteered"])


def test_topic_sweep_heatmaps_show_both_ratios_per_topic():
    import math

    import pandas as pd

    from labkit.viz import topic_sweep_heatmaps

    grid = pd.DataFrame({"layer": [1, 1, 6, 6], "coefficient": [2.0, 4.0, 2.0, 4.0], "ratio": [1.5, 4.0, 0.5, 1.0],
                         "perplexity_ratio": [1.1, 2.5, 1.0, 1.3]})
    fig = topic_sweep_heatmaps({"wedding": grid, "love": grid.assign(ratio=2.0)})
    assert fig.to_dict() == topic_sweep_heatmaps({"wedding": grid, "love": grid.assign(ratio=2.0)}).to_dict()
    ratio, perplexity, love_ratio, _ = fig.data
    assert list(ratio.y) == ["L1", "L6"] and list(ratio.x) == ["c=2", "c=4"]
    assert ratio.z[0][1] == pytest.approx(2.0) and ratio.text[0][1] == "4.00"  # log2 colour, ratio as text
    assert ratio.z[1][0] == pytest.approx(-1.0) and ratio.zmid == 0
    assert perplexity.z[0][1] == pytest.approx(2.5) and perplexity.text[1][1] == "1.30"
    assert all(math.isclose(v, 1.0) for line in love_ratio.z for v in line)
    assert [a.text for a in fig.layout.annotations][:2] == ["wedding: topic probability, x unsteered", "wedding: perplexity, x unsteered"]
    with pytest.raises(ValueError, match="needs columns"):
        topic_sweep_heatmaps({"wedding": grid.drop(columns="ratio")})
    with pytest.raises(ValueError, match="grids is empty"):
        topic_sweep_heatmaps({})


def test_minimal_mask_plot_shows_each_rankings_cut_and_the_random_masks():
    from labkit.viz import minimal_mask_plot

    rows = [
        {"organism": "planted", "ranking": "frequency", "n_experts": 1, "cut": 0.97, "random_cuts": [0.0, 0.01]},
        {"organism": "planted", "ranking": "causal", "n_experts": 1, "cut": 0.97, "random_cuts": [0.0, 0.01]},
        {"organism": "natural", "ranking": "frequency", "n_experts": 4, "cut": 0.47, "random_cuts": [0.56, -0.1]},
        {"organism": "natural", "ranking": "causal", "n_experts": 1, "cut": 0.0, "random_cuts": [0.04]},
    ]
    figure = minimal_mask_plot(rows)
    bars = {trace.name: trace for trace in figure.data if trace.type == "bar"}
    assert list(bars) == ["frequency", "causal"]
    assert list(bars["frequency"].x) == ["planted", "natural"] and list(bars["frequency"].y) == [0.97, 0.47]
    assert list(bars["causal"].y) == [0.97, 0.0] and list(bars["frequency"].text) == ["1 expert", "4 experts"]
    dots = [trace for trace in figure.data if trace.type == "scatter"][0]
    assert list(dots.y) == [0.0, 0.01, 0.0, 0.01, 0.56, -0.1, 0.04]
    assert figure.layout.yaxis.range[0] == -0.1
    with pytest.raises(ValueError, match=r"row 0 lacks \['cut'\]"):
        minimal_mask_plot([{"organism": "a", "ranking": "b", "n_experts": 1, "random_cuts": []}])
