"""labkit.models, labkit.backends, labkit.moe.routers: value tests that kill mutation survivors
(issue 22). Tiny random-weight models and the shipped organism; expected values are spelled out
or recomputed independently."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

import labkit
from labkit.models import lab_model, lab_model_or_none, load_model


# --- load_model: which engine gets which arguments ------------------------------------------------


def test_engine_vllm_hands_every_argument_to_the_engine_loader(monkeypatch):
    """``engine="vllm"`` calls :func:`labkit.engines.vllm_load.load_vllm` with the name, the TP degree,
    the dtype, the BOS rule and every engine keyword, unchanged (a stub stands in for vLLM)."""
    import labkit.engines.vllm_load as engine

    calls = []
    monkeypatch.setattr(engine, "load_vllm", lambda *args, **kwargs: calls.append((args, kwargs)) or "handle")
    got = load_model("moe-organism", engine="vllm", tensor_parallel_size=2, dtype=torch.bfloat16, prepend_bos=False,
                     max_num_batched_tokens=16, block_size=32)
    assert got == "handle"
    assert calls == [(("moe-organism",), {"tensor_parallel_size": 2, "dtype": torch.bfloat16, "prepend_bos": False,
                                          "max_num_batched_tokens": 16, "block_size": 32})]
    with pytest.raises(ValueError, match=r"^load_model: engine='VLLM' is not known"):
        load_model("moe-organism", engine="VLLM")


def test_engine_options_on_the_hf_path_are_listed_exactly():
    with pytest.raises(ValueError, match=r"^load_model: \['tensor_parallel_size'\] apply to engine='vllm' only"):
        load_model("moe-organism", tensor_parallel_size=2)
    with pytest.raises(ValueError, match=r"^load_model: \['block_size', 'max_num_batched_tokens'\] apply to engine='vllm' only"):
        load_model("moe-organism", max_num_batched_tokens=16, block_size=32)
    with pytest.raises(ValueError, match=r"^load_model: \['block_size', 'tensor_parallel_size'\] apply"):
        load_model("moe-organism", tensor_parallel_size=3, block_size=32)


def test_a_loaded_model_is_named_canonically():
    from labkit.sources import organism_dirs

    model = load_model("MOE-Organism".lower())
    assert lab_model(model).name == "moe-organism"
    again = load_model(organism_dirs()["moe-organism"])  # the directory: the organism's name, not the path
    assert lab_model(again).name == "moe-organism"


def test_lab_model_or_none_only_for_a_backend_that_runs_forward_passes(shared_tiny_llama, tiny_tokenizer):
    from labkit.engines.vllm import VLLMModel

    assert lab_model_or_none(shared_tiny_llama) is lab_model(shared_tiny_llama)
    assert lab_model_or_none(torch.nn.Linear(2, 2)) is None and lab_model_or_none("text") is None
    handle = VLLMModel("h", None, tiny_tokenizer, shared_tiny_llama.labkit.config, prepend_bos=True,
                       tensor_parallel_size=1, max_model_len=64)
    assert lab_model_or_none(handle) is None  # the engine handle runs no forward pass in this process


# --- hooks: reprobe -----------------------------------------------------------------------------------


def test_reprobe_forgets_the_fired_hook_points_and_probes_again(tiny_llama):
    from labkit import hooks
    from labkit.backends.hooks import _index

    names = hooks.hook_names(tiny_llama)
    index = _index(tiny_llama.labkit)
    assert index.probed[0] is True
    index.sites["stale"] = object()
    hooks.reprobe(tiny_llama)
    assert index.probed[0] is False and not index.sites
    hooks.probe(tiny_llama)
    assert index.probed[0] is True and hooks.hook_names(tiny_llama) == names


# --- masks: the selection open on a router ------------------------------------------------------------


def test_active_selection_is_the_merge_of_the_open_masks(shared_tiny_olmoe):
    from labkit.backends.hf_masking import active_selection, open_selections
    from labkit.moe import ExpertMask, masked
    from labkit.moe.families import find_routers

    router = find_routers(shared_tiny_olmoe)[1].router
    assert active_selection(router) is None and open_selections(router) == []
    with masked(shared_tiny_olmoe, ExpertMask.off([(1, 2)])):
        outer = active_selection(router)
        assert outer.off.nonzero().flatten().tolist() == [2] and len(open_selections(router)) == 1
        with masked(shared_tiny_olmoe, ExpertMask.off([(1, 5)])):
            assert active_selection(router).off.nonzero().flatten().tolist() == [2, 5]
            assert len(open_selections(router)) == 2
        assert active_selection(router).off.nonzero().flatten().tolist() == [2]
    assert active_selection(router) is None


# --- routers: family table ------------------------------------------------------------------------------


def test_deepseek_style_families_carry_their_names():
    from labkit.moe.routers import FAMILIES, supported_families

    assert FAMILIES["deepseek_v3"].name == "DeepSeek-V3" and FAMILIES["glm4_moe"].name == "GLM-4.5 / 4.6"
    assert "DeepSeek-V3 ('deepseek_v3')" in supported_families()
    assert all(isinstance(f.name, str) and f.name for f in FAMILIES.values())


def test_lfm2_correction_bias_only_when_the_router_uses_it():
    from labkit.moe.routers import FAMILIES

    family = FAMILIES["lfm2_moe"]
    assert family.scheme.correction is not None
    assert family.scheme_for(SimpleNamespace(use_expert_bias=True)).correction == family.scheme.correction
    assert family.scheme_for(SimpleNamespace(use_expert_bias=False)).correction is None


def test_transformers_version_gate(monkeypatch):
    """A family routed only from a later transformers is moved to NOT_ROUTED (with the release);
    a gated type that is not a family is left alone."""
    import transformers

    from labkit.moe.routers import table as routers  # the family table module (labkit.moe.routers re-exports it)

    families, not_routed = dict(routers.FAMILIES), dict(routers.NOT_ROUTED)
    monkeypatch.setattr(routers, "FAMILIES", families)
    monkeypatch.setattr(routers, "NOT_ROUTED", not_routed)
    monkeypatch.setattr(routers, "_ROUTED_FROM", {"mixtral": "9.0", "not_a_family": "9.0"})
    monkeypatch.setattr(transformers, "__version__", "5.1.0")
    family = families["mixtral"]
    routers._gate_by_transformers_version()
    assert "mixtral" not in families
    for alias in family.model_types:
        assert not_routed[alias].startswith("routed from transformers 9.0: under the installed 5.1.0")
    assert "not_a_family" not in not_routed
    monkeypatch.setattr(transformers, "__version__", "9.0")  # new enough: nothing moves
    families["mixtral"] = family
    routers._gate_by_transformers_version()
    assert families["mixtral"] is family


# --- messages that name the caller -----------------------------------------------------------------


def test_messages_name_the_caller_and_the_fix(shared_tiny_llama):
    from labkit.cache import cache_activations
    from labkit.models import hf_model_of
    from labkit.steering import SteeringVector

    far = SteeringVector("blocks.9.hook_resid_pre", torch.ones(32), model_name="tiny-llama")
    with pytest.raises(ValueError, match=r"SteeringVector 'blocks\.9\.hook_resid_pre'"):
        with labkit.steered(shared_tiny_llama, far):
            pass
    from labkit.engines.vllm import VLLMModel

    handle = VLLMModel("h", None, shared_tiny_llama.labkit.tokenizer, shared_tiny_llama.labkit.config, prepend_bos=True,
                       tensor_parallel_size=1, max_model_len=64)
    with pytest.raises(TypeError, match=r"hf_model_of"):
        hf_model_of(handle)
    with pytest.raises(ValueError, match=r"set model\.cfg\.use_attn_result = True \(TransformerLens's switch\), "
                       r"then call labkit\.hooks\.reprobe\(model\)\."):
        cache_activations(shared_tiny_llama, ["the cat"], ["blocks.0.attn.hook_result"], progress=False)


# --- hooks survive TransformerLens's reset_hooks inside an intervention ---------------------------


def test_a_bridge_hook_survives_reset_hooks_inside_the_block(tiny_llama):
    """labkit's bridge hooks are permanent in TransformerLens's sense: a ``reset_hooks()`` (or a
    ``run_with_cache``) inside the block keeps them; labkit removes them itself at the end."""
    from labkit import hooks

    seen = []
    with hooks.attach(tiny_llama, {"blocks.1.hook_resid_pre": lambda a, site: seen.append(a.shape) or None},
                      target="bridge") as module:
        assert module is tiny_llama
        tiny_llama.reset_hooks()
        tiny_llama(torch.tensor([[0, 5, 6]]))
    assert seen == [torch.Size([1, 3, 32])]
    tiny_llama(torch.tensor([[0, 5, 6]]))
    assert len(seen) == 1


# --- generation stops at the lab's end-of-sequence ids ---------------------------------------------


def test_generation_stops_at_the_first_eos(tiny_tokenizer):
    """The twin's generate is told labkit's EOS ids: a model whose every next token is EOS runs one
    forward pass, not ``max_new_tokens`` of them (its configs name no EOS; the tokenizer's counts)."""
    from labkit.models import from_hf, hf_model_of
    from tests.conftest import tiny_llama_hf

    hf = tiny_llama_hf(tiny_tokenizer)
    with torch.no_grad():
        hf.lm_head.weight.zero_()  # uniform logits: greedy picks id 0, the tokenizer's <|endoftext|>
    hf.config.eos_token_id = None  # no EOS in the configs: labkit takes the tokenizer's
    hf.generation_config.eos_token_id = None
    model = from_hf(hf, tiny_tokenizer, name="tiny-llama")
    assert tiny_tokenizer.eos_token_id == 0
    calls = []
    handle = hf_model_of(model).register_forward_hook(lambda *a: calls.append(1))
    try:
        out = labkit.generate(model, ["the cat"], max_new_tokens=6)
    finally:
        handle.remove()
    assert out.token_ids == [[0]] and len(calls) == 1  # the completion ends with its EOS


# --- mixed batches: one row's ActAdd and another row's prompt-only vector at one hook point -------


def test_front_and_prompt_vectors_of_different_rows_at_one_hook_point(shared_tiny_llama):
    model = shared_tiny_llama
    front = labkit.actadd(model, " wedding", " ", layer=1, coefficient=6.0)
    torch.manual_seed(3)
    prompt_only = SteeringVector_("blocks.1.hook_resid_pre", 3 * torch.randn(32), positions="prompt")
    prompts = ["the cat sat on", "a dog ran"]
    batch = labkit.generate(model, prompts, steering_per_row=[[front], [prompt_only]], max_new_tokens=5)
    solo = [labkit.generate(model, [p], steering=[v], max_new_tokens=5).token_ids[0] for p, v in zip(prompts, [front, prompt_only])]
    plain = labkit.generate(model, prompts, max_new_tokens=5).token_ids
    assert batch.token_ids == solo and solo[1] != plain[1]


def SteeringVector_(hook, tensor, positions):
    from labkit.steering import SteeringVector

    return SteeringVector(hook, tensor, coefficient=1.0, positions=positions, model_name="tiny-llama")


# --- generate's keywords ---------------------------------------------------------------------------------


def test_generate_keyword_hints_and_nucleus_sampling(shared_tiny_llama):
    model = shared_tiny_llama
    with pytest.raises(ValueError, match=r"^generate: unknown keyword argument\(s\) 'top_pp' \(did you mean 'top_p'\?\); extra"):
        labkit.generate(model, ["the cat"], max_new_tokens=2, top_pp=0.5)
    with pytest.raises(ValueError, match=r"^generate: unknown keyword argument\(s\) 'qqqqzz'; extra keywords"):
        labkit.generate(model, ["the cat"], max_new_tokens=2, qqqqzz=1)
    # top_p reaches the sampler: a nucleus of ~0 mass keeps only the most likely token, i.e. greedy
    prompts = ["the cat sat", "a dog"]
    greedy = labkit.generate(model, prompts, max_new_tokens=8).token_ids
    nucleus = labkit.generate(model, prompts, max_new_tokens=8, temperature=1.0, top_p=1e-9, seed=0).token_ids
    free = labkit.generate(model, prompts, max_new_tokens=8, temperature=1.0, top_p=1.0, seed=0).token_ids
    assert nucleus == greedy and free != greedy


def test_hook_probe_value_comparison_is_relative_to_the_tensor_scale():
    """Two activations mean the same when they differ by at most 1e-4 of the reference's largest
    magnitude (+1e-6) in float32, 2e-2 in half precision; integers must be equal."""
    from labkit.backends.hooks import _same_value

    big = torch.tensor([1000.0, -3.0])
    assert _same_value(big + torch.tensor([0.09, 0.0]), big)  # 0.09 <= 1e-4 * 1000 + 1e-6
    assert not _same_value(big + torch.tensor([0.11, 0.0]), big)
    small = torch.tensor([0.001, 0.0])
    assert not _same_value(small + torch.tensor([0.0, 1e-5]), small)  # 1e-5 > 1e-4 * 0.001 + 1e-6
    assert _same_value(small + torch.tensor([0.0, 1e-6]), small)
    half = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    assert _same_value(half + 0.03, half) and not _same_value(half + 0.1, half)
    assert _same_value(torch.tensor([1, 2]), torch.tensor([1, 2])) and not _same_value(torch.tensor([1, 2]), torch.tensor([1, 3]))
    assert not _same_value(big, big.double()) and not _same_value(big, big[:1])
    assert _same_value(torch.zeros(0), torch.zeros(0))


# --- steering at a module's output (not only at a layer's input) ----------------------------------


def test_steering_at_output_hook_points_adds_where_transformer_lens_would(tiny_llama):
    """``blocks.0.hook_resid_post`` is the tensor ``blocks.1.hook_resid_pre`` is (the output of
    layer 0, the input of layer 1): the same vector there gives the same logits; and a vector at
    ``blocks.0.hook_mlp_out`` (a module output on the twin) equals TransformerLens's own
    ``run_with_hooks`` adding it at that hook point."""
    from labkit.models import hf_model_of
    from labkit.steering import SteeringVector

    torch.manual_seed(5)
    vector = torch.randn(32)
    ids = torch.tensor([tiny_llama.labkit.encode("the cat sat on the mat")])
    twin = hf_model_of(tiny_llama)

    def logits_under(hook_name):
        steering = SteeringVector(hook_name, vector, coefficient=2.0, model_name="tiny-llama")
        with labkit.steered(tiny_llama, steering), torch.no_grad():
            return twin(input_ids=ids).logits

    with torch.no_grad():
        plain = twin(input_ids=ids).logits
        lens = tiny_llama.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_mlp_out", lambda a, hook: a + 2.0 * vector)])
    post, pre = logits_under("blocks.0.hook_resid_post"), logits_under("blocks.1.hook_resid_pre")
    assert not torch.allclose(post, plain, atol=1e-3)
    torch.testing.assert_close(post, pre, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits_under("blocks.0.hook_mlp_out"), lens, rtol=1e-4, atol=1e-4)


def test_an_input_correction_bias_may_come_by_keyword():
    """Families whose router takes the correction bias as an argument (AFMoE): positional or by
    keyword, the same routing; sigmoid scores + bias choose, the unbiased scores weigh (by hand)."""
    from labkit.moe.routers import FAMILIES, route

    scheme = FAMILIES["afmoe"].scheme
    router = SimpleNamespace(top_k=2, route_scale=1.5, num_experts=6)
    torch.manual_seed(2)
    logits, hidden, bias = torch.randn(3, 6), torch.randn(3, 4), torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 5.0])
    positional = route(scheme, router, logits, args=(hidden, bias))
    for name in ("expert_bias", "e_score_correction_bias"):
        keyword = route(scheme, router, logits, args=(hidden,), kwargs={name: bias})
        assert torch.equal(keyword[0], positional[0]) and torch.equal(keyword[1], positional[1])
    scores = torch.sigmoid(logits)
    chosen = torch.topk(scores + bias, 2, dim=-1).indices
    assert (chosen == 5).any(-1).all()  # the bias pulls expert 5 in everywhere
    assert sorted(map(sorted, positional[0].tolist())) == sorted(map(sorted, chosen.tolist()))
    weights = scores.gather(-1, positional[0])
    torch.testing.assert_close(positional[1].float(), 1.5 * weights / weights.sum(-1, keepdim=True))
    with pytest.raises(ValueError, match="was called without its correction-bias argument"):
        route(scheme, router, logits, args=(hidden,), kwargs={})


