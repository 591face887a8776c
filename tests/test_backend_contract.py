"""The backend contract, in code: the same tests on every backend labkit serves.

Rows: the TransformerLens bridge (``transformer_lens``), a plain Hugging Face model
(``hugging_face``) and the vLLM engine (``vllm``, where vLLM is installed — as CI has it). All three
run the shipped MoE organism copied *without* its ``labkit.json``, so the BOS rule each backend
uses comes from the one default (:func:`labkit.tokens.default_prepend_bos`) and must agree.

What each capability means and what an open intervention reaches on each backend is stated in
:mod:`labkit.backends.base`; these tests hold it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil

import pytest
import torch

import labkit
from labkit.cache import cache_activations
from labkit.evals import perplexity
from labkit.backends import CAPABILITIES, NotOnBackendError, backend_of
from labkit.datasets import data_dir, read_prompts
from labkit.hooks import count_hooks
from labkit.moe import ExpertMask, masked, trace_routing
from labkit.tokens import LABKIT_SETTINGS, default_prepend_bos

HAS_VLLM = importlib.util.find_spec("vllm") is not None
BACKENDS = [
    "transformer_lens",
    "hugging_face",
    pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.skipif(not HAS_VLLM, reason="vLLM not installed (make install-engine)")]),
]
N = 6


@pytest.fixture(scope="module")
def organism_dir(tmp_path_factory):
    """The organism checkpoint without labkit.json: BOS from the architecture's default."""
    source = data_dir() / "models" / "moe-organism"
    target = tmp_path_factory.mktemp("contract") / "moe-organism-nobos"
    shutil.copytree(source, target)
    (target / LABKIT_SETTINGS).unlink(missing_ok=True)
    return target


@pytest.fixture(scope="module")
def reference(organism_dir):
    return labkit.load_model(str(organism_dir))


@pytest.fixture(scope="module")
def engine(organism_dir):
    if not HAS_VLLM:
        pytest.skip("vLLM not installed")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    handle = labkit.load_model(str(organism_dir), engine="vllm", max_num_batched_tokens=64)
    try:
        yield handle
    finally:
        handle.close()


@pytest.fixture(scope="module", params=BACKENDS)
def model(request, organism_dir, reference):
    if request.param == "transformer_lens":
        return reference
    if request.param == "hugging_face":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(organism_dir).eval()
    return request.getfixturevalue("engine")


@pytest.fixture(scope="module")
def prompts():
    return read_prompts("eval_sensitive", 2) + read_prompts("eval_neutral", 2)


def _tokens(reference, prompts):
    return [backend_of(reference).encode(p) for p in prompts]


def test_capabilities_are_declared_from_the_known_set(model):
    backend = backend_of(model)
    assert backend.kind in ("transformer_lens", "hugging_face", "vllm")
    assert backend.capabilities <= set(CAPABILITIES)
    assert {"mask", "trace"} <= backend.capabilities  # every backend routes MoE models


def test_a_missing_capability_is_one_error_naming_the_backend(model, reference):
    backend = backend_of(model)
    vector = labkit.mean_difference(reference, ["war and peace"], ["the cat sat"], layer=1)
    calls = {
        "generate": lambda: labkit.generate(model, ["hi"], max_new_tokens=2),
        "steer": lambda: labkit.steered(model, vector).__enter__(),
        "forward": lambda: labkit.models.hf_model_of(model),
        "cache": lambda: cache_activations(model, ["hi"], ["blocks.1.hook_resid_pre"], progress=False),
        "logprobs": lambda: perplexity(model, ["war and peace"]),
    }
    for capability, call in calls.items():
        if backend.supports(capability):
            continue
        with pytest.raises(NotOnBackendError, match=backend.kind) as error:
            call()
        assert CAPABILITIES[capability] in str(error.value)


def test_the_bos_rule_is_one_value_on_every_backend(model, reference, organism_dir):
    from transformers import AutoConfig

    expected = default_prepend_bos(organism_dir, AutoConfig.from_pretrained(organism_dir))
    assert reference.cfg.default_prepend_bos == expected  # TransformerLens's OLMoE default: True
    backend = backend_of(model)
    if backend.kind == "hugging_face":
        return  # a plain model has no tokenizer of its own
    assert model.cfg.default_prepend_bos == expected  # the bridge's cfg, or the engine handle's
    for prompt in ("war and peace", " the cat"):
        assert backend.encode(prompt) == backend_of(reference).encode(prompt)


