"""Property-based: every public entry point, fed generated bad and edge-case inputs, either works as
documented or raises labkit's own ``TypeError`` / ``ValueError`` that starts with the function's
name and names the argument at fault -- never another exception type, never a hook left behind,
never longer than :data:`DEADLINE` per call (issue 22).

Bounds stated: hypothesis ``deadline`` is 4 s per example (a call on the tiny models takes
milliseconds; a bare string iterated as characters, or a 10-minute loop, would exceed it), and
``max_examples`` is kept small so the module runs in well under a minute on 2 cores. The models
are the session's tiny random-weight Llama (context 64) and OLMoE (8 experts, top-2, context 128).
"""

from __future__ import annotations

import json
import math
import os
from datetime import timedelta

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="the property tests need hypothesis (the test extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import labkit  # noqa: E402
from labkit import evals  # noqa: E402
from labkit.cache import ActivationCache, cache_activations  # noqa: E402
from labkit.hooks import count_hooks  # noqa: E402
from labkit.moe import ExpertMask, trace_routing  # noqa: E402
from labkit.moe.attribution import ExpertAttribution  # noqa: E402
from labkit.moe.causal import CausalAttribution  # noqa: E402
from labkit.moe.trace import RoutingTrace  # noqa: E402
from labkit.steering import SteeringVector  # noqa: E402

DEADLINE = timedelta(seconds=4)
# LABKIT_PROPERTY_EXAMPLES=500 LABKIT_PROPERTY_RANDOM=1 explores further (new examples each run)
PROPERTY = settings(
    max_examples=int(os.environ.get("LABKIT_PROPERTY_EXAMPLES", "40")),
    deadline=DEADLINE,
    derandomize=not os.environ.get("LABKIT_PROPERTY_RANDOM"),  # by default the same examples every run
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)

WORD = st.sampled_from(["the", "cat", "sat", "love", "hate", " ", "é", "\n", "<|endoftext|>", "🙂", "a b"])
TEXT = st.lists(WORD, min_size=0, max_size=12).map("".join)
LONG_TEXT = st.integers(70, 200).map(lambda n: " ".join(["cat"] * n))  # past the 64-token context
ODD = st.one_of(
    st.none(), st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
    st.binary(max_size=4), st.dictionaries(TEXT, TEXT, max_size=2), st.just(object()),
)
PROMPTS = st.one_of(
    TEXT, LONG_TEXT, ODD,
    st.lists(TEXT, max_size=3), st.tuples(TEXT, TEXT),
    st.lists(st.one_of(TEXT, ODD, LONG_TEXT), max_size=3),
)
INT_ARG = st.one_of(st.integers(-2, 4), st.floats(-1, 3), st.none(), st.booleans(), st.just("2"))


def _hooks(*models) -> int:
    return sum(count_hooks(model, model.labkit.twin) for model in models)


def _outcome(call, caller: str, arguments: tuple[str, ...]):
    """Run ``call``; a labkit TypeError/ValueError must start with ``caller:`` and name one of
    ``arguments`` (or the prompt / text / layer / expert it is about)."""
    try:
        return call()
    except (TypeError, ValueError) as error:
        message = str(error)
        assert message.startswith(caller), f"not labkit's message: {type(error).__name__}: {message}"
        words = (*arguments, "prompt", "text")
        assert any(word in message for word in words), f"names none of {words}: {message}"
        return error


def _check_names_argument(*models, call, caller, arguments):
    before = _hooks(*models)
    try:
        _outcome(call, caller, arguments)
    finally:
        assert _hooks(*models) == before, "a hook was left behind"


@PROPERTY
@given(prompts=PROMPTS, max_new_tokens=INT_ARG, temperature=st.one_of(st.floats(-1, 2), st.none()))
def test_generate(shared_tiny_llama, prompts, max_new_tokens, temperature):
    _check_names_argument(
        shared_tiny_llama, caller="generate", arguments=("prompts", "max_new_tokens", "temperature"),
        call=lambda: labkit.generate(shared_tiny_llama, prompts, max_new_tokens=max_new_tokens, temperature=temperature),
    )


