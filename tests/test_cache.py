"""Activation caching: batch == rows alone, fast path == bridge, budgets, streaming, bad input."""

from __future__ import annotations

import pytest
import torch

from labkit.cache import (
    ActivationCache,
    MemoryBudgetError,
    cache_activations,
    estimate_cache_bytes,
    select_positions,
)
from labkit.hooks import count_hooks
from labkit.models import hf_model_of

PROMPTS = ["the cat sat on the mat", "love", "what happened in the city during war and peace", "one two"]
HOOKS = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"]


#: The README's stated precision of "a batched cache equals each prompt run alone": the largest
#: ``||batched - solo|| / ||solo||`` over positions (float32). Measured at main 0f7d1e5+: SmolLM2
#: 4.0e-6 (blocks.15.hook_resid_pre, batch 2 and 8; 1.4e-2 absolute there), organism 4.6e-7.
BATCH_RELATIVE_TOLERANCE = 1e-5


def worst_position_error(batched, alone: dict, prompts, hooks) -> float:
    """``max ||batched - solo|| / ||solo||`` over prompts, hook points and positions (float64)."""
    worst = 0.0
    for i, prompt in enumerate(prompts):
        for name in hooks:
            a, b = batched.per_prompt(name)[i].double(), alone[prompt][name].double()
            a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
            worst = max(worst, float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-30)).max()))
    return worst


def test_batched_equals_each_prompt_alone(tiny_llama):
    alone = {p: cache_activations(tiny_llama, [p], HOOKS, batch_size=1, progress=False) for p in PROMPTS}
    for batch_size in (2, 4):
        batched = cache_activations(tiny_llama, PROMPTS, HOOKS, batch_size=batch_size, progress=False)
        assert worst_position_error(batched, alone, PROMPTS, HOOKS) <= BATCH_RELATIVE_TOLERANCE


@pytest.mark.slow
def test_batched_equals_solo_on_smollm2_to_the_stated_relative_tolerance(smollm2):
    """The README's number on the real model, where an absolute tolerance would be meaningless
    (residual norms in the hundreds: 1.4e-2 absolute is 4e-6 of the position's norm)."""
    prompts = ["The Eiffel Tower is in", "I think dogs are", "What happened in 1989? The answer is that", "Love is",
               "The quick brown fox jumps over the lazy dog and then", "Q: What is the capital of France? A:", "Hello",
               "Once upon a time, in a land far away,"]
    hooks = ["blocks.3.hook_resid_pre", "blocks.15.hook_resid_pre", "blocks.29.hook_resid_post"]
    alone = {p: cache_activations(smollm2, [p], hooks, batch_size=1, progress=False) for p in prompts}
    for batch_size in (2, 8):
        batched = cache_activations(smollm2, prompts, hooks, batch_size=batch_size, progress=False)
        error = worst_position_error(batched, alone, prompts, hooks)
        assert 0 < error <= BATCH_RELATIVE_TOLERANCE  # not bit-identical: the README says "to 1e-5", not "equal"


def test_fast_path_matches_bridge_run_with_cache(tiny_llama):
    cache = cache_activations(tiny_llama, PROMPTS[:1], HOOKS, progress=False)
    ids = tiny_llama.to_tokens(PROMPTS[0])
    _, reference = tiny_llama.run_with_cache(ids, names_filter=lambda n: n in HOOKS)
    for name in HOOKS:
        torch.testing.assert_close(cache[name], reference[name][0], atol=1e-5, rtol=1e-5)


def test_bridge_only_hook_point_is_cached_through_the_bridge(tiny_llama):
    name = "blocks.1.ln1.hook_normalized"
    cache = cache_activations(tiny_llama, PROMPTS[:2], [name], progress=False)
    ids = tiny_llama.to_tokens(PROMPTS[1])
    _, reference = tiny_llama.run_with_cache(ids, names_filter=lambda n: n == name)
    torch.testing.assert_close(cache.per_prompt(name)[1], reference[name][0], atol=1e-5, rtol=1e-5)


def test_positions_last_and_stack(tiny_llama):
    cache = cache_activations(tiny_llama, PROMPTS, HOOKS[:1], positions="last", progress=False)
    stacked = cache.stack(HOOKS[0])
    assert stacked.shape == (len(PROMPTS), tiny_llama.cfg.d_model)
    full = cache_activations(tiny_llama, PROMPTS, HOOKS[:1], progress=False)
    for i in range(len(PROMPTS)):
        torch.testing.assert_close(stacked[i], full.per_prompt(HOOKS[0])[i][-1])
    padded = full.padded(HOOKS[0])
    assert padded.shape[:2] == (len(PROMPTS), int(full.position.max()) + 1)
    assert torch.isnan(padded[1, -1]).all()  # "love" is shorter than the longest prompt


def test_select_positions():
    assert select_positions(5, "all") == [0, 1, 2, 3, 4]
    assert select_positions(5, "last") == [4]
    assert select_positions(5, slice(-2, None)) == [3, 4]
    assert select_positions(5, [0, -1]) == [0, 4]
    with pytest.raises(ValueError, match="out of range"):
        select_positions(3, [5])
    with pytest.raises(ValueError, match="not allowed"):
        select_positions(3, "first")


