"""Steering vectors: ActAdd recipe, mean difference, serialisation, composition, bad input, hygiene."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

import labkit
from labkit.hooks import count_hooks
from labkit.models import hf_model_of, tokenizer_of
from labkit.steering import SteeringVector, steered


def hidden_states(model, token_ids: list[int]) -> tuple[torch.Tensor, ...]:
    """Reference activations straight from Hugging Face: ``hidden_states[L]`` enters block L."""
    twin = hf_model_of(model)
    with torch.no_grad():
        out = twin(input_ids=torch.tensor([token_ids]), output_hidden_states=True)
    return tuple(h[0] for h in out.hidden_states)


def logits(model, text: str) -> torch.Tensor:
    ids = model.to_tokens(text)
    with torch.no_grad():
        return hf_model_of(model)(input_ids=ids).logits


# --- the published recipe ------------------------------------------------------------------


def test_actadd_is_coefficient_times_padded_difference(tiny_llama):
    tokenizer = tokenizer_of(tiny_llama)
    plus, minus = " wedding party", " "
    vector = labkit.actadd(tiny_llama, plus, minus, layer=1, coefficient=3.0)
    # the lab's BOS rule is the bridge's: both prompts start with BOS (TransformerLens's to_tokens)
    plus_ids, minus_ids = tiny_llama.to_tokens(plus)[0].tolist(), tiny_llama.to_tokens(minus)[0].tolist()
    assert plus_ids[0] == minus_ids[0] == tokenizer.bos_token_id
    space = tokenizer(" ", add_special_tokens=False).input_ids[-1]
    assert len(plus_ids) > len(minus_ids)  # the shorter side is right-padded with spaces
    minus_padded = minus_ids + [space] * (len(plus_ids) - len(minus_ids))
    expected = hidden_states(tiny_llama, plus_ids)[1] - hidden_states(tiny_llama, minus_padded)[1]
    assert vector.activations.shape == (len(plus_ids), tiny_llama.cfg.d_model)
    torch.testing.assert_close(vector.activations, expected)
    torch.testing.assert_close(vector.steering_vector, 3.0 * expected)
    # Turner et al.'s setup: the BOS row of the difference is exactly zero
    assert torch.equal(vector.activations[0], torch.zeros_like(vector.activations[0]))
    assert vector.activations[1:].abs().sum() > 0
    assert vector.positions == "front" and vector.hook_name == "blocks.1.hook_resid_pre"
    assert vector.source["plus"] == plus and vector.source["minus_token_ids"] == minus_padded
    assert vector.model_name == "tiny-llama" and vector.layer == 1


def test_actadd_adds_to_the_first_real_positions_of_each_row(tiny_llama):
    tokenizer = tokenizer_of(tiny_llama)
    vector = labkit.actadd(tiny_llama, " wedding", " ", layer=1, coefficient=2.0)
    n = vector.n_positions
    texts = ["the cat sat on a mat and the dog ran to the park", "love and hate and war"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)  # left padding
    seen = {}

    def grab(activation, _site):
        seen["act"] = activation.detach().clone()

    with steered(tiny_llama, vector) as twin:
        # registered after the steering hook, so it sees the stream after the addition
        with labkit.hooks.attach(tiny_llama, {"blocks.1.hook_resid_pre": grab}):
            positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
            twin(**batch, position_ids=positions)
    for row, text in enumerate(texts):
        ids = tokenizer(text).input_ids
        start = batch.input_ids.shape[1] - len(ids)
        added = seen["act"][row, start:] - hidden_states(tiny_llama, ids)[1]
        torch.testing.assert_close(added[:n], vector.steering_vector, rtol=1e-4, atol=1e-4)
        assert torch.all(added[n:].abs().max(dim=-1).values < 1e-4)
    steered_act = seen["act"]
    with labkit.hooks.attach(tiny_llama, {"blocks.1.hook_resid_pre": grab}) as twin:
        twin(**batch, position_ids=positions)
    pads = batch.attention_mask == 0
    assert pads.any() and torch.equal(steered_act[pads], seen["act"][pads])  # pads get nothing


def test_mean_difference_is_difference_of_means(tiny_llama):
    tokenizer = tokenizer_of(tiny_llama)
    positive, negative = ["love", "love and peace"], ["hate", "hate and war", "war"]
    vector = labkit.mean_difference(tiny_llama, positive, negative, layer=2, coefficient=1.5)

    def mean_last(prompts):
        return torch.stack([hidden_states(tiny_llama, tiny_llama.to_tokens(p)[0].tolist())[2][-1] for p in prompts]).mean(0)

    torch.testing.assert_close(vector.activations, mean_last(positive) - mean_last(negative), rtol=1e-4, atol=1e-5)
    assert vector.activations.shape == (tiny_llama.cfg.d_model,) and vector.positions == "all"
    mean_tokens = labkit.mean_difference(tiny_llama, positive, negative, layer=2, token="mean")
    assert not torch.allclose(mean_tokens.activations, vector.activations)


# --- data type ----------------------------------------------------------------------------


def test_save_load_roundtrip_safetensors_and_json(tiny_llama, tmp_path):
    vector = labkit.actadd(tiny_llama, "love", "hate", layer=0, coefficient=-2.5)
    json_path = vector.save(tmp_path / "love_hate")
    tensor_path = tmp_path / "love_hate.safetensors"
    assert json_path.name == "love_hate.json" and tensor_path.is_file()
    meta = json.loads(json_path.read_text())
    assert meta["kind"] == "labkit.SteeringVector" and meta["model_name"] == "tiny-llama"
    assert meta["layer"] == 0 and meta["source"]["plus"] == "love"
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))
    for path in (tmp_path / "love_hate", json_path, tensor_path):
        loaded = SteeringVector.load(path)
        assert torch.equal(loaded.activations, vector.activations)
        assert loaded.metadata() == vector.metadata()
    assert SteeringVector.from_dict(vector.to_dict()).metadata() == vector.metadata()


def test_saved_metadata_states_every_number_of_the_vector(tmp_path):
    """The JSON a user reads next to the tensor: kind, version, layer, width, shape, coefficient.
    (Mutation testing found the width and shape keys unchecked.)"""
    vector = SteeringVector("blocks.2.hook_resid_post", torch.arange(12.0).reshape(3, 4), coefficient=-1.5,
                            positions="front", model_name="m", source={"method": "actadd"})
    expected = {"kind": "labkit.SteeringVector", "version": 1, "hook_name": "blocks.2.hook_resid_post",
                "layer": 2, "coefficient": -1.5, "positions": "front", "model_name": "m", "d_model": 4,
                "shape": [3, 4], "source": {"method": "actadd"}, "operation": "add"}
    assert vector.metadata() == expected
    json_path = vector.save(tmp_path / "new" / "dirs" / "v")  # missing parents are created
    tensor_path = json_path.with_suffix(".safetensors")
    from labkit.storage import file_sha256

    binding = {"sha256": file_sha256(tensor_path), "shapes": {"activations": [3, 4]}, "dtypes": {"activations": "float32"}}
    assert json.loads(json_path.read_text()) == {**expected, "tensors": ["activations"], "tensor_file": binding}
    with safe_open(str(tensor_path), framework="pt") as f:  # the tensor file says what it is, too
        assert f.metadata() == {"kind": "labkit.SteeringVector", "version": "1"}
        assert torch.equal(f.get_tensor("activations"), vector.activations)


def test_from_dict_refuses_another_kind_or_version():
    data = SteeringVector("blocks.0.hook_resid_pre", torch.ones(4)).to_dict()
    assert torch.equal(SteeringVector.from_dict(data).activations, torch.ones(4))
    refusals = {
        "version": (2, r"SteeringVector.from_dict: the dict is labkit.SteeringVector version 2, newer than this labkit reads \(1\)"),
        "kind": ("labkit.ExpertMask", r"the dict is of kind 'labkit.ExpertMask'; expected kind 'labkit.SteeringVector'. Load it with ExpertMask.load"),
    }
    for key, (value, message) in refusals.items():
        with pytest.raises(ValueError, match=message):
            SteeringVector.from_dict({**data, key: value})
    # a hand-written dict may leave out the optional fields: unchecked model, empty provenance
    minimal = {k: data[k] for k in ("kind", "version", "hook_name", "activations", "coefficient", "positions")}
    loaded = SteeringVector.from_dict(minimal)
    assert loaded.model_name == "" and loaded.source == {}


def test_vector_is_frozen_and_transforms_return_new_objects(tiny_llama):
    vector = labkit.mean_difference(tiny_llama, ["love"], ["hate"], layer=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        vector.coefficient = 3.0
    other = vector.with_coefficient(3.0).with_positions("generated")
    assert vector.coefficient == 1.0 and vector.positions == "all"
    assert other.coefficient == 3.0 and other.positions == "generated"


# --- composition ---------------------------------------------------------------------------


def test_vectors_compose_same_and_different_layers(tiny_llama):
    text = "the cat sat on a mat"
    direction = labkit.mean_difference(tiny_llama, ["love"], ["hate"], layer=1, coefficient=1.0)
    with steered(tiny_llama, direction.with_coefficient(2.0)):
        doubled = logits(tiny_llama, text)
    with steered(tiny_llama, direction, direction):
        twice = logits(tiny_llama, text)
    with steered(tiny_llama, direction), steered(tiny_llama, direction):
        nested = logits(tiny_llama, text)
    torch.testing.assert_close(twice, doubled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nested, twice)

    layer2 = labkit.actadd(tiny_llama, " wedding", " ", layer=2, coefficient=3.0)
    with steered(tiny_llama, direction, layer2):
        both = logits(tiny_llama, text)
    with steered(tiny_llama, direction):
        one = logits(tiny_llama, text)
    assert not torch.allclose(both, one) and not torch.allclose(one, logits(tiny_llama, text))


def test_zero_coefficient_changes_nothing(tiny_llama):
    vector = labkit.actadd(tiny_llama, " wedding", " ", layer=1, coefficient=0.0)
    plain = logits(tiny_llama, "the dog ran to the park")
    with steered(tiny_llama, vector):
        assert torch.equal(logits(tiny_llama, "the dog ran to the park"), plain)


# --- bad input -----------------------------------------------------------------------------


def test_bad_input_errors_name_received_and_allowed(tiny_llama, tiny_tokenizer):
    with pytest.raises(ValueError, match=r"prompt 0 is empty"):
        labkit.actadd(tiny_llama, "", " ", layer=1)
    with pytest.raises(ValueError, match=r"need a prompt or a non-empty list of prompts"):
        labkit.mean_difference(tiny_llama, [], ["hate"], layer=1)
    with pytest.raises(ValueError, match=r"layer 3 out of range; model has 3 layers \(0\.\.2\)"):
        labkit.actadd(tiny_llama, "love", "hate", layer=3)
    with pytest.raises(ValueError, match=r"coefficient must be finite, got nan"):
        labkit.actadd(tiny_llama, "love", "hate", layer=1, coefficient=float("nan"))
    with pytest.raises(ValueError, match=r"coefficient must be finite, got inf"):
        labkit.mean_difference(tiny_llama, ["love"], ["hate"], layer=1).with_coefficient(float("inf"))
    with pytest.raises(ValueError, match=r"positions='front' is not allowed"):
        labkit.mean_difference(tiny_llama, ["love"], ["hate"], layer=1, positions="front")
    with pytest.raises(ValueError, match=r"positions='middle' is not allowed; use one of"):
        SteeringVector("blocks.0.hook_resid_pre", torch.ones(32), positions="middle")
    bad = torch.ones(32)
    bad[3] = float("nan")
    with pytest.raises(ValueError, match=r"1 NaN/inf value"):
        SteeringVector("blocks.0.hook_resid_pre", bad)
    with pytest.raises(ValueError, match=r"shape \(pos, d_model\) or \(d_model,\)"):
        SteeringVector("blocks.0.hook_resid_pre", torch.ones(2, 3, 32), positions="front")

    wide = SteeringVector("blocks.0.hook_resid_pre", torch.ones(48), model_name="tiny-llama")
    with pytest.raises(ValueError, match=r"d_model=48, but model 'tiny-llama' has d_model=32"):
        with steered(tiny_llama, wide):
            pass
    deep = SteeringVector("blocks.7.hook_resid_pre", torch.ones(32))
    with pytest.raises(ValueError, match=r"layer 7 out of range; model has 3 layers"):
        labkit.generate(tiny_llama, "love", steering=deep, max_new_tokens=2)
    from labkit.models import from_hf
    from tests.conftest import tiny_llama_hf

    other = from_hf(tiny_llama_hf(tiny_tokenizer, seed=1), tiny_tokenizer, name="other-llama")
    vector = labkit.mean_difference(tiny_llama, ["love"], ["hate"], layer=1)
    with pytest.raises(ValueError, match=r"made for model 'tiny-llama' and refuses to apply to 'other-llama'"):
        with steered(other, vector):
            pass
    with pytest.raises(ValueError, match=r"exists only inside the TransformerLens bridge"):
        with steered(tiny_llama, SteeringVector("blocks.0.attn.hook_pattern", torch.ones(32))):
            pass
    assert count_hooks(hf_model_of(tiny_llama)) == 0


# --- hook hygiene --------------------------------------------------------------------------


def test_no_hook_survives_exit_exception_or_interrupt(tiny_llama):
    twin = hf_model_of(tiny_llama)
    vectors = [
        labkit.actadd(tiny_llama, " wedding", " ", layer=1, coefficient=4.0),
        labkit.mean_difference(tiny_llama, ["love"], ["hate"], layer=2),
    ]
    bridge_at_rest = count_hooks(tiny_llama, tiny_llama.original_model)
    assert count_hooks(twin) == 0
    with steered(tiny_llama, *vectors):
        assert count_hooks(twin) == 3  # one per vector + the input observer
        # the same on the bridge side: one per vector + the observer on the original model
        assert count_hooks(tiny_llama, tiny_llama.original_model) == bridge_at_rest + 3
    assert count_hooks(twin) == 0

    with pytest.raises(RuntimeError):
        with steered(tiny_llama, *vectors):
            raise RuntimeError("boom")
    assert count_hooks(twin) == 0

    with pytest.raises(KeyboardInterrupt):
        with steered(tiny_llama, *vectors):
            raise KeyboardInterrupt
    assert count_hooks(twin) == 0

    def interrupt(*_args, **_kwargs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with labkit.hooks.attach(tiny_llama, {"blocks.2.hook_resid_post": interrupt}):
            labkit.generate(tiny_llama, "love", steering=vectors, max_new_tokens=4)
    assert count_hooks(twin) == 0
    assert count_hooks(tiny_llama, tiny_llama.original_model) == bridge_at_rest


# --- where each position mode adds, on the prompt pass and every decode step -----------------

STEER_LAYER = 1
MODE_PROMPTS = ["the cat sat on a mat and the dog ran to the park", "love and hate", "war"]


def _additions_during_generation(model, vector, prompts, *, use_cache, new_tokens=4):
    """Run ``labkit.generate`` steered and return, per forward call of the twin, what the
    steering hook added at the hook point: the stream entering the block after the steering
    hook minus the stream before it, ``(batch, new, d_model)`` per call."""
    block = hf_model_of(model).model.layers[STEER_LAYER]
    before, after = [], []

    def grab(store):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            store.append(hidden.detach().clone())

        return hook

    first = block.register_forward_pre_hook(grab(before), with_kwargs=True, prepend=True)
    try:
        with steered(model, vector):
            last = block.register_forward_pre_hook(grab(after), with_kwargs=True)
            try:
                out = labkit.generate(
                    model, prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=use_cache
                )
            finally:
                last.remove()
    finally:
        first.remove()
    assert len(before) == len(after) == new_tokens  # the prompt pass + one call per further token
    return out, [a - b for a, b in zip(after, before)]


def _expected_addition(vector, mode, lengths, width, start, stop):
    """What ``mode`` must add at absolute positions ``start..stop-1`` of a left-padded batch
    whose prompt is ``width`` tokens wide and whose rows have ``lengths`` real prompt tokens."""
    d_model = vector.d_model
    added = vector.steering_vector
    expected = torch.zeros(len(lengths), stop - start, d_model)
    for row, length in enumerate(lengths):
        first_real = width - length
        for column, position in enumerate(range(start, stop)):
            if position < first_real:
                continue  # padding never receives anything
            in_prompt = position < width
            if mode == "all" or (mode == "prompt" and in_prompt) or (mode == "generated" and not in_prompt):
                expected[row, column] = added
            elif mode == "front" and in_prompt and position - first_real < added.shape[0]:
                expected[row, column] = added[position - first_real]
    return expected


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "no_cache"])
@pytest.mark.parametrize("mode", ["front", "all", "prompt", "generated"])
def test_each_position_mode_adds_exactly_where_it_applies(tiny_llama, mode, use_cache):
    generator = torch.Generator().manual_seed(7)
    d_model = tiny_llama.cfg.d_model
    shape = (4, d_model) if mode == "front" else (d_model,)
    vector = SteeringVector(
        f"blocks.{STEER_LAYER}.hook_resid_pre", torch.randn(shape, generator=generator),
        coefficient=2.5, positions=mode, model_name="tiny-llama",
    )
    out, additions = _additions_during_generation(tiny_llama, vector, MODE_PROMPTS, use_cache=use_cache)
    lengths = [len(ids) for ids in out.prompt_token_ids]
    width = max(lengths)
    assert len(set(lengths)) == 3 and min(lengths) < 4  # left padding, and a row shorter than the ActAdd rows
    applied_somewhere = False
    for call, added in enumerate(additions):
        new = added.shape[1]
        # with the cache call 0 covers the prompt and call t the token at width+t-1; without it
        # every call recomputes everything from position 0
        start = 0 if (call == 0 or not use_cache) else width + call - 1
        expected = _expected_addition(vector, mode, lengths, width, start, start + new)
        zero = expected == 0
        assert torch.equal(added[zero], torch.zeros_like(added[zero])), f"call {call}: added where {mode!r} must not"
        torch.testing.assert_close(added[~zero], expected[~zero], rtol=0, atol=1e-5)
        applied_somewhere |= bool((~zero).any())
    assert applied_somewhere


# --- one-batch sweeps: a row of the batch equals its solo run --------------------------------


def _sweep_rows(model):
    wedding = labkit.actadd(model, " wedding party", " ", layer=1)
    short = labkit.actadd(model, "love", "hate", layer=1)
    direction = labkit.mean_difference(model, ["love", "peace"], ["hate", "war"], layer=2)
    return [
        wedding.with_coefficient(8.0),
        None,
        [direction.with_coefficient(6.0), wedding.with_coefficient(-5.0)],  # two vectors, composed in order
        short.with_coefficient(3.0),  # an ActAdd vector of another length at the same hook point
        direction.with_coefficient(4.0).with_positions("generated"),
        labkit.directional_ablation(model, direction),
        wedding.with_coefficient(2.0),
        direction.with_coefficient(-6.0).with_positions("prompt"),
    ]


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "no_cache"])
def test_one_batch_sweep_rows_equal_their_solo_runs(tiny_llama, use_cache):
    rows = _sweep_rows(tiny_llama)
    prompts = ["the cat sat on a mat", "love and hate", "war", "the dog ran to the park while",
               "one two three", "peace", "the city during war and peace", "what happened"]
    settings = dict(max_new_tokens=8, min_new_tokens=8, use_cache=use_cache)
    batched = labkit.generate(tiny_llama, prompts, steering_per_row=rows, **settings)
    for prompt, row, ids in zip(prompts, rows, batched.token_ids):
        assert ids == labkit.generate(tiny_llama, [prompt], steering=row, **settings).token_ids[0]
    # and the steering is really there: the steered rows differ from the plain batch
    plain = labkit.generate(tiny_llama, prompts, **settings)
    assert plain.token_ids[1] == batched.token_ids[1]  # the row without a vector
    assert sum(a != b for a, b in zip(plain.token_ids, batched.token_ids)) >= 4
    assert count_hooks(hf_model_of(tiny_llama)) == 0


def test_one_batch_sweep_same_prompt_many_coefficients(tiny_llama):
    vector = labkit.actadd(tiny_llama, " wedding", " ", layer=1)
    coefficients = [0.0, 2.0, 4.0, 8.0, -4.0, 16.0]
    prompt = "the cat sat on a mat"
    batched = labkit.generate(
        tiny_llama, [prompt] * len(coefficients), steering_per_row=[vector.with_coefficient(c) for c in coefficients],
        max_new_tokens=6, min_new_tokens=6,
    )
    for c, ids in zip(coefficients, batched.token_ids):
        assert ids == labkit.generate(tiny_llama, prompt, steering=vector.with_coefficient(c),
                                      max_new_tokens=6, min_new_tokens=6).token_ids[0]
    assert len({tuple(ids) for ids in batched.token_ids}) >= 3


def test_rows_bad_input(tiny_llama):
    vector = labkit.actadd(tiny_llama, " wedding", " ", layer=1)
    with pytest.raises(ValueError, match=r"steering_per_row has 1 entries for 2 prompts"):
        labkit.generate(tiny_llama, ["love", "war"], steering_per_row=[vector], max_new_tokens=2)
    with pytest.raises(TypeError, match=r"steering_per_row must be a list with one entry per prompt"):
        labkit.generate(tiny_llama, ["love"], steering_per_row=vector, max_new_tokens=2)
    with pytest.raises(TypeError, match=r"expected SteeringVector objects, got int"):
        labkit.generate(tiny_llama, ["love"], steering_per_row=[3], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"3 row settings were given, but the model ran a batch of 1 rows"):
        with steered(tiny_llama, rows=[vector, None, vector]):
            logits(tiny_llama, "the cat")
    assert count_hooks(hf_model_of(tiny_llama)) == 0


# --- PCA, probe, directional ablation ------------------------------------------------------

PAIRS = (["love", "love and peace", "peace", "the park"], ["hate", "hate and war", "war", "the city"])


def _last_token_acts(model, prompts, layer):
    return torch.stack([hidden_states(model, model.to_tokens(p)[0].tolist())[layer][-1] for p in prompts])


def test_pca_direction_is_top_component_of_paired_differences(tiny_llama):
    sklearn_decomposition = pytest.importorskip("sklearn.decomposition")
    positives, negatives = PAIRS
    vector = labkit.pca_direction(tiny_llama, positives, negatives, layer=2, coefficient=2.0)
    differences = (_last_token_acts(tiny_llama, positives, 2) - _last_token_acts(tiny_llama, negatives, 2)).double()
    # RepE's randomised pair order made exact: PCA (centred, by scikit-learn) of {d_i, -d_i}
    component = torch.from_numpy(
        sklearn_decomposition.PCA(n_components=1).fit(torch.cat([differences, -differences]).numpy()).components_[0]
    )
    unit = vector.activations.double() / vector.activations.norm()
    assert abs(float(unit @ component)) > 1 - 1e-5
    # oriented so the positives project above the negatives, length = that separation
    separation = float(differences.mean(0) @ unit)
    assert separation > 0
    torch.testing.assert_close(vector.activations.norm().double(), torch.tensor(separation, dtype=torch.float64),
                               rtol=1e-4, atol=1e-6)
    assert vector.source["method"] == "pca" and 0 < vector.source["explained_variance_ratio"] <= 1
    assert vector.coefficient == 2.0 and vector.positions == "all"
    # one pair: the component is the difference itself, i.e. the mean difference
    one = labkit.pca_direction(tiny_llama, positives[:1], negatives[:1], layer=2)
    torch.testing.assert_close(one.activations, labkit.mean_difference(tiny_llama, positives[:1], negatives[:1], layer=2).activations,
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"needs paired prompts .* got 2 positive and 1 negative"):
        labkit.pca_direction(tiny_llama, positives[:2], negatives[:1], layer=2)


def test_probe_direction_matches_scikit_learn_logistic_regression(tiny_llama):
    linear_model = pytest.importorskip("sklearn.linear_model")
    positives, negatives = PAIRS
    vector = labkit.probe_direction(tiny_llama, positives, negatives, layer=2, inverse_regularization=10.0)
    features = torch.cat([_last_token_acts(tiny_llama, positives, 2), _last_token_acts(tiny_llama, negatives, 2)])
    labels = [1] * len(positives) + [0] * len(negatives)
    reference = linear_model.LogisticRegression(C=10.0, tol=1e-10, max_iter=10_000).fit(features.double().numpy(), labels)
    weights = torch.from_numpy(reference.coef_[0])
    unit = vector.activations.double() / vector.activations.norm()
    assert float(unit @ weights / weights.norm()) > 0.999  # same direction, same sign
    assert vector.source["train_accuracy"] == reference.score(features.double().numpy(), labels)
    assert vector.source["method"] == "probe"
    with pytest.raises(ValueError, match=r"inverse_regularization must be > 0"):
        labkit.probe_direction(tiny_llama, positives, negatives, layer=2, inverse_regularization=0.0)


def test_directional_ablation_projects_the_direction_out_everywhere(tiny_llama):
    direction = labkit.mean_difference(tiny_llama, *PAIRS, layer=1)
    vectors = labkit.directional_ablation(tiny_llama, direction)
    n_layers = tiny_llama.cfg.n_layers
    assert [v.hook_name for v in vectors] == [f"blocks.{layer}.{hook}" for layer in range(n_layers)
                                              for hook in ("hook_resid_pre", "hook_resid_mid")]
    assert all(v.operation == "ablate" and v.positions == "all" for v in vectors)
    unit = direction.activations / direction.activations.norm()
    seen: dict[str, torch.Tensor] = {}

    def grab(name):
        def hook(activation, _site):
            seen[name] = activation.detach().clone()
        return hook

    names = [v.hook_name for v in vectors]
    text = "the cat sat on a mat and the dog ran"
    with labkit.hooks.attach(tiny_llama, {name: grab(name) for name in names}) as twin:
        twin(input_ids=tiny_llama.to_tokens(text))
    before = dict(seen)
    assert all(float((before[name] @ unit).abs().max()) > 1e-3 for name in names)  # the direction is present
    with steered(tiny_llama, *vectors):  # registered after the ablation hooks: they see its result
        with labkit.hooks.attach(tiny_llama, {name: grab(name) for name in names}) as twin:
            twin(input_ids=tiny_llama.to_tokens(text))
    for name in names:
        assert float((seen[name] @ unit).abs().max()) < 1e-4, name  # x - (x·r̂) r̂ has no r̂ component
    # block 0's input is the embedding: ablation there is exactly x - (x·r̂) r̂
    x = before["blocks.0.hook_resid_pre"]
    torch.testing.assert_close(seen["blocks.0.hook_resid_pre"], x - (x @ unit).unsqueeze(-1) * unit, rtol=1e-5, atol=1e-6)
    # coefficient 0 changes nothing; the ablation round-trips through save/load
    plain = logits(tiny_llama, text)
    with steered(tiny_llama, *labkit.directional_ablation(tiny_llama, direction, coefficient=0.0)):
        assert torch.equal(logits(tiny_llama, text), plain)
    with steered(tiny_llama, *vectors):
        assert not torch.allclose(logits(tiny_llama, text), plain)
    assert SteeringVector.from_dict(vectors[0].to_dict()).operation == "ablate"
    assert "operation='ablate'" in repr(vectors[0])
    with pytest.raises(ValueError, match=r"needs a single \(d_model,\) direction"):
        labkit.directional_ablation(tiny_llama, labkit.actadd(tiny_llama, "love", "hate", layer=1))
    with pytest.raises(ValueError, match=r"operation='subtract' is not allowed"):
        SteeringVector("blocks.0.hook_resid_pre", torch.ones(32), operation="subtract")
    with pytest.raises(ValueError, match=r"needs a non-zero direction"):
        SteeringVector("blocks.0.hook_resid_pre", torch.zeros(32), operation="ablate")