def test_cached_activations_and_perplexity_agree_with_the_bridge(model, reference, prompts):
    """Every backend that caches gives the bridge's cache (each row to 1e-5 of its norm), under an
    open mask too; every backend with token logprobs gives the bridge's perplexity."""
    backend = backend_of(model)
    if not backend.supports("cache"):
        pytest.skip("no caching on this backend (the missing-capability test checks its error)")
    names = ["blocks.1.hook_resid_mid", "blocks.2.hook_mlp_out", "blocks.2.mlp.hook_router_logits"]
    mask = ExpertMask.on([(2, 3)], model=reference)
    for context in (None, mask):
        with masked(model, context) if context else contextlib.nullcontext():
            got = cache_activations(model, prompts, names, positions="last", progress=False)
        with masked(reference, context) if context else contextlib.nullcontext():
            expected = cache_activations(reference, prompts, names, positions="last", progress=False)
        for name in names:
            error = (got.stack(name).float() - expected.stack(name).float()).norm(dim=-1)
            assert bool((error <= 1e-5 * expected.stack(name).float().norm(dim=-1) + 1e-6).all()), name
    assert perplexity(model, prompts) == pytest.approx(perplexity(reference, prompts), rel=1e-5)


def test_greedy_generation_agrees_with_the_bridge(model, reference, prompts):
    if not backend_of(model).supports("generate"):
        pytest.skip("no generation on this backend")
    assert labkit.generate(model, prompts, max_new_tokens=N).token_ids == labkit.generate(reference, prompts, max_new_tokens=N).token_ids


def test_steering_agrees_with_the_bridge(model, reference, prompts):
    if not backend_of(model).supports("generate"):
        pytest.skip("no generation on this backend")
    vector = labkit.mean_difference(reference, read_prompts("attribution_behavior", 4), read_prompts("attribution_control", 4), layer=1, coefficient=3.0)
    with labkit.steered(reference, vector):
        expected = labkit.generate(reference, prompts, max_new_tokens=N).token_ids
    with labkit.steered(model, vector):
        got = labkit.generate(model, prompts, max_new_tokens=N).token_ids
    assert got == expected
    assert expected != labkit.generate(reference, prompts, max_new_tokens=N).token_ids, "the vector must act"


def test_masked_traces_agree_with_the_bridge(model, reference, prompts):
    rows = _tokens(reference, prompts)
    mask = ExpertMask.off([(1, 3), (2, 5)])
    with masked(reference, mask):
        expected = trace_routing(reference, rows, progress=False)
    with masked(model, mask):
        got = trace_routing(model, rows, progress=False)
    assert torch.equal(got.topk_indices, expected.topk_indices)
    torch.testing.assert_close(got.topk_weights, expected.topk_weights, rtol=0, atol=1e-5)
    assert not (got.topk_indices[1] == 3).any() and not (got.topk_indices[2] == 5).any()
    # nested masks merge the same way on every backend (off ∪ off)
    with masked(model, ExpertMask.off([(1, 3)])), masked(model, ExpertMask.off([(2, 5)])):
        nested = trace_routing(model, rows, progress=False)
    assert torch.equal(nested.topk_indices, expected.topk_indices)


