"""The vLLM engine's driver side without an engine: the handle's facts, its tokenisation, the
hook-point mapping, the CPU core split and the routing settings sent to the workers (issue 22,
mutation survivors of labkit/engines/). Each value is checked against an independent
computation (the Hugging Face bridge on the same tokenizer, the config, a by-hand split).

No engine is started, so these run in a second; they are marked ``vllm`` because they belong to
the engine path (``make test`` runs them in the engine's environment, and ``make mutate-engine``
under the mutation harness). Only ``vllm``'s ``SamplingParams`` is imported, by the stub tests.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import make_tokenizer, tiny_llama_hf

pytestmark = pytest.mark.vllm


def _handle(config, tokenizer, *, prepend_bos=True, tp=1, max_model_len=48, llm=None, generation_config=None):
    from labkit.engines.vllm import VLLMModel

    return VLLMModel("tiny-handle", llm, tokenizer, config, prepend_bos=prepend_bos, tensor_parallel_size=tp,
                     max_model_len=max_model_len, generation_config=generation_config)


def _bos_tokenizer(*, bos: bool, eos: bool):
    """The tiny tokenizer, made to prepend BOS and / or append EOS by itself."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    base = make_tokenizer()
    backend = base.backend_tokenizer
    special = base.convert_tokens_to_ids("<|endoftext|>")
    template = ("<|endoftext|> " if bos else "") + "$A" + (" <|endoftext|>" if eos else "")
    backend.post_processor = TemplateProcessing(single=template, special_tokens=[("<|endoftext|>", special)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


# --- the handle's facts ---------------------------------------------------------------------------


def test_handle_facts_come_from_its_config_and_arguments():
    tokenizer = make_tokenizer()
    config = tiny_llama_hf(tokenizer).config
    handle = _handle(config, tokenizer, tp=2, max_model_len=40, prepend_bos=False)
    assert handle.config is config  # the engine keeps the config it was started with
    assert vars(handle.cfg) == {
        "n_layers": config.num_hidden_layers, "d_model": config.hidden_size, "n_ctx": 40,
        "default_prepend_bos": False, "tokenizer_prepends_bos": False, "tokenizer_appends_eos": False,
    }
    assert handle.n_ctx == 40 and handle.tensor_parallel_size == 2 and handle.vocab_size == config.vocab_size
    assert repr(handle) == "VLLMModel('tiny-handle', tensor_parallel_size=2)"
    assert handle.last_cached_tokens == [] and handle.open_selections(0) == []
    with pytest.raises(ValueError, match=r"^residual_activations: prompt 0 is 41 tokens; the model's context window is 40"):
        handle.check_context([41], caller="residual_activations")


@pytest.mark.parametrize("bos, eos", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("prepend_bos", [True, False])
def test_encode_equals_the_bridge_on_the_same_tokenizer(bos, eos, prepend_bos):
    """One BOS rule on both paths, whatever the tokenizer adds by itself: by hand, the ids are the
    tokenizer's plain ids, with one BOS in front iff ``prepend_bos``, and no EOS."""
    from labkit.models import from_hf

    tokenizer = _bos_tokenizer(bos=bos, eos=eos)
    special = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    handle = _handle(tiny_llama_hf(make_tokenizer()).config, tokenizer, prepend_bos=prepend_bos)
    assert (handle.cfg.tokenizer_prepends_bos, handle.cfg.tokenizer_appends_eos) == (bos, eos)
    bridge = from_hf(tiny_llama_hf(make_tokenizer()), tokenizer, prepend_bos=prepend_bos)
    for prompt in ("the cat sat", "a"):
        plain = tokenizer(prompt, add_special_tokens=False).input_ids
        expected = ([special] if prepend_bos else []) + plain
        assert handle.encode(prompt) == expected == bridge.labkit.encode(prompt)
        assert handle.encode(prompt, prepend_bos=not prepend_bos) == ([special] if not prepend_bos else []) + plain


def test_cpu_cores_split_into_equal_groups(monkeypatch):
    from labkit.engines import vllm_load as engine

    cases = [([0, 1], 2, "0|1"), ([3, 0, 2, 1], 2, "0,1|2,3"), ([0, 1, 2, 3, 4], 2, "0,1|2,3"),
             ([5, 6, 7], 1, "5,6,7"), ([0, 1, 2, 3, 4, 5], 3, "0,1|2,3|4,5")]
    for cores, tp, expected in cases:
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, cores=cores: set(cores))
        assert engine._cpu_thread_binding(tp) == expected
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 on the CPU needs at least that many cores; this process may use 2 \(\[0, 1\]\)"):
        engine._cpu_thread_binding(3)


# --- the routing settings the workers receive -----------------------------------------------------


def test_router_settings_of_a_routed_and_a_dense_model():
    from labkit.engines.vllm_router import ENGINE_ROUTING_KIND, router_settings
    from tests.moe_fixtures import tiny_moe_hf

    tokenizer = make_tokenizer()
    model = tiny_moe_hf("qwen2_moe", tokenizer)  # MoE on every second layer (decoder_sparse_step=2)
    config = model.config
    settings = router_settings(SimpleNamespace(config=config, skeleton=model))
    json.dumps(settings)  # JSON-ready: it crosses the process boundary as text
    moe_layers = [i for i in range(config.num_hidden_layers) if (i + 1) % config.decoder_sparse_step == 0]
    assert settings["kind"] == ENGINE_ROUTING_KIND and settings["model_type"] == "qwen2_moe"
    assert settings["routed"] is True and settings["reason"] == ""
    assert sorted(settings["layers"], key=int) == [str(i) for i in moe_layers]
    for entry in settings["layers"].values():
        assert entry["n_experts"] == config.num_experts and entry["top_k"] == config.num_experts_per_tok
        assert entry["attrs"]["norm_topk_prob"] is False
        assert all(isinstance(v, (bool, int, float, str, type(None))) for v in entry["attrs"].values())

    dense = tiny_llama_hf(tokenizer)
    settings = router_settings(SimpleNamespace(config=dense.config, skeleton=dense))
    assert settings["kind"] == ENGINE_ROUTING_KIND and settings["model_type"] == "llama"
    assert settings["routed"] is False and settings["layers"] == {}
    assert "llama" in settings["reason"] and len(settings["reason"]) > 20


# --- the driver's requests, on a stub engine ------------------------------------------------------


class _StubLLM:
    """Records what the driver sends; answers like vLLM with fixed token ids per request."""

    def __init__(self, answers, *, budget=64, max_seqs=8):
        self.answers = answers
        self.calls = []
        self.llm_engine = SimpleNamespace(
            vllm_config=SimpleNamespace(scheduler_config=SimpleNamespace(max_num_batched_tokens=budget, max_num_seqs=max_seqs),
                                        parallel_config=SimpleNamespace(data_parallel_size=1, enable_expert_parallel=False)),
            engine_core=SimpleNamespace(shutdown=lambda: self.calls.append(("shutdown",))),
        )

    def collective_rpc(self, method, args=()):
        self.calls.append((method, args))
        return [b""] if method.startswith("labkit_collect") else [None]

    def generate(self, prompts, params, use_tqdm=True):
        assert use_tqdm is False  # no progress bar per engine call inside labkit's own loops
        self.calls.append(("generate", prompts, params))
        return [SimpleNamespace(num_cached_tokens=i, outputs=[SimpleNamespace(token_ids=list(self.answers[i]))])
                for i in range(len(prompts))]


def test_generate_ids_sends_each_row_its_interventions_and_sampling(tiny_tokenizer):
    """Per row: the prompt ids, a cache salt and extra-args key only where an intervention applies
    (the same key for the same interventions, registered once, released after), SamplingParams
    (greedy zeroes top_p / top_k), completions trimmed after EOS."""
    pytest.importorskip("vllm")
    from labkit.steering import SteeringVector

    config = tiny_llama_hf(tiny_tokenizer).config
    eos = tiny_tokenizer.eos_token_id
    llm = _StubLLM([[5, 6, eos, 9], [7], [8, eos]])
    handle = _handle(config, tiny_tokenizer, llm=llm, generation_config=SimpleNamespace(eos_token_id=eos))
    vector = SteeringVector("blocks.1.hook_resid_pre", torch.ones(config.hidden_size), model_name="tiny-handle")
    rows = [[0, 11, 12], [0, 13], [0, 14, 15, 16]]
    out = handle.generate_ids(rows, max_new_tokens=4, temperature=0.0, top_p=0.5, top_k=3,
                              steering_per_row=[[vector], [], [vector]], min_new_tokens=2)
    assert out == [[5, 6, eos], [7], [8, eos]]
    assert handle.last_cached_tokens == [0, 1, 2]
    methods = [c[0] for c in llm.calls]
    assert methods == ["labkit_register", "generate", "labkit_release"]
    key = llm.calls[0][1][0]
    _, prompts, params = llm.calls[1]
    assert [p["prompt_token_ids"] for p in prompts] == rows
    assert [p.get("cache_salt") for p in prompts] == [key, None, key]
    assert [p.extra_args for p in params] == [{"labkit": key}, None, {"labkit": key}]
    for p in params:
        assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_tokens) == (4, 0.0, 1.0, 0, 2)
    assert json.loads(llm.calls[2][1][0]) == [key]
    spec = json.loads(llm.calls[0][1][1])
    assert spec["steering"][0]["layer"] == 1 and spec["trace"] is False

    llm.calls.clear()
    handle.generate_ids([[0, 11]], max_new_tokens=2, temperature=0.7, top_p=0.5, top_k=3, seed=4)
    (_, prompts, params), = llm.calls  # no intervention: nothing registered or released
    assert "cache_salt" not in prompts[0] and params[0].extra_args is None
    assert (params[0].temperature, params[0].top_p, params[0].top_k, params[0].seed) == (0.7, 0.5, 3, 4)


def test_seeded_sampling_refused_only_when_the_prompts_exceed_one_step(tiny_tokenizer):
    pytest.importorskip("vllm")
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the refusal applies to vLLM's CPU worker only")
    config = tiny_llama_hf(tiny_tokenizer).config
    llm = _StubLLM([[1]] * 3, budget=6, max_seqs=2)
    handle = _handle(config, tiny_tokenizer, llm=llm)
    handle.generate_ids([[0, 1, 2], [0, 1, 2]], max_new_tokens=1, temperature=1.0, seed=0)  # 6 tokens = the budget
    handle.generate_ids([[0] * 7], max_new_tokens=1, temperature=1.0)  # no seed: fine
    handle.generate_ids([[0] * 7], max_new_tokens=1, temperature=0.0, seed=0)  # greedy: fine
    with pytest.raises(ValueError, match=r"these 2 prompts hold 7 tokens, the step budget is max_num_batched_tokens=6 \(max_num_seqs=2\)"):
        handle.generate_ids([[0, 1, 2], [0, 1, 2, 3]], max_new_tokens=1, temperature=1.0, seed=0)
    with pytest.raises(ValueError, match=r"these 3 prompts hold 3 tokens"):
        handle.generate_ids([[0], [0], [0]], max_new_tokens=1, temperature=1.0, seed=0)


def test_close_shuts_the_engine_down_once(tiny_tokenizer):
    llm = _StubLLM([])
    handle = _handle(tiny_llama_hf(tiny_tokenizer).config, tiny_tokenizer, llm=llm)
    with handle as same:
        assert same is handle
    handle.close()
    assert llm.calls == [("shutdown",)]


# --- the worker's install, on a stub model runner ---------------------------------------------------


class _Layer(torch.nn.Module):
    hidden_size = 8

    def forward(self, positions, hidden_states, residual):
        return hidden_states, residual


def test_worker_install_reports_what_this_rank_holds_and_hooks_once():
    """``labkit_install`` on a stub runner (a dense 3-layer model, layers 1..2 on this rank): one
    steering pre-hook per held layer plus the step observer, and the info the driver may read."""
    from labkit.engines.vllm_worker import LabkitWorkerExtension

    inner = torch.nn.Module()
    inner.layers = torch.nn.ModuleList([_Layer() for _ in range(3)])
    inner.start_layer, inner.end_layer = 1, 3
    model = torch.nn.Module()
    model.model = inner
    worker = LabkitWorkerExtension()
    worker.model_runner = SimpleNamespace(model=model)
    settings = json.dumps({"routed": False, "model_type": "llama", "layers": {}})
    info = json.loads(worker.labkit_install(settings))
    assert {k: info[k] for k in ("n_layers", "layers_here", "moe_layers", "d_model")} == {
        "n_layers": 3, "layers_here": [1, 3], "moe_layers": [], "d_model": 8}
    assert [len(layer._forward_pre_hooks) for layer in inner.layers] == [0, 1, 1]
    assert len(model._forward_pre_hooks) == 1
    assert json.loads(worker.labkit_install(settings)) == info  # a second install hooks nothing more
    assert [len(layer._forward_pre_hooks) for layer in inner.layers] == [0, 1, 1]


# --- where the residual stream enters a layer (every signature vLLM uses) --------------------------


class _PreNorm(torch.nn.Module):
    def forward(self, positions, hidden_states, residual):
        return hidden_states


class _GptOss(torch.nn.Module):
    def forward(self, hidden_states, positions, residual):
        return hidden_states


class _NoResidual(torch.nn.Module):
    def forward(self, positions, hidden_states):
        return hidden_states


def test_layer_inputs_find_read_and_replace_the_stream_by_name():
    from labkit.engines.vllm_layers import LayerInputs

    h, r, p = torch.full((2, 3), 1.0), torch.full((2, 3), 10.0), torch.arange(2)
    new = torch.full((2, 3), 5.0)
    pre = LayerInputs(_PreNorm(), 0)
    assert pre.names == ["positions", "hidden_states", "residual"] and pre.has_residual
    assert pre.get((p, h, r), {}, "hidden_states") is h and pre.get((p, h, r), {}, "residual") is r
    assert pre.get((p, h), {"residual": r}, "residual") is r and pre.get((p, h), {}, "residual") is None
    assert torch.equal(pre.stream((p, h, r), {}), h + r) and pre.stream((p, h, None), {}) is h
    args, kwargs = pre.replace((p, h, r), {}, "hidden_states", new)
    assert args[0] is p and args[1] is new and args[2] is r and kwargs == {}
    args, kwargs = pre.replace((p,), {"hidden_states": h, "residual": r}, "hidden_states", new)
    assert args == (p,) and kwargs["hidden_states"] is new and kwargs["residual"] is r
    args, kwargs = pre.replace((p,), {}, "hidden_states", new)  # not passed yet: becomes a keyword
    assert args == (p,) and kwargs == {"hidden_states": new}

    gpt = LayerInputs(_GptOss(), 1)
    assert gpt.get((h, p, r), {}, "hidden_states") is h and torch.equal(gpt.stream((h, p, r), {}), h + r)
    args, _ = gpt.replace((h, p, r), {}, "hidden_states", new)
    assert args[0] is new and args[1] is p and args[2] is r

    bare = LayerInputs(_NoResidual(), 2)
    assert not bare.has_residual and bare.stream((p, h), {}) is h
    assert bare.get((p, h), {}, "residual") is None
    with pytest.raises(RuntimeError, match=r"decoder layer 4 \(Linear\) takes \['input'\], with no hidden_states"):
        LayerInputs(torch.nn.Linear(2, 2), 4)


# --- the routing seam, on a stub fused-MoE runner ---------------------------------------------------


class _Router:
    def __init__(self, n_experts, bias=None):
        self.global_num_experts = n_experts
        self.e_score_correction_bias = bias

    def _compute_routing(self, hidden_states, router_logits, indices_type):
        raise AssertionError("vLLM's own routing must be replaced")


def _runner(n_experts=8, scale=1.0, monolithic=False, bias=None):
    return SimpleNamespace(router=_Router(n_experts, bias), routed_scaling_factor=scale,
                           routed_experts=SimpleNamespace(quant_method=SimpleNamespace(is_monolithic=monolithic)))


def _softmax_topk_by_hand(logits, k, off=None):
    probs = torch.softmax(logits.float(), -1)
    ranked = probs if off is None else probs.masked_fill(off, -1.0)
    indices = torch.topk(ranked, k, dim=-1).indices
    return indices, probs.gather(-1, indices)


def test_installed_routing_is_the_family_rule_per_request_mask_and_trace():
    """OLMoE (softmax, top-2, no renormalisation) on 4 tokens: unmasked rows get softmax top-2 by
    hand; rows under a mask lose the switched-off experts to the next best with their natural
    weights; traced rows are recorded with their positions; the kernel gets float32 weights
    divided by the runner's scaling factor and int32 ids."""
    from labkit.engines.vllm_router import install_routing
    from labkit.interventions import Selection
    from labkit.moe.routers import FAMILIES

    family = FAMILIES["olmoe"]
    entry = {"n_experts": 8, "top_k": 2, "attrs": {"norm_topk_prob": False, "num_experts": 8}}
    runner = _runner(scale=2.0)
    off = torch.zeros(8, dtype=torch.bool)
    off[[0, 1, 2]] = True
    plan = SimpleNamespace(masks={5: [(torch.tensor([1, 3, 9]), Selection(off=off, on=torch.zeros(8, dtype=torch.bool)))]},
                           traced=[("k1", torch.tensor([0, 3, 7]), torch.tensor([10, 13, 17]))])
    records = []
    install_routing(family, entry, runner, lambda: plan, lambda *a: records.append(a), 5)
    torch.manual_seed(0)
    logits = torch.randn(4, 8) * 3
    logits[:, :3] += 5  # experts 0..2 win unmasked
    weights, ids = runner.router._compute_routing(torch.randn(4, 16), logits, torch.int32)
    plain_i, plain_w = _softmax_topk_by_hand(logits, 2)
    masked_i, masked_w = _softmax_topk_by_hand(logits, 2, off)
    expected_i, expected_w = plain_i.clone(), plain_w.clone()
    expected_i[[1, 3]], expected_w[[1, 3]] = masked_i[[1, 3]], masked_w[[1, 3]]
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32 and ids.is_contiguous()
    assert torch.equal(ids.long(), expected_i)
    torch.testing.assert_close(weights, expected_w / 2.0)
    ((key, layer, positions, rec_i, rec_w, rec_logits),) = records
    assert (key, layer) == ("k1", 5) and positions.tolist() == [10, 13]  # row 7 is past this step's 4 tokens
    assert torch.equal(rec_i.long(), expected_i[[0, 3]])
    torch.testing.assert_close(rec_w.float(), expected_w[[0, 3]])  # the family's own weights, not divided
    assert torch.equal(rec_logits, logits[[0, 3]])

    runner = _runner(scale=1.0)
    install_routing(family, entry, runner, lambda: SimpleNamespace(masks={}, traced=[]), lambda *a: None, 0)
    weights, ids = runner.router._compute_routing(torch.randn(4, 16), logits, torch.int32)
    torch.testing.assert_close(weights, plain_w)  # factor 1: nothing divided


def test_installed_routing_refusals():
    from labkit.engines.vllm_router import install_routing
    from labkit.moe.routers import FAMILIES

    entry = {"n_experts": 8, "top_k": 2, "attrs": {"norm_topk_prob": False}}
    with pytest.raises(RuntimeError, match=r"layer 3's MoE kernel \(SimpleNamespace\) is monolithic"):
        install_routing(FAMILIES["olmoe"], entry, _runner(monolithic=True), lambda: None, lambda *a: None, 3)
    with pytest.raises(RuntimeError, match=r"layer 2: vLLM's router serves 9 experts, the model's config 8"):
        install_routing(FAMILIES["olmoe"], entry, _runner(n_experts=9), lambda: None, lambda *a: None, 2)
    ds = {"n_experts": 8, "top_k": 2, "attrs": {"norm_topk_prob": True, "n_group": 1, "topk_group": 1,
                                                 "routed_scaling_factor": 1.0}}
    with pytest.raises(RuntimeError, match=r"the DeepSeek-V3 family chooses experts with a correction bias, but vLLM's router \(_Router\) holds none"):
        install_routing(FAMILIES["deepseek_v3"], ds, _runner(), lambda: None, lambda *a: None, 1)


def test_correction_bias_reaches_the_family_proxy_at_its_attribute_path():
    from labkit.engines.vllm_router import _proxy
    from labkit.moe.routers import FAMILIES

    bias = torch.arange(8.0)
    proxy, correction = _proxy(FAMILIES["ernie4_5_moe"], {"top_k": "2", "attrs": {"norm_min": 1e-12}}, _Router(8, bias))
    assert correction is bias and proxy.moe_statics.e_score_correction_bias is bias
    assert proxy.top_k == 2 and proxy.norm_min == 1e-12
    proxy, correction = _proxy(FAMILIES["afmoe"], {"top_k": 4, "attrs": {}}, _Router(8, bias))
    assert correction is bias and not hasattr(proxy, "e_score_correction_bias")  # "input": passed, not set
    proxy, correction = _proxy(FAMILIES["olmoe"], {"top_k": 2, "attrs": {"norm_topk_prob": True}}, _Router(8, bias))
    assert correction is None and vars(proxy) == {"norm_topk_prob": True, "top_k": 2}


def test_moe_runners_are_found_once_in_a_layer():
    from labkit.engines.vllm_router import find_moe_runners

    class Runner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.router = _Router(8)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = Runner()

    layer = torch.nn.Module()
    layer.mlp = Block()
    layer.other = torch.nn.Linear(2, 2)
    found = find_moe_runners(layer)
    assert found == [layer.mlp.experts]
    plain = SimpleNamespace(block_sparse_moe=SimpleNamespace(experts=SimpleNamespace(router=_Router(4))))
    assert find_moe_runners(plain) == [plain.block_sparse_moe.experts]
    assert find_moe_runners(torch.nn.Linear(2, 2)) == [] and find_moe_runners(SimpleNamespace()) == []


def test_a_router_that_states_no_expert_count_is_taken_at_the_config_count():
    from labkit.engines.vllm_router import install_routing
    from labkit.moe.routers import FAMILIES

    runner = _runner()
    del runner.router.global_num_experts
    runner.routed_experts = SimpleNamespace(quant_method=SimpleNamespace())  # no is_monolithic: modular
    entry = {"n_experts": 8, "top_k": 2, "attrs": {"norm_topk_prob": False}}
    install_routing(FAMILIES["olmoe"], entry, runner, lambda: SimpleNamespace(masks={}, traced=[]), lambda *a: None, 0)
    logits = torch.randn(2, 8)
    weights, ids = runner.router._compute_routing(torch.randn(2, 4), logits, torch.int32)
    indices, expected = _softmax_topk_by_hand(logits, 2)
    assert torch.equal(ids.long(), indices) and torch.allclose(weights, expected)


def test_masked_rows_of_an_input_cast_family_get_weights_in_the_hidden_dtype():
    """Cohere2-MoE (softmax of the chosen logits, weights cast to the input's dtype): a masked
    row's weights are computed from its hidden states' dtype too -- by hand, softmax over the
    two best non-masked logits."""
    from labkit.engines.vllm_router import install_routing
    from labkit.interventions import Selection
    from labkit.moe.routers import FAMILIES

    entry = {"n_experts": 8, "top_k": 2, "attrs": {"expert_selection_fn": "softmax", "norm_topk_prob": False}}
    off = torch.zeros(8, dtype=torch.bool)
    off[0] = True
    plan = SimpleNamespace(masks={0: [(torch.tensor([1]), Selection(off=off, on=torch.zeros(8, dtype=torch.bool)))]}, traced=[])
    runner = _runner()
    install_routing(FAMILIES["cohere2_moe"], entry, runner, lambda: plan, lambda *a: None, 0)
    logits = torch.tensor([[5.0, 4.0, 3.0, 0, 0, 0, 0, 0], [5.0, 4.0, 3.0, 0, 0, 0, 0, 0]])
    weights, ids = runner.router._compute_routing(torch.randn(2, 4, dtype=torch.bfloat16), logits, torch.int32)
    assert ids.tolist() == [[0, 1], [1, 2]]
    expected = torch.softmax(torch.tensor([5.0, 4.0]), -1).to(torch.bfloat16).float()
    torch.testing.assert_close(weights, torch.stack([expected, expected]))  # 4,3 differ by 1 as 5,4 do


# --- the workers' records, collected ------------------------------------------------------------------


def test_collected_records_are_sorted_by_position_and_a_repeated_position_keeps_its_last_record():
    """Records arrive per step (prefill chunks, recomputation after a preemption); the blob holds
    each position once, sorted, with its last record. A key with no records gives nothing."""
    from safetensors.torch import load

    from labkit.engines.vllm_worker import LabkitWorkerExtension

    worker = LabkitWorkerExtension()
    first, second = torch.tensor([2, 0]), torch.tensor([1, 2])
    acts = [torch.tensor([[2.0], [0.0]]), torch.tensor([[1.0], [22.0]])]
    idx = [torch.tensor([[5, 6], [1, 2]]), torch.tensor([[3, 4], [7, 0]])]
    weights = [torch.tensor([[0.5, 0.5], [0.9, 0.1]]), torch.tensor([[0.6, 0.4], [0.7, 0.3]])]
    logits = [torch.randn(2, 8), torch.randn(2, 8)]
    empty = (torch.zeros(0, dtype=torch.long), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), torch.zeros(0, 8))
    worker._labkit = {
        "captures": {"a": {3: [(first, acts[0]), (second, acts[1])]}},
        "traces": {"a": {3: [(first, idx[0], weights[0], logits[0]), (second, idx[1], weights[1], logits[1])]},
                   "e": {1: [empty]}},
    }
    traces = load(worker.labkit_collect_traces(json.dumps(["a", "e"])))
    assert traces["0.position"].tolist() == [0, 1, 2]
    assert traces["0.topk_indices.3"].tolist() == [[1, 2], [3, 4], [7, 0]] and traces["0.topk_indices.3"].dtype == torch.int64
    torch.testing.assert_close(traces["0.topk_weights.3"], torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3]]))
    torch.testing.assert_close(traces["0.router_logits.3"], torch.stack([logits[0][1], logits[1][0], logits[1][1]]))
    assert traces["1.position"].numel() == 0 and traces["1.topk_indices.1"].shape == (0, 2)
    assert worker.labkit_collect_traces(json.dumps(["x"])) == b""


