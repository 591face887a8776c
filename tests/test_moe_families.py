"""Every MoE text-generation family of the pinned transformers: routed exactly, or named with a reason.

For each routed family, on a tiny random-weight model built from its transformers config:
labkit's recomputation with no mask equals the router's own output bit for bit; a trace equals
the router's top-k; an empty mask is bit-identical; off / on / bias masks equal an independent
token-by-token reading of the family's rule, and the MoE block output under the mask equals the
block run with that reference routing; masked generation with the KV cache equals it without;
a masked batch equals its rows. Unknown router configuration is refused.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from labkit.hooks import count_hooks
from labkit.moe import ExpertMask, masked, trace_routing
from labkit.moe.families import FAMILIES, NOT_ROUTED, family_of, find_routers
from tests.moe_fixtures import PUBLIC_ROUTING, TOP_K, family_hf, one_thread, public_routing_hf, shared_family_hf, shared_tokenizer


def _shipped_model_types() -> set[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return set(CONFIG_MAPPING_NAMES)


#: Families whose model type the installed transformers ships. The lab pins a range of
#: transformers; entries for families a newer release adds are kept and skip here.
SHIPPED = _shipped_model_types()
ROUTED = tuple(t for t in FAMILIES if t in SHIPPED)
NOT_IN_THIS_TRANSFORMERS = tuple(t for t in FAMILIES if t not in SHIPPED)
#: Hybrid linear-attention families whose reference kernels make generation slow on CPU.
SLOW_ON_CPU = {"kimi_linear"}
ROUTED_FAST = tuple(pytest.param(t, marks=pytest.mark.slow) if t in SLOW_ON_CPU else t for t in ROUTED)
PROMPTS = ["the cat sat on a mat", "what happened in the city during war and peace", "one two three four five"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def ids_of(text: str) -> torch.Tensor:
    return shared_tokenizer()(text, return_tensors="pt").input_ids


# --- the family table -------------------------------------------------------------------------

_MOE_CLASS = re.compile(r"^class (\w*(?:Experts|Router|TopKGating|MoE|SparseMoeBlock))\(", re.MULTILINE)


def moe_text_families() -> list[str]:
    """``model_type`` of every causal-LM family whose modeling module defines a MoE module class.

    Read from transformers itself: the causal-LM auto mapping, and in each family's modeling
    source a class named ``...Experts`` / ``...Router`` / ``...TopKGating`` / ``...MoE`` /
    ``...SparseMoeBlock`` (the source is scanned, not imported: importing ~200 modeling modules
    costs tens of seconds).
    """
    import importlib.util

    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found = []
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        module_name = model_type_to_module_name(model_type)
        spec = importlib.util.find_spec(f"transformers.models.{module_name}")
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(list(spec.submodule_search_locations)[0]) / f"modeling_{module_name}.py"
        if path.is_file() and _MOE_CLASS.search(path.read_text()):
            found.append(model_type)
    return found


def test_every_moe_family_is_routed_or_named_with_a_reason():
    families = moe_text_families()
    routed_types = {t for family in FAMILIES.values() for t in family.model_types}
    missing = [t for t in families if t not in routed_types and t not in NOT_ROUTED]
    assert not missing, f"MoE families of transformers not yet routed (route them or add to NOT_ROUTED with a reason): {missing}"
    # an entry is stale when this transformers ships the model type but not as a MoE causal LM;
    # entries for model types it does not ship at all belong to newer releases inside the pin
    stale = sorted(t for t in (routed_types | set(NOT_ROUTED)) - set(families) if t in SHIPPED)
    assert not stale, f"entries for model types transformers ships, but not as MoE causal LMs: {stale}"
    assert not routed_types & set(NOT_ROUTED)
    assert len(ROUTED) >= 30, f"only {len(ROUTED)} routed families ship with this transformers"
    import transformers

    print(f"\ntransformers {transformers.__version__}: {len(families)} MoE text-generation model types; "
          f"{len(ROUTED)} families routed ({len([t for t in families if t in routed_types])} model types); "
          f"not routed: {sorted(t for t in NOT_ROUTED if t in SHIPPED)}; entries for newer releases: "
          f"{sorted(set(NOT_IN_THIS_TRANSFORMERS) | {t for t in NOT_ROUTED if t not in SHIPPED})}")


def test_error_for_dense_or_unrouted_model_lists_the_families():
    from tests.conftest import tiny_llama_hf

    with pytest.raises(ValueError, match=r"'llama'.*Supported families: OLMoE \('olmoe'\).*Llama-4.*DeepSeek-V3 \('deepseek_v3'\)"):
        family_of(tiny_llama_hf(shared_tokenizer()))


# --- exactness per family ---------------------------------------------------------------------


def router_calls(model, input_ids):
    """Every router call's ``(router, args, kwargs, output)``, read with hooks independent of labkit."""
    seen = []
    handles = [
        moe_layer.router.register_forward_hook(
            lambda m, a, k, o, layer=moe_layer.layer: seen.append((layer, m, a, k, o)), with_kwargs=True
        )
        for moe_layer in find_routers(model)
    ]
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("model_type", ROUTED)
def test_recomputed_routing_is_the_routers_own_output_bit_for_bit(model_type):
    model = shared_family_hf(model_type)
    family = family_of(model)
    moe = find_routers(model)
    calls = router_calls(model, ids_of(PROMPTS[1]))
    assert sorted({c[0] for c in calls}) == [m.layer for m in moe]
    trace = trace_routing(model, [PROMPTS[1]], tokenizer=shared_tokenizer(), include_router_logits=True, progress=False)
    assert (trace.n_experts, trace.top_k) == (moe[0].n_experts, TOP_K)
    for row, (layer, router, args, kwargs, output) in enumerate(calls):
        logits, weights, indices = family.read(output, router)
        again_indices, again_weights = family.route(router, logits, None, args, kwargs)
        assert torch.equal(again_indices, indices), f"{model_type} layer {layer}"
        assert torch.equal(again_weights, weights), f"{model_type} layer {layer}"
        assert again_weights.dtype == weights.dtype
        assert torch.equal(trace.topk_indices[row], indices)
        assert torch.equal(trace.topk_weights[row], weights.float())
        assert torch.equal(trace.router_logits[row], logits.float())
    assert count_hooks(model) == 0