def test_memory_held_equals_requested_bytes(tiny_llama):
    cache = cache_activations(tiny_llama, PROMPTS, HOOKS, batch_size=2, progress=False)
    requested = sum(cache[n].numel() * cache[n].element_size() for n in HOOKS)
    assert cache.nbytes() == requested
    assert estimate_cache_bytes(tiny_llama, PROMPTS, HOOKS) == requested


def test_budget_refuses_with_advice(tiny_llama):
    with pytest.raises(MemoryBudgetError, match="positions='last'.*out_dir"):
        cache_activations(tiny_llama, PROMPTS, HOOKS, max_bytes=100, progress=False)


def test_stream_to_disk_and_load_lazily(tiny_llama, tmp_path):
    in_memory = cache_activations(tiny_llama, PROMPTS, HOOKS, progress=False)
    out = tmp_path / "acts"
    streamed = cache_activations(
        tiny_llama, PROMPTS, HOOKS, batch_size=1, out_dir=out, shard_bytes=1, max_bytes=10_000, progress=False
    )
    assert len(list(out.glob("shard-*.safetensors"))) == len(PROMPTS)
    reloaded = ActivationCache.load(out)
    assert reloaded.nbytes() == 0  # nothing loaded until asked
    for name in HOOKS:
        torch.testing.assert_close(reloaded[name], in_memory[name])
    assert torch.equal(reloaded.prompt_index, in_memory.prompt_index)
    assert reloaded.prompts == tuple(PROMPTS)
    with pytest.raises(ValueError, match="not empty"):
        cache_activations(tiny_llama, PROMPTS, HOOKS, out_dir=out, progress=False)


