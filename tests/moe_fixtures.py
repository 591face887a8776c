"""Tiny random-weight MoE models of every family labkit routes, built from transformers configs.

Importable helper (not a conftest): ``from tests.moe_fixtures import tiny_moe_hf, FAMILIES``.
Every model is seeded, float32, 3-4 layers, hidden size 32, 8 experts, so a forward pass costs
milliseconds. Layer layouts exercise the numbering rules: DeepSeek-V3's first layer is dense
(``first_k_dense_replace=1``), Qwen3-MoE's layer 1 is dense (``mlp_only_layers=[1]``), and
Qwen2-MoE's layer 0 is dense (``decoder_sparse_step=2`` makes layers 1 and 3 sparse).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

FAMILIES = ("olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3")

#: True model layer index of every MoE layer of each tiny model.
MOE_LAYERS = {
    "olmoe": [0, 1, 2],
    "qwen2_moe": [1, 3],
    "qwen3_moe": [0, 2],
    "mixtral": [0, 1, 2],
    "gpt_oss": [0, 1, 2],
    "deepseek_v3": [1, 2, 3],
}
N_EXPERTS = 8
TOP_K = 2


def _common(tokenizer) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        num_experts_per_tok=TOP_K,
        tie_word_embeddings=False,
    )


def tiny_moe_config(family: str, tokenizer):
    """A transformers config for a tiny model of ``family`` (one of :data:`FAMILIES`)."""
    import transformers as tf

    common = _common(tokenizer)
    if family == "olmoe":
        config = tf.OlmoeConfig(
            **common, intermediate_size=16, num_hidden_layers=3, num_experts=N_EXPERTS, norm_topk_prob=False
        )
        arch = "OlmoeForCausalLM"
    elif family == "qwen2_moe":
        config = tf.Qwen2MoeConfig(
            **common,
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_hidden_layers=4,
            num_experts=N_EXPERTS,
            decoder_sparse_step=2,
            norm_topk_prob=False,
        )
        arch = "Qwen2MoeForCausalLM"
    elif family == "qwen3_moe":
        config = tf.Qwen3MoeConfig(
            **common,
            head_dim=8,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            num_experts=N_EXPERTS,
            mlp_only_layers=[1],
            decoder_sparse_step=1,
            norm_topk_prob=True,
        )
        arch = "Qwen3MoeForCausalLM"
    elif family == "mixtral":
        config = tf.MixtralConfig(**common, intermediate_size=16, num_hidden_layers=3, num_local_experts=N_EXPERTS)
        arch = "MixtralForCausalLM"
    elif family == "gpt_oss":
        config = tf.GptOssConfig(
            **common,
            head_dim=8,
            intermediate_size=16,
            num_hidden_layers=3,
            num_local_experts=N_EXPERTS,
            sliding_window=8,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        )
        arch = "GptOssForCausalLM"
    elif family == "deepseek_v3":
        config = tf.DeepseekV3Config(
            **{**common, "num_key_value_heads": 4},  # multi-head latent attention: kv heads = heads
            intermediate_size=48,
            moe_intermediate_size=16,
            num_hidden_layers=4,
            n_routed_experts=N_EXPERTS,
            n_shared_experts=1,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        )
        arch = "DeepseekV3ForCausalLM"
    else:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    config.architectures = [arch]
    config._attn_implementation = "eager"
    return config


def tiny_moe_hf(family: str, tokenizer, seed: int = 0):
    """A seeded tiny random-weight causal LM of ``family`` (plain Hugging Face, eval mode).

    Router weights are drawn larger than the default init so routing is decisive (no near-ties),
    and DeepSeek-V3's ``e_score_correction_bias`` is made non-zero so tests see its effect.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_moe_config(family, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 3 or "expert" in name:  # batched experts are left uninitialised
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
            if name.endswith("mlp.router.bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
    return model.eval()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one CPU thread, restoring the caller's setting after.

    The tiny models do microseconds of math per op; on a shared 2-core machine torch's default
    thread pool makes them 50-100x slower through oversubscription.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.lru_cache(maxsize=None)
def shared_tokenizer():
    """One offline tokenizer for all tiny MoE models of a session."""
    from tests.conftest import make_tokenizer

    return make_tokenizer()


@functools.lru_cache(maxsize=None)
def shared_moe_hf(family: str):
    """One tiny model per family for the whole session (tests only add hooks they remove)."""
    return tiny_moe_hf(family, shared_tokenizer())


# --- every family labkit routes: a generic tiny config per model_type -----------------------------

_EXPERT_KEYS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")

#: Generic tiny settings, applied where the family's config has the key.
_TINY = dict(
    hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    max_position_embeddings=128, moe_intermediate_size=16, shared_expert_intermediate_size=16,
    num_experts_per_tok=TOP_K, moe_topk=TOP_K, n_group=4, topk_group=2, kv_lora_rank=16, q_lora_rank=None,
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, first_k_dense_replace=1, sliding_window=8,
    tie_word_embeddings=False,
)

#: Per-family settings on top of :data:`_TINY` (3 layers; first layer dense where the family has dense layers).
_FAMILY_TINY = {
    "deepseek_v2": dict(num_key_value_heads=4, topk_method="group_limited_greedy", n_shared_experts=1),
    "deepseek_v32": dict(num_key_value_heads=4, q_lora_rank=16, n_shared_experts=1),
    "glm4_moe_lite": dict(num_key_value_heads=4, n_shared_experts=1),
    "glm_moe_dsa": dict(num_key_value_heads=4, q_lora_rank=16, n_shared_experts=1),
    "kimi_linear": dict(num_key_value_heads=4, n_shared_experts=1),
    "bailing_hybrid": dict(num_key_value_heads=4),
    "axk1": dict(num_key_value_heads=4, q_lora_rank=16),
    "axk2": dict(num_key_value_heads=4, q_lora_rank=16),
    "hy_v4": dict(num_key_value_heads=4, q_lora_rank=16),
    "longcat_flash": dict(num_key_value_heads=4, q_lora_rank=16, zero_expert_num=2),
    "dots1": dict(n_shared_experts=1),
    "beam": dict(mlp_layer_types=["dense", "sparse", "sparse"]),
    "flint": dict(mlp_only_layers=[0]),
    "qwen4_exp_text": dict(
        indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=8, indexer_compress_ratio=2,
    ),
    "lfm2_moe": dict(num_dense_layers=1, layer_types=["full_attention", "conv", "full_attention"]),
    "jamba": dict(
        expert_layer_period=1, expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1,
        mamba_d_state=4, mamba_d_conv=2, mamba_expand=2, mamba_dt_rank=4,
    ),
    "granitemoehybrid": dict(
        layer_types=["mamba", "attention", "mamba"], mamba_n_heads=4, mamba_d_head=16, mamba_d_state=4,
        mamba_n_groups=1, mamba_chunk_size=4,
    ),
    "nemotron_h": dict(
        layer_types=["moe", "attention", "moe"], mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=4,
        n_groups=1, chunk_size=4,
    ),
}


def family_config(model_type: str, tokenizer, n_layers: int = 3, **overrides):
    """A tiny transformers config of any family labkit routes (the text config for composite ones)."""
    from transformers import CONFIG_MAPPING

    text = CONFIG_MAPPING[model_type]().get_text_config()
    kwargs = {key: value for key, value in _TINY.items() if hasattr(text, key)}
    kwargs.update({key: N_EXPERTS for key in _EXPERT_KEYS if hasattr(text, key)})
    kwargs.update(
        vocab_size=len(tokenizer), num_hidden_layers=n_layers, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    layer_types = getattr(text, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and layer_types and model_type != "jamba":
        kinds = list(dict.fromkeys(layer_types))
        kwargs["layer_types"] = [kinds[i % len(kinds)] for i in range(n_layers)]
    kwargs.update(_FAMILY_TINY.get(model_type, {}))
    n_experts = next((overrides[key] for key in _EXPERT_KEYS if key in overrides), None)
    if n_experts is not None:  # aliases of the expert count must agree
        kwargs.update({key: n_experts for key in _EXPERT_KEYS if key in kwargs})
    kwargs.update(overrides)
    config = type(text)(**kwargs)
    config._attn_implementation = "eager"
    return config


def randomise_routing(model, seed: int) -> None:
    """Decisive routing: router weights ~ N(0, 1), correction biases ~ N(0, 0.1), experts ~ N(0, 0.1)."""
    from labkit.moe.families import FAMILIES as ROUTED

    family = next((f for f in ROUTED.values() if model.config.model_type in f.model_types), None)
    routers = {id(m) for m in model.modules() if family is not None and type(m).__name__ == family.router_class}
    router_params = {id(p) for m in model.modules() if id(m) in routers for p in m.parameters()}
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if id(parameter) in router_params and parameter.ndim == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
            elif id(parameter) in router_params and name.endswith("bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
            elif parameter.ndim == 3 or "expert" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        for name, tensor in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith(("e_score_correction_bias", "expert_bias")):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)


def family_hf(model_type: str, tokenizer, seed: int = 0, **overrides):
    """A seeded tiny random-weight causal LM of any routed family (plain Hugging Face, eval mode)."""
    from transformers import AutoModelForCausalLM

    if model_type in FAMILIES and not overrides:
        return tiny_moe_hf(model_type, tokenizer, seed)
    config = family_config(model_type, tokenizer, **overrides)
    config.architectures = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomise_routing(model, seed)
    return model.eval()


@functools.lru_cache(maxsize=None)
def shared_family_hf(model_type: str):
    """One tiny model per routed family for the whole session."""
    return family_hf(model_type, shared_tokenizer())


#: The routing part of public checkpoints' configs (config.json on the Hugging Face hub, read
#: 2026), at tiny width: expert counts, top-k, groups, shared experts, scoring, renormalisation,
#: scaling and the dense-layer pattern are the checkpoint's; hidden sizes and depth are tiny.
#: ``(model_type, config overrides, expected MoE layers)``.
PUBLIC_ROUTING = {
    "allenai/OLMoE-1B-7B-0924": (
        "olmoe", dict(num_experts=64, num_experts_per_tok=8, norm_topk_prob=False, n_layers=2), [0, 1],
    ),
    "Qwen/Qwen3-30B-A3B": (
        "qwen3_moe",
        dict(num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], n_layers=2),
        [0, 1],
    ),
    "deepseek-ai/DeepSeek-V3 (and R1)": (
        "deepseek_v3",
        dict(
            num_key_value_heads=4, n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4,
            n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=3, n_layers=4,
        ),
        [3],
    ),
    "openai/gpt-oss-20b": (
        "gpt_oss",
        dict(num_local_experts=32, num_experts_per_tok=4, layer_types=["sliding_attention", "full_attention"], n_layers=2),
        [0, 1],
    ),
    "mistralai/Mixtral-8x7B-v0.1": ("mixtral", dict(num_local_experts=8, num_experts_per_tok=2, n_layers=2), [0, 1]),
    "zai-org/GLM-4.5-Air": (
        "glm4_moe",
        dict(
            n_routed_experts=128, num_experts_per_tok=8, n_group=1, topk_group=1, n_shared_experts=1,
            routed_scaling_factor=1.0, norm_topk_prob=True, first_k_dense_replace=1, n_layers=2,
        ),
        [1],
    ),
    "meta-llama/Llama-4-Scout-17B-16E": (
        "llama4_text", dict(num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1, n_layers=2), [0, 1],
    ),
    "Qwen/Qwen3-Next-80B-A3B-Instruct": (
        "qwen3_next",
        dict(
            num_experts=512, num_experts_per_tok=10, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
            layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"], n_layers=4,
        ),
        [0, 1, 2, 3],
    ),
}


@functools.lru_cache(maxsize=None)
def public_routing_hf(checkpoint: str):
    """A tiny random model with the routing hyperparameters of a public checkpoint."""
    model_type, overrides, _ = PUBLIC_ROUTING[checkpoint]
    overrides = dict(overrides)
    n_layers = overrides.pop("n_layers")
    from transformers import AutoModelForCausalLM

    config = family_config(model_type, shared_tokenizer(), n_layers=n_layers, **overrides)
    config.architectures = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomise_routing(model, 0)
    return model.eval()