@pytest.mark.parametrize("model_type", ROUTED)
def test_recomputed_routing_is_bit_exact_in_bfloat16_too(model_type):
    """Casts and float32 upcasts are part of each family's rule: checked where they matter."""
    if model_type == "inkling2_text":
        pytest.skip("transformers 5.23's Inkling-2 router itself fails in bfloat16 (float32 states @ bfloat16 weight)")
    model = family_hf(model_type, shared_tokenizer()).to(torch.bfloat16)
    family = family_of(model)
    for layer, router, args, kwargs, output in router_calls(model, ids_of(PROMPTS[1])):
        logits, weights, indices = family.read(output, router)
        again_indices, again_weights = family.route(router, logits, None, args, kwargs)
        assert torch.equal(again_indices, indices), f"{model_type} layer {layer}"
        assert again_weights.dtype == weights.dtype, f"{model_type} layer {layer}: {again_weights.dtype} vs {weights.dtype}"
        assert torch.equal(again_weights, weights), f"{model_type} layer {layer}"


@pytest.mark.parametrize("model_type", ROUTED)
def test_empty_mask_is_bit_identical(model_type):
    model = shared_family_hf(model_type)
    with torch.no_grad():
        plain = model(ids_of(PROMPTS[1])).logits
        with masked(model, ExpertMask()):
            again = model(ids_of(PROMPTS[1])).logits
    assert torch.equal(plain, again)


def reference_route(scheme, router, logits, off, on, bias, correction):
    """Independent token-by-token reading of a family's rule under off / on / bias."""
    k = int(router.top_k)
    all_indices, all_weights = [], []
    for token, token_logits in enumerate(logits):
        x = token_logits.float() if scheme.upcast else token_logits
        if scheme.score == "softmax":
            scores = torch.softmax(x.float(), dim=-1)
        elif scheme.score == "sigmoid":
            scores = torch.sigmoid(x)
        else:
            scores = x.clone()
        n = scores.shape[0]
        key = [scores[e].item() + (0.0 if correction is None else correction[e].item()) for e in range(n)]
        for e in range(n):
            if scheme.score == "softmax" and not scheme.choose_plus_bias:
                key[e] = key[e] * math.exp(bias[e])
            else:
                key[e] = key[e] + bias[e]
            if off[e]:
                key[e] = -math.inf
        weight_of = {e: scores[e].item() for e in range(n)}
        if scheme.groups is not None:
            n_group, size = int(router.num_group), n // int(router.num_group)
            group_score = []
            for g in range(n_group):
                members = sorted(key[g * size : (g + 1) * size], reverse=True)
                group_score.append(sum(members[:2]) if scheme.groups == "top2_sum" else members[0])
                if any(on[g * size : (g + 1) * size]):
                    group_score[g] = math.inf
            groups = sorted(range(n_group), key=lambda g: -group_score[g])[: int(router.topk_group)]
            for e in range(n):
                if e // size not in groups:
                    key[e] = -math.inf if off[e] else scheme.group_fill
                    if scheme.groups == "max":
                        weight_of[e] = scheme.group_fill
        for e in range(n):
            if on[e]:
                key[e] = math.inf
        chosen = sorted(range(n), key=lambda e: -key[e])[:k]
        w = torch.tensor([weight_of[e] for e in chosen])
        if scheme.weight == "softmax_of_chosen":
            w = torch.softmax(w, dim=-1)
        elif scheme.weight == "sigmoid_of_chosen":
            w = torch.sigmoid(w)
        norm = scheme.renormalise if not isinstance(scheme.renormalise, str) else getattr(router, scheme.renormalise)
        if norm:
            total = w.sum()
            if scheme.clamp_attr is not None:
                total = max(total, torch.tensor(getattr(router, scheme.clamp_attr)))
            w = w / (total + scheme.eps)
        if scheme.scale is not None:
            w = w * getattr(router, scheme.scale)
        all_indices.append(chosen)
        all_weights.append(w)
    return torch.tensor(all_indices), torch.stack(all_weights)