def test_masks_refused_under_data_or_expert_parallel_dispatch(tiny_tokenizer):
    llm = _StubLLM([])
    handle = _handle(tiny_llama_hf(tiny_tokenizer).config, tiny_tokenizer, llm=llm)
    handle.routing = {"routed": True}
    parallel = llm.llm_engine.vllm_config.parallel_config
    handle.check_mask_dispatch("masked")  # dp=1, no expert parallel: fine
    for dp, ep in ((2, False), (1, True)):
        parallel.data_parallel_size, parallel.enable_expert_parallel = dp, ep
        with pytest.raises(ValueError, match=rf"data_parallel_size={dp}, enable_expert_parallel={ep}"):
            handle.check_mask_dispatch("masked")
        handle.check_mask_dispatch("trace_routing")  # traces are per token: fine
    llm.llm_engine.vllm_config.parallel_config = SimpleNamespace()  # an older config without the fields
    handle.check_mask_dispatch("masked")


# --- load_vllm's arguments to vllm.LLM, with a stub engine class ------------------------------------


def test_load_vllm_starts_the_engine_with_labkits_settings(monkeypatch):
    """What ``load_vllm`` hands ``vllm.LLM`` and the handle it returns, on the shipped organism
    (config read from disk): float32, eager, TP, the context window from the config (at most
    4096), labkit's worker extension, seed 0 unless given, the caller's engine keywords; the
    workers are installed with the routing settings; the BOS rule given wins over the organism's."""
    pytest.importorskip("vllm")
    import labkit.engines.vllm_load as engine
    from labkit.sources import resolve_source
    from transformers import AutoConfig

    started = []

    class LLM:
        def __init__(self, **kwargs):
            started.append(kwargs)
            self.rpc = []

        def collective_rpc(self, method, args=()):
            self.rpc.append((method, args))
            return [json.dumps({"rank": 0})]

    monkeypatch.setattr(engine, "_vllm", lambda: SimpleNamespace(LLM=LLM))
    config = AutoConfig.from_pretrained(resolve_source("moe-organism"))
    handle = engine.load_vllm("moe-organism", prepend_bos=True, max_num_batched_tokens=16)
    (kwargs,) = started
    window = min(config.max_position_embeddings, 4096)
    assert kwargs["dtype"] == "float32" and kwargs["enforce_eager"] is True and kwargs["tensor_parallel_size"] == 1
    assert kwargs["max_model_len"] == window == handle.n_ctx and kwargs["seed"] == 0
    assert kwargs["worker_extension_cls"] == "labkit.engines.vllm_worker.LabkitWorkerExtension"
    assert kwargs["max_num_batched_tokens"] == 16 and kwargs["model"] == kwargs["tokenizer"]
    assert handle.cfg.default_prepend_bos is True and handle.name == "moe-organism"
    (install,) = handle.llm.rpc
    assert install[0] == "labkit_install" and json.loads(install[1][0]) == handle.routing and handle.routing["routed"]
    assert handle.layout == [{"rank": 0}]  # what each rank reported
    started.clear()
    other = engine.load_vllm("moe-organism", max_model_len=32, seed=5)
    assert started[0]["max_model_len"] == 32 == other.n_ctx and started[0]["seed"] == 5
    assert other.cfg.default_prepend_bos is False  # the organism's labkit.json says no BOS


