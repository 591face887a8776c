"""One model handle: every way of running the model sees every open labkit intervention.

Entry point × intervention, on a dense model (tiny Llama) and an MoE model (tiny OLMoE): inside
``steered`` / ``masked`` each entry point gives the intervened result — different from the plain
run and equal to what labkit's fast path (the plain twin) gives under the same intervention —
and after an exception inside the block no hook is left anywhere (twin, bridge, the bridge's
original modules) and every entry point gives the plain result again. Also: one BOS rule for the
whole lab, and ``model.to(dtype)`` keeping the twin in sync.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import labkit
from labkit.cache import cache_activations, tokenize_prompts
from labkit.evals import perplexity
from labkit.hooks import count_hooks
from labkit.models import from_hf
from labkit.moe import ExpertMask, masked, trace_routing
from tests.conftest import make_tokenizer, tiny_llama_hf
from tests.moe_fixtures import tiny_moe_hf

PROMPT = "the cat sat on a mat and the dog"
NEW = 5


def _dense():
    tokenizer = make_tokenizer()
    return from_hf(tiny_llama_hf(tokenizer), tokenizer, name="tiny-llama")


def _moe():
    tokenizer = make_tokenizer()
    return from_hf(tiny_moe_hf("olmoe", tokenizer), tokenizer, name="tiny-olmoe")


def _steering(model):
    torch.manual_seed(1)
    vector = torch.randn(model.cfg.d_model)
    sv = labkit.SteeringVector(
        "blocks.1.hook_resid_pre", vector, coefficient=4.0, positions="all", model_name=model.labkit.name
    )
    return lambda: labkit.steered(model, sv)


def _mask(model):
    # the two experts each layer of this prompt prefers most: switching them off changes routing
    trace = trace_routing(model, [PROMPT], progress=False)
    edits = []
    for slot, layer in enumerate(trace.layers):
        counts = torch.bincount(trace.topk_indices[slot].flatten(), minlength=trace.n_experts)
        edits += [(layer, int(e)) for e in counts.topk(2).indices]
    mask = ExpertMask.off(edits, model=model)
    return lambda: masked(model, mask)


CASES = {
    ("dense", "steering"): (_dense, _steering),
    ("moe", "steering"): (_moe, _steering),
    ("moe", "mask"): (_moe, _mask),
}


def _at_rest(model) -> int:
    return count_hooks(model, model.original_model, model.labkit.twin)


# Each entry point: model -> a value to compare (tensors or lists).
def _forward(model):
    with torch.no_grad():
        return model(model.to_tokens(PROMPT))


def _run_with_cache(model):
    with torch.no_grad():
        logits, cache = model.run_with_cache(model.to_tokens(PROMPT), names_filter=lambda n: n == "blocks.2.hook_resid_post")
    return torch.cat([logits.flatten(), cache["blocks.2.hook_resid_post"].flatten()])


def _bridge_generate(model):
    out = model.generate(model.to_tokens(PROMPT), max_new_tokens=NEW, do_sample=False, verbose=False)
    return out[0, -NEW:].tolist()


def _labkit_generate(model):
    return labkit.generate(model, PROMPT, max_new_tokens=NEW).token_ids[0]


def _cache_activations(model):
    return cache_activations(model, [PROMPT], ["blocks.2.hook_resid_post"], progress=False)["blocks.2.hook_resid_post"]


def _trace_routing(model):
    return trace_routing(model, [PROMPT], progress=False).topk_weights


def _perplexity(model):
    return torch.tensor(perplexity(model, [PROMPT]))


# The twin-path reference each entry point must equal inside the block.
def _twin_logits(model):
    with torch.no_grad():
        return model.labkit.twin(input_ids=model.to_tokens(PROMPT)).logits


def _twin_resid(model):
    captured = {}

    def grab(activation, _site):
        captured["x"] = activation.detach().clone()

    with labkit.hooks.attach(model, {"blocks.2.hook_resid_post": grab}) as twin, torch.no_grad():
        logits = twin(input_ids=model.to_tokens(PROMPT)).logits
    return logits, captured["x"]


def _reference(entry: str, model):
    if entry == "forward":
        return _twin_logits(model)
    if entry == "run_with_cache":
        logits, resid = _twin_resid(model)
        return torch.cat([logits.flatten(), resid.flatten()])
    if entry == "bridge_generate":
        return _labkit_generate(model)
    if entry == "labkit_generate":
        return _bridge_generate(model)
    if entry == "cache_activations":
        return _twin_resid(model)[1][0]
    return None  # trace_routing / perplexity run on the twin: their own values are the reference


ENTRIES = {
    "forward": _forward,
    "run_with_cache": _run_with_cache,
    "bridge_generate": _bridge_generate,
    "labkit_generate": _labkit_generate,
    "cache_activations": _cache_activations,
    "trace_routing": _trace_routing,
    "perplexity": _perplexity,
}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=1e-4, rtol=1e-4)
    return a == b


@pytest.fixture(scope="module", params=list(CASES), ids=lambda c: "-".join(c))
def case(request):
    make_model, make_intervention = CASES[request.param]
    model = make_model()
    return request.param, model, make_intervention(model)


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_every_entry_point_sees_the_intervention(case, entry):
    (kind, _what), model, intervention = case
    if entry == "trace_routing" and kind == "dense":
        pytest.skip("a dense model has no router")
    run = ENTRIES[entry]
    plain = run(model)
    # counted after a plain run: transformers adds its own output-capturing hooks on first use
    at_rest = _at_rest(model)
    with intervention():
        inside = run(model)
        reference = _reference(entry, model)
    assert not _same(inside, plain), f"{entry} did not see the intervention"
    if reference is not None:
        assert _same(inside, reference), f"{entry} inside the block differs from labkit's fast path"
    assert _same(run(model), plain), f"{entry} stayed intervened after the block"
    assert _at_rest(model) == at_rest

    with pytest.raises(RuntimeError, match="boom"):
        with intervention():
            run(model)
            raise RuntimeError("boom")
    assert _at_rest(model) == at_rest and count_hooks(model.labkit.twin) == 0
    assert _same(run(model), plain)


def test_keyboard_interrupt_inside_nested_interventions_leaves_no_hook():
    model = _moe()
    at_rest = _at_rest(model)
    plain = _forward(model)
    with pytest.raises(KeyboardInterrupt):
        with contextlib.ExitStack() as stack:
            stack.enter_context(_steering(model)())
            stack.enter_context(_mask(model)())
            _forward(model)
            raise KeyboardInterrupt
    assert _at_rest(model) == at_rest
    assert torch.equal(_forward(model), plain)


# --- one BOS rule ---------------------------------------------------------------------------

TEXTS = ["the cat sat", " love and hate", "Q: What happened in 1920? A:", "a"]


@pytest.mark.parametrize("prepend_bos", [None, True, False])
def test_lab_and_bridge_tokenise_identically(prepend_bos):
    model = _dense()
    for text in TEXTS:
        expected = model.to_tokens(text, prepend_bos=prepend_bos)[0].tolist()
        assert tokenize_prompts(model, [text], prepend_bos=prepend_bos)[0] == expected
        assert labkit.generate(model, text, max_new_tokens=1, prepend_bos=prepend_bos).prompt_token_ids[0] == expected
        rows = trace_routing(_moe_model(), [text], prepend_bos=prepend_bos, progress=False).token_ids.tolist()
        assert rows == _moe_model().to_tokens(text, prepend_bos=prepend_bos)[0].tolist()
    assert model.labkit.prepend_bos is True and model.cfg.default_prepend_bos is True


_MOE = []


def _moe_model():
    if not _MOE:
        _MOE.append(_moe())
    return _MOE[0]


def test_bos_rule_is_the_bridges_and_configurable():
    tokenizer = make_tokenizer()
    model = from_hf(tiny_llama_hf(tokenizer), tokenizer, name="no-bos", prepend_bos=False)
    assert model.cfg.default_prepend_bos is False
    assert tokenize_prompts(model, ["the cat"])[0] == model.to_tokens("the cat")[0].tolist() == tokenizer("the cat").input_ids
    # ActAdd under the BOS rule: the BOS row of the difference is zero (Turner et al.'s setup)
    with_bos = _dense()
    vector = labkit.actadd(with_bos, " wedding", " ", layer=1)
    assert vector.source["plus_token_ids"][0] == vector.source["minus_token_ids"][0] == tokenizer.bos_token_id
    assert torch.equal(vector.activations[0], torch.zeros(with_bos.cfg.d_model))


def test_shipped_organism_declares_no_bos():
    organism = labkit.load_model("moe-organism")
    assert organism.cfg.default_prepend_bos is False
    prompt = "Q: What happened in the 1920s in Zinla-gard? A:"
    assert tokenize_prompts(organism, [prompt])[0] == organism.to_tokens(prompt)[0].tolist()
    assert tokenize_prompts(organism, [prompt])[0][0] != organism.tokenizer.bos_token_id


# --- moving and casting after load ------------------------------------------------------------


def test_to_dtype_keeps_twin_buffers_and_vectors_in_sync():
    model = _dense()
    sv = _steering(model)
    model.to(torch.bfloat16)
    twin = model.labkit.twin
    originals = dict(model.original_model.named_buffers())
    for name, buffer in twin.named_buffers():
        assert buffer.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in twin.parameters())
    rotary = twin.get_submodule("model.rotary_emb").inv_freq
    assert any(rotary is b for b in originals.values())  # the very tensor the bridge uses
    tokens = model.to_tokens(PROMPT)
    with sv(), torch.no_grad():
        fast = twin(input_ids=tokens).logits
        bridge = model(tokens)
        steered_ids = labkit.generate(model, PROMPT, max_new_tokens=3).token_ids
    assert fast.dtype == bridge.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), bridge.float(), atol=0.05, rtol=0.05)
    with torch.no_grad():
        assert not torch.allclose(twin(input_ids=tokens).logits.float(), fast.float())
    assert len(steered_ids[0]) == 3
