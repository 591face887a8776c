"""compare_conditions end to end on a tiny random OLMoE: trace -> attribute -> mask -> table."""

from __future__ import annotations

import math

import pytest

from labkit.evals import RefusalDetector
from labkit.moe import ExpertMask, attribute_experts, compare_conditions, masked, trace_routing
from tests.moe_fixtures import tiny_moe_hf

BEHAVIOR = ["what happened in the city during war", "what happened in the park during war", "the war question"]
CONTROL = ["the cat sat on a mat", "the dog ran to the park", "love and the wedding party"]


@pytest.fixture(scope="module")
def olmoe(tiny_tokenizer):
    from labkit.models import from_hf

    return from_hf(tiny_moe_hf("olmoe", tiny_tokenizer), tiny_tokenizer, name="tiny-olmoe")


@pytest.fixture(scope="module")
def attribution(olmoe):
    behavior = trace_routing(olmoe, BEHAVIOR, progress=False)
    control = trace_routing(olmoe, CONTROL, progress=False)
    return attribute_experts(behavior, control, n_bootstrap=20, n_splits=5)


def test_table_has_every_condition_and_consistent_rates(olmoe, attribution):
    # a detector that fires on some random-model completions, so rates are not all 0
    detector = RefusalDetector(phrases=("the",), anywhere=True)
    tasks = {"copy": (["one two", "three four"], ["three", "five"])}
    table = compare_conditions(
        olmoe, attribution=attribution, behavior_prompts=BEHAVIOR, control_prompts=CONTROL,
        task_sets=tasks, detector=detector, n_values=(1, 2), random_seeds=(0, 1),
        bias_values=(-3.0,), max_new_tokens=3, batch_size=2, progress=False,
    )
    counts = table.condition.value_counts().to_dict()
    # top_k=2: both n=1 and n=2 can be forced on without exceeding top_k per layer
    assert counts == {"baseline": 1, "top_off": 2, "random_off": 4, "random_off_mean": 2, "top_on": 2, "top_bias": 1}
    assert table.condition.iloc[0] == "baseline"
    assert (table.behavior_n.dropna() == 3).all()
    measured = table.dropna(subset=["behavior_count"])
    assert (measured.behavior_rate == measured.behavior_count / 3).all()
    assert ((measured.behavior_ci_low <= measured.behavior_rate) & (measured.behavior_rate <= measured.behavior_ci_high)).all()
    top_on = table[table.condition == "top_on"]
    assert top_on.behavior_rate.isna().all() and top_on.control_rate.notna().all()
    assert table.copy_accuracy.notna().sum() == 1 + 2 + 4 + 2 + 1
    # random masks are matched per layer and disjoint from the attributed experts
    top2 = set(attribution.top(2))
    for experts in table[table.condition == "random_off"].experts:
        pairs = {(int(p[1:].split("E")[0]), int(p.split("E")[1])) for p in experts.split()}
        assert not pairs & top2
    mean = table[(table.condition == "random_off_mean") & (table.n == 2)].iloc[0]
    seeds = table[(table.condition == "random_off") & (table.n == 2)]
    assert math.isclose(mean.behavior_rate, seeds.behavior_rate.mean())
    assert "baseline n=0 seed=nan bias=nan" in table.attrs["examples"]
    assert table.seed.dtype == "Int64"


def test_baseline_row_equals_unmasked_generation_and_empty_mask(olmoe, attribution):
    from labkit.generation import generate

    detector = RefusalDetector(phrases=("the",), anywhere=True)
    table = compare_conditions(
        olmoe, attribution=attribution, behavior_prompts=BEHAVIOR, control_prompts=CONTROL,
        detector=detector, n_values=(1,), random_seeds=(), force_on=False, max_new_tokens=3, progress=False,
    )
    texts = generate(olmoe, BEHAVIOR, max_new_tokens=3, seed=0).texts
    assert table.behavior_count.iloc[0] == sum(map(detector, texts))
    with masked(olmoe, ExpertMask.off([])):
        assert generate(olmoe, BEHAVIOR, max_new_tokens=3, seed=0).texts == texts


def test_bad_input(olmoe, attribution):
    with pytest.raises(ValueError, match="behavior_prompts must be a non-empty list"):
        compare_conditions(olmoe, attribution=attribution, behavior_prompts=[], control_prompts=CONTROL)
    with pytest.raises(ValueError, match="2 prompts and 1 answers"):
        compare_conditions(
            olmoe, attribution=attribution, behavior_prompts=BEHAVIOR, control_prompts=CONTROL,
            task_sets={"copy": (["a", "b"], ["a"])},
        )
    with pytest.raises(TypeError, match="without .top"):
        compare_conditions(olmoe, attribution=None, behavior_prompts=BEHAVIOR, control_prompts=CONTROL)


def _pairs(label: str) -> list[tuple[int, int]]:
    return [(int(p[1:].split("E")[0]), int(p.split("E")[1])) for p in label.split()]


def test_every_row_equals_a_direct_generation_under_that_rows_mask(olmoe, attribution):
    from labkit.evals import behavior_rate, exact_match_accuracy
    from labkit.generation import generate

    seen: list[str] = []

    def detector(text: str) -> bool:  # records every text it judges, in order
        seen.append(text)
        return "the" in text.split()

    tasks = {"copy": (["one two", "three four"], ["three", "five"])}
    table = compare_conditions(
        olmoe, attribution=attribution, behavior_prompts=BEHAVIOR, control_prompts=CONTROL,
        task_sets=tasks, detector=detector, n_values=(1, 2), random_seeds=(0, 1),
        bias_values=(-4.0,), max_new_tokens=4, progress=False,
    )
    judged = list(seen)
    expected_judged: list[str] = []
    differs_from_baseline = 0
    baseline = generate(olmoe, BEHAVIOR + CONTROL, max_new_tokens=4, seed=0).texts
    for row in table[table.condition != "random_off_mean"].itertuples():
        experts = _pairs(row.experts)
        if row.condition == "top_off":
            assert experts == attribution.top(row.n)
        mask = {
            "baseline": lambda: ExpertMask(),
            "top_off": lambda: ExpertMask.off(experts),
            "random_off": lambda: ExpertMask.off(experts),
            "top_on": lambda: ExpertMask.on(experts),
            "top_bias": lambda: ExpertMask.bias(experts, row.bias),
        }[row.condition]()
        assert (len(mask) == 0) == (row.condition == "baseline")
        with masked(olmoe, mask):
            behavior = generate(olmoe, BEHAVIOR, max_new_tokens=4, seed=0).texts
            control = generate(olmoe, CONTROL, max_new_tokens=4, seed=0).texts
            copy = generate(olmoe, tasks["copy"][0], max_new_tokens=4, seed=0).texts
        differs_from_baseline += (behavior + control) != baseline
        if row.condition != "top_on":
            expected_judged += behavior
            rate = behavior_rate(behavior, lambda t: "the" in t.split())
            assert (row.behavior_count, row.behavior_rate) == (rate.count, rate.rate)
            key = f"{row.condition} n={row.n} seed={row.seed if row.condition == 'random_off' else math.nan} bias={row.bias}"
            assert table.attrs["examples"][key] == behavior[:3]
            accuracy = exact_match_accuracy(copy, tasks["copy"][1])
            assert row.copy_accuracy == accuracy.rate
        expected_judged += control
        rate = behavior_rate(control, lambda t: "the" in t.split())
        assert (row.control_count, row.control_rate) == (rate.count, rate.rate)
    assert judged == expected_judged  # every completion the table counted, row by row
    assert differs_from_baseline >= 4  # the masks really change what the model writes
