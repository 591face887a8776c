"""No silently wrong number: bad input refused at every entry point, halves of a save bound together,
the user's directory kept (issue 22). Tiny random-weight models. On main at 0f7d1e5 every test here
failed except the bare-string cases of the entry points that already took a string as one prompt
(they pin the rule)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import labkit
from labkit import evals
from labkit.cache import ActivationCache, cache_activations
from labkit.hooks import count_hooks
from labkit.moe import ExpertMask, attribute_experts, trace_routing
from labkit.moe.attribution import ExpertAttribution
from labkit.moe.trace import RoutingTrace
from labkit.steering import SteeringVector

HOOK = "blocks.1.hook_resid_pre"
LONG = " ".join(["the cat sat on a mat"] * 20)  # > 64 tokens on the tiny tokenizer


def _hooks(model) -> int:
    return count_hooks(model, model.labkit.twin)


# --- the one prompt rule ------------------------------------------------------------------------


def test_check_prompts_rule():
    from labkit.checks import check_prompts

    assert check_prompts("Hello there", caller="f") == ["Hello there"]
    assert check_prompts(("a", "b"), caller="f") == ["a", "b"]
    assert check_prompts((p for p in ["a", "b"]), caller="f") == ["a", "b"]  # any iterable
    assert check_prompts([[1, 2], "x"], caller="f", token_ids=True) == [[1, 2], "x"]
    for bad, shown in ((None, "NoneType: None"), (5, "int: 5"), (2.5, "float: 2.5"), (b"ab", "bytes"), ({"a": 1}, "dict")):
        with pytest.raises(TypeError, match=rf"^f: texts must be a string or a non-empty list of strings, got {shown}"):
            check_prompts(bad, caller="f", argument="texts")
    with pytest.raises(TypeError, match=r"prompt 1 must be a str, got int: 3 \(in prompts\)"):
        check_prompts(["a", 3], caller="f")
    with pytest.raises(TypeError, match="one list of token ids; pass a list of prompts"):
        check_prompts([1, 2, 3], caller="f", token_ids=True)
    with pytest.raises(ValueError, match=r"need a prompt or a non-empty list of prompts, got \[\] \(prompts is empty\)"):
        check_prompts(iter(()), caller="f")
    with pytest.raises(ValueError, match=r"prompt 0 is empty \(''\) in prompts"):
        check_prompts([""], caller="f")


def _entry_points(llama, moe):
    """Every public function that takes a list of prompts, as ``name -> call(prompts)``."""
    return {
        "generate": lambda p: labkit.generate(llama, p, max_new_tokens=2).token_ids,
        "cache_activations": lambda p: cache_activations(llama, p, [HOOK], progress=False).prompts,
        "trace_routing": lambda p: trace_routing(moe, p, progress=False).n_prompts,
        "perplexity": lambda p: evals.perplexity(llama, p),
        "mean_difference": lambda p: labkit.mean_difference(llama, p, p, layer=1).source["positive_prompts"],
        "pca_direction": lambda p: labkit.pca_direction(llama, p, p, layer=1).source["positive_prompts"],
        "probe_direction": lambda p: labkit.probe_direction(llama, p, p, layer=1).source["positive_prompts"],
        "steering_perplexities": lambda p: evals.steering_perplexities(llama, p, [None]),
        "topic_probability": lambda p: evals.topic_probability(llama, p, ["cat"], [None]),
    }


@pytest.mark.parametrize(
    "name", ["generate", "cache_activations", "trace_routing", "perplexity", "mean_difference", "pca_direction",
             "steering_perplexities", "topic_probability"],
)
def test_a_bare_string_is_one_prompt_everywhere(shared_tiny_llama, shared_tiny_olmoe, name):
    """``"the cat sat"`` is one prompt (main at 0f7d1e5: cache_activations cached 11 one-character
    prompts); the result equals the call with ``["the cat sat"]``."""
    call = _entry_points(shared_tiny_llama, shared_tiny_olmoe)[name]
    bare, listed = call("the cat sat"), call(["the cat sat"])
    if name == "cache_activations":
        assert bare == listed == ("the cat sat",)
    elif name == "trace_routing":
        assert bare == listed == 1
    elif name in ("mean_difference", "pca_direction"):
        assert bare == listed == ["the cat sat"]
    else:
        assert bare == listed


@pytest.mark.parametrize("name", list(_entry_points(None, None)))
@pytest.mark.parametrize("bad", [None, 7])
def test_none_or_int_prompts_raise_labkits_type_error(shared_tiny_llama, shared_tiny_olmoe, name, bad):
    """Main at 0f7d1e5: ``'int' object is not iterable`` from deep inside (cache, trace)."""
    before = _hooks(shared_tiny_llama) + _hooks(shared_tiny_olmoe)
    call = _entry_points(shared_tiny_llama, shared_tiny_olmoe)[name]
    argument = "positive_prompts" if name.endswith(("difference", "direction")) else "(prompts|texts)"
    with pytest.raises(TypeError, match=rf"^{name}: {argument} must be a string or a non-empty list"):
        call(bad)
    assert _hooks(shared_tiny_llama) + _hooks(shared_tiny_olmoe) == before


# --- the context window -------------------------------------------------------------------------


def test_texts_longer_than_the_context_are_refused(shared_tiny_llama):
    """Main at 0f7d1e5: perplexity returned a number for a 123-token text on a 64-token model and
    actadd an 123-row vector. labkit computes no sliding-window perplexity (documented)."""
    model = shared_tiny_llama
    n = len(model.labkit.encode(LONG))
    assert n > 64
    window = rf"is {n} tokens; the model's context window is 64 tokens"
    with pytest.raises(ValueError, match=rf"^perplexity: prompt 1 {window}"):  # the index of the long text
        evals.perplexity(model, ["the cat", LONG])
    with pytest.raises(ValueError, match=rf"^actadd \(plus\): prompt 0 {window}"):
        labkit.actadd(model, LONG, " ", layer=1)
    with pytest.raises(ValueError, match=rf"^actadd \(minus\): prompt 0 {window}"):
        labkit.actadd(model, " ", LONG, layer=1)
    with pytest.raises(ValueError, match=rf"^mean_difference: prompt 0 {window}"):
        labkit.mean_difference(model, [LONG], ["the dog"], layer=1)
    with pytest.raises(ValueError, match=rf"^steering_perplexities: prompt 0 {window}"):
        evals.steering_perplexities(model, [LONG], [None])
    # a text of exactly the window is fine, and gives the number the model computes
    fits = " ".join(LONG.split()[:30])
    assert len(model.labkit.encode(fits)) <= 64 and evals.perplexity(model, fits) > 1


# --- out_dir: the user's folder is kept ---------------------------------------------------------


def test_out_dir_that_is_a_file_or_under_a_file(shared_tiny_llama, tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ValueError, match=r"^cache_activations: out_dir '.*file' is an existing file, not a directory"):
        cache_activations(shared_tiny_llama, ["the cat"], [HOOK], out_dir=tmp_path / "file", progress=False)
    with pytest.raises(ValueError, match=r"lies under '.*file', which is an existing file"):
        cache_activations(shared_tiny_llama, ["the cat"], [HOOK], out_dir=tmp_path / "file" / "x", progress=False)
    with pytest.raises(TypeError, match=r"out_dir must be a path \(str or os.PathLike\), got int: 3"):
        cache_activations(shared_tiny_llama, ["the cat"], [HOOK], out_dir=3, progress=False)
    assert (tmp_path / "file").read_text() == "mine"
    from labkit.checks import check_out_dir

    assert check_out_dir(tmp_path / "new", caller="f") == (tmp_path / "new", False)


def _interrupt_after(monkeypatch, model, n_batches: int) -> dict:
    from labkit.backends import backend_of

    backend = backend_of(model)
    calls = {"n": 0}
    real_capture = backend.capture

    def flaky_capture(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n_batches + 1:  # the batch after n_batches complete ones
            raise KeyboardInterrupt
        return real_capture(*args, **kwargs)

    monkeypatch.setattr(backend, "capture", flaky_capture)
    return calls


@pytest.mark.parametrize("existing", [True, False])
def test_interrupt_mid_stream_cleans_only_what_labkit_created(shared_tiny_llama, tmp_path, monkeypatch, existing):
    """Main at 0f7d1e5: an interrupt while streaming into the user's empty folder deleted the folder.
    Shards were written before the interrupt (shard_bytes=1: one shard per batch)."""
    prompts = ["the cat sat", "a dog ran", "love and hate", "one two three"]
    out = tmp_path / "mine" if existing else tmp_path / "new" / "deeper"
    if existing:
        out.mkdir()
    calls = _interrupt_after(monkeypatch, shared_tiny_llama, 3)
    before = _hooks(shared_tiny_llama)
    with pytest.raises(KeyboardInterrupt):
        cache_activations(shared_tiny_llama, prompts, [HOOK], batch_size=1, out_dir=out, shard_bytes=1, progress=False)
    assert calls["n"] == 4  # the interrupt came after three shards were on disk
    assert _hooks(shared_tiny_llama) == before
    if existing:
        assert out.is_dir() and list(out.iterdir()) == []  # the user's folder, as it was
    else:
        assert not (tmp_path / "new").exists()  # every directory labkit created is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == (["mine"] if existing else [])


# --- saved halves bound together ----------------------------------------------------------------


def _saved_objects(llama, tmp_path):
    from tests.test_moe_attribution import make_trace

    vectors = (labkit.actadd(llama, " ocean", " ", layer=1), labkit.actadd(llama, " mountain range", " ", layer=1))
    traces = (make_trace([5, 4], seed=1), make_trace([5, 4, 6], seed=2))
    attributions = (attribute_experts(*traces[:2], n_bootstrap=10, n_splits=0),
                    attribute_experts(make_trace([3] * 4, seed=3), make_trace([3] * 4, seed=4), n_bootstrap=10, n_splits=0))
    return {SteeringVector: vectors, RoutingTrace: traces, ExpertAttribution: attributions}


def test_one_saves_json_beside_another_saves_tensors_is_refused(shared_tiny_llama, tmp_path):
    """Main at 0f7d1e5: vector A's .json beside vector B's .safetensors loaded without complaint."""
    for cls, (a, b) in _saved_objects(shared_tiny_llama, tmp_path).items():
        folder = tmp_path / cls.__name__
        a.save(folder / "a")
        b.save(folder / "b")
        document = json.loads((folder / "a.json").read_text())
        assert set(document["tensor_file"]) == {"sha256", "shapes", "dtypes"}
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a bound pair loads without a warning
            cls.load(folder / "a")
        (folder / "b.safetensors").replace(folder / "a.safetensors")
        with pytest.raises(ValueError, match=rf"^{cls.__name__}.load: '.*a.safetensors' does not belong to '.*a.json'"):
            cls.load(folder / "a")


def test_same_shapes_other_bytes_refused_by_the_hash(shared_tiny_llama, tmp_path):
    vector = labkit.actadd(shared_tiny_llama, " ocean", " ", layer=1)
    vector.save(tmp_path / "a")
    vector.with_coefficient(2.0).save(tmp_path / "b")  # same shapes and dtypes
    SteeringVector(vector.hook_name, vector.activations + 1.0, positions="front").save(tmp_path / "c")
    (tmp_path / "c.safetensors").replace(tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match=r"its SHA-256 is .* the JSON was saved with"):
        SteeringVector.load(tmp_path / "a")


def test_files_saved_before_the_binding_load_with_a_warning(shared_tiny_llama, tmp_path):
    vector = labkit.actadd(shared_tiny_llama, " ocean", " ", layer=1)
    path = vector.save(tmp_path / "old")
    document = json.loads(path.read_text())
    del document["tensor_file"]
    path.write_text(json.dumps(document))
    with pytest.warns(UserWarning, match="written before labkit bound the .json and .safetensors halves"):
        loaded = SteeringVector.load(path)
    assert torch.equal(loaded.activations, vector.activations)


def test_cache_shards_of_another_cache_are_refused(shared_tiny_llama, tmp_path):
    a = cache_activations(shared_tiny_llama, ["the cat sat"], [HOOK], out_dir=tmp_path / "a", progress=False)
    cache_activations(shared_tiny_llama, ["a dog ran"], [HOOK], out_dir=tmp_path / "b", progress=False)
    expected = a[HOOK].clone()
    torch.testing.assert_close(ActivationCache.load(tmp_path / "a")[HOOK], expected, rtol=0, atol=0)
    (tmp_path / "b" / "shard-00000.safetensors").replace(tmp_path / "a" / "shard-00000.safetensors")
    with pytest.raises(ValueError, match=r"shard '.*shard-00000.safetensors' is not the file this cache's index.json"):
        ActivationCache.load(tmp_path / "a")[HOOK]
    (tmp_path / "b" / "index.safetensors").write_bytes((tmp_path / "a" / "index.safetensors").read_bytes())
    (tmp_path / "a" / "index.json").replace(tmp_path / "b" / "index.json")  # a's index JSON, b's tensors
    cache_activations(shared_tiny_llama, ["love and hate"], [HOOK], out_dir=tmp_path / "c", progress=False)
    (tmp_path / "c" / "index.safetensors").replace(tmp_path / "b" / "index.safetensors")
    with pytest.raises(ValueError, match="does not belong to"):
        ActivationCache.load(tmp_path / "b")


def test_mask_from_another_models_attribution_is_refused(shared_tiny_olmoe, tiny_tokenizer):
    """Main at 0f7d1e5: only layer and expert counts were compared, so model A's attribution bound to B."""
    from labkit.models import from_hf
    from tests.moe_fixtures import tiny_moe_hf

    other = from_hf(tiny_moe_hf("olmoe", tiny_tokenizer, seed=1), tiny_tokenizer, name="tiny-olmoe-other")
    behavior = trace_routing(shared_tiny_olmoe, ["the cat sat on a mat", "love and hate"], progress=False)
    control = trace_routing(shared_tiny_olmoe, ["one two three four", "the dog ran"], progress=False)
    attribution = attribute_experts(behavior, control, n_bootstrap=0, n_splits=0)
    assert attribution.model_name == "tiny-olmoe"
    mask = ExpertMask.from_attribution(attribution, 2, model=shared_tiny_olmoe)
    assert mask.model_name == "tiny-olmoe" and mask.experts() == [tuple(x[:2]) for x in attribution.top(2)]
    with pytest.raises(ValueError, match=r"computed on model 'tiny-olmoe' but model= is 'tiny-olmoe-other'"):
        ExpertMask.from_attribution(attribution, 2, model=other)