def _write_reference(family, output, router, indices, weights):
    if family.name == "Llama-4":
        scores = torch.zeros_like(output[0]).scatter_(1, indices, weights.to(output[0].dtype))
        return scores, output[1]
    return (output[0], weights.to(output[1].dtype), indices, *output[3:])


def _block_of(model, router):
    names = {module: name for name, module in model.named_modules()}
    parent = names[router].rsplit(".", 1)[0]
    return model.get_submodule(parent)


def check_mask_against_reference(model, model_type, moe_index=0):
    """Off 1 / on 6 / bias 4 in one MoE layer: router output = reference rule; block output = hand computation."""
    family = family_of(model)
    moe_layer = find_routers(model)[moe_index]
    router, layer, n = moe_layer.router, moe_layer.layer, moe_layer.n_experts
    scheme = family.scheme_for(router)
    mask = ExpertMask(((layer, 1, "off"), (layer, 6, "on"), (layer, 4, "bias", 1.5)))
    off, on, bias = [False] * n, [False] * n, [0.0] * n
    off[1], on[6], bias[4] = True, True, 1.5
    block = _block_of(model, router)

    seen = {}
    handles = [
        router.register_forward_hook(lambda m, a, k, o: seen.update(args=a, kwargs=k, out=o), with_kwargs=True),
        block.register_forward_hook(lambda m, a, o: seen.update(x=a[0], block_out=o)),
    ]
    try:
        with torch.no_grad(), masked(model, mask):
            model(ids_of(PROMPTS[1]))
    finally:
        for handle in handles:
            handle.remove()
    logits, weights, indices = family.read(seen["out"], router)
    args, kwargs = seen["args"], seen["kwargs"]
    correction = None
    if scheme.correction == "input":
        correction = args[1] if len(args) > 1 else next(v for k, v in kwargs.items() if k in ("expert_bias", "e_score_correction_bias"))
    elif scheme.correction is not None:
        owner = router
        for part in scheme.correction.removeprefix("attr:").split("."):
            owner = getattr(owner, part)
        correction = owner.squeeze()
    ref_indices, ref_weights = reference_route(scheme, router, logits.detach(), off, on, bias, correction)
    assert (indices == 6).any(-1).all() and not (indices == 1).any()
    for token in range(indices.shape[0]):
        got = dict(zip(indices[token].tolist(), weights[token].float().tolist()))
        want = dict(zip(ref_indices[token].tolist(), ref_weights[token].tolist()))
        assert got.keys() == want.keys(), f"{model_type} token {token}: {sorted(got)} vs reference {sorted(want)}"
        for expert in got:
            assert math.isclose(got[expert], want[expert], rel_tol=1e-5, abs_tol=1e-6), (model_type, token, expert)

    # the block under the mask = the block run with the reference routing put in the router's place
    replace = router.register_forward_hook(
        lambda m, a, o: _write_reference(family, o, m, ref_indices, ref_weights)
    )
    try:
        with torch.no_grad():
            expected = block(seen["x"])
    finally:
        replace.remove()
    got_out = seen["block_out"][0] if isinstance(seen["block_out"], tuple) else seen["block_out"]
    expected = expected[0] if isinstance(expected, tuple) else expected
    torch.testing.assert_close(got_out, expected, rtol=1e-5, atol=1e-6)
    assert count_hooks(model) == 0