# --- activation reads (labkit/engines/vllm_capture.py, this round's sample) -----------------------


def _reading_handle(model_type: str = "llama"):
    """A handle with no engine: one layer layout with every site, tensor parallelism only."""
    tokenizer = make_tokenizer()
    config = tiny_llama_hf(tokenizer).config
    config.model_type = model_type
    parallel = SimpleNamespace(data_parallel_size=1, enable_expert_parallel=False)
    handle = _handle(config, tokenizer, llm=SimpleNamespace(llm_engine=SimpleNamespace(vllm_config=SimpleNamespace(parallel_config=parallel))))
    every = ["hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out"]
    handle.layout = [{"layer_classes": ["LlamaDecoderLayer"], "sites": {str(i): every for i in range(config.num_hidden_layers)}}]
    return handle


def test_points_inside_a_block_are_refused_outside_the_checked_families():
    """FlexOlmo's blocks normalise the attention output before adding it: its attention child's
    output is not TransformerLens's hook_attn_out, so reading or steering there is refused."""
    from labkit.engines.vllm_capture import engine_reads

    for point in ("hook_attn_out", "hook_mlp_out", "hook_resid_mid"):
        with pytest.raises(ValueError, match="is not served on the vLLM engine for 'flex_olmo' models"):
            engine_reads(_reading_handle("flex_olmo"), f"blocks.1.{point}", "cache_activations")
        assert engine_reads(_reading_handle("olmoe"), f"blocks.1.{point}", "t")[1] == point
    with pytest.raises(ValueError, match="'flex_olmo' models"):
        _reading_handle("flex_olmo").steering_site("blocks.0.hook_mlp_out", "steered")
    assert engine_reads(_reading_handle("flex_olmo"), "blocks.1.hook_resid_post", "t") == (1, "hook_resid_post", ((1, "hook_resid_post"),))


