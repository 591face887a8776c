"""labkit.moe.causal: value tests that kill mutation survivors (issue 22). The planted tiny OLMoE
of tests/test_moe_causal.py (expert (1, 3) carries the target token); every expected number is
recomputed by hand (masked forward passes, a by-hand greedy search, a hand-made table)."""

from __future__ import annotations

import json

import pytest
import torch

from labkit.moe import ExpertMask, masked
from labkit.moe.causal import CausalAttribution, causal_attribution, minimal_mask, target_probability, validate_mask
from tests.moe_fixtures import one_thread
from tests.test_moe_causal import HELDOUT, PLANTED, TRAIN, _planted


@pytest.fixture(scope="module")
def planted():
    with one_thread():
        yield _planted(0.1)


def _attribution(effect, layers=(2, 5)) -> CausalAttribution:
    effect = torch.tensor(effect)
    return CausalAttribution(effect=effect, stderr=effect.abs() / 10, baseline=0.5, layers=tuple(layers), n_prompts=3,
                             method="ablation", target=" x", model_name="m")


def test_table_rows_sorted_by_effect_then_layer_then_expert():
    result = _attribution([[0.1, 0.3, -0.2], [0.3, -0.2, 0.0]])
    table = result.table()
    assert list(table.columns) == ["layer", "expert", "effect", "stderr"]
    expected = [(2, 1, 0.3), (5, 0, 0.3), (2, 0, 0.1), (5, 2, 0.0), (2, 2, -0.2), (5, 1, -0.2)]
    got = [(int(r.layer), int(r.expert), round(float(r.effect), 6)) for r in table.itertuples()]
    assert got == expected
    assert table.stderr.tolist() == pytest.approx([abs(e) / 10 for *_, e in expected])
    assert list(table.index) == list(range(6))
    assert result.top(3) == [(2, 1), (5, 0), (2, 0)]


def test_load_names_itself_and_the_missing_key(tmp_path):
    path = _attribution([[0.1, 0.2]], layers=(1,)).save(tmp_path / "c")
    data = json.loads(path.read_text())
    data.pop("baseline")
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"^CausalAttribution\.load: .* lacks 'baseline'"):
        CausalAttribution.load(path)


def test_minimal_mask_arguments_are_named(planted):
    model, target = planted
    with pytest.raises(ValueError, match=r"^minimal_mask: max_experts must be an int ≥ 1, got 0"):
        minimal_mask(model, TRAIN, target, max_experts=0)
    with pytest.raises(ValueError, match=r"^minimal_mask: pool must be an int ≥ 1, got True"):
        minimal_mask(model, TRAIN, target, pool=True)


def test_minimal_mask_scores_under_the_bos_rule_it_is_given(shared_tiny_olmoe):
    """On a random tiny OLMoE (the plant saturates its score): the search's baseline and its one
    pick's score are the target probabilities without BOS when asked so, recomputed by hand."""
    model, target = shared_tiny_olmoe, " war"
    ranking = _attribution([[0.0] * 8, [0.0, 0.0, 0.0, 1.0] + [0.0] * 4, [0.0] * 8], layers=(0, 1, 2))
    without = target_probability(model, TRAIN, target, prepend_bos=False)
    assert abs(without - target_probability(model, TRAIN, target, prepend_bos=True)) > 1e-3 * without
    search = minimal_mask(model, TRAIN, target, ranking=ranking, pool=1, max_experts=1, prepend_bos=False, progress=False)
    assert search.experts == (PLANTED,)
    assert search.scores[0] == pytest.approx(without, rel=1e-6)
    with masked(model, ExpertMask.off([PLANTED])):
        assert search.scores[1] == pytest.approx(target_probability(model, TRAIN, target, prepend_bos=False), rel=1e-6)


def test_minimal_mask_never_takes_more_than_n_experts_minus_top_k_from_one_layer(planted):
    """A ranking whose candidates all sit in layer 0 (8 experts, top-2): the greedy search may
    switch off at most 6 of them, then stops with no admissible candidate; each pick is the
    candidate whose addition lowers the score most, recomputed here by hand."""
    model, target = planted
    ranking = _attribution([[1.0 - e / 10 for e in range(8)], [0.0] * 8, [0.0] * 8], layers=(0, 1, 2))
    search = minimal_mask(model, TRAIN[:3], target, fraction=1.0, ranking=ranking, pool=8, max_experts=8, progress=False)
    assert len(search.experts) == 6 and {layer for layer, _ in search.experts} == {0} and not search.reached
    picked: list = []
    for step in range(6):
        scores = {}
        for expert in range(8):
            if (0, expert) in picked:
                continue
            with masked(model, ExpertMask.off([*picked, (0, expert)])):
                scores[(0, expert)] = target_probability(model, TRAIN[:3], target)
        best = min(scores, key=lambda c: (scores[c], ranking.top(8).index(c)))
        picked.append(best)
        assert search.scores[step + 1] == pytest.approx(scores[best], rel=1e-6)
    assert list(search.experts) == picked


def test_validate_mask_default_seeds_are_0_1_2(planted):
    model, target = planted
    mask = ExpertMask.off([PLANTED], model=model)
    check = validate_mask(model, mask, HELDOUT, target, n_random=3)
    for i, random_mask in enumerate(check.random_masks):
        expected = ExpertMask.random(model, seed=i, match_layers_of=mask)
        assert random_mask.experts("off") == expected.experts("off")
        with masked(model, expected):
            assert check.random[i] == pytest.approx(target_probability(model, HELDOUT, target), rel=1e-6)


def test_causal_attribution_shows_progress_by_default(planted, capsys):
    model, target = planted
    causal_attribution(model, TRAIN[:2], target, layers=[1])
    assert "causal ablation" in capsys.readouterr().err
    causal_attribution(model, TRAIN[:2], target, layers=[1], progress=False)
    assert "causal ablation" not in capsys.readouterr().err
