"""Causal expert attribution and the minimal-mask search, on a tiny OLMoE with one planted expert.

The planted model: a constant residual direction (embedding dimension 0) makes layer 1's router
choose expert 3 for every token, and expert 3 writes along dimension 1, which only the target
token's unembedding reads. So ``p(target | prompt)`` is near 1 with the expert and near
``1 / vocab`` without it, and no other expert matters much: the ground truth is known.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr

import labkit
from labkit.hooks import count_hooks
from labkit.models import from_hf
from labkit.moe import ExpertMask, masked
from labkit.moe.causal import (
    CausalAttribution,
    causal_attribution,
    minimal_mask,
    target_logprobs,
    target_probability,
    validate_mask,
)
from tests.conftest import make_tokenizer
from tests.moe_fixtures import one_thread, tiny_moe_hf

PLANTED = (1, 3)
TRAIN = ["the cat sat", "a dog ran far", "we went home", "it is late now", "red and blue", "one two"]
HELDOUT = ["they sang loud", "a bird flew", "my hat is", "so many books"]


def _single_token_target(tokenizer) -> tuple[str, int]:
    for token_id in range(len(tokenizer) - 1, 0, -1):
        text = tokenizer.decode([token_id])
        if text.startswith(" ") and len(text) > 2 and tokenizer.encode(text, add_special_tokens=False) == [token_id]:
            return text, token_id
    raise AssertionError("no single-token target in the tiny vocabulary")


def _planted(scale: float):
    tokenizer = make_tokenizer()
    hf = tiny_moe_hf("olmoe", tokenizer, seed=0)
    target, target_id = _single_token_target(tokenizer)
    layer, expert = PLANTED
    with torch.no_grad():
        hf.model.embed_tokens.weight[:, 0] = 10.0  # a constant direction in the residual stream
        hf.model.embed_tokens.weight[:, 1] = 0.0
        gate = hf.model.layers[layer].mlp.gate.weight
        gate[:, 0] = 0.0
        gate[expert, 0] = 5.0  # layer 1 routes every token to the planted expert
        experts = hf.model.layers[layer].mlp.experts
        experts.gate_up_proj[expert] = 0.0
        experts.gate_up_proj[expert, :, 0] = 1.0  # gate = up = x_0 > 0: activation x_0² σ(x_0) > 0
        experts.down_proj[expert] = 0.0
        experts.down_proj[expert, 1, :] = scale  # the planted expert writes along dimension 1
        for index, decoder_layer in enumerate(hf.model.layers):  # nothing else writes along dimension 1
            decoder_layer.self_attn.o_proj.weight[1, :] = 0.0
            others = [e for e in range(8) if (index, e) != PLANTED]
            decoder_layer.mlp.experts.down_proj[others, 1, :] = 0.0
        hf.lm_head.weight[:, 1] = 0.0
        hf.lm_head.weight[target_id, 1] = 5.0  # only the target token reads dimension 1
    return from_hf(hf, tokenizer, name=f"planted-{scale}"), target


@pytest.fixture(scope="module")
def planted():
    with one_thread():
        yield _planted(0.1)


@pytest.fixture(scope="module")
def faint():
    """The same plant at 1/10,000 of the strength: the score is nearly linear in the change."""
    with one_thread():
        yield _planted(1e-5)


def test_the_plant_works(planted):
    model, target = planted
    (target_id,) = model.labkit.tokenizer.encode(target, add_special_tokens=False)
    assert target_probability(model, TRAIN, target) > 0.9
    first_tokens = [ids[0] for ids in labkit.generate(model, TRAIN, max_new_tokens=1).token_ids]
    assert first_tokens == [target_id] * len(TRAIN)
    with masked(model, ExpertMask.off([PLANTED])):
        assert target_probability(model, TRAIN, target) < 0.05
        first_tokens = [ids[0] for ids in labkit.generate(model, TRAIN, max_new_tokens=1).token_ids]
        assert target_id not in first_tokens


def test_target_logprobs_by_hand(planted):
    """Teacher forcing: log p(target | prompt) from one forward pass of prompt + target, per prompt."""
    model, target = planted
    record = model.labkit
    got = target_logprobs(model, TRAIN[:3], target, batch_size=2)
    target_ids = record.tokenizer.encode(target, add_special_tokens=False)
    for i, prompt in enumerate(TRAIN[:3]):
        ids = record.encode(prompt)
        logits = record.twin(torch.tensor([ids + target_ids])).logits[0].float().log_softmax(-1)
        expected = sum(logits[len(ids) - 1 + j, t] for j, t in enumerate(target_ids))
        torch.testing.assert_close(got[i], expected, rtol=1e-5, atol=1e-5)


def test_exact_ablation_equals_the_masked_score_and_ranks_the_plant_first(planted):
    model, target = planted
    result = causal_attribution(model, TRAIN, target, progress=False)
    assert result.top(1) == [PLANTED] and result.layers == (0, 1, 2) and result.method == "ablation"
    baseline = target_probability(model, TRAIN, target)
    assert result.baseline == pytest.approx(baseline, abs=1e-7)
    for layer, expert in [PLANTED, (0, 5), (2, 1)]:
        with masked(model, ExpertMask.off([(layer, expert)])):
            off = target_probability(model, TRAIN, target)
        assert float(result.effect[layer, expert]) == pytest.approx(baseline - off, abs=1e-6)
    assert float(result.effect[PLANTED]) > 0.85
    others = result.effect.clone()
    others[PLANTED] = 0
    assert others.abs().max() < 0.05


def test_first_order_ranks_the_plant_first(planted):
    model, target = planted
    exact = causal_attribution(model, TRAIN, target, progress=False)
    estimate = causal_attribution(model, TRAIN, target, method="first_order", progress=False)
    assert estimate.top(1) == [PLANTED] and estimate.method == "first_order"
    assert estimate.baseline == pytest.approx(exact.baseline, abs=1e-6)
    assert count_hooks(model.labkit.twin) == 0


def test_first_order_is_exact_to_first_order(faint):
    """With a faint plant the score is close to linear in the layer output: estimate ≈ exact."""
    model, target = faint
    exact = causal_attribution(model, TRAIN, target, progress=False)
    estimate = causal_attribution(model, TRAIN, target, method="first_order", progress=False)
    assert float(exact.effect[PLANTED]) > 0
    assert float(estimate.effect[PLANTED]) == pytest.approx(float(exact.effect[PLANTED]), rel=0.02)
    assert estimate.top(4) == exact.top(4)
    assert spearmanr(exact.effect.flatten(), estimate.effect.flatten()).statistic > 0.8


def test_effects_inside_a_mask_are_conditional_on_it(planted):
    model, target = planted
    with masked(model, ExpertMask.off([PLANTED])):
        inside = causal_attribution(model, TRAIN, target, layers=[1], method="first_order", progress=False)
        exact_inside = causal_attribution(model, TRAIN, target, layers=[1], progress=False)
    assert inside.baseline < 0.05 and exact_inside.baseline == pytest.approx(inside.baseline, abs=1e-6)
    assert abs(float(exact_inside.effect[0, 3])) < 1e-6  # already off: switching it off again changes nothing
    assert abs(float(inside.effect[0, 3])) < 1e-6


def test_minimal_mask_finds_the_plant_and_validates_on_held_out_prompts(planted):
    model, target = planted
    search = minimal_mask(model, TRAIN, target, fraction=0.9, progress=False)
    assert search.experts == (PLANTED,) and search.reached and len(search.scores) == 2
    assert search.scores[1] <= search.target == pytest.approx(0.1 * search.scores[0])
    assert search.mask.experts("off") == [PLANTED]
    check = validate_mask(model, search.mask, HELDOUT, target, n_random=3)
    assert check.cut > 0.9 and max(check.random_cut) < 0.1
    assert all(m.experts("off")[0][0] == 1 and PLANTED not in m.experts() for m in check.random_masks)


def test_save_load_round_trip(planted, tmp_path):
    model, target = planted
    result = causal_attribution(model, TRAIN[:2], target, layers=[1], progress=False)
    again = CausalAttribution.load(result.save(tmp_path / "causal"))
    assert torch.equal(again.effect, result.effect) and again.top(3) == result.top(3)
    assert (again.layers, again.method, again.target, again.score) == (result.layers, result.method, result.target, "probability")


def test_bad_input_is_refused_clearly(planted):
    model, target = planted
    with pytest.raises(ValueError, match="unknown method 'exact'; allowed: ablation, first_order"):
        causal_attribution(model, TRAIN, target, method="exact")
    with pytest.raises(ValueError, match="got 2 targets for 6 prompts"):
        causal_attribution(model, TRAIN, [target, target])
    with pytest.raises(ValueError, match=r"layers \[7\] are not MoE layers of this model; MoE layers: \[0, 1, 2\]"):
        causal_attribution(model, TRAIN, target, layers=[7])
    with pytest.raises(ValueError, match="target 0 is ''"):
        target_logprobs(model, TRAIN[:1], "")
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        minimal_mask(model, TRAIN, target, fraction=1.5)
    with pytest.raises(ValueError, match="the mask is empty"):
        validate_mask(model, ExpertMask(()), HELDOUT, target)
    assert count_hooks(model.labkit.twin) == 0


def test_logprob_score_is_the_mean_per_token_log_probability_drop(planted):
    """score="logprob": effect = mean over prompts of (log p without mask - log p with the expert
    off) / target length, in nats; both methods rank the plant first."""
    model, target = planted
    n_tokens = len(model.labkit.tokenizer.encode(target, add_special_tokens=False))
    exact = causal_attribution(model, TRAIN, target, score="logprob", layers=[1], progress=False)
    base = target_logprobs(model, TRAIN, target)
    with masked(model, ExpertMask.off([PLANTED])):
        off = target_logprobs(model, TRAIN, target)
    assert float(exact.effect[0, 3]) == pytest.approx(float(((base - off) / n_tokens).mean()), rel=1e-5)
    assert exact.baseline == pytest.approx(float((base / n_tokens).mean()), rel=1e-5)
    assert exact.top(1) == [PLANTED] and exact.score == "logprob"
    estimate = causal_attribution(model, TRAIN, target, score="logprob", method="first_order", progress=False)
    assert estimate.top(1) == [PLANTED]
    with pytest.raises(ValueError, match="unknown score 'nats'; allowed: probability, logprob"):
        causal_attribution(model, TRAIN, target, score="nats")
