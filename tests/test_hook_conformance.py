"""A TransformerLens hook name means what TransformerLens says, on labkit's fast path and on the bridge.

For tiny random models of nine dense architectures TransformerLens 4.3 supports and every MoE
family labkit routes: for **every** hook name in the bridge's vocabulary that
``cache_activations`` accepts (per-position activations of every layer's every kind; attention
patterns and other ``[batch, head, pos, pos]`` tensors are refused by it), the cached tensor has
the shape and values of the bridge's own ``run_with_cache`` for that name. Names that land on
the plain twin are cached together on the twin (the fast path); the rest on the bridge. A name
that never fires is refused with the flag that turns it on.
"""

from __future__ import annotations

import pytest
import torch

from labkit.cache import cache_activations
from labkit.hooks import HookPointNeverFiresError, hook_names, resolve_hook
from labkit.models import from_hf
from tests.conftest import make_tokenizer
from tests.moe_fixtures import FAMILIES, tiny_moe_hf

PROMPT = "the cat sat on a mat and the dog ran"


def _common(tokenizer) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def _decoder(**extra) -> dict:
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **extra,
    )


def tiny_dense_hf(arch: str, tokenizer):
    import transformers as tf

    common = _common(tokenizer)
    if arch == "gpt2":
        config = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common)
        cls = tf.GPT2LMHeadModel
    elif arch == "llama":
        config, cls = tf.LlamaConfig(**_decoder(), **common), tf.LlamaForCausalLM
    elif arch == "mistral":
        config, cls = tf.MistralConfig(**_decoder(), **common), tf.MistralForCausalLM
    elif arch == "qwen2":
        config, cls = tf.Qwen2Config(**_decoder(), **common), tf.Qwen2ForCausalLM
    elif arch == "qwen3":
        config, cls = tf.Qwen3Config(**_decoder(head_dim=8), **common), tf.Qwen3ForCausalLM
    elif arch == "gemma2":
        config, cls = tf.Gemma2Config(**_decoder(head_dim=8), **common), tf.Gemma2ForCausalLM
    elif arch == "gemma3":
        config, cls = tf.Gemma3TextConfig(**_decoder(head_dim=8), **common), tf.Gemma3ForCausalLM
    elif arch == "phi3":
        config, cls = tf.Phi3Config(**_decoder(), **common), tf.Phi3ForCausalLM
    elif arch == "olmo2":
        config, cls = tf.Olmo2Config(**_decoder(), **common), tf.Olmo2ForCausalLM
    else:
        raise ValueError(arch)
    config.architectures = [cls.__name__]
    torch.manual_seed(0)
    return cls(config).eval()


DENSE = ("llama", "gpt2", "gemma2", "gemma3", "qwen2", "qwen3", "mistral", "phi3", "olmo2")


def _model(arch: str):
    tokenizer = make_tokenizer()
    if arch in FAMILIES:
        return from_hf(tiny_moe_hf(arch, tokenizer), tokenizer, name=f"tiny-{arch}")
    return from_hf(tiny_dense_hf(arch, tokenizer), tokenizer, name=f"tiny-{arch}")


def _reference(model, tokens) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    return {name: cache[name] for name in cache.keys()}


@pytest.mark.parametrize("arch", [*DENSE, *FAMILIES])
def test_every_accepted_hook_name_matches_the_bridge(arch):
    model = _model(arch)
    tokens = model.to_tokens(PROMPT)
    length = tokens.shape[1]
    reference = _reference(model, tokens)
    on_twin, on_bridge, refused, never = [], [], [], []
    for name in hook_names(model):
        try:
            site = resolve_hook(model, name)
        except HookPointNeverFiresError:
            never.append(name)
            continue
        value = reference.get(site.canonical)
        assert value is not None, f"{name} fires but the bridge's run_with_cache has no {site.canonical}"
        if value.dim() < 2 or value.shape[0] != 1 or value.shape[1] != length:
            refused.append(name)
        elif site.on_twin:
            on_twin.append(name)
        else:
            on_bridge.append(name)
    n_layers = model.cfg.n_layers
    # every layer's residual stream is on the fast path, per-head q/k/v are not
    assert {f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)} <= set(on_twin)
    assert {f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)} <= set(on_twin)
    assert len(on_twin) >= 4 * n_layers and len(on_bridge) >= 2 * n_layers, (len(on_twin), len(on_bridge))
    for group in (on_twin, on_bridge):
        cache = cache_activations(model, [PROMPT], group, progress=False)
        for name in group:
            expected = reference[resolve_hook(model, name).canonical][0]
            got = cache.padded(name)[0]
            assert got.shape == expected.shape, f"{arch} {name}: {tuple(got.shape)} vs bridge {tuple(expected.shape)}"
            torch.testing.assert_close(got, expected.to(got.dtype), atol=1e-5, rtol=1e-5, msg=f"{arch} {name}")
    for name in refused[:3]:
        with pytest.raises(ValueError, match="not \\[batch, pos"):
            cache_activations(model, [PROMPT], [name], progress=False)


def test_gated_hook_point_is_refused_with_its_flag():
    model = _model("llama")
    with pytest.raises(HookPointNeverFiresError, match=r"use_attn_result"):
        cache_activations(model, [PROMPT], ["blocks.1.attn.hook_result"], progress=False)
    with pytest.raises(ValueError, match=r"Closest real names: \[.*blocks\.1\.hook_resid_pre"):
        cache_activations(model, [PROMPT], ["blocks.1.hook_resid_prex"], progress=False)


def test_per_head_query_has_the_bridges_shape():
    model = _model("llama")
    cache = cache_activations(model, [PROMPT], ["blocks.0.attn.hook_q", "blocks.0.attn.hook_k"], progress=False)
    length = model.to_tokens(PROMPT).shape[1]
    assert tuple(cache.padded("blocks.0.attn.hook_q").shape) == (1, length, 4, 8)  # [batch, pos, head, d_head]
    assert tuple(cache.padded("blocks.0.attn.hook_k").shape) == (1, length, 2, 8)
