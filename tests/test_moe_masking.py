"""Expert masks on tiny random models of the six original MoE families: parity, semantics, guard rails.

Every other family: tests/test_moe_families.py.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from labkit.hooks import count_hooks
from labkit.moe import ExpertMask, masked, trace_routing
from tests.conftest import tiny_llama_hf
from tests.moe_fixtures import shared_moe_hf, shared_tokenizer, FAMILIES, MOE_LAYERS, N_EXPERTS, TOP_K, one_thread, tiny_moe_hf

PROMPTS = ["the cat sat on a mat", "what happened in the city during war and peace", "one two three four five"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


_tokenizer = shared_tokenizer
hf = shared_moe_hf


def ids_of(text: str) -> torch.Tensor:
    return _tokenizer()(text, return_tensors="pt").input_ids


def trace(model):
    return trace_routing(model, PROMPTS, tokenizer=_tokenizer(), progress=False)


def a_valid_mask(family: str) -> list[tuple[int, int]]:
    """Two experts off in the last MoE layer, from different DeepSeek groups (no group emptied)."""
    return [(MOE_LAYERS[family][-1], 0), (MOE_LAYERS[family][-1], 3)]


# --- parity -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_mask_is_bit_identical(family):
    model = hf(family)
    before = count_hooks(model)
    with torch.no_grad():
        plain = model(ids_of(PROMPTS[1])).logits
        with masked(model, ExpertMask()):
            assert count_hooks(model) == before  # nothing registered
            again = model(ids_of(PROMPTS[1])).logits
    assert torch.equal(plain, again)


# --- semantics --------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:ExpertMask.*keep a single expert")
@pytest.mark.parametrize("family", FAMILIES)
def test_off_expert_is_never_chosen_and_on_expert_always(family):
    model = hf(family)
    pairs = a_valid_mask(family)
    layer = pairs[0][0]
    natural = trace(model)
    row = natural.layers.index(layer)
    off = torch.tensor([e for _, e in pairs])
    assert torch.isin(natural.topk_indices[row], off).any(), "fixture should route to the experts we switch off"
    with masked(model, ExpertMask.off(pairs, model=model)):
        switched_off = trace(model)
    assert not torch.isin(switched_off.topk_indices[row], off).any()
    # the masked layer is the last MoE layer, so every earlier layer routes exactly as before
    assert torch.equal(switched_off.topk_indices[:row], natural.topk_indices[:row])

    rarely = int(torch.bincount(natural.topk_indices[row].flatten(), minlength=N_EXPERTS).argmin())
    with masked(model, ExpertMask.on([(layer, rarely)])):
        forced = trace(model)
    assert (forced.topk_indices[row] == rarely).any(-1).all()


def reference_route(family, router, logits, off, on, bias):
    """Independent, token-by-token reading of each family's router (for the parity check)."""
    n, k = router.num_experts, router.top_k
    indices, weights = [], []
    for token_logits in logits.float():
        if family == "deepseek_v3":
            scores = token_logits.sigmoid()
            choice = scores + router.e_score_correction_bias + bias
            choice[off] = -math.inf
            size = n // router.num_group
            group_score = [sorted(choice[g * size : (g + 1) * size].tolist())[-2:] for g in range(router.num_group)]
            group_score = [sum(pair) for pair in group_score]
            for g in range(router.num_group):
                if on[g * size : (g + 1) * size].any():
                    group_score[g] = math.inf
            groups = sorted(range(router.num_group), key=lambda g: -group_score[g])[: router.topk_group]
            allowed = [e for e in range(n) if e // size in groups]
            key = {e: (math.inf if on[e] else choice[e].item()) for e in allowed}
            chosen = sorted(allowed, key=lambda e: -key[e])[:k]
            w = scores[chosen]
            w = w / (w.sum() + 1e-20) if router.norm_topk_prob else w
            w = w * router.routed_scaling_factor
        elif family == "gpt_oss":
            key = token_logits + bias
            key[off], key[on] = -math.inf, math.inf
            chosen = key.argsort(descending=True)[:k].tolist()
            w = torch.softmax(token_logits[chosen], dim=-1)
        else:
            probs = torch.softmax(token_logits, dim=-1)
            key = probs * bias.exp()
            key[off], key[on] = -math.inf, math.inf
            chosen = key.argsort(descending=True)[:k].tolist()
            w = probs[chosen]
            if family == "mixtral" or router.norm_topk_prob:
                w = w / w.sum()
        indices.append(chosen)
        weights.append(w)
    return torch.tensor(indices), torch.stack(weights)


@pytest.mark.filterwarnings("ignore:ExpertMask.*keep a single expert")
@pytest.mark.parametrize("family", FAMILIES)
def test_masked_block_output_equals_hand_computation(family):
    model = hf(family)
    layer = MOE_LAYERS[family][0]
    block = model.model.layers[layer].mlp
    router = block.router if family == "gpt_oss" else block.gate
    mask = ExpertMask((( layer, 1, "off"), (layer, 6, "on"), (layer, 4, "bias", 1.5)))
    off = torch.zeros(N_EXPERTS, dtype=torch.bool)
    on = torch.zeros(N_EXPERTS, dtype=torch.bool)
    bias = torch.zeros(N_EXPERTS)
    off[1], on[6], bias[4] = True, True, 1.5

    seen = {}
    handle = block.register_forward_hook(lambda m, i, o: seen.update(x=i[0], out=o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad(), masked(model, mask):
            model(ids_of(PROMPTS[1]))
    finally:
        handle.remove()

    with torch.no_grad():
        x = seen["x"].reshape(-1, seen["x"].shape[-1])
        logits = torch.nn.functional.linear(x, router.weight, getattr(router, "bias", None))
        chosen, weights = reference_route(family, router, logits, off, on, bias)
        assert (chosen == 6).any(-1).all() and not (chosen == 1).any()
        expected = block.experts(x, chosen, weights.to(x.dtype))
        if family == "qwen2_moe":
            expected = expected + torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
        if family == "deepseek_v3":
            expected = expected + block.shared_experts(x)
    torch.testing.assert_close(seen["out"].reshape(expected.shape), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3", "gpt_oss"])
def test_bias_changes_choice_not_weights(family):
    model = hf(family)
    layer = MOE_LAYERS[family][-1]
    natural = trace_routing(model, PROMPTS, tokenizer=_tokenizer(), include_router_logits=True, progress=False)
    with masked(model, ExpertMask.bias({(layer, 2): 50.0})):
        biased = trace(model)
    row = natural.layers.index(layer)
    assert (biased.topk_indices[row] == 2).any(-1).all()
    with masked(model, ExpertMask.on([(layer, 2)])):
        forced = trace(model)
    # a huge bias acts like "on"; both weight expert 2 by its natural score
    torch.testing.assert_close(
        torch.sort(biased.topk_weights[row], -1).values, torch.sort(forced.topk_weights[row], -1).values
    )


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3"])
def test_nested_bias_masks_sum(family):
    model = hf(family)
    layer = MOE_LAYERS[family][-1]
    ids = ids_of(PROMPTS[1])

    def run():
        with torch.no_grad():
            return trace(model), model(ids).logits

    outer = {(layer, 2): 1.5, (layer, 5): -1.0}
    inner = {(layer, 2): 2.0, (layer, 6): 0.75}
    with masked(model, ExpertMask.bias(outer)):
        only_outer = run()
        with masked(model, ExpertMask.bias(inner)):
            nested = run()
    summed = {key: outer.get(key, 0.0) + inner.get(key, 0.0) for key in {*outer, *inner}}
    with masked(model, ExpertMask.bias(summed)):
        single = run()
    assert torch.equal(nested[0].topk_indices, single[0].topk_indices)
    assert torch.equal(nested[0].topk_weights, single[0].topk_weights)
    assert torch.equal(nested[1], single[1])
    # the inner mask really adds to the outer one (not replaced by it, not ignored)
    assert not torch.equal(nested[0].topk_indices, only_outer[0].topk_indices)
    with masked(model, ExpertMask.bias(inner)):
        only_inner = run()
    assert not torch.equal(nested[0].topk_indices, only_inner[0].topk_indices)
    assert count_hooks(model) == 0


def test_masked_generation_with_kv_cache_through_labkit_generate():
    from labkit.generation import generate
    from labkit.models import from_hf

    tokenizer = _tokenizer()
    bridge = from_hf(tiny_moe_hf("olmoe", tokenizer), tokenizer, name="tiny-olmoe")
    mask = ExpertMask.off([(0, 0), (1, 0), (1, 5), (2, 7)], model=bridge)
    at_rest = count_hooks(bridge, bridge.original_model, hf_twin(bridge))
    plain = generate(bridge, PROMPTS, max_new_tokens=8).token_ids
    with masked(bridge, mask):
        cached = generate(bridge, PROMPTS, max_new_tokens=8).token_ids
        uncached = generate(bridge, PROMPTS, max_new_tokens=8, use_cache=False).token_ids
        answers = trace_routing(bridge, PROMPTS, scope="generated", max_new_tokens=8, progress=False)
    assert cached == uncached
    assert cached != plain
    assert not torch.isin(answers.topk_indices[0], torch.tensor([0])).any()
    assert count_hooks(bridge, bridge.original_model, hf_twin(bridge)) == at_rest
    assert count_hooks(hf_twin(bridge)) == 0


def hf_twin(bridge):
    from labkit.models import hf_model_of

    return hf_model_of(bridge)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_no_hook_survives_an_exception(error):
    model = hf("qwen2_moe")
    before = count_hooks(model)
    with pytest.raises(error):
        with masked(model, ExpertMask.off(a_valid_mask("qwen2_moe"))):
            assert count_hooks(model) == before + 1
            raise error("interrupted")
    assert count_hooks(model) == before


def test_masks_nest_and_merge():
    model = hf("mixtral")
    layer = 2
    with contextlib.ExitStack() as stack:
        stack.enter_context(masked(model, ExpertMask.off([(layer, 0)])))
        with masked(model, ExpertMask.off([(layer, 3)])):
            both = trace(model)
        only_first = trace(model)
    row = both.layers.index(layer)
    assert not torch.isin(both.topk_indices[row], torch.tensor([0, 3])).any()
    assert not (only_first.topk_indices[row] == 0).any() and (only_first.topk_indices[row] == 3).any()
    assert count_hooks(model) == 0
    with masked(model, ExpertMask.off([(layer, 0)])):
        with pytest.raises(ValueError, match=r"layer 2 experts \[0\] are both off and on"):
            with masked(model, ExpertMask.on([(layer, 0)])):
                pass


# --- data -------------------------------------------------------------------------------------


def test_round_trip_and_constructors(tmp_path):
    model = hf("deepseek_v3")
    mask = ExpertMask(((1, 2, "off"), (3, 5, "bias", -0.5), (2, 7, "on")), "tiny", 4, 8)
    assert [(e.layer, e.expert) for e in mask.edits] == [(1, 2), (2, 7), (3, 5)]
    assert ExpertMask.from_dict(mask.to_dict()) == mask
    assert ExpertMask.load(mask.save(tmp_path / "mask")) == mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.json"]  # a mask has no tensors
    assert mask.to_dict()["kind"] == "labkit.ExpertMask" and mask.to_dict()["version"] == 1

    assert ExpertMask.off({1: [2, 3]}) == ExpertMask.off([(1, 2), (1, 3)])
    assert ExpertMask.bias([(1, 2)], 0.5).edits[0].value == 0.5

    class Attribution:  # duck-typed: anything with .top(n)
        n_experts = 8

        def top(self, n):
            return [(3, 1, 9.0), (1, 4, 7.0), (2, 0, 5.0)][:n]

    from_attr = ExpertMask.from_attribution(Attribution(), 2, model=model)
    assert from_attr.experts() == [(1, 4), (3, 1)] and from_attr.n_layers == 4

    class ForeignAttribution(Attribution):
        n_experts = 64

    with pytest.raises(ValueError, match="attribution has n_experts=64 but the model has n_experts=8"):
        ExpertMask.from_attribution(ForeignAttribution(), 2, model=model)

    control = ExpertMask.random(model, seed=3, match_layers_of=from_attr)
    assert sorted(e.layer for e in control.edits) == [1, 3]
    assert not set(control.experts()) & set(from_attr.experts())
    assert control == ExpertMask.random(model, seed=3, match_layers_of=from_attr)
    spread = ExpertMask.random(model, 12, seed=0, exclude=[(1, 0)])
    assert len(spread) == 12 and (1, 0) not in spread.experts()
    assert set(spread.layers) <= {1, 2, 3}
    assert all(sum(e.layer == l for e in spread.edits) <= N_EXPERTS - TOP_K for l in spread.layers)
    assert len(ExpertMask.random((4, 8), 5, seed=1)) == 5


def test_from_attribution_keeps_bias_values_and_the_attribution_shape():
    """Mutation-found gaps: the bias value, n = 1, and the model facts read off the attribution."""

    class Attribution:
        model_name, n_layers, n_experts = "organism", 4, 8

        def top(self, n):
            return [(3, 1, 9.0), (1, 4, 7.0), (2, 0, 5.0)][:n]

    biased = ExpertMask.from_attribution(Attribution(), 2, mode="bias", value=-1.5)
    assert [(e.layer, e.expert, e.mode, e.value) for e in biased.edits] == [(1, 4, "bias", -1.5), (3, 1, "bias", -1.5)]
    assert (biased.model_name, biased.n_layers, biased.n_experts) == ("organism", 4, 8)
    assert ExpertMask.from_attribution(Attribution(), 1).experts("off") == [(3, 1)]
    for n in (0, True):
        with pytest.raises(ValueError, match="n must be an int ≥ 1"):
            ExpertMask.from_attribution(Attribution(), n)
    with pytest.raises(ValueError, match="mode='bias' needs value"):
        ExpertMask.from_attribution(Attribution(), 2, mode="bias")
    with pytest.raises(ValueError, match=r"has no \.top\(n\) method"):
        ExpertMask.from_attribution(object(), 2)
    # the default seed is 0 (a random control is reproducible without passing one)
    assert ExpertMask.random((4, 8), 5) == ExpertMask.random((4, 8), 5, seed=0) != ExpertMask.random((4, 8), 5, seed=1)


def test_random_control_respects_the_per_mode_cap_values_and_matched_layers():
    """The random row of the MoTE table: how many experts a layer may lose (off: n_experts - top_k;
    on: top_k), the bias value, the shape recorded, and matched layers. (Mutation-found gaps.)"""
    model = hf("deepseek_v3")
    layers = MOE_LAYERS["deepseek_v3"]
    for mode, cap in (("off", N_EXPERTS - TOP_K), ("on", TOP_K)):
        full = ExpertMask.random(model, cap * len(layers), seed=0, mode=mode)
        assert sorted(e.layer for e in full.edits) == sorted(layers * cap)
        assert {e.mode for e in full.edits} == {mode} and full.n_experts == N_EXPERTS
        with pytest.raises(ValueError, match=f"only {cap * len(layers)} can be drawn"):
            ExpertMask.random(model, cap * len(layers) + 1, seed=0, mode=mode)
    biased = ExpertMask.random((4, 8), 3, seed=2, mode="bias", value=-0.5)
    assert [e.value for e in biased.edits] == [-0.5] * 3 and (biased.n_layers, biased.n_experts) == (4, 8)
    with pytest.raises(ValueError, match="mode='bias' needs value"):
        ExpertMask.random((4, 8), 3, mode="bias")
    assert len(ExpertMask.random((1, 1), 1)) == 1
    for bad in ((4, -1), (4, True), [4], (0, 8)):
        with pytest.raises(ValueError, match="model_or_shape must be a model or"):
            ExpertMask.random(bad, 1)
    for n in (0, True):
        with pytest.raises(ValueError, match="n must be an int ≥ 1"):
            ExpertMask.random((4, 8), n)
    # matched layers: as many per layer as the mask has, never its own experts, up to the whole pool
    target = ExpertMask.off([(0, 1), (0, 2), (0, 3), (0, 4), (2, 5)])
    for seed in range(5):
        control = ExpertMask.random((3, 8), 5, seed=seed, match_layers_of=target)
        assert sorted(e.layer for e in control.edits) == [0, 0, 0, 0, 2]
        assert not set(control.experts()) & set(target.experts())
    assert len(ExpertMask.random((1, 8), seed=0, match_layers_of=ExpertMask.off([(0, e) for e in range(4)]))) == 4
    mixed = ExpertMask(((0, 1, "off"), (1, 2, "on")))
    assert mixed.experts("on") == [(1, 2)] and mixed.experts("off") == [(0, 1)]
    assert ExpertMask.from_dict({"kind": "labkit.ExpertMask", "version": 1}) == ExpertMask()


# --- guard rails ------------------------------------------------------------------------------


def test_errors_name_the_value_and_the_allowed_range():
    model = hf("deepseek_v3")

    def apply(mask):
        with masked(model, mask):
            pass

    with pytest.raises(ValueError, match=r"layer 9 out of range; model has 4 layers \(0\.\.3\)"):
        apply(ExpertMask.off([(9, 0)]))
    with pytest.raises(ValueError, match=r"layer 1 expert 8 out of range; model has 8 experts per layer \(0\.\.7\).*shared"):
        apply(ExpertMask.off([(1, 8)]))
    with pytest.raises(ValueError, match=r"layer 0 is a dense layer.*MoE layers: \[1, 2, 3\]"):
        apply(ExpertMask.off([(0, 1)]))
    with pytest.raises(ValueError, match=r"made for a model with 64 experts per layer"):
        apply(ExpertMask.off([(1, 1)]).__class__(((1, 1, "off"),), "big-moe", 4, 64))
    with pytest.raises(ValueError, match=r"made for model 'other-model'.*for_model"):
        apply(ExpertMask(((1, 1, "off"),), "other-model"))
    with pytest.raises(ValueError, match=r"unknown mode 'mute'; allowed modes: off, on, bias"):
        ExpertMask(((1, 1, "mute"),))
    with pytest.raises(ValueError, match=r"bias must be a finite number, got nan"):
        ExpertMask.bias({(1, 1): float("nan")})
    with pytest.raises(ValueError, match=r"shared experts cannot be masked — they are not routed"):
        ExpertMask.off([(1, "shared")])
    with pytest.raises(ValueError, match=r"layer 1 expert 2 appears twice"):
        ExpertMask.off([(1, 2), (1, 2)])
    with pytest.raises(ValueError, match=r"switches off 7 of 8 experts, leaving 1 selectable.*at most 6"):
        apply(ExpertMask.off([(1, e) for e in range(7)]))
    with pytest.raises(ValueError, match=r"forces 3 experts on, but each token takes only top_k=2"):
        apply(ExpertMask.on([(1, 0), (1, 2), (1, 4)]))
    with pytest.warns(UserWarning, match=r"expert groups \[0\] are emptied"):
        apply(ExpertMask.off([(1, 0), (1, 1)]))
    with pytest.raises(ValueError, match=r"'llama'.*Supported families"):
        with masked(tiny_llama_hf(_tokenizer()), ExpertMask.off([(0, 0)])):
            pass
    with pytest.raises(TypeError, match="expected an ExpertMask, got dict"):
        with masked(model, {"off": [(1, 1)]}):
            pass
    assert count_hooks(model) == 0


def test_deepseek_group_limits():
    """topk_group=1 of 4 groups of 2 experts, top_k=2: each token routes inside one group."""
    from transformers import AutoModelForCausalLM

    from tests.moe_fixtures import tiny_moe_config

    config = tiny_moe_config("deepseek_v3", _tokenizer())
    config.topk_group = 1
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match=r"forces on experts in 2 expert groups.*topk_group=1 of n_group=4"):
        with masked(model, ExpertMask.on([(1, 0), (1, 2)])):
            pass
    with pytest.raises(ValueError, match=r"hold only 1 selectable experts, fewer than top_k=2"):
        with pytest.warns(UserWarning, match="keep a single expert"):
            with masked(model, ExpertMask.off([(1, 0), (1, 2), (1, 4), (1, 6)])):
                pass
    with masked(model, ExpertMask.on([(1, 3)])):
        forced = trace_routing(model, PROMPTS, tokenizer=_tokenizer(), progress=False)
    row = forced.layers.index(1)
    assert (forced.topk_indices[row] == 3).any(-1).all()
    assert (forced.topk_indices[row] // 2 == 1).all()  # both choices from expert 3's group
    assert count_hooks(model) == 0


def test_integer_like_layer_and_expert_are_accepted():
    import numpy as np

    expected = ExpertMask.off([(0, 1), (2, 3)])
    assert ExpertMask.off([(np.int64(0), np.int32(1)), (2, 3)]) == expected
    assert ExpertMask.off([(torch.tensor(0), torch.tensor(1, dtype=torch.int32)), (2, 3)]) == expected
    assert ExpertMask.off({np.int64(0): [np.int64(1)], 2: [3]}) == expected
    assert all(type(e.layer) is int and type(e.expert) is int for e in ExpertMask.off([(np.int64(0), torch.tensor(1))]).edits)
    for bad in (0.0, np.float64(1.0), True, np.bool_(True), torch.tensor(True), torch.tensor(1.0), "1"):
        with pytest.raises(ValueError, match=r"ExpertMask: layer must be an integer ≥ 0 .* got .* of type"):
            ExpertMask.off([(bad, 1)])
    with pytest.raises(ValueError, match=r"expert must be an integer ≥ 0, got -1"):
        ExpertMask.off([(0, np.int64(-1))])
    # range checks still apply to converted values
    with pytest.raises(ValueError, match=r"layer 0 expert 8 out of range; model has 8 experts per layer \(0..7\)"):
        ExpertMask(((np.int64(0), torch.tensor(8)),), None, 4, 8)


def test_from_dict_and_load_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(ValueError, match=r"ExpertMask.from_dict: the dict: edit 0 \(\{'layer': 0\}\) lacks 'expert'"):
        ExpertMask.from_dict({"kind": "labkit.ExpertMask", "edits": [{"layer": 0}]})
    with pytest.raises(ValueError, match=r"edit 1 is 7, expected an object"):
        ExpertMask.from_dict({"kind": "labkit.ExpertMask", "edits": [{"layer": 0, "expert": 1}, 7]})
    with pytest.raises(ValueError, match=r"'edits' is a dict, expected a list"):
        ExpertMask.from_dict({"kind": "labkit.ExpertMask", "edits": {}})
    with pytest.raises(ValueError, match=r"value must be a number, got 'big'"):
        ExpertMask.from_dict({"kind": "labkit.ExpertMask", "edits": [{"layer": 0, "expert": 1, "mode": "bias", "value": "big"}]})
    with pytest.raises(ValueError, match=r"no 'kind' key"):
        ExpertMask.from_dict({"edits": []})

    with pytest.raises(FileNotFoundError, match=r"ExpertMask.load: no file at '.*nope.json'; expected nope.json .* written by ExpertMask.save"):
        ExpertMask.load(tmp_path / "nope.json")
    save_file({"x": torch.zeros(3)}, str(tmp_path / "t.safetensors"), metadata={"labkit": '{"kind": "labkit.RoutingTrace"}'})
    with pytest.raises(ValueError, match=r"ExpertMask.load: '.*t.safetensors' is of kind 'labkit.RoutingTrace'; expected kind 'labkit.ExpertMask'. Load it with RoutingTrace.load"):
        ExpertMask.load(tmp_path / "t.safetensors")
    (tmp_path / "vector.json").write_text('{"kind": "labkit.SteeringVector", "version": 1}')
    with pytest.raises(ValueError, match=r"'.*vector.json' is of kind 'labkit.SteeringVector'; expected kind 'labkit.ExpertMask'. Load it with SteeringVector.load"):
        ExpertMask.load(tmp_path / "vector.json")
    (tmp_path / "broken.json").write_text('{"kind": ')
    with pytest.raises(ValueError, match=r"broken.json' is not valid JSON"):
        ExpertMask.load(tmp_path / "broken.json")
    (tmp_path / "bad_edit.json").write_text('{"kind": "labkit.ExpertMask", "version": 1, "edits": [{"expert": 2}]}')
    with pytest.raises(ValueError, match=r"ExpertMask.load: '.*bad_edit.json': edit 0 .* lacks 'layer'"):
        ExpertMask.load(tmp_path / "bad_edit.json")
    (tmp_path / "blob.json").write_bytes(bytes([0xFF, 0xFE, 0x00, 0x81]))
    with pytest.raises(ValueError, match=r"blob.json' is binary, not JSON"):
        ExpertMask.load(tmp_path / "blob.json")


def test_deepseek_group_capacity_counts_the_worst_groups_a_token_may_get():
    """top_k=4 in topk_group=2 of 4 groups of 2: with groups left at 2, 1, 1, 1 selectable experts,
    the worst two groups a token may be given hold 2 + 1 = 3 < 4 experts: refused (a mutation
    survivor summed all three one-expert groups and let it through)."""
    from transformers import AutoModelForCausalLM

    from tests.moe_fixtures import tiny_moe_config

    config = tiny_moe_config("deepseek_v3", _tokenizer())
    config.num_experts_per_tok = 4
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match=r"hold only 3 selectable experts, fewer than top_k=4"):
        with pytest.warns(UserWarning, match="keep a single expert"):
            with masked(model, ExpertMask.off([(1, 2), (1, 4), (1, 6)])):
                pass
    with pytest.warns(UserWarning, match=r"groups \[1\] keep a single expert"):
        with masked(model, ExpertMask.off([(1, 2)])):  # groups 2, 1, 2, 2: the worst two hold 4
            pass
    assert count_hooks(model) == 0