def test_a_position_the_workers_did_not_record_is_an_error_naming_the_hook_point(monkeypatch):
    """The workers' records are checked before anything is returned: a missing position (a token
    that skipped the layer) raises, naming the caller and the hook point."""
    import labkit.engines.vllm_capture as capture

    handle = _reading_handle("olmoe")
    records = {"0.position.1.hook_resid_pre": torch.tensor([0, 2]), "0.value.1.hook_resid_pre": torch.zeros(2, 4)}
    monkeypatch.setattr(capture, "prefill_records", lambda *a, **k: (records, {}))
    with pytest.raises(RuntimeError, match=r"cache_activations: .* at blocks\.1\.hook_resid_pre, expected \[0, 1, 2\]"):
        capture.capture_activations(handle, [[5, 6, 7]], [[0, 1, 2]], ["blocks.1.hook_resid_pre"])
    records["0.value.1.hook_resid_pre"] = torch.arange(8.0).reshape(2, 4)  # the workers' rows for positions 0 and 2
    got = capture.capture_activations(handle, [[5, 6, 7]], [[2, 0]], ["blocks.1.hook_resid_pre"])["blocks.1.hook_resid_pre"]
    assert torch.equal(got, torch.arange(8.0).reshape(2, 4)[[1, 0]])  # back in the caller's order of positions


