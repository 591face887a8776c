"""The six expert-selection rules: planted-expert recovery on a tiny model, and each statistic
against an independent computation (by-hand loops, scipy).

The planted model: a tiny OLMoE whose trigger token `` war`` differs from the control token
`` mat`` only in two residual dimensions that nothing but layer 1's router and expert 3 read
(attention, every other router and expert are blind to them). Expert 3 of layer 1 is chosen on
the trigger token and only there, and writes a direction only the target token's unembedding
reads. So the behaviour prompts (``... war``) route differently from their paired controls
(``... mat``) in exactly one expert, and ``p(" sat" | ... war)`` is ~1 with it and ~0 without.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import rankdata

from labkit.models import from_hf
from labkit.moe import ExpertMask, RoutingTrace, masked, trace_routing
from labkit.moe.causal import causal_attribution, target_probability
from labkit.moe.selection import (
    ExpertSelection,
    ablation_effect,
    first_order_effect,
    frequency_difference,
    npmi,
    risk_difference,
    rule_agreement,
    stability_selection,
    trace_rules,
)
from tests.conftest import make_tokenizer
from tests.moe_fixtures import one_thread, tiny_moe_hf

PLANTED = (1, 3)
PREFIXES = ["the cat sat on", "a dog ran to the", "what happened in the", "one two three", "love and hate",
            "the city during the", "question answer", "four five on a"]
BEHAVIOR = [p + " war" for p in PREFIXES]
CONTROL = [p + " mat" for p in PREFIXES]


def _single_token(tokenizer, word: str) -> int:
    ids = tokenizer.encode(word, add_special_tokens=False)
    assert len(ids) == 1, (word, ids)
    return ids[0]


def planted_model(scale: float = 0.1):
    """The tiny OLMoE with expert 3 of layer 1 planted on the trigger token (module docstring)."""
    tokenizer = make_tokenizer()
    hf = tiny_moe_hf("olmoe", tokenizer, seed=0)
    trigger, control, target = (_single_token(tokenizer, w) for w in (" war", " mat", " sat"))
    layer, expert = PLANTED
    with torch.no_grad():
        embedding = hf.model.embed_tokens.weight
        embedding[trigger] = embedding[control]  # the two tokens differ only in dimensions 0 and 2
        embedding[:, 0:3] = 0.0
        embedding[:, 2] = 10.0  # "not the trigger"
        embedding[trigger, 2] = 0.0
        embedding[trigger, 0] = 10.0  # "the trigger"
        for block in hf.model.layers:  # nothing reads or writes dimensions 0-2 ...
            for projection in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
                projection.weight[:, 0:3] = 0.0
            block.self_attn.o_proj.weight[0:3, :] = 0.0
            block.mlp.gate.weight[:, 0:3] = 0.0
            block.mlp.experts.gate_up_proj[:, :, 0:3] = 0.0
            block.mlp.experts.down_proj[:, 0:3, :] = 0.0
        block = hf.model.layers[layer]  # ... but the planted expert's router row and the expert
        block.mlp.gate.weight[expert, 0] = 5.0
        block.mlp.gate.weight[expert, 2] = -5.0
        block.mlp.experts.gate_up_proj[expert] = 0.0
        block.mlp.experts.gate_up_proj[expert, :, 0] = 1.0
        block.mlp.experts.down_proj[expert] = 0.0
        block.mlp.experts.down_proj[expert, 1, :] = scale  # writes dimension 1 ...
        hf.lm_head.weight[:, 1] = 0.0
        hf.lm_head.weight[target, 1] = 5.0  # ... which only the target token reads
    return from_hf(hf, tokenizer, name="planted-trigger"), tokenizer.decode([target])


@pytest.fixture(scope="module")
def planted():
    with one_thread():
        model, target = planted_model()
        behavior = trace_routing(model, BEHAVIOR, progress=False)
        control = trace_routing(model, CONTROL, progress=False)
        yield model, target, behavior, control


def test_the_plant_works(planted):
    model, target, behavior, control = planted
    assert target_probability(model, BEHAVIOR, target) > 0.99 > 0.01 > target_probability(model, CONTROL, target)
    with masked(model, ExpertMask.off([PLANTED])):
        assert target_probability(model, BEHAVIOR, target) < 0.01
    # routing differs between the pairs in the planted expert only (layer 1, last token)
    differs = (behavior.topk_indices.sort(-1).values != control.topk_indices.sort(-1).values).any(-1)
    assert differs.sum(-1).tolist() == [0, len(BEHAVIOR), 0]


@pytest.mark.parametrize("last_tokens", [None, 1])
def test_every_trace_rule_recovers_the_plant(planted, last_tokens):
    _, _, behavior, control = planted
    rules = trace_rules(behavior, control, last_tokens=last_tokens, n_resamples=50)
    assert sorted(rules) == ["frequency_difference", "npmi", "risk_difference", "stability_selection"]
    for name, selection in rules.items():
        assert selection.top(1) == [PLANTED], name
        assert selection.rule == name and isinstance(selection, ExpertSelection)
    # paired prompts whose routing differs in one expert: only it passes the difference filters
    for name in ("frequency_difference", "risk_difference", "npmi"):
        assert rules[name].n_eligible == 1
    assert float(rules["stability_selection"].score[PLANTED]) == 1.0
    if last_tokens == 1:  # the trigger token alone: chosen on every behaviour token, never on control
        assert float(rules["risk_difference"].score[PLANTED]) == 1.0
        assert float(rules["npmi"].score[PLANTED]) == pytest.approx(1.0)  # p(x,y) = p(x) = p(y) = 1/2


def test_both_causal_rules_recover_the_plant(planted):
    model, target, _, _ = planted
    exact = ablation_effect(model, BEHAVIOR, target, progress=False)
    first_order = first_order_effect(model, BEHAVIOR, target, progress=False)
    assert exact.top(1) == first_order.top(1) == [PLANTED]
    assert float(exact.score[PLANTED]) > 0.98 and exact.n_eligible == 1
    # the same numbers as labkit.moe.causal, and the exact effect equals the masked score by hand
    reference = causal_attribution(model, BEHAVIOR, target, progress=False)
    torch.testing.assert_close(exact.score, reference.effect.double())
    with masked(model, ExpertMask.off([PLANTED])):
        off = target_probability(model, BEHAVIOR, target)
    assert float(exact.score[PLANTED]) == pytest.approx(target_probability(model, BEHAVIOR, target) - off, abs=1e-6)
    assert exact.top_k == 2 and exact.layers == (0, 1, 2)


# --- independent computations on random traces ---------------------------------------------------


def random_trace(seed: int, lengths, *, n_layers=3, n_experts=6, top_k=2, model_name="m", vocab=20) -> RoutingTrace:
    generator = torch.Generator().manual_seed(seed)
    n_tokens = sum(lengths)
    indices = torch.rand(n_layers, n_tokens, n_experts, generator=generator).argsort(-1)[..., :top_k]
    return RoutingTrace(
        topk_indices=indices, topk_weights=torch.rand(n_layers, n_tokens, top_k, generator=generator),
        router_logits=None, token_ids=torch.randint(0, vocab, (n_tokens,), generator=generator),
        prompt_index=torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]),
        position=torch.cat([torch.arange(n) for n in lengths]),
        layers=tuple(range(n_layers)), n_experts=n_experts, top_k=top_k, n_prompts=len(lengths), model_name=model_name,
    )


def by_hand_counts(trace, last_tokens=None):
    """Per prompt: {(layer, expert): tokens whose top-k held it}, token counts, token ids kept."""
    counts, tokens, kept = [], [], []
    for p in range(trace.n_prompts):
        positions = [t for t in range(trace.n_tokens) if int(trace.prompt_index[t]) == p]
        if last_tokens is not None:
            positions = positions[-last_tokens:]
        table = {}
        for layer in range(len(trace.layers)):
            for expert in range(trace.n_experts):
                table[layer, expert] = sum(expert in trace.topk_indices[layer, t].tolist() for t in positions)
        counts.append(table)
        tokens.append(len(positions))
        kept.append([(t, int(trace.token_ids[t])) for t in positions])
    return counts, tokens, kept


B_LENGTHS, C_LENGTHS = [5, 2, 7, 3], [4, 6, 1, 3]


@pytest.mark.parametrize("last_tokens", [None, 2])
def test_frequency_and_risk_difference_by_hand(last_tokens):
    behavior, control = random_trace(0, B_LENGTHS), random_trace(1, C_LENGTHS)
    counts_b, tokens_b, _ = by_hand_counts(behavior, last_tokens)
    counts_c, tokens_c, _ = by_hand_counts(control, last_tokens)
    frequency = frequency_difference(behavior, control, last_tokens=last_tokens)
    risk = risk_difference(behavior, control, last_tokens=last_tokens)
    for layer in range(3):
        for expert in range(6):
            mean_b = sum(c[layer, expert] / n for c, n in zip(counts_b, tokens_b)) / len(tokens_b)
            mean_c = sum(c[layer, expert] / n for c, n in zip(counts_c, tokens_c)) / len(tokens_c)
            assert float(frequency.score[layer, expert]) == pytest.approx(mean_b - mean_c, abs=1e-12)
            pooled = sum(c[layer, expert] for c in counts_b) / sum(tokens_b) - sum(c[layer, expert] for c in counts_c) / sum(tokens_c)
            assert float(risk.score[layer, expert]) == pytest.approx(pooled, abs=1e-12)
    assert torch.equal(frequency.eligible, frequency.score > 0) and torch.equal(risk.eligible, risk.score > 0)
    assert not torch.allclose(frequency.score, risk.score)  # unequal lengths: prompt mean ≠ pooled tokens


def _npmi_by_hand(n_xy, n_x, n_y, total):
    if n_xy == 0:
        return -1.0
    if n_xy == total:
        return 1.0
    p_xy, p_x, p_y = n_xy / total, n_x / total, n_y / total
    return math.log(p_xy / (p_x * p_y)) / -math.log(p_xy)


@pytest.mark.parametrize("markers", [None, (3, 7, 11)])
def test_npmi_by_hand(markers):
    behavior, control = random_trace(2, B_LENGTHS), random_trace(3, C_LENGTHS)
    result = npmi(behavior, control, marker_token_ids=markers)
    for layer in range(3):
        for expert in range(6):
            n_xy = n_x = n_y = total = 0
            for trace, is_behaviour in ((behavior, True), (control, False)):
                for t in range(trace.n_tokens):
                    chosen = expert in trace.topk_indices[layer, t].tolist()
                    x = is_behaviour if markers is None else int(trace.token_ids[t]) in markers
                    total += 1
                    n_y += chosen
                    n_x += x
                    n_xy += chosen and x
            assert float(result.score[layer, expert]) == pytest.approx(_npmi_by_hand(n_xy, n_x, n_y, total), abs=1e-12)
    assert float(result.score.max()) <= 1.0 and float(result.score.min()) >= -1.0


@pytest.mark.parametrize("base", ["frequency_difference", "risk_difference", "npmi"])
def test_stability_selection_by_hand(base):
    behavior, control = random_trace(4, [3, 5, 2, 4, 6, 3]), random_trace(5, [4, 2, 5, 3, 3, 4])
    result = stability_selection(behavior, control, base=base, n_resamples=20, fraction=0.5, top=4, threshold=0.5, seed=7)
    score_of = {"frequency_difference": frequency_difference, "risk_difference": risk_difference, "npmi": npmi}[base]

    def subset(trace, keep):
        rows = [t for t in range(trace.n_tokens) if int(trace.prompt_index[t]) in keep]
        remap = {p: i for i, p in enumerate(sorted(keep))}
        return RoutingTrace(
            topk_indices=trace.topk_indices[:, rows], topk_weights=trace.topk_weights[:, rows], router_logits=None,
            token_ids=trace.token_ids[rows], prompt_index=torch.tensor([remap[int(trace.prompt_index[t])] for t in rows]),
            position=trace.position[rows], layers=trace.layers, n_experts=trace.n_experts, top_k=trace.top_k,
            n_prompts=len(keep), model_name=trace.model_name,
        )

    rng = np.random.default_rng(7)
    hits = np.zeros((3, 6))
    for _ in range(20):
        keep_b = sorted(rng.choice(6, size=3, replace=False).tolist())
        keep_c = keep_b if base == "risk_difference" else sorted(rng.choice(6, size=3, replace=False).tolist())
        scores = score_of(subset(behavior, keep_b), subset(control, keep_c)).score
        cells = sorted(((-float(scores[l, e]), l * 6 + e) for l in range(3) for e in range(6)))[:4]
        for negative, flat in cells:
            if -negative > 0:
                hits[flat // 6, flat % 6] += 1
    np.testing.assert_allclose(result.score.numpy(), hits / 20)
    assert torch.equal(result.eligible, result.score >= 0.5)
    torch.testing.assert_close(result.tiebreak, score_of(behavior, control).score)


def test_rule_agreement_is_spearman_over_cells():
    rules = trace_rules(random_trace(6, B_LENGTHS), random_trace(7, C_LENGTHS), n_resamples=10)
    table = rule_agreement(rules)
    for a in rules:
        for b in rules:
            x, y = rankdata(rules[a].score.flatten()), rankdata(rules[b].score.flatten())
            assert table.loc[a, b] == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)


# --- the result type, bad input --------------------------------------------------------------------


def test_top_respects_the_filter_and_the_cap():
    behavior, control = random_trace(8, B_LENGTHS), random_trace(9, C_LENGTHS)
    selection = frequency_difference(behavior, control)
    ranked = selection.ranked()
    assert len(ranked) == selection.n_eligible and selection.top(2) == ranked[:2]
    capped = selection.top(3, per_layer_cap=1)
    assert len({layer for layer, _ in capped}) == 3
    with pytest.raises(ValueError, match=r"asked for n=\d+ experts but the rule's filter \(score > 0\) keeps"):
        selection.top(selection.n_eligible + 1)
    with pytest.raises(ValueError, match="under the cap of 1 per layer only 3 can be chosen"):
        selection.top(4, per_layer_cap=1)
    with pytest.raises(ValueError, match="n=0 is outside the allowed range 1..inf"):
        selection.top(0)


def test_bad_input_is_refused_clearly(planted):
    behavior, control = random_trace(10, B_LENGTHS), random_trace(11, C_LENGTHS)
    other_model = random_trace(12, C_LENGTHS, model_name="another")
    for rule in (frequency_difference, risk_difference, npmi, stability_selection):
        with pytest.raises(ValueError, match="traces come from different models"):
            rule(behavior, other_model)
    with pytest.raises(ValueError, match="traces have different expert counts"):
        npmi(behavior, random_trace(13, C_LENGTHS, n_experts=8))
    unpaired = random_trace(14, [3, 4])
    with pytest.raises(ValueError, match="compares prompt pairs .* behavior has 4 prompts and control 2"):
        risk_difference(behavior, unpaired)
    with pytest.raises(ValueError, match="compares prompt pairs"):
        stability_selection(behavior, unpaired, base="risk_difference")
    assert stability_selection(behavior, unpaired, n_resamples=3).rule == "stability_selection"  # fTRI base: unpaired is fine
    with pytest.raises(TypeError, match="pass a labkit.moe.RoutingTrace"):
        npmi(behavior, "control")
    with pytest.raises(ValueError, match="none of marker_token_ids"):
        npmi(behavior, control, marker_token_ids=[999])
    with pytest.raises(ValueError, match="base='magic'"):
        stability_selection(behavior, control, base="magic")
    with pytest.raises(ValueError, match="threshold=1.5"):
        stability_selection(behavior, control, threshold=1.5)
    with pytest.raises(ValueError, match="last_tokens=0"):
        frequency_difference(behavior, control, last_tokens=0)
    with pytest.raises(ValueError, match="compare selections of one model"):
        rule_agreement([frequency_difference(behavior, control), npmi(other_model, other_model)])
    _, _, planted_behavior, planted_control = planted  # N above what the filter keeps: one stable expert
    with pytest.raises(ValueError, match=r"asked for n=2 .* \(selection probability >= 0.6\) keeps 1 of 24"):
        stability_selection(planted_behavior, planted_control, n_resamples=10, last_tokens=1).top(2)


def test_save_load_round_trip(tmp_path):
    selection = stability_selection(random_trace(15, B_LENGTHS), random_trace(16, C_LENGTHS), n_resamples=5)
    loaded = ExpertSelection.load(selection.save(tmp_path / "stable"))
    for name in ("score", "eligible", "tiebreak"):
        assert torch.equal(getattr(loaded, name), getattr(selection, name))
    assert (loaded.rule, loaded.layers, loaded.settings, loaded.filter) == (selection.rule, selection.layers, selection.settings, selection.filter)
    assert loaded.ranked() == selection.ranked()


# --- where the definitions part ways ---------------------------------------------------------------


def trace_of(prompts, *, n_experts: int = 4, model_name: str = "m") -> RoutingTrace:
    """A one-layer trace: ``prompts[p][t]`` is the tuple of experts token ``t`` of prompt ``p`` chose."""
    flat = [tuple(token) for prompt in prompts for token in prompt]
    top_k = len(flat[0])
    return RoutingTrace(
        topk_indices=torch.tensor(flat).view(1, -1, top_k), topk_weights=torch.ones(1, len(flat), top_k), router_logits=None,
        token_ids=torch.zeros(len(flat), dtype=torch.long),
        prompt_index=torch.cat([torch.full((len(p),), i) for i, p in enumerate(prompts)]),
        position=torch.cat([torch.arange(len(p)) for p in prompts]),
        layers=(0,), n_experts=n_experts, top_k=top_k, n_prompts=len(prompts), model_name=model_name,
    )


def test_npmi_prefers_an_exclusive_expert_the_risk_difference_a_frequent_one():
    """Top-2 routing. Expert 0 serves every behaviour token and half the control tokens (Δ = 0.5);
    expert 1 serves 40 % of the behaviour tokens and no control token (Δ = 0.4). The risk
    difference ranks the frequent expert first; nPMI, which rewards exclusivity, the exclusive one
    (ln 2 / ln 5 = 0.431 against ln(4/3) / ln 2 = 0.415)."""
    behavior = trace_of([[(0, 1)] * 40 + [(0, 2)] * 60])
    control = trace_of([[(0, 3)] * 50 + [(2, 3)] * 50])
    risk, information = risk_difference(behavior, control), npmi(behavior, control)
    assert risk.top(2) == [(0, 0), (0, 1)] and information.top(2) == [(0, 1), (0, 0)]
    assert float(risk.score[0, 0]) == pytest.approx(0.5) and float(risk.score[0, 1]) == pytest.approx(0.4)
    assert float(information.score[0, 1]) == pytest.approx(math.log(2) / math.log(5))
    assert float(information.score[0, 0]) == pytest.approx(math.log(4 / 3) / math.log(2))


def test_stability_selection_drops_an_expert_carried_by_one_prompt():
    """Expert 1 fills one behaviour prompt and nothing else: fTRI ranks it first (0.1 against 0.08)
    but it is selected only in the half-subsamples that hold that prompt (about half), below the
    0.6 threshold. Expert 0 serves one token in 8 of 10 behaviour prompts: selected in every
    subsample, the stable choice."""
    prompts = [[(0,)] + [(3,)] * 9] * 8 + [[(3,)] * 10] + [[(1,)] * 10]  # expert 3: the filler
    behavior, control = trace_of(prompts), trace_of([[(3,)] * 10] * 10)
    frequency = frequency_difference(behavior, control)
    stable = stability_selection(behavior, control, n_resamples=200, top=2, threshold=0.6, seed=0)
    assert frequency.top(2) == [(0, 1), (0, 0)]
    assert stable.top(1) == [(0, 0)] and stable.n_eligible == 1
    assert float(stable.score[0, 0]) == 1.0 and 0.35 < float(stable.score[0, 1]) < 0.65  # ≈ P(prompt drawn) = 1/2