def test_every_shipped_save_is_bound():
    """Files labkit ships under data/ (e.g. the SmolLM2 SAE) carry the binding, so loading them
    raises no 'written before labkit bound the halves' warning and a swapped tensor file is caught."""
    from labkit import storage
    from labkit.datasets import data_dir

    documents = []
    for path in sorted(data_dir().rglob("*.json")):
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(document, dict) and str(document.get("kind", "")).startswith("labkit.") and document.get("tensors"):
            documents.append(path)
            json_path, tensor_path = storage.file_pair(path)
            storage.check_binding(document.get("tensor_file"), tensor_path, json_path, caller="shipped")
    assert documents, "expected at least the shipped SAE"


def test_perplexity_of_a_two_token_text_equals_the_hand_computation(shared_tiny_llama):
    """The shortest text perplexity accepts (two tokens: one predicted token), by hand from the
    twin's logits; a one-token text is refused. (Mutation testing: ``< 2`` → ``<= 2`` survived.)"""
    model = shared_tiny_llama
    record = model.labkit
    text = "the"  # BOS + one token
    assert len(record.encode(text)) == 2
    ids = torch.tensor([record.encode(text)])
    with torch.no_grad():
        logits = record.twin(input_ids=ids).logits[0, 0].double()
    expected = float(torch.exp(-torch.log_softmax(logits, -1)[ids[0, 1]]))
    assert evals.perplexity(model, text) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match=r"^perplexity: text 0 .* has 1 token\(s\); need ≥ 2"):
        evals.perplexity(model, "a", prepend_bos=False)  # one token, nothing predicted