def test_deepseek_v2_group_limited_pick_outside_the_groups_weighs_zero():
    """DeepSeek-V2 (group-limited greedy) weighs its picks with the group-masked scores: when a
    mask leaves fewer experts in the chosen group than top-k, the extra pick comes from outside
    the chosen groups, with weight 0 -- as transformers' ``tmp_scores`` gives it (by hand)."""
    from labkit.interventions import Selection
    from labkit.moe.routers import FAMILIES, route

    router = SimpleNamespace(top_k=2, num_group=2, topk_group=1, routed_scaling_factor=2.0,
                             topk_method="group_limited_greedy", num_experts=4)
    scheme = FAMILIES["deepseek_v2"].scheme_for(router)
    logits = torch.tensor([[4.0, 3.0, 1.0, 0.5]])
    scores = torch.softmax(logits, -1)
    off = torch.tensor([False, True, False, False])
    indices, weights = route(scheme, router, logits, Selection(off=off, on=torch.zeros(4, dtype=torch.bool)))
    picks = dict(zip(indices[0].tolist(), weights[0].tolist()))
    assert 0 in picks and len(picks) == 2 and 1 not in picks
    (outside,) = set(picks) - {0}
    assert outside in (2, 3) and picks[outside] == 0.0
    assert picks[0] == pytest.approx(2.0 * float(scores[0, 0]))


def test_objects_labkit_did_not_make_and_unrouted_families_are_refused_with_the_reason():
    from labkit.backends import backend_of
    from labkit.moe.routers import NOT_ROUTED, family_of_config

    for thing in (torch.nn.Linear(2, 2), SimpleNamespace(config=object())):
        with pytest.raises(TypeError, match=rf"^{type(thing).__name__} was not loaded by labkit"):
            backend_of(thing)
    model_type, why = next(iter(NOT_ROUTED.items()))
    with pytest.raises(ValueError, match=rf"labkit does not route {model_type!r}: {re.escape(why)}\."):
        family_of_config(SimpleNamespace(model_type=model_type, architectures=["SomeForCausalLM"]))
