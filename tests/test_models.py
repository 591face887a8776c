"""Model loading: offline resolution, the plain twin, and the KV-cache/transformers-pin guard."""

from __future__ import annotations

import copy

import pytest
import torch

from labkit.models import (
    ModelNotAvailableError,
    available_offline_models,
    from_hf,
    hf_model_of,
    load_model,
    tokenizer_of,
)
from tests.conftest import tiny_llama_hf


def test_twin_shares_parameters_and_matches_bridge(tiny_llama):
    twin = hf_model_of(tiny_llama)
    bridge_params = {p.data_ptr() for p in tiny_llama.parameters()}
    assert all(p.data_ptr() in bridge_params for p in twin.parameters())
    ids = torch.tensor([tiny_llama.tokenizer("the cat sat")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama(ids), twin(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_caller_tokenizer_is_not_mutated(tiny_tokenizer):
    tiny_tokenizer.padding_side = "right"
    before = dict(tiny_tokenizer.init_kwargs)
    bridge = from_hf(tiny_llama_hf(tiny_tokenizer), tiny_tokenizer, name="t")
    assert tiny_tokenizer.padding_side == "right"
    assert tiny_tokenizer.init_kwargs == before
    assert tokenizer_of(bridge).padding_side == "left"


def test_kv_cached_bridge_generation_matches_plain_hf(tiny_tokenizer):
    """Guard for the transformers pin (<5.24): with 5.24 the layer kwarg ``past_key_values``
    became ``cache`` and TransformerLens 4.3's bridge attention silently ignored the KV cache,
    so cached generation produced garbage while a single forward pass stayed correct."""
    hf = tiny_llama_hf(tiny_tokenizer, seed=1)
    plain = copy.deepcopy(hf)  # booting replaces hf's layers in place
    bridge = from_hf(hf, tiny_tokenizer, name="t")
    ids = torch.tensor([tiny_tokenizer("the cat sat on")["input_ids"]])
    n_new = 12
    with torch.no_grad():
        reference = plain.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
            min_new_tokens=n_new, pad_token_id=tiny_tokenizer.pad_token_id,
        )[0, ids.shape[1]:]
    kwargs = dict(max_new_tokens=n_new, do_sample=False, stop_at_eos=False, verbose=False, return_type="tokens")
    cached = bridge.generate(ids, use_past_kv_cache=True, **kwargs)[0, ids.shape[1]:]
    uncached = bridge.generate(ids, use_past_kv_cache=False, **kwargs)[0, ids.shape[1]:]
    assert cached.tolist() == uncached.tolist() == reference.tolist()


def test_unknown_model_offline_lists_offline_models():
    with pytest.raises(ModelNotAvailableError) as info:
        load_model("no-such-org/no-such-model-xyz")
    message = str(info.value)
    assert "no-such-org/no-such-model-xyz" in message
    assert "Models available offline" in message
    for name in available_offline_models():
        assert name in message


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="no config.json"):
        load_model(tmp_path)


def test_local_checkpoint_directory_loads(tiny_tokenizer, tmp_path):
    hf = tiny_llama_hf(tiny_tokenizer, seed=2)
    hf.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    bridge = load_model(tmp_path)
    ids = torch.tensor([tiny_tokenizer("love and hate")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(bridge(ids), hf(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_from_hf_requires_architectures(tiny_tokenizer):
    hf = tiny_llama_hf(tiny_tokenizer)
    hf.config.architectures = None
    with pytest.raises(ValueError, match="config.architectures"):
        from_hf(hf, tiny_tokenizer)


def test_smollm2_is_embedded_offline(smollm2):
    assert "smollm2-135m-instruct" in available_offline_models()
    assert smollm2.cfg.n_layers == 30 and smollm2.cfg.d_model == 576
    tokenizer = tokenizer_of(smollm2)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = hf_model_of(smollm2).generate(**ids, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