@PROPERTY
@given(
    prompts=PROMPTS,
    hook_names=st.one_of(st.just(["blocks.1.hook_resid_pre"]), st.just("blocks.0.hook_resid_post"), ODD,
                         st.lists(st.sampled_from(["blocks.1.hook_resid_pre", "blocks.9.hook_resid_pre", "nope", ""]), max_size=2)),
    positions=st.one_of(st.sampled_from(["all", "last", "first", ""]), st.integers(-70, 70), st.none(),
                        st.lists(st.integers(-3, 5), max_size=3), st.just(slice(0, 2))),
    batch_size=INT_ARG,
)
def test_cache_activations(shared_tiny_llama, prompts, hook_names, positions, batch_size):
    _check_names_argument(
        shared_tiny_llama, caller="cache_activations", arguments=("prompts", "hook_names", "positions", "batch_size", "hook"),
        call=lambda: cache_activations(shared_tiny_llama, prompts, hook_names, positions=positions,
                                       batch_size=batch_size, progress=False),
    )


@PROPERTY
@given(
    prompts=st.one_of(PROMPTS, st.lists(st.lists(st.integers(-2, 400), max_size=4), max_size=2)),
    scope=st.one_of(st.sampled_from(["all", "generated", "last", ("last", 2), ("last", 0), ("first", 1)]), ODD),
    batch_size=INT_ARG,
    max_new_tokens=INT_ARG,
)
def test_trace_routing(shared_tiny_olmoe, prompts, scope, batch_size, max_new_tokens):
    _check_names_argument(
        shared_tiny_olmoe, caller="trace_routing", arguments=("prompts", "scope", "batch_size", "max_new_tokens", "token id"),
        call=lambda: trace_routing(shared_tiny_olmoe, prompts, scope=scope, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, progress=False),
    )


@PROPERTY
@given(texts=PROMPTS, batch_size=INT_ARG)
def test_perplexity(shared_tiny_llama, texts, batch_size):
    result = None

    def call():
        nonlocal result
        result = evals.perplexity(shared_tiny_llama, texts, batch_size=batch_size)
        return result

    _check_names_argument(shared_tiny_llama, caller="perplexity", arguments=("texts", "batch_size"), call=call)
    if isinstance(result, float):
        assert math.isfinite(result) and result >= 1.0


@PROPERTY
@given(plus=st.one_of(TEXT, LONG_TEXT, ODD), minus=st.one_of(TEXT, ODD), layer=INT_ARG,
       coefficient=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3), st.none(), st.just("1")))
def test_actadd(shared_tiny_llama, plus, minus, layer, coefficient):
    result = None

    def call():
        nonlocal result
        result = labkit.actadd(shared_tiny_llama, plus, minus, layer=layer, coefficient=coefficient)

    _check_names_argument(shared_tiny_llama, caller="actadd", arguments=("plus", "minus", "layer", "coefficient"), call=call)
    if isinstance(result, SteeringVector):
        assert result.activations.shape[0] <= 64 and torch.isfinite(result.activations).all()


@PROPERTY
@given(positive=PROMPTS, negative=PROMPTS, layer=INT_ARG,
       method=st.sampled_from(["mean_difference", "pca_direction", "probe_direction"]),
       positions=st.sampled_from(["all", "prompt", "generated", "front", None]),
       token=st.sampled_from(["last", "mean", "first"]))
def test_vector_builders(shared_tiny_llama, positive, negative, layer, method, positions, token):
    build = getattr(labkit, method)
    _check_names_argument(
        shared_tiny_llama, caller=method,
        arguments=("positive_prompts", "negative_prompts", "layer", "positions", "token", "paired", "prompts"),
        call=lambda: build(shared_tiny_llama, positive, negative, layer=layer, positions=positions, token=token),
    )


EXPERTS = st.one_of(
    st.lists(st.tuples(st.integers(-1, 4), st.integers(-1, 9)), max_size=3),
    st.dictionaries(st.integers(-1, 3), st.lists(st.integers(-1, 9), max_size=2), max_size=2),
    ODD, TEXT,
    st.lists(st.one_of(st.tuples(st.integers(0, 2)), st.tuples(st.integers(0, 2), st.integers(0, 7), st.integers(0, 1)), ODD), max_size=2),
)


@PROPERTY
@given(experts=EXPERTS, kind=st.sampled_from(["off", "on", "bias"]), bind=st.booleans(),
       value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.none(), st.just("x")))
