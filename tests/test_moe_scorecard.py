"""The selection scorecard on the planted tiny model (tests/test_moe_selection.py): values against
masked scores computed by hand, the bootstrap against a by-hand loop, resuming, bad input, the figure."""

from __future__ import annotations

import numpy as np
import pytest

import labkit
from labkit.hooks import count_hooks
from labkit.moe import ExpertMask, masked, trace_routing
from labkit.moe.causal import target_logprobs, target_probability
from labkit.moe.scorecard import ScoreSet, difference_interval, selection_scorecard
from labkit.moe.selection import ablation_effect, frequency_difference, stability_selection
from labkit.viz import scorecard_plot
from tests.moe_fixtures import one_thread
from tests.test_moe_selection import BEHAVIOR, CONTROL, PLANTED, planted_model

HELDOUT_PREFIXES = ["the park while", "a mat and", "two three four", "during the war and"]


@pytest.fixture(scope="module")
def card():
    with one_thread():
        model, target = planted_model()
        behavior = trace_routing(model, BEHAVIOR, progress=False)
        control = trace_routing(model, CONTROL, progress=False)
        selections = {
            "fTRI": frequency_difference(behavior, control, last_tokens=1),
            "ablation": ablation_effect(model, BEHAVIOR, target, progress=False),
        }
        sets = dict(
            behavior=ScoreSet("trigger", [p + " war" for p in HELDOUT_PREFIXES], target),
            induce=ScoreSet("control", [p + " mat" for p in HELDOUT_PREFIXES], target),
            off_target=ScoreSet("other", ["the cat", "one two", "love and"], [" sat", " the", " hate"], score="logprob"),
            fluency=ScoreSet("text", ["what happened in", "a dog ran"], [" the city", " to the park"], score="logprob"),
        )
        yield model, target, behavior, control, selections, sets


def _run(card, **kwargs):
    model, _, _, _, selections, sets = card
    settings = dict(n_values=(1,), budget=None, n_random=3, n_bootstrap=200, progress=False)
    settings.update(kwargs)
    return selection_scorecard(model, selections, **sets, **settings)


def test_difference_interval_by_hand():
    rng = np.random.default_rng(0)
    selected, random = rng.normal(size=7), rng.normal(size=(4, 7)) + 0.5
    got = difference_interval(selected, random, n_bootstrap=300, confidence=0.9, seed=3)
    draws = np.random.default_rng(3)
    prompts, seeds = draws.integers(0, 7, size=(300, 7)), draws.integers(0, 4, size=(300, 4))
    sel, rnd = [], []
    for b in range(300):
        sel.append(sum(selected[i] for i in prompts[b]) / 7)
        rnd.append(sum(random[s, i] for s in seeds[b] for i in prompts[b]) / 28)
    diff = np.array(sel) - np.array(rnd)
    assert got["difference"] == pytest.approx(selected.mean() - random.mean())
    assert got["random_sd"] == pytest.approx(np.std(random.mean(1), ddof=1))
    for name, values in (("selected", sel), ("random", rnd), ("difference", diff)):
        assert got[f"{name}_low"] == pytest.approx(np.quantile(values, 0.05))
        assert got[f"{name}_high"] == pytest.approx(np.quantile(values, 0.95))
    with pytest.raises(ValueError, match="the same prompts"):
        difference_interval(selected, random[:, :3])


def test_scorecard_values_equal_masked_scores_by_hand(card):
    model, target, *_, sets = card
    frame = _run(card)
    assert set(frame.rule) == {"fTRI", "ablation"} and set(frame.metric) == {"behavior", "off_target", "fluency"}
    row = frame[(frame.rule == "fTRI") & (frame["mode"] == "off") & (frame.n == 1) & (frame.metric == "behavior")].iloc[0]
    assert row.experts == "L1E3"
    prompts = list(sets["behavior"].prompts)
    assert row.baseline == pytest.approx(target_probability(model, prompts, target))
    with masked(model, ExpertMask.off([PLANTED])):
        assert row.selected == pytest.approx(target_probability(model, prompts, target))
    by_seed = []
    selected_mask = ExpertMask.off([PLANTED], model=model)
    for seed in range(3):  # layer-matched (one expert of layer 1), never the planted one
        mask = ExpertMask.random(model, seed=seed, exclude=[PLANTED], match_layers_of=selected_mask)
        assert mask.layers == (1,) and PLANTED not in mask.experts()
        with masked(model, mask):
            by_seed.append(target_probability(model, prompts, target))
    assert row.random_values == pytest.approx(tuple(by_seed))
    assert row.difference == pytest.approx(row.selected - np.mean(by_seed))
    assert row.difference_high < -0.9  # the plant: far below every random expert of its layer
    # forced on: measured on the control prompts; the planted expert reads the trigger dimension,
    # which control tokens lack, so forcing it on there writes nothing -- no better than random
    on = frame[(frame.rule == "fTRI") & (frame["mode"] == "on") & (frame.n == 1) & (frame.metric == "behavior")].iloc[0]
    assert on.score_set == "control" and abs(on.difference) < 1e-6 and on.difference_low <= 0 <= on.difference_high
    # off-target and fluency: the mean log-probability per target token, as teacher forcing gives it
    fluency = frame[(frame.rule == "fTRI") & (frame["mode"] == "off") & (frame.n == 1) & (frame.metric == "fluency")].iloc[0]
    with masked(model, ExpertMask.off([PLANTED])):
        logprob = target_logprobs(model, list(sets["fluency"].prompts), list(sets["fluency"].targets)).double().numpy()
    lengths = [len(model.labkit.tokenizer.encode(t, add_special_tokens=False)) for t in sets["fluency"].targets]
    assert fluency.selected == pytest.approx(float(np.mean(logprob / np.array(lengths))))