@pytest.mark.filterwarnings("ignore:ExpertMask.*keep a single expert")
@pytest.mark.parametrize("model_type", ROUTED)
def test_mask_equals_the_reference_rule_and_the_block_output_its_hand_computation(model_type):
    check_mask_against_reference(shared_family_hf(model_type), model_type)


def _mask_for(model):
    """Expert 0 off in every MoE layer, expert 5 on in the last one."""
    layers = [m.layer for m in find_routers(model)]
    return ExpertMask(tuple((layer, 0, "off") for layer in layers) + ((layers[-1], 5, "on"),))


@pytest.mark.filterwarnings("ignore:ExpertMask.*keep a single expert")
@pytest.mark.parametrize("model_type", ROUTED_FAST)
def test_masked_generation_with_kv_cache_equals_without(model_type):
    model = shared_family_hf(model_type)
    tokenizer = shared_tokenizer()
    ids = ids_of(PROMPTS[0])
    with torch.no_grad(), masked(model, _mask_for(model)):
        answers = [
            model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=use_cache, pad_token_id=tokenizer.pad_token_id)
            for use_cache in (True, False)
        ]
        generated = trace_routing(model, [PROMPTS[0]], tokenizer=tokenizer, scope="generated", max_new_tokens=5, progress=False)
    assert torch.equal(answers[0], answers[1])
    assert not (generated.topk_indices == 0).any()
    assert count_hooks(model) == 0


@pytest.mark.filterwarnings("ignore:ExpertMask.*keep a single expert")
@pytest.mark.parametrize("model_type", ROUTED_FAST)
def test_masked_batch_equals_its_rows(model_type):
    model, tokenizer = shared_family_hf(model_type), shared_tokenizer()
    with masked(model, _mask_for(model)):
        batched = trace_routing(model, PROMPTS, tokenizer=tokenizer, batch_size=3, progress=False)
        alone = [trace_routing(model, [p], tokenizer=tokenizer, batch_size=1, progress=False) for p in PROMPTS]
    assert torch.equal(batched.topk_indices, torch.cat([t.topk_indices for t in alone], dim=1))
    torch.testing.assert_close(batched.topk_weights, torch.cat([t.topk_weights for t in alone], dim=1))
    assert not (batched.topk_indices == 0).any()


# --- refusals ---------------------------------------------------------------------------------


def test_unknown_router_configuration_is_refused():
    model = family_hf("deepseek_v3", shared_tokenizer())
    router = find_routers(model)[0].router
    router.router_softcap = 30.0  # a routing option a future transformers might add
    with pytest.raises(ValueError, match=r"DeepSeek-V3 router DeepseekV3TopkRouter at layer 1 has routing configuration labkit does not know: \['router_softcap'\]"):
        find_routers(model)
    with pytest.raises(ValueError, match="router_softcap"):
        with masked(model, ExpertMask.off([(1, 0)])):
            pass
    del router.router_softcap
    router.register_buffer("expert_temperature", torch.ones(8))
    with pytest.raises(ValueError, match=r"\['expert_temperature'\]"):
        trace_routing(model, PROMPTS, tokenizer=shared_tokenizer(), progress=False)


def test_unknown_option_values_are_refused():
    model = family_hf("deepseek_v2", shared_tokenizer())
    for moe_layer in find_routers(model):
        moe_layer.router.topk_method = "noaux_tc"
    with pytest.raises(ValueError, match=r"topk_method='noaux_tc' is not a routing labkit implements; allowed: 'greedy', 'group_limited_greedy'"):
        find_routers(model)
    cohere = family_hf("cohere2_moe", shared_tokenizer())
    find_routers(cohere)[0].router.expert_selection_fn = "relu"
    with pytest.raises(ValueError, match=r"expert_selection_fn='relu' unknown; allowed: 'softmax', 'sigmoid'"):
        find_routers(cohere)


def test_options_change_the_rule():
    """DeepSeek-V2 greedy vs group-limited, Cohere2 softmax vs sigmoid, LFM2 with / without expert bias."""
    for model_type, overrides in [
        ("deepseek_v2", dict(topk_method="greedy")),
        ("cohere2_moe", dict(expert_selection_fn="sigmoid", norm_topk_prob=True)),
        ("lfm2_moe", dict(use_expert_bias=False)),
        ("axk2", dict(n_group=None, topk_group=None)),
    ]:
        model = family_hf(model_type, shared_tokenizer(), **overrides)
        family = family_of(model)
        for layer, router, args, kwargs, output in router_calls(model, ids_of(PROMPTS[1])):
            logits, weights, indices = family.read(output, router)
            again = family.route(router, logits, None, args, kwargs)
            assert torch.equal(again[0], indices) and torch.equal(again[1], weights), (model_type, layer)