def test_no_hook_is_left_behind_by_any_entry_point(model, reference, prompts):
    """Hooks counted before and after every public entry point, also when the block raises."""
    backend = backend_of(model)
    if backend.kind == "vllm":
        modules = []  # the engine hooks inside its worker processes, installed once at start-up
    elif backend.kind == "hugging_face":
        modules = [model]
    else:
        modules = [model, model.original_model, backend.twin]
    before = count_hooks(*modules) if modules else 0
    vector = labkit.mean_difference(reference, ["war and peace"], ["the cat sat"], layer=1)
    mask = ExpertMask.off([(1, 3)])
    rows = _tokens(reference, prompts)
    trace_routing(model, rows, progress=False)
    with masked(model, mask):
        trace_routing(model, rows, scope=("last", 2), progress=False)
    with pytest.raises(RuntimeError, match="boom"), masked(model, mask):
        raise RuntimeError("boom")
    if backend.supports("generate"):
        labkit.generate(model, prompts[:2], steering=vector, mask=mask, max_new_tokens=2)
        with pytest.raises(RuntimeError, match="boom"), labkit.steered(model, vector):
            raise RuntimeError("boom")
    if backend.supports("capture_resid"):
        labkit.actadd(model, "war", "peace", layer=1)
    if backend.supports("forward"):
        from labkit.cache import cache_activations

        cache_activations(model, prompts[:2], ["blocks.1.hook_resid_pre"], progress=False)
    assert (count_hooks(*modules) if modules else 0) == before


def test_an_open_intervention_reaches_what_the_contract_says(model, reference, prompts):
    """HF: an eager hook — the bridge's own forward inside the block is steered too.
    vLLM: request data — labkit calls on the handle are steered, a direct llm.generate is not."""
    backend = backend_of(model)
    vector = labkit.mean_difference(reference, read_prompts("attribution_behavior", 4), read_prompts("attribution_control", 4), layer=1, coefficient=3.0)
    ids = torch.tensor([backend_of(reference).encode(prompts[0])])
    if backend.kind == "transformer_lens":
        plain = model(ids)
        with labkit.steered(model, vector):
            assert not torch.allclose(model(ids), plain)
        assert torch.equal(model(ids), plain)
    elif backend.kind == "vllm":
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=N, temperature=0.0)
        direct = model.llm.generate([TokensPrompt(prompt_token_ids=ids[0].tolist())], params, use_tqdm=False)
        with labkit.steered(model, vector):
            steered = labkit.generate(model, prompts[:1], max_new_tokens=N).token_ids[0]
            bypass = model.llm.generate([TokensPrompt(prompt_token_ids=ids[0].tolist())], params, use_tqdm=False)
        assert list(bypass[0].outputs[0].token_ids) == list(direct[0].outputs[0].token_ids)
        assert steered != labkit.generate(model, prompts[:1], max_new_tokens=N).token_ids[0]
    else:
        pytest.skip("a plain model has no steering")


# -- the engine's argument validation, on every machine (no vLLM needed) -----------------------


def test_engine_loader_refusals_need_no_vllm():
    from labkit.engines.vllm_load import load_vllm

    with pytest.raises(ValueError, match="enforce_eager=False is refused"):
        load_vllm("moe-organism", enforce_eager=False)
    with pytest.raises(ValueError, match="compilation_config= is refused"):
        load_vllm("moe-organism", compilation_config={"level": 3})
    with pytest.raises(ValueError, match="tensor_parallel_size must be an int ≥ 1"):
        load_vllm("moe-organism", tensor_parallel_size=0)
    with pytest.raises(ValueError, match="dtype .* is not supported"):
        load_vllm("moe-organism", dtype=torch.int8)


def test_engine_handle_validation_needs_no_vllm(reference):
    from labkit.engines.vllm import VLLMModel

    handle = object.__new__(VLLMModel)  # no engine behind it: only the checks that come first run
    handle._steering, handle._masks = [], []
    with pytest.raises(ValueError, match="takes no streamer"):
        handle.generate_ids([[1, 2]], max_new_tokens=2, streamer=object())
    with pytest.raises(ValueError, match=r"\['num_beams'\] are not supported on the vLLM engine"):
        handle.generate_ids([[1, 2]], max_new_tokens=2, num_beams=2)
    with pytest.raises(ValueError, match="steering_per_row"), handle.steered([], rows=[[]]):
        pass
    with pytest.raises(ValueError, match="uses its own tokenizer"):
        handle.check_tokenizer_override("trace_routing")