def test_perplexity_batching_bos_and_batch_size_edges(shared_tiny_llama):
    """Mutation survivors of labkit/evals/perplexity.py, each killed by a value: a BOS + one-token
    text beside a long one (the short row carries many pads), batch_size 1 vs 2, prepend_bos
    passed through, batch_size 0 refused with the function's name."""
    model = shared_tiny_llama
    texts = ["the", "the cat sat on a mat and the dog ran to the park"]
    reference = evals.perplexity(model, texts, batch_size=1)  # no padding at all
    assert evals.perplexity(model, texts, batch_size=2) == pytest.approx(reference, rel=1e-5)
    for batch_size in (1, 2):
        (pooled,) = evals.steering_perplexities(model, texts, [None], batch_size=batch_size)
        assert pooled == pytest.approx(reference, rel=1e-5)
    longer = ["the cat", texts[1]]  # "the" alone is one token without BOS
    without_bos = evals.perplexity(model, longer, prepend_bos=False, batch_size=1)
    assert without_bos != pytest.approx(evals.perplexity(model, longer), rel=1e-3)
    (pooled,) = evals.steering_perplexities(model, longer, [None], prepend_bos=False)
    assert pooled == pytest.approx(without_bos, rel=1e-5)
    with pytest.raises(ValueError, match=r"^perplexity: batch_size must be an int ≥ 1, got 0"):
        evals.perplexity(model, texts, batch_size=0)
    for bad in (0, True):
        with pytest.raises(ValueError, match=rf"^steering_perplexities: batch_size must be a positive int, got {bad}"):
            evals.steering_perplexities(model, texts, [None], batch_size=bad)
