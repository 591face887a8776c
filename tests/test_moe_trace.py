"""Routing traces on tiny random models of the six original MoE families (plain HF and labkit bridge).

Every other family: tests/test_moe_families.py.
"""

from __future__ import annotations


import pytest
import torch

from labkit.hooks import count_hooks
from labkit.moe import RoutingTrace, moe_layers, trace_routing
from labkit.moe.families import find_routers
from tests.conftest import make_tokenizer, tiny_llama_hf
from tests.moe_fixtures import shared_moe_hf, shared_tokenizer, FAMILIES, MOE_LAYERS, N_EXPERTS, TOP_K, one_thread, tiny_moe_hf

PROMPTS = [
    "the cat sat on a mat",
    "love",
    "what happened in the city during war and peace",
    "one two three",
    "the dog ran to the park while",
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


_tokenizer = shared_tokenizer
hf = shared_moe_hf


def router_outputs(model, input_ids):
    """What each HF router module itself returns, read with hooks independent of labkit.

    (``output_router_logits=True`` makes transformers install permanent output-capturing hooks,
    so tests that count hooks use a model that never ran it.)
    """
    seen = {}
    handles = []
    for index, layer in enumerate(model.model.layers):
        router = getattr(layer.mlp, "router", None) or getattr(layer.mlp, "gate", None)
        if router is None or not hasattr(router, "top_k"):
            continue
        handles.append(router.register_forward_hook(lambda m, i, o, index=index: seen.__setitem__(index, o)))
    try:
        with torch.no_grad():
            out = model(input_ids, output_router_logits=True)
    finally:
        for handle in handles:
            handle.remove()
    return seen, out


@pytest.mark.parametrize("family", FAMILIES)
def test_trace_is_the_routers_own_choice(family):
    model, tokenizer = tiny_moe_hf(family, _tokenizer()), _tokenizer()  # own copy: output_router_logits
    trace = trace_routing(model, [PROMPTS[2]], tokenizer=tokenizer, include_router_logits=True, progress=False)
    assert count_hooks(model) == 0
    ids = tokenizer(PROMPTS[2], return_tensors="pt").input_ids
    seen, out = router_outputs(model, ids)

    assert trace.layers == tuple(MOE_LAYERS[family]) == tuple(moe_layers(model)) == tuple(sorted(seen))
    assert trace.topk_indices.shape == (len(trace.layers), ids.shape[1], TOP_K)
    assert trace.router_logits.shape == (len(trace.layers), ids.shape[1], N_EXPERTS)
    assert (trace.n_experts, trace.top_k, trace.n_prompts) == (N_EXPERTS, TOP_K, 1)
    for row, layer in enumerate(trace.layers):
        logits, weights, indices = seen[layer]
        assert torch.equal(trace.topk_indices[row], indices)
        assert torch.equal(trace.topk_weights[row], weights.float())
        assert torch.equal(trace.router_logits[row], logits.float())
        # transformers' own output_router_logits agrees (one entry per MoE layer, in order)
        assert torch.equal(trace.router_logits[row], out.router_logits[row].float())
    assert torch.equal(trace.token_ids, ids[0])
    assert torch.equal(trace.position, torch.arange(ids.shape[1]))


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_per_prompt(family):
    model, tokenizer = hf(family), _tokenizer()
    batched = trace_routing(model, PROMPTS, tokenizer=tokenizer, batch_size=3, progress=False)
    alone = [trace_routing(model, [p], tokenizer=tokenizer, batch_size=1, progress=False) for p in PROMPTS]
    assert torch.equal(batched.topk_indices, torch.cat([t.topk_indices for t in alone], dim=1))
    torch.testing.assert_close(batched.topk_weights, torch.cat([t.topk_weights for t in alone], dim=1))
    assert torch.equal(batched.token_ids, torch.cat([t.token_ids for t in alone]))
    lengths = [len(tokenizer(p).input_ids) for p in PROMPTS]
    assert batched.prompt_index.tolist() == [i for i, n in enumerate(lengths) for _ in range(n)]
    assert batched.position.tolist() == [j for n in lengths for j in range(n)]
    assert batched.n_prompts == len(PROMPTS)


def test_scope_last_and_generated():
    model, tokenizer = hf("olmoe"), _tokenizer()
    full = trace_routing(model, PROMPTS, tokenizer=tokenizer, progress=False)
    last = trace_routing(model, PROMPTS, tokenizer=tokenizer, scope=("last", 2), progress=False)
    keep = torch.zeros(full.n_tokens, dtype=torch.bool)
    for prompt in range(len(PROMPTS)):
        rows = (full.prompt_index == prompt).nonzero().flatten()
        keep[rows[-2:]] = True
    assert torch.equal(last.topk_indices, full.topk_indices[:, keep])
    assert torch.equal(last.position, full.position[keep])

    generated = trace_routing(
        model, PROMPTS[:2], tokenizer=tokenizer, scope="generated", max_new_tokens=4, progress=False
    )
    for prompt, text in enumerate(PROMPTS[:2]):
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            answer = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answer = answer[0, ids.shape[1] :]
        rows = generated.prompt_index == prompt
        assert generated.token_ids[rows].tolist() == answer.tolist()
        assert generated.position[rows].tolist() == list(range(ids.shape[1], ids.shape[1] + len(answer)))
        # routing of the answer tokens = routing in one pass over prompt + answer
        whole = trace_routing(model, [torch.cat([ids[0], answer]).tolist()], progress=False)
        assert torch.equal(generated.topk_indices[:, rows], whole.topk_indices[:, ids.shape[1] :])


@pytest.mark.parametrize("family", FAMILIES)
def test_bridge_and_hf_model_give_the_same_trace(family):
    """TransformerLens 4.3 boots every family; labkit traces the bridge's plain twin."""
    from labkit.models import from_hf, hf_model_of

    tokenizer = _tokenizer()
    bridge = from_hf(tiny_moe_hf(family, tokenizer), tokenizer, name=f"tiny-{family}")
    on_bridge = trace_routing(bridge, PROMPTS, progress=False)
    on_hf = trace_routing(hf(family), PROMPTS, tokenizer=tokenizer, prepend_bos=bridge.labkit.prepend_bos, progress=False)
    assert on_bridge.layers == tuple(MOE_LAYERS[family]) == tuple(moe_layers(bridge))
    assert torch.equal(on_bridge.topk_indices, on_hf.topk_indices)
    assert on_bridge.model_name == f"tiny-{family}"
    assert count_hooks(hf_model_of(bridge)) == 0


def test_save_load_round_trip(tmp_path):
    model, tokenizer = hf("qwen3_moe"), _tokenizer()
    for logits in (False, True):
        trace = trace_routing(model, PROMPTS[:2], tokenizer=tokenizer, include_router_logits=logits, progress=False)
        path = trace.save(tmp_path / f"trace{logits}.safetensors")
        assert path == tmp_path / f"trace{logits}.json" and (tmp_path / f"trace{logits}.safetensors").is_file()
        loaded = RoutingTrace.load(path)
        again = RoutingTrace.from_dict(trace.to_dict())
        for other in (loaded, again):
            assert other.layers == trace.layers == (0, 2)
            assert (other.router_logits is None) == (not logits)
            for name in ("topk_indices", "topk_weights", "token_ids", "prompt_index", "position"):
                assert torch.equal(getattr(other, name), getattr(trace, name))
            assert other.metadata() == trace.metadata()


def test_no_hook_survives_an_exception():
    model, tokenizer = hf("mixtral"), _tokenizer()
    router = find_routers(model)[1].router

    def explode(*_):
        raise KeyboardInterrupt

    handle = router.register_forward_pre_hook(explode)
    try:
        with pytest.raises(KeyboardInterrupt):
            trace_routing(model, PROMPTS, tokenizer=tokenizer, progress=False)
    finally:
        handle.remove()
    assert count_hooks(model) == 0


def test_bad_input_errors():
    model, tokenizer = hf("olmoe"), _tokenizer()
    with pytest.raises(ValueError, match=r"scope \('first', 2\) is not allowed; use 'all', 'generated'"):
        trace_routing(model, PROMPTS, tokenizer=tokenizer, scope=("first", 2))
    with pytest.raises(ValueError, match="batch_size must be an int ≥ 1, got 0"):
        trace_routing(model, PROMPTS, tokenizer=tokenizer, batch_size=0)
    with pytest.raises(ValueError, match="prompts is empty"):
        trace_routing(model, [], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="pass tokenizer"):
        trace_routing(model, PROMPTS)
    with pytest.raises(ValueError, match="trace_routing: chat=True but this tokenizer has no chat template"):
        trace_routing(model, PROMPTS, tokenizer=tokenizer, chat=True)
    with pytest.raises(ValueError, match="max_new_tokens must be an int ≥ 1, got 0"):
        trace_routing(model, PROMPTS, tokenizer=tokenizer, scope="generated", max_new_tokens=0)
    dense = tiny_llama_hf(tokenizer)
    with pytest.raises(ValueError, match=r"'llama'.*Supported families: OLMoE"):
        trace_routing(dense, PROMPTS, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="'llama'"):
        moe_layers(dense)
    with pytest.raises(ValueError, match=r"topk_indices has shape \(1, 3, 2\), expected \(2, 3, 2\)"):
        RoutingTrace(
            torch.zeros(1, 3, 2, dtype=torch.long), torch.zeros(1, 3, 2), None, torch.zeros(3, dtype=torch.long),
            torch.zeros(3, dtype=torch.long), torch.arange(3), (0, 1), 8, 2, 1, "x",
        )


def test_caller_tokenizer_is_not_mutated():
    model, tokenizer = hf("olmoe"), make_tokenizer()
    tokenizer.pad_token = None
    tokenizer.padding_side = "right"
    before = (tokenizer.pad_token, tokenizer.pad_token_id, tokenizer.padding_side, dict(tokenizer.special_tokens_map))
    trace = trace_routing(model, PROMPTS[:3], tokenizer=tokenizer, progress=False)
    after = (tokenizer.pad_token, tokenizer.pad_token_id, tokenizer.padding_side, dict(tokenizer.special_tokens_map))
    assert after == before
    # the left-padding copy still traces what each prompt traces alone
    alone = trace_routing(model, PROMPTS[2:3], tokenizer=tokenizer, progress=False)
    assert torch.equal(trace.topk_indices[:, trace.prompt_index == 2], alone.topk_indices)


def test_prompts_longer_than_the_context_window_are_refused():
    model, tokenizer = hf("qwen3_moe"), _tokenizer()
    n_ctx = model.config.max_position_embeddings
    trace_routing(model, [[1] * n_ctx], progress=False)  # exactly the window: fine
    with pytest.raises(ValueError, match=rf"trace_routing: prompt 1 is {n_ctx + 1} tokens; the model's context window is {n_ctx}"):
        trace_routing(model, [[1, 2], [1] * (n_ctx + 1)], progress=False)
    with pytest.raises(ValueError, match=rf"prompt 0 is 3 tokens \+ {n_ctx} new tokens; .* lower max_new_tokens"):
        trace_routing(model, [[1, 2, 3]], tokenizer=tokenizer, scope="generated", max_new_tokens=n_ctx, progress=False)
    assert count_hooks(model) == 0


def test_token_ids_outside_the_vocabulary_are_refused():
    model = hf("mixtral")
    vocab = model.get_input_embeddings().num_embeddings
    with pytest.raises(ValueError, match=rf"prompt 1 has token id {vocab} outside the model's vocabulary \(0..{vocab - 1}"):
        trace_routing(model, [[1, 2], [3, vocab]], progress=False)
    with pytest.raises(ValueError, match=r"prompt 0 has token id -1 outside"):
        trace_routing(model, [[-1, 3]], progress=False)
    assert trace_routing(model, [[0, vocab - 1]], progress=False).n_tokens == 2


def test_loading_the_wrong_file_says_what_was_found(tmp_path):
    from safetensors.torch import save_file

    from labkit.moe import ExpertMask

    trace = trace_routing(hf("qwen3_moe"), PROMPTS[:1], tokenizer=_tokenizer(), progress=False)
    path = trace.save(tmp_path / "trace.safetensors")
    with pytest.raises(FileNotFoundError, match=r"RoutingTrace.load: no file at '.*nope.safetensors'; expected nope.json .* written by RoutingTrace.save"):
        RoutingTrace.load(tmp_path / "nope.safetensors")
    mask_path = ExpertMask.off([(0, 1)]).save(tmp_path / "mask.json")
    with pytest.raises(ValueError, match=r"mask.json' is of kind 'labkit.ExpertMask'; expected kind 'labkit.RoutingTrace'. Load it with ExpertMask.load"):
        RoutingTrace.load(mask_path)
    # a lone safetensors file (the layout before labkit.storage) of another labkit kind, and of none
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"labkit": '{"kind": "labkit.ExpertAttribution", "version": 1}'})
    with pytest.raises(ValueError, match=r"is of kind 'labkit.ExpertAttribution'; expected kind 'labkit.RoutingTrace'. Load it with ExpertAttribution.load"):
        RoutingTrace.load(tmp_path / "other.safetensors")
    save_file({"activations": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match=r"plain.safetensors' has no labkit metadata and no plain.json beside it \(tensors: \['activations'\]\)"):
        RoutingTrace.load(tmp_path / "plain.safetensors")
    (tmp_path / "junk.json").write_text('{"kind": "labkit.RoutingTrace", "version": 1, "tensors": ["topk_indices"]}')
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"junk.safetensors' is not a safetensors file"):
        RoutingTrace.load(tmp_path / "junk")
    assert RoutingTrace.load(path).metadata() == trace.metadata()