def test_interrupted_streaming_leaves_nothing_and_no_hooks(tiny_llama, tmp_path, monkeypatch):
    from labkit.backends import backend_of

    backend = backend_of(tiny_llama)
    calls = {"n": 0}
    real_capture = backend.capture

    def flaky_capture(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # fail on the second batch
            raise KeyboardInterrupt
        return real_capture(*args, **kwargs)

    monkeypatch.setattr(backend, "capture", flaky_capture)
    before = count_hooks(tiny_llama) + count_hooks(hf_model_of(tiny_llama))
    with pytest.raises(KeyboardInterrupt):
        cache_activations(tiny_llama, PROMPTS, HOOKS, batch_size=1, out_dir=tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    assert count_hooks(tiny_llama) + count_hooks(hf_model_of(tiny_llama)) == before


def test_hooks_removed_after_exception_in_hook(tiny_llama):
    from labkit.hooks import attach

    before = count_hooks(tiny_llama) + count_hooks(hf_model_of(tiny_llama))

    def boom(activation, site):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with attach(tiny_llama, {"blocks.0.hook_resid_pre": boom}) as run:
            run(input_ids=torch.tensor([[1, 2, 3]]))
    assert count_hooks(tiny_llama) + count_hooks(hf_model_of(tiny_llama)) == before


@pytest.mark.parametrize(
    ("prompts", "hooks", "kwargs", "match"),
    [
        ([], HOOKS, {}, "cache_activations: need a prompt or a non-empty list of prompts"),
        (["x", ""], HOOKS, {}, "prompt 1 is empty"),
        (["x"], ["blocks.1.hook_resid_pr"], {}, "Closest real names: \\['blocks.1.hook_resid_pre'"),
        (["x"], [], {}, "hook_names is empty"),
        (["x"], HOOKS, {"batch_size": 0}, "batch_size must be a positive int"),
        (["x"], HOOKS, {"positions": "first"}, "not allowed"),
        (["one " * 100], HOOKS, {}, "context window is 64 tokens"),
        (["x"], ["blocks.0.attn.hook_pattern"], {}, "not \\[batch, pos"),
    ],
)
def test_bad_input(tiny_llama, prompts, hooks, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cache_activations(tiny_llama, prompts, hooks, progress=False, **kwargs)


def test_one_tokenisation_rule_everywhere(tiny_llama):
    """Caching, generation and routing traces encode a prompt identically (chat or not)."""
    import labkit
    from labkit.cache import tokenize_prompts

    tokenizer = tiny_llama.tokenizer
    labkit_tokenizer = labkit.models.tokenizer_of(tiny_llama)
    labkit_tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} and{% endfor %}"
    try:
        for chat in (False, True):
            cached = tokenize_prompts(tiny_llama, ["love"], chat=chat)[0]
            generated = labkit.generate(tiny_llama, "love", chat=chat, max_new_tokens=1).prompt_token_ids[0]
            assert cached == generated
        # the bridge's rule (cfg.default_prepend_bos): BOS first, as TransformerLens tokenises
        assert tokenize_prompts(tiny_llama, ["love"])[0] == tiny_llama.to_tokens("love")[0].tolist()
        assert tokenize_prompts(tiny_llama, ["love"], prepend_bos=False)[0] == tokenizer("love")["input_ids"]
        assert tokenize_prompts(tiny_llama, ["love"], chat=True)[0] == tokenizer("love and")["input_ids"]
    finally:
        labkit_tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat=True but this tokenizer has no chat template"):
        tokenize_prompts(tiny_llama, ["love"], chat=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"max_bytes": -1}, "max_bytes must be a positive int"), ({"dtype": torch.int8}, "floating torch dtype")],
)
def test_bad_budget_or_dtype(tiny_llama, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cache_activations(tiny_llama, ["love"], HOOKS, progress=False, **kwargs)


def test_non_string_prompt_is_a_type_error(tiny_llama):
    with pytest.raises(TypeError, match="prompt 1 must be a str, got int"):
        cache_activations(tiny_llama, ["x", 3], HOOKS, progress=False)


def test_sizes_in_messages_are_in_binary_units():
    """The byte counts budget errors and reprs print (a survivor of the mutation run: ×1024)."""
    from labkit.cache import _human

    assert [_human(n) for n in (0, 1023, 1024, 1536, 5 * 1024**2, 3 * 1024**3, 2 * 1024**4, 5 * 1024**5)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "5.0 MiB", "3.0 GiB", "2.0 TiB", "5120.0 TiB"]


def test_cache_records_the_model_it_came_from(tiny_llama, tmp_path):
    from labkit.models import model_name_of

    streamed = cache_activations(tiny_llama, PROMPTS[:2], HOOKS[:1], out_dir=tmp_path / "a", progress=False)
    in_memory = cache_activations(tiny_llama, PROMPTS[:2], HOOKS[:1], progress=False)
    assert in_memory.model_name == streamed.model_name == model_name_of(tiny_llama) == "tiny-llama"
    assert ActivationCache.load(tmp_path / "a").model_name == "tiny-llama"


def test_in_memory_budget_counts_the_whole_cache_and_an_empty_out_dir_is_used(tiny_llama, tmp_path):
    """Survivors of the mutation run: ``shard_bytes`` limits what streaming holds, not what an
    in-memory cache holds; an existing empty directory is written into."""
    total = estimate_cache_bytes(tiny_llama, PROMPTS, HOOKS)
    with pytest.raises(MemoryBudgetError):
        cache_activations(tiny_llama, PROMPTS, HOOKS, shard_bytes=1, max_bytes=total - 1, progress=False)
    (tmp_path / "empty").mkdir()
    cache = cache_activations(tiny_llama, PROMPTS, HOOKS, out_dir=tmp_path / "empty", progress=False)
    assert cache.prompts == tuple(PROMPTS) and any((tmp_path / "empty").glob("shard-*.safetensors"))


def test_router_logits_cache_equals_the_routing_trace(shared_tiny_olmoe):
    """``blocks.{L}.mlp.hook_router_logits`` (labkit's name): the router logits the trace records,
    at the kept positions, alone or beside a hook point served by the bridge (other modules run)."""
    from labkit.moe import trace_routing

    model = shared_tiny_olmoe
    prompts = ["the cat sat on the mat", "war and peace", "one two three four"]
    trace = trace_routing(model, prompts, include_router_logits=True, progress=False)
    layer = trace.layers[-1]
    name = f"blocks.{layer}.mlp.hook_router_logits"
    for others in ([], [f"blocks.{layer}.hook_resid_pre"], [f"blocks.{layer}.attn.hook_q"]):
        cache = cache_activations(model, prompts, [name, *others], progress=False)
        assert torch.equal(cache.token_ids, trace.token_ids)
        torch.testing.assert_close(cache[name].float(), trace.router_logits[trace.layers.index(layer)], rtol=1e-4, atol=1e-5)
    last = cache_activations(model, prompts, [name], positions="last", progress=False)
    lengths = torch.bincount(trace.prompt_index)
    ends = torch.cumsum(lengths, 0) - 1
    torch.testing.assert_close(last.stack(name).float(), trace.router_logits[trace.layers.index(layer)][ends], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"layer 9 has no MoE router on this model \(MoE layers"):
        cache_activations(model, prompts, ["blocks.9.mlp.hook_router_logits"], progress=False)


def test_a_second_cache_call_needs_no_probe_pass(shared_tiny_llama, monkeypatch):
    """Hook-point shapes are probed once per name and remembered on the model: a repeat call runs
    only its batches (the ratio caching ÷ plain forward in bench/bench_cache.py)."""
    import labkit.backends.hf_capture as capture_module
    from labkit.backends import backend_of

    name = "blocks.2.hook_mlp_out"
    backend_of(shared_tiny_llama).activation_shape_memo.pop(name, None)
    probes = []
    real = capture_module.probe_shapes
    monkeypatch.setattr(capture_module, "probe_shapes", lambda *a, **k: probes.append(a[1]) or real(*a, **k))
    monkeypatch.setattr("labkit.backends.hf.probe_shapes", capture_module.probe_shapes)
    first = cache_activations(shared_tiny_llama, ["the cat sat", "a dog"], [name], progress=False)
    second = cache_activations(shared_tiny_llama, ["the cat sat", "a dog"], [name], progress=False)
    assert probes == [[name]] and torch.equal(first[name], second[name])