def test_too_few_experts_errors_or_skips(card):
    model, _, behavior, control, _, sets = card
    stable = {"stability": stability_selection(behavior, control, n_resamples=10, last_tokens=1)}  # keeps one expert
    with pytest.raises(ValueError, match="rule 'stability', mode 'off', N=2 .* keeps 1 of 24.*too_few='skip'"):
        selection_scorecard(model, stable, **sets, n_values=(1, 2), budget=None, n_random=2, progress=False)
    frame = selection_scorecard(model, stable, **sets, n_values=(1, 2), budget=None, n_random=2, n_bootstrap=50,
                                too_few="skip", progress=False)
    assert set(frame.n) == {1} and len(frame.attrs["skipped"]) == 2  # N=2 off and on


def test_resumes_from_persisted_cells(card, tmp_path, monkeypatch):
    model = card[0]
    calls = []
    real = ScoreSet.evaluate

    def counting(self, *args, **kwargs):
        calls.append(self.name)
        if len(calls) == interrupt_at[0]:
            raise RuntimeError("interrupted")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ScoreSet, "evaluate", counting)
    interrupt_at = [0]
    full = _run(card)
    total = len(calls)
    calls.clear()
    interrupt_at[0] = total // 2
    hooks = count_hooks(model.labkit.twin)
    with pytest.raises(RuntimeError, match="interrupted"):
        _run(card, out_dir=tmp_path)
    assert count_hooks(model.labkit.twin) == hooks  # no mask left on after the interruption
    assert len(list((tmp_path / "cells").glob("*.json"))) == total // 2 - 1
    calls.clear()
    interrupt_at[0] = 0
    resumed = _run(card, out_dir=tmp_path)
    assert len(calls) == total - (total // 2 - 1)  # only the cells not yet done
    calls.clear()
    again = _run(card, out_dir=tmp_path)
    assert calls == []  # everything loaded
    for frame in (resumed, again):
        assert frame.drop(columns="random_values").equals(full.drop(columns="random_values"))
        assert list(frame.random_values) == list(full.random_values)


def test_bad_input_is_refused_clearly(card):
    model, target, behavior, control, selections, sets = card
    other = labkit.moe.ExpertSelection(
        rule="x", score=selections["fTRI"].score, eligible=selections["fTRI"].eligible, layers=(0, 1, 2),
        n_experts=8, top_k=2, model_name="another-model", filter="score > 0", source="test",
    )
    with pytest.raises(ValueError, match="scores model 'another-model'.*select experts on the model you evaluate"):
        selection_scorecard(model, {"x": other}, **sets, progress=False)
    with pytest.raises(TypeError, match="pass ExpertSelection objects"):
        selection_scorecard(model, {"x": [(1, 3)]}, **sets, progress=False)
    with pytest.raises(ValueError, match="modes="):
        _run(card, modes=("sideways",))
    with pytest.raises(ValueError, match="budget=2"):
        _run(card, budget=2)
    with pytest.raises(ValueError, match="n_random=0"):
        _run(card, n_random=0)
    with pytest.raises(ValueError, match="needs targets"):
        ScoreSet("s", ["a"])
    with pytest.raises(ValueError, match="2 targets for 1 prompts"):
        ScoreSet("s", ["a"], ["b", "c"])
    with pytest.raises(ValueError, match="score='maybe'"):
        ScoreSet("s", ["a"], "b", score="maybe")


def test_generated_scores_and_budget(card):
    model, target, *_ = card
    prompts = [p + " war" for p in HELDOUT_PREFIXES]
    detected = ScoreSet("said target", prompts, score="generated", detector=lambda text: text.startswith(target), max_new_tokens=2)
    texts = labkit.generate(model, prompts, max_new_tokens=2).texts
    assert list(detected.evaluate(model)) == [float(t.startswith(target)) for t in texts] == [1.0] * 4
    frame = _run(card, n_values=(1,), budget=0.04, modes=("off",))
    assert list(dict.fromkeys(frame.n_label)) == ["1", "budget 4.0%"] and set(frame.n) == {1}  # round(4 % of 24) = 1
    frame = _run(card, n_values=(1,), budget=0.1, modes=("off",), too_few="skip")  # round(10 % of 24) = 2: the plant has 1
    assert set(frame.n_label) == {"1"} and len(frame.attrs["skipped"]) == 2


def test_scorecard_plot(card):
    frame = _run(card)
    figure = scorecard_plot(frame, title="planted")
    assert len(figure.data) == 2 * 2 * 3  # rules x modes x metrics
    assert figure.layout.title.text == "planted"
    first = figure.data[0]
    assert list(first.x) == ["1"] and first.name == "fTRI"
    with pytest.raises(ValueError, match="needs columns"):
        scorecard_plot(frame.drop(columns="difference"))
    with pytest.raises(ValueError, match="no rows"):
        scorecard_plot(frame.iloc[:0])