def _offline_handle(dtype=torch.float32, layer_classes=("OlmoeDecoderLayer",), sites=None, expert_parallel=False):
    """A VLLMModel with no engine behind it: what the driver checks before any request."""
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoTokenizer

    from labkit.engines.vllm import VLLMModel
    from labkit.sources import resolve_source
    from labkit.tokens import lab_tokenizer

    source = resolve_source("moe-organism")
    config = AutoConfig.from_pretrained(source)
    handle = VLLMModel("moe-organism", None, lab_tokenizer(AutoTokenizer.from_pretrained(source)), config,
                       prepend_bos=True, tensor_parallel_size=1, max_model_len=64, dtype=dtype)
    every = ["hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out"]
    handle.layout = [{"layer_classes": list(layer_classes),
                      "sites": sites or {str(layer): every for layer in range(config.num_hidden_layers)}}]
    handle.routing = {"routed": True, "layers": {str(layer): {"n_experts": 16} for layer in range(config.num_hidden_layers)}}
    parallel = SimpleNamespace(data_parallel_size=1, enable_expert_parallel=expert_parallel)
    handle.llm = SimpleNamespace(llm_engine=SimpleNamespace(vllm_config=SimpleNamespace(parallel_config=parallel)))
    return handle


def test_engine_steering_and_cache_sites_need_no_vllm():
    from labkit.engines.vllm_capture import engine_reads, shapes_on_engine

    handle = _offline_handle()
    assert handle.steering_site("blocks.1.hook_resid_post", "t") == (2, "hook_resid_pre")  # the next layer's input
    assert handle.steering_site("blocks.2.hook_resid_post", "t") == (2, "hook_resid_post")  # the last: its output
    assert handle.steering_site("blocks.0.hook_mlp_out", "t") == (0, "hook_mlp_out")
    assert engine_reads(handle, "blocks.1.hook_resid_mid", "t") == (1, "hook_resid_mid", ((1, "hook_resid_pre"), (1, "hook_attn_out")))
    assert shapes_on_engine(handle, ["blocks.0.hook_attn_out", "blocks.2.mlp.hook_router_logits"]) == {
        "blocks.0.hook_attn_out": (128,), "blocks.2.mlp.hook_router_logits": (16,)}
    with pytest.raises(ValueError, match="is not cached on the vLLM engine; it caches blocks"):
        engine_reads(handle, "blocks.1.attn.hook_pattern", "cache_activations")
    with pytest.raises(ValueError, match="not supported on the vLLM engine; it steers"):
        handle.steering_site("blocks.1.ln2.hook_normalized", "steered")
    hybrid = _offline_handle(sites={"0": ["hook_resid_pre", "hook_resid_post", "hook_mlp_out"]})
    with pytest.raises(ValueError, match="no attn_out block"):
        engine_reads(hybrid, "blocks.0.hook_resid_mid", "cache_activations")
    with pytest.raises(ValueError, match="no attn_out block"):
        hybrid.steering_site("blocks.0.hook_attn_out", "steered")
    with pytest.raises(ValueError, match="under data- or expert-parallel dispatch is not supported"):
        engine_reads(_offline_handle(expert_parallel=True), "blocks.0.hook_mlp_out", "cache_activations")


def test_engine_refuses_the_float16_rescaled_deepseek_stream():
    """vLLM's DeepSeek-V2/V3 layers divide the stream by routed_scaling_factor in float16: a vector
    added or an activation read there would be off by that factor, so both are refused."""
    from labkit.engines.vllm_capture import engine_reads

    rescaled = _offline_handle(torch.float16, ("DeepseekV2DecoderLayer",))
    with pytest.raises(ValueError, match="divides the residual stream by routed_scaling_factor"):
        rescaled.steering_site("blocks.1.hook_resid_pre", "steered")
    with pytest.raises(ValueError, match="Load the engine with dtype=torch.bfloat16 or torch.float32"):
        engine_reads(rescaled, "blocks.1.hook_mlp_out", "cache_activations")
    assert engine_reads(rescaled, "blocks.1.mlp.hook_router_logits", "t")[1] == "mlp.hook_router_logits"
    for fine in (_offline_handle(torch.bfloat16, ("DeepseekV2DecoderLayer",)), _offline_handle(torch.float16)):
        assert fine.steering_site("blocks.1.hook_resid_pre", "steered") == (1, "hook_resid_pre")
