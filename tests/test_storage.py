"""One save/load layout for every labkit result: ``<stem>.json`` + ``<stem>.safetensors``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import labkit
from labkit import storage
from labkit.cache import ActivationCache, cache_activations
from labkit.moe import ExpertMask
from labkit.moe.attribution import ExpertAttribution, attribute_experts
from labkit.moe.trace import RoutingTrace
from tests.test_moe_attribution import make_trace


@pytest.fixture(scope="module")
def trace_pair():
    boost = {(0, 3): 6.0}
    return make_trace([5] * 6, seed=1, boost=boost), make_trace([5] * 6, seed=2)


def _objects(tiny_llama, trace_pair, tmp_path):
    behavior, control = trace_pair
    vector = labkit.actadd(tiny_llama, "love", "hate", layer=1, coefficient=2.0)
    attribution = attribute_experts(behavior, control, n_bootstrap=20, seed=0)
    mask = ExpertMask(((0, 3, "off"), (1, 2, "bias", -0.5)), "synthetic", 2, 8)
    return {
        "labkit.SteeringVector": (vector, labkit.SteeringVector),
        "labkit.RoutingTrace": (behavior, RoutingTrace),
        "labkit.ExpertAttribution": (attribution, ExpertAttribution),
        "labkit.ExpertMask": (mask, ExpertMask),
    }


def _same(kind, a, b) -> bool:
    if kind == "labkit.SteeringVector":
        return torch.equal(a.activations, b.activations) and a.metadata() == b.metadata()
    if kind == "labkit.RoutingTrace":
        return a.metadata() == b.metadata() and all(
            torch.equal(getattr(a, n), getattr(b, n)) for n in ("topk_indices", "topk_weights", "token_ids", "position")
        )
    if kind == "labkit.ExpertAttribution":
        return torch.equal(a.score, b.score) and torch.equal(a.q_value, b.q_value) and a.top(3) == b.top(3)
    return a == b


def test_every_kind_saves_as_stem_json_plus_safetensors(tiny_llama, trace_pair, tmp_path):
    for kind, (obj, cls) in _objects(tiny_llama, trace_pair, tmp_path).items():
        folder = tmp_path / kind
        written = obj.save(folder / "result")
        assert written == folder / "result.json"
        document = json.loads(written.read_text())
        assert document["kind"] == kind and document["version"] == 1
        tensor_file = folder / "result.safetensors"
        if kind == "labkit.ExpertMask":
            assert not tensor_file.exists() and "tensors" not in document
        else:
            with safe_open(str(tensor_file), framework="pt") as handle:
                assert handle.metadata() == {"kind": kind, "version": "1"}
                assert sorted(handle.keys()) == document["tensors"]
        # the stem, the JSON path and the tensor path all load the same object
        for path in (folder / "result", written, tensor_file):
            if kind == "labkit.ExpertMask" and path == tensor_file:
                continue
            assert _same(kind, cls.load(path), obj), (kind, path)
        assert sorted(p.name for p in folder.iterdir()) <= ["result.json", "result.safetensors"]


def test_activation_cache_index_uses_the_layout(tiny_llama, tmp_path):
    out = tmp_path / "acts"
    cache_activations(tiny_llama, ["a b c", "d e"], ["blocks.0.hook_resid_post"], out_dir=out, progress=False)
    document = json.loads((out / "index.json").read_text())
    assert document["kind"] == "labkit.ActivationCache" and document["tensors"] == ["position", "prompt_index", "token_ids"]
    assert (out / "index.safetensors").is_file()
    with pytest.raises(ValueError, match=r"ActivationCache.load: '.*index.json' is of kind 'labkit.ExpertMask'"):
        (out / "index.json").write_text(json.dumps({**document, "kind": "labkit.ExpertMask"}))
        ActivationCache.load(out)
    with pytest.raises(FileNotFoundError, match="no directory at"):
        ActivationCache.load(tmp_path / "nowhere")


def test_files_of_the_previous_layout_still_load(trace_pair, tmp_path):
    """A trace / attribution saved before labkit.storage: one ``x.safetensors`` with the metadata
    in its header and a ``x.safetensors.json`` copy for people."""
    behavior, control = trace_pair
    attribution = attribute_experts(behavior, control, n_bootstrap=0, n_splits=0)
    for name, obj, cls in (("trace", behavior, RoutingTrace), ("attribution", attribution, ExpertAttribution)):
        written = obj.save(tmp_path / "new" / name)
        metadata, tensors = storage.load(written, kind=f"labkit.{cls.__name__}", version=1, caller="t", writer="t")
        metadata.pop("tensors")
        old = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(old), metadata={"labkit": json.dumps(metadata)})
        old.with_name(old.name + ".json").write_text(json.dumps(metadata))
        for path in (old, old.with_name(old.name + ".json")):
            kind = f"labkit.{cls.__name__}"
            assert _same(kind, cls.load(path), obj)


def test_a_save_without_tensors_removes_a_stale_tensor_file(tmp_path):
    (tmp_path / "mask.safetensors").write_bytes(b"old")
    ExpertMask.off([(0, 1)]).save(tmp_path / "mask")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.json"]


def test_json_has_no_nan(trace_pair, tmp_path):
    """NaN (skipped intervals, noise floor) is written as null, so any JSON reader accepts the file."""
    attribution = attribute_experts(*trace_pair, n_bootstrap=0, n_splits=0)
    text = attribution.save(tmp_path / "bare").read_text()
    assert "NaN" not in text and json.loads(text)["noise_floor"] is None