def test_expert_mask_constructors(shared_tiny_olmoe, experts, kind, bind, value):
    model = shared_tiny_olmoe if bind else None

    def call():
        if kind == "bias":
            mask = ExpertMask.bias(experts, value, model=model)
        else:
            mask = getattr(ExpertMask, kind)(experts, model=model)
        if bind:  # a mask the constructor accepted for this model applies, or is refused by masked()
            with labkit.moe.masked(shared_tiny_olmoe, mask):
                labkit.generate(shared_tiny_olmoe, "the cat", max_new_tokens=1)
        return mask

    _check_names_argument(
        shared_tiny_olmoe, caller=("ExpertMask", "masked"), arguments=("expert", "layer", "value", "bias", "mask", "experts"),
        call=call,
    )


@PROPERTY
@given(n=INT_ARG, seed=st.one_of(st.integers(-1, 3), ODD), mode=st.sampled_from(["off", "on", "bias", "nope"]),
       value=st.one_of(st.floats(-2, 2), st.none()), top=INT_ARG)
def test_expert_mask_random_and_from_attribution(shared_tiny_olmoe, n, seed, mode, value, top):
    class Ranked:
        model_name, n_layers, n_experts = "tiny-olmoe", 3, 8

        def top(self, k):
            return [(layer, expert) for layer in range(3) for expert in range(8)][:k]

    _check_names_argument(
        shared_tiny_olmoe, caller="ExpertMask", arguments=("n", "seed", "mode", "value", "experts", "expert"),
        call=lambda: ExpertMask.random(shared_tiny_olmoe, n, seed=seed, mode=mode, value=value),
    )
    _check_names_argument(
        shared_tiny_olmoe, caller="ExpertMask", arguments=("n", "mode", "value", "expert"),
        call=lambda: ExpertMask.from_attribution(Ranked(), top, mode, value, model=shared_tiny_olmoe),
    )


LOADERS = {
    "SteeringVector.load": SteeringVector.load,
    "RoutingTrace.load": RoutingTrace.load,
    "ExpertAttribution.load": ExpertAttribution.load,
    "CausalAttribution.load": CausalAttribution.load,
    "ExpertMask.load": ExpertMask.load,
    "ActivationCache.load": ActivationCache.load,
}
JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2, 2), st.floats(allow_nan=False), TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
    max_leaves=8,
)


@PROPERTY
@given(
    loader=st.sampled_from(sorted(LOADERS)),
    document=st.one_of(JSONISH, st.fixed_dictionaries({"kind": st.sampled_from(
        ["labkit.SteeringVector", "labkit.RoutingTrace", "labkit.ExpertAttribution", "labkit.CausalAttribution",
         "labkit.ExpertMask", "labkit.ActivationCache", "other"]), "version": st.one_of(st.integers(-1, 3), TEXT)},
        optional={"tensors": st.lists(TEXT, max_size=2), "edits": JSONISH, "hook_name": JSONISH, "shards": JSONISH})),
    tensor_bytes=st.one_of(st.none(), st.binary(max_size=16)),
    where=st.sampled_from(["stem", "json", "missing", "none", "int"]),
)
def test_every_load(tmp_path_factory, loader, document, tensor_bytes, where):
    """Generated JSON (of every kind, or none) with generated tensor bytes beside it; also a missing
    path and non-path arguments. FileNotFoundError is the documented answer for a missing file."""
    folder = tmp_path_factory.mktemp("load")
    stem = folder / "x"
    if loader == "ActivationCache.load":
        stem = folder / "index"
    stem.with_suffix(".json").write_text(json.dumps(document), encoding="utf-8")
    if tensor_bytes is not None:
        stem.with_suffix(".safetensors").write_bytes(tensor_bytes)
    target = {"stem": stem, "json": stem.with_suffix(".json"), "missing": folder / "nothing", "none": None, "int": 3}[where]
    if loader == "ActivationCache.load" and where in ("stem", "json"):
        target = folder
    caller = loader.split(".")[0]
    try:
        _outcome(lambda: LOADERS[loader](target), caller, ("path", "kind", "version", "file", "directory", "lacks", "tensor"))
    except FileNotFoundError as error:
        assert str(error).startswith(caller) and where in ("missing", "stem", "json")