def test_generation_keywords_reach_vllm_and_each_unsupported_option_is_refused_alone(tiny_tokenizer):
    pytest.importorskip("vllm")
    config = tiny_llama_hf(tiny_tokenizer).config
    llm = _StubLLM([[5, 6]])
    handle = _handle(config, tiny_tokenizer, llm=llm, generation_config=SimpleNamespace(eos_token_id=tiny_tokenizer.eos_token_id))
    handle.generate_ids([[0, 11]], max_new_tokens=2, repetition_penalty=1.3)
    (_, _prompts, params), = llm.calls
    assert params[0].repetition_penalty == pytest.approx(1.3)
    with pytest.raises(ValueError, match="takes no streamer"):
        handle.generate_ids([[0, 11]], max_new_tokens=2, streamer=object())  # use_cache left True
    with pytest.raises(ValueError, match="takes no streamer"):
        handle.generate_ids([[0, 11]], max_new_tokens=2, use_cache=False)
    with pytest.raises(ValueError, match=r"\['num_beams'\] are not supported"):
        handle.generate_ids([[0, 11]], max_new_tokens=2, num_beams=2)


def test_load_vllm_dtype_parallel_size_and_cpu_thread_binding(monkeypatch):
    """bfloat16 reaches vLLM by its name; a bad TP size is refused before vLLM is touched; on a CPU
    a TP>1 engine gets this process's cores split per rank unless the caller bound them."""
    pytest.importorskip("vllm")
    import labkit.engines.vllm_load as engine

    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="tensor_parallel_size must be an int ≥ 1"):
            engine.load_vllm("moe-organism", tensor_parallel_size=bad)
    started = []

    class LLM:
        def __init__(self, **kwargs):
            started.append((kwargs, os.environ.get("VLLM_CPU_OMP_THREADS_BIND")))

        def collective_rpc(self, method, args=()):
            return [json.dumps({"rank": 0})]

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("TP=2 thread binding needs two cores")
    monkeypatch.setattr(engine, "_vllm", lambda: SimpleNamespace(LLM=LLM))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "")  # recorded, so the test's end restores the original state
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    handle = engine.load_vllm("moe-organism", dtype=torch.bfloat16)
    assert started[-1] == (started[-1][0], None) and started[-1][0]["dtype"] == "bfloat16" and handle.dtype == torch.bfloat16
    assert handle.generation_config is not None and handle.generation_config.eos_token_id is not None
    engine.load_vllm("moe-organism", tensor_parallel_size=2)  # the organism's 4 heads divide by 2
    assert started[-1][1] == engine._cpu_thread_binding(2)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "1|0")
    engine.load_vllm("moe-organism", tensor_parallel_size=2)
    assert started[-1][1] == "1|0"  # the caller's binding is kept


def test_load_vllm_without_a_generation_config_file_derives_it_from_the_model_config(monkeypatch, tmp_path):
    pytest.importorskip("vllm")
    import shutil

    import labkit.engines.vllm_load as engine
    from labkit.datasets import data_dir

    class LLM:
        def __init__(self, **kwargs):
            pass

        def collective_rpc(self, method, args=()):
            return [json.dumps({"rank": 0})]

    target = tmp_path / "organism"
    shutil.copytree(data_dir() / "models" / "moe-organism", target)
    (target / "generation_config.json").unlink()
    monkeypatch.setattr(engine, "_vllm", lambda: SimpleNamespace(LLM=LLM))
    handle = engine.load_vllm(str(target))
    config = json.loads((target / "config.json").read_text())
    assert handle.generation_config is not None and handle.generation_config.eos_token_id == config["eos_token_id"]