# --- public checkpoints' routing ---------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:ExpertMask.*keep a single expert")
@pytest.mark.parametrize("checkpoint", list(PUBLIC_ROUTING))
def test_public_checkpoint_routing_at_tiny_width(checkpoint):
    """The exact routing a user of the checkpoint meets: hyperparameters, dense layers, masks."""
    model_type, overrides, expected_layers = PUBLIC_ROUTING[checkpoint]
    model = public_routing_hf(checkpoint)
    family = family_of(model)
    moe = find_routers(model)
    assert [m.layer for m in moe] == expected_layers
    keys = {"num_experts": "n_experts", "n_routed_experts": "n_experts", "num_local_experts": "n_experts", "num_experts_per_tok": "top_k"}
    for key, value in overrides.items():
        if key in keys:
            assert getattr(moe[0], keys[key]) == value, (checkpoint, key)
    router = moe[0].router
    for key, attribute in [("n_group", "num_group"), ("topk_group", "topk_group"), ("routed_scaling_factor", "routed_scaling_factor"), ("norm_topk_prob", "norm_topk_prob")]:
        if key in overrides and hasattr(router, attribute):
            assert getattr(router, attribute) == overrides[key], (checkpoint, key)
    for layer, router, args, kwargs, output in router_calls(model, ids_of(PROMPTS[1])):
        logits, weights, indices = family.read(output, router)
        again = family.route(router, logits, None, args, kwargs)
        assert torch.equal(again[0], indices) and torch.equal(again[1], weights), (checkpoint, layer)
    check_mask_against_reference(model, model_type, moe_index=-1)
    with torch.no_grad():
        plain = model(ids_of(PROMPTS[0])).logits
        with masked(model, ExpertMask()):
            assert torch.equal(model(ids_of(PROMPTS[0])).logits, plain)


# --- TransformerLens -----------------------------------------------------------------------------

#: Families TransformerLens 4.3 cannot boot (labkit routes them on the plain Hugging Face model).
BRIDGE_CANNOT_BOOT = {
    **{
        model_type: "TransformerLens 4.3 has no adapter for this architecture"
        for model_type in (
            "mellum", "hunyuan_v1_moe", "minimax", "longcat_flash", "aria_text", "granitemoe_swa", "granitemoeshared",
            "cohere2_moe", "kolibri1", "deepseek_v32", "dots1", "exaone_moe", "hy_v4", "kimi_linear", "mimo_v2_flash",
            "solar_open", "bailing_hybrid", "axk1", "axk2", "beam", "hy_v3", "minimax_m3_vl_text", "inkling2_text", "flint",
            "qwen4_exp_text",
        )
    },
    "granitemoehybrid": "TransformerLens 4.3's Granite-MoE-Hybrid adapter fails to boot: 'Original component not set "
    "for model.rotary_emb'",
}


@pytest.mark.filterwarnings("ignore:ExpertMask.*keep a single expert")
@pytest.mark.parametrize("model_type", ROUTED)
def test_transformer_lens_boots_the_family_and_traces_like_the_plain_model(model_type):
    from labkit.models import from_hf, hf_model_of

    tokenizer = shared_tokenizer()
    if model_type in BRIDGE_CANNOT_BOOT:
        with pytest.raises((ValueError, RuntimeError), match="Could not determine supported architecture|Original component not set"):
            from_hf(family_hf(model_type, tokenizer), tokenizer, name=f"tiny-{model_type}")
        return
    bridge = from_hf(family_hf(model_type, tokenizer), tokenizer, name=f"tiny-{model_type}")
    on_bridge = trace_routing(bridge, PROMPTS, progress=False)
    on_hf = trace_routing(shared_family_hf(model_type), PROMPTS, tokenizer=tokenizer, prepend_bos=bridge.labkit.prepend_bos, progress=False)
    assert torch.equal(on_bridge.topk_indices, on_hf.topk_indices)
    assert torch.equal(on_bridge.topk_weights, on_hf.topk_weights)
    layer = on_bridge.layers[-1]
    with masked(bridge, ExpertMask.off([(layer, 0)])):
        with torch.no_grad():
            bridge(bridge.to_tokens(PROMPTS[0]))  # the bridge's own forward runs masked routers
        again = trace_routing(bridge, PROMPTS, progress=False)
    assert not (again.topk_indices[-1] == 0).any()
    assert count_hooks(hf_model_of(bridge)) == 0