def test_from_dict_requires_kind_and_fields():
    trace = trace_routing(hf("qwen3_moe"), PROMPTS[:1], tokenizer=_tokenizer(), progress=False)
    with pytest.raises(ValueError, match=r"RoutingTrace.from_dict: the dict has no 'kind' key .* expected kind 'labkit.RoutingTrace'"):
        RoutingTrace.from_dict({})
    no_kind = {k: v for k, v in trace.to_dict().items() if k != "kind"}
    with pytest.raises(ValueError, match="no 'kind' key"):
        RoutingTrace.from_dict(no_kind)
    partial = {k: v for k, v in trace.to_dict().items() if k not in ("top_k", "position")}
    with pytest.raises(ValueError, match=r"lacks 'position', 'top_k'"):
        RoutingTrace.from_dict(partial)
    with pytest.raises(ValueError, match="version 9, newer than this labkit reads"):
        RoutingTrace.from_dict({**trace.to_dict(), "version": 9})
    with pytest.raises(ValueError, match="holds a list, expected a dict"):
        RoutingTrace.from_dict([1])


def test_trace_names_its_model_and_generates_32_tokens_by_default():
    """Provenance and the documented default answer length (survivors of the mutation run)."""
    model, tokenizer = hf("olmoe"), _tokenizer()
    before = model.config.name_or_path
    model.config.name_or_path = "org/tiny-olmoe"
    try:
        generated = trace_routing(model, ["war and peace"], tokenizer=tokenizer, scope="generated", progress=False)
    finally:
        model.config.name_or_path = before
    assert generated.model_name == "org/tiny-olmoe"
    ids = tokenizer("war and peace", return_tensors="pt").input_ids  # no EOS within 40 tokens
    with torch.no_grad():
        answer = model.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.token_ids.tolist() == answer[0, ids.shape[1]:].tolist() and len(generated.token_ids) == 32
