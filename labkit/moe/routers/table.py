"""The family table: one declarative :class:`RouterFamily` entry per architecture, and router lookup.

Each entry names the family's ``model_type`` values, its Hugging Face router class, its
:class:`~labkit.moe.routers.scheme.Scheme` and every router attribute the scheme accounts for;
:func:`find_routers_in` finds and checks the routers of a model. See :mod:`labkit.moe.routers`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from labkit.moe.routers.scheme import (
    DEEPSEEK_V3,
    GRANITE,
    LLAMA4,
    MIXTRAL,
    SIGMOID_BIAS_SCALED,
    SOFTMAX_ALWAYS,
    SOFTMAX_FLAG,
    SOFTMAX_NEVER_INPUT,
    TOPK_SOFTMAX,
    Scheme,
    read_llama4,
    read_standard,
    route,
    write_llama4,
    write_standard,
)

__all__ = [
    "BASE", "DS_KEYS", "FAMILIES", "NOT_ROUTED", "MoELayer", "RouterFamily", "check_router", "decoder_layers",
    "family_of_config", "find_routers_in", "router_keys", "supported_families",
]

# Router attributes every standard router has.
BASE = frozenset({"top_k", "num_experts", "hidden_dim", "weight"})
DS_KEYS = BASE | {"routed_scaling_factor", "num_group", "topk_group", "norm_topk_prob", "e_score_correction_bias"}


def _family_options_deepseek_v2(router, scheme: Scheme) -> Scheme:
    method = router.topk_method
    if method == "greedy":
        return replace(scheme, groups=None)
    if method == "group_limited_greedy":
        return scheme
    raise ValueError(
        f"DeepSeek-V2 router: topk_method={method!r} is not a routing labkit implements; allowed: "
        "'greedy', 'group_limited_greedy'."
    )


def _family_options_cohere2(router, scheme: Scheme) -> Scheme:
    fn = router.expert_selection_fn
    if fn == "softmax":
        return replace(scheme, weight="softmax_of_chosen", weight_float=True, renormalise=False)
    if fn == "sigmoid":
        return replace(scheme, weight="sigmoid_of_chosen", renormalise="norm_topk_prob")
    raise ValueError(f"Cohere2-MoE router: expert_selection_fn={fn!r} unknown; allowed: 'softmax', 'sigmoid'.")


def _family_options_score_fn(router, scheme: Scheme) -> Scheme:
    name = type(router.score_fn).__name__
    if name in ("Sigmoid", "SigmoidActivation"):
        return scheme
    raise ValueError(
        f"{type(router).__name__}: scoring function {name} is not one labkit implements for this family; "
        "allowed: sigmoid."
    )


def _family_options_axk2(router, scheme: Scheme) -> Scheme:
    return scheme if router.num_group is not None else replace(scheme, groups=None)


def _family_options_lfm2(router, scheme: Scheme) -> Scheme:
    return scheme if router.use_expert_bias else replace(scheme, correction=None)


@dataclass(frozen=True)
class RouterFamily:
    """How one architecture routes.

    Attributes:
        name: human-readable family name.
        model_types: ``config.model_type`` values of the family.
        router_class: class name of the Hugging Face router module (a decoder layer holding no
            module of this class is dense).
        scheme: the routing rule (:class:`Scheme`).
        router_keys: every attribute / parameter / buffer / submodule of the router the scheme
            accounts for; a router with any other is refused.
        options: ``options(router, scheme) -> scheme`` for config-dependent rules (raises on an
            option value labkit does not implement), or ``None``.
        read / write: the router output protocol (default: ``(logits, weights, indices, ...)``).
        n_experts_attr: router attribute with the number of routable experts (the width of
            its logits).
        shared_experts: the always-on shared expert(s), in words, or ``None``.
        dense_rule: how the family marks dense layers, for error messages.
        note: anything a user must know (zero experts, scores instead of logits, ...).
    """

    name: str
    model_types: tuple[str, ...]
    router_class: str
    scheme: Scheme
    router_keys: frozenset[str] = BASE
    options: Callable[[torch.nn.Module, Scheme], Scheme] | None = None
    read: Callable = field(default=read_standard, repr=False)
    write: Callable = field(default=write_standard, repr=False)
    n_experts_attr: str = "num_experts"
    shared_experts: str | None = None
    dense_rule: str = "every layer is a MoE layer"
    note: str = ""

    @property
    def groups(self) -> bool:
        return self.scheme.groups is not None

    def scheme_for(self, router: torch.nn.Module) -> Scheme:
        """The scheme with this router's options resolved (raises on an unknown option)."""
        return self.scheme if self.options is None else self.options(router, self.scheme)

    def route(self, router, router_logits, selection=None, args=(), kwargs=None):
        """:func:`route` under this family's scheme for this router."""
        return route(self.scheme_for(router), router, router_logits, selection, args, kwargs)


_QWEN_DENSE = "layers in mlp_only_layers or with (layer + 1) % decoder_sparse_step != 0 are dense"
_FIRST_K = "the first first_k_dense_replace layers are dense"


def _ds(name, model_types, router_class, **extra) -> RouterFamily:
    """A DeepSeek-V3-routed family: sigmoid, correction bias, group-limited top-k, shared experts."""
    extra.setdefault("shared_experts", "n_shared_experts always-on shared experts")
    extra.setdefault("dense_rule", _FIRST_K)
    return RouterFamily(name, model_types, router_class, extra.pop("scheme", DEEPSEEK_V3), extra.pop("router_keys", DS_KEYS), **extra)


_ENTRIES = (
    # softmax over all experts, top-k, renormalise per flag ------------------------------------
    RouterFamily("OLMoE", ("olmoe",), "OlmoeTopKRouter", SOFTMAX_FLAG, BASE | {"norm_topk_prob"}),
    RouterFamily("FlexOlmo", ("flex_olmo",), "FlexOlmoTopKRouter", SOFTMAX_FLAG, BASE | {"norm_topk_prob"}),
    RouterFamily("Mellum", ("mellum",), "MellumTopKRouter", SOFTMAX_FLAG, BASE | {"norm_topk_prob"}),
    RouterFamily(
        "Qwen2-MoE", ("qwen2_moe",), "Qwen2MoeTopKRouter", SOFTMAX_FLAG, BASE | {"norm_topk_prob"},
        shared_experts="one shared expert with its own sigmoid gate", dense_rule=_QWEN_DENSE,
    ),
    RouterFamily("Qwen3-MoE", ("qwen3_moe",), "Qwen3MoeTopKRouter", SOFTMAX_FLAG, BASE | {"norm_topk_prob"}, dense_rule=_QWEN_DENSE),
    RouterFamily(
        "Qwen3-Next", ("qwen3_next",), "Qwen3NextTopKRouter", SOFTMAX_FLAG, BASE | {"norm_topk_prob"},
        shared_experts="one shared expert with its own sigmoid gate", dense_rule=_QWEN_DENSE,
    ),
    RouterFamily(
        "Qwen4-Exp", ("qwen4_exp_text", "qwen4_exp"), "Qwen4ExpTextTopKRouter", SOFTMAX_FLAG, BASE | {"norm_topk_prob"},
        shared_experts="one shared expert with its own sigmoid gate",
    ),
    RouterFamily(
        "Qwen3.5-MoE", ("qwen3_5_moe_text", "qwen3_5_moe"), "Qwen3_5MoeTopKRouter", SOFTMAX_ALWAYS, BASE,
        shared_experts="one shared expert with its own sigmoid gate",
    ),
    RouterFamily(
        "Hunyuan-MoE", ("hunyuan_v1_moe",), "HunYuanMoEV1Gate",
        Scheme("softmax", renormalise=True), frozenset({"config", "layer_idx", "num_experts", "top_k", "wg"}),
        shared_experts="a shared MLP", note="router weight kept in float32 (wg); top-k may vary per layer",
    ),
    RouterFamily(
        "Jamba", ("jamba",), "JambaTopKRouter", SOFTMAX_NEVER_INPUT, BASE,
        dense_rule="layers with (layer - expert_layer_offset) % expert_layer_period != 0 are dense",
    ),
    RouterFamily("Mixtral", ("mixtral",), "MixtralTopKRouter", MIXTRAL, BASE),
    RouterFamily("MiniMax", ("minimax",), "MiniMaxTopKRouter", MIXTRAL, BASE),
    RouterFamily(
        "ERNIE-4.5-MoE", ("ernie4_5_moe",), "Ernie4_5_MoeTopKRouter",
        Scheme("softmax", correction="attr:moe_statics.e_score_correction_bias", choose_plus_bias=True,
               renormalise=True, clamp_attr="norm_min", cast="input"),
        frozenset({"weight", "moe_statics", "top_k", "num_experts", "norm_min"}),
        shared_experts="moe_num_shared_experts shared experts", dense_rule="layers before moe_layer_start_index, "
        "after moe_layer_end_index or off moe_layer_interval are dense",
    ),
    RouterFamily(
        "LongCat-Flash", ("longcat_flash",), "LongcatFlashTopkRouter",
        Scheme("softmax", softmax_float=False, correction="attr:e_score_correction_bias", choose_plus_bias=True,
               sorted=False, scale="routed_scaling_factor"),
        frozenset({"top_k", "num_experts", "hidden_dim", "n_routed_experts", "routed_scaling_factor", "router_bias",
                   "e_score_correction_bias", "classifier"}),
        n_experts_attr="n_routed_experts",
        note="experts n_routed_experts.. are zero (identity) experts: routable and maskable like the others",
    ),
    # top-k on the logits, softmax over the k chosen --------------------------------------------
    RouterFamily("GPT-OSS", ("gpt_oss",), "GptOssTopKRouter", TOPK_SOFTMAX, BASE | {"bias"}),
    RouterFamily("Aria", ("aria_text",), "AriaTextTopKRouter", TOPK_SOFTMAX, frozenset({"num_experts", "top_k", "weight"}),
                 shared_experts="moe_num_shared_experts shared experts"),
    RouterFamily("Granite-MoE", ("granitemoe",), "GraniteMoeTopKRouter", GRANITE, frozenset({"num_experts", "top_k", "weight"})),
    RouterFamily("Granite-MoE-SWA", ("granitemoe_swa",), "GraniteMoeSWATopKRouter", GRANITE, frozenset({"num_experts", "top_k", "weight"})),
    RouterFamily("Granite-MoE-Shared", ("granitemoeshared",), "GraniteMoeSharedTopKRouter", GRANITE,
                 frozenset({"num_experts", "top_k", "weight"}), shared_experts="a shared MLP"),
    RouterFamily("Granite-MoE-Hybrid", ("granitemoehybrid",), "GraniteMoeHybridTopKRouter", GRANITE,
                 frozenset({"num_experts", "top_k", "weight"}), shared_experts="a shared MLP"),
    RouterFamily(
        "Cohere2-MoE", ("cohere2_moe",), "Cohere2MoeTopKRouter", Scheme("none", cast="input"),
        frozenset({"top_k", "num_experts", "expert_selection_fn", "norm_topk_prob", "weight"}),
        options=_family_options_cohere2,
    ),
    # top-k on the logits, sigmoid of the chosen ------------------------------------------------
    RouterFamily(
        "Llama-4", ("llama4_text", "llama4"), "Llama4Router", LLAMA4, frozenset({"num_experts", "top_k", "weight",
        "in_features", "out_features", "bias"}), read=read_llama4, write=write_llama4,
        n_experts_attr="num_experts", shared_experts="one shared expert",
        dense_rule="layers not in moe_layers (interleave_moe_layer_step) are dense",
        note="the router returns dense [token, expert] sigmoid scores (0 off the top-k) that scale the "
        "expert *inputs*; labkit reads the top-k from them",
    ),
    RouterFamily(
        "Kolibri", ("kolibri1",), "Kolibri1TopKRouter",
        Scheme("none", upcast=False, correction="attr:e_score_correction_bias", choose_plus_bias=True,
               weight="sigmoid_of_chosen", renormalise="norm_topk_prob", cast=None),
        BASE | {"norm_topk_prob", "e_score_correction_bias"}, shared_experts="always-on shared experts",
    ),
    # sigmoid scores + correction bias, group-limited (DeepSeek-V3 routing) ---------------------
    _ds("DeepSeek-V3", ("deepseek_v3",), "DeepseekV3TopkRouter"),
    _ds("DeepSeek-V3.2", ("deepseek_v32",), "DeepseekV32TopkRouter"),
    _ds("GLM-4.5 / 4.6", ("glm4_moe",), "Glm4MoeTopkRouter"),
    _ds("GLM-4.7-Flash (GLM-4-MoE-Lite)", ("glm4_moe_lite",), "Glm4MoeLiteTopkRouter"),
    _ds("GLM-5 (GLM-MoE-DSA)", ("glm_moe_dsa",), "GlmMoeDsaTopkRouter"),
    _ds("dots1", ("dots1",), "Dots1TopkRouter"),
    _ds("EXAONE-MoE", ("exaone_moe",), "ExaoneMoeTopkRouter"),
    _ds("Hunyuan-V4", ("hy_v4",), "HYV4TopkRouter"),
    _ds("Kimi-Linear", ("kimi_linear",), "KimiLinearTopkRouter"),
    _ds("MiMo-V2-Flash", ("mimo_v2_flash",), "MiMoV2FlashTopkRouter", shared_experts=None),
    _ds("Nemotron-H", ("nemotron_h",), "NemotronHTopkRouter", dense_rule="only layer_types 'moe' layers have experts"),
    _ds("Solar-Open", ("solar_open",), "SolarOpenTopkRouter"),
    _ds("Bailing-Hybrid (Ling)", ("bailing_hybrid",), "BailingHybridTopkRouter"),
    _ds("A.X K1", ("axk1",), "AXK1TopkRouter"),
    _ds("A.X K2", ("axk2",), "AXK2TopkRouter", scheme=replace(DEEPSEEK_V3, group_fill=0.0), options=_family_options_axk2),
    _ds(
        "Beam", ("beam",), "BeamTopKRouter",
        scheme=replace(DEEPSEEK_V3, group_sorted=True, sorted=True, scale=None),
        router_keys=DS_KEYS - {"routed_scaling_factor"}, shared_experts=None,
        dense_rule="mlp_layer_types 'dense' layers are dense",
        note="routed_scaling_factor is applied by the block after the experts, not in the router weights",
    ),
    # sigmoid scores + correction bias, no groups -----------------------------------------------
    RouterFamily(
        "AFMoE (Trinity)", ("afmoe",), "AfmoeTokenChoiceRouter",
        Scheme("sigmoid", correction="input", renormalise=True, eps=1e-20, scale="route_scale", cast=None),
        frozenset({"config", "top_k", "num_experts", "route_scale", "gate"}),
        shared_experts="num_shared_experts shared experts", dense_rule="the first num_dense_layers layers are dense",
    ),
    RouterFamily(
        "Hunyuan-V3", ("hy_v3",), "HYV3TopKRouter",
        Scheme("sigmoid", correction="input", sorted=False, renormalise=True, eps=1e-20, scale="router_scaling_factor", cast=None),
        BASE | {"router_scaling_factor"}, shared_experts="shared experts", dense_rule=_FIRST_K,
    ),
    RouterFamily(
        "MiniMax-M2", ("minimax_m2",), "MiniMaxM2TopKRouter",
        Scheme("sigmoid", upcast=True, correction="input", sorted=False, renormalise=True, cast=None), BASE,
    ),
    RouterFamily(
        "MiniMax-M3", ("minimax_m3_vl_text",), "MiniMaxM3VLTopKRouter",
        Scheme("sigmoid", upcast=True, correction="attr:e_score_correction_bias", sorted=False, renormalise=True, cast=None),
        BASE | {"e_score_correction_bias"}, shared_experts="always-on shared experts",
    ),
    RouterFamily(
        "Inkling-2", ("inkling2_text",), "Inkling2TopKRouter", SIGMOID_BIAS_SCALED,
        BASE | {"score_fn", "routed_scaling_factor", "e_score_correction_bias"}, options=_family_options_score_fn,
    ),
    RouterFamily(
        "Laguna", ("laguna",), "LagunaTopKRouter",
        Scheme("sigmoid", correction="attr:e_score_correction_bias", renormalise=True, cast="input"),
        BASE | {"e_score_correction_bias", "router_logit_softcapping"}, shared_experts="always-on shared experts",
        note="router logits are soft-capped (tanh) inside the router; labkit's router_logits are the capped ones",
    ),
    RouterFamily(
        "LFM2-MoE", ("lfm2_moe",), "Lfm2MoeTopKRouter",
        Scheme("sigmoid", correction="input", renormalise="norm_topk_prob", eps=1e-6, scale="routed_scaling_factor",
               cast="logits"),
        BASE | {"norm_topk_prob", "routed_scaling_factor", "use_expert_bias"}, options=_family_options_lfm2,
        dense_rule="the first num_dense_layers layers are dense",
    ),
    RouterFamily(
        "Flint", ("flint",), "FlintTopKRouter", Scheme("sigmoid", upcast=True, renormalise="norm_topk_prob", cast=None),
        BASE | {"norm_topk_prob"}, shared_experts="one always-on shared expert", dense_rule=_QWEN_DENSE,
    ),
    # softmax, group-limited greedy (DeepSeek-V2) -----------------------------------------------
    RouterFamily(
        "DeepSeek-V2", ("deepseek_v2",), "DeepseekV2TopkRouter",
        Scheme("softmax", groups="max", group_fill=0.0, sorted=False, scale="routed_scaling_factor", cast=None),
        BASE | {"routed_scaling_factor", "topk_method", "num_group", "topk_group"}, options=_family_options_deepseek_v2,
        shared_experts="n_shared_experts always-on shared experts", dense_rule=_FIRST_K,
    ),
)

#: Every routed family, keyed by its first ``model_type``.
FAMILIES: dict[str, RouterFamily] = {family.model_types[0]: family for family in _ENTRIES}

#: MoE text-generation families of the pinned transformers that labkit does not route, and why.
NOT_ROUTED: dict[str, str] = {
    "phimoe": "Phi-3.5-MoE's sparsemixer chooses each expert by a jitter-threshold mask around the running "
    "maximum, not a top-k over one score; an off/on mask has no exact sparsemixer counterpart",
    "dbrx": "DBRX's router module returns only logits; top-k and p-norm weighting happen in a method of "
    "the block (route_tokens_to_experts), not in a module a hook can replace",
    "jetmoe": "JetMoE's gating returns expert-sorted token batches (and its attention is a mixture of "
    "experts with the same gating class), not (logits, weights, indices)",
    "inkling_text": "Inkling normalises the routed weights jointly with shared-expert logits the router "
    "does not return (shared gammas); masking would need the hidden states, not the router output",
    "deepseek_v4": "DeepSeek-V4's first layers route by a token-id hash table (tid2eid), which no score "
    "adjustment can steer, and its scoring function is sqrtsoftplus",
    "zaya": "ZAYA's router is an MLP carrying state across layers (router_states) with a skip expert; "
    "its tiny config does not validate without a full ZAYA layout",
    "doge": "Doge's CDMoE retrieves experts by product keys inside the MLP; there is no router module",
    "gemma4": "not yet: Gemma 4's router sits in the decoder layer beside a dense MLP, returns softmax "
    "probabilities (not logits) and scales the weights per expert (per_expert_scale), and its config's "
    "per-layer attributes need a dedicated tiny config; the rule fits a Scheme but is untested here",
    "gemma4_text": "as gemma4",
    "dots3_note": "not yet: dots3's config is per-layer (per_layer_config, DSA attention) and needs a "
    "dedicated tiny config; its text router is DeepSeek-V3 routing but untested here",
    "dots3_note_text": "as dots3_note",
}

#: Families whose entry is verified only from a transformers release on: their routers (class name
#: unchanged) return another output or route differently before it, so under an older release
#: inside the pin they are not routed (named, with the reason) rather than routed wrongly.
_ROUTED_FROM = {
    "jamba": "5.20",
    "aria_text": "5.20",
    "granitemoe": "5.20",
    "granitemoe_swa": "5.20",
    "granitemoeshared": "5.20",
    "granitemoehybrid": "5.20",
    "qwen4_exp_text": "5.20",
}


def _gate_by_transformers_version() -> None:
    import transformers
    from packaging.version import Version

    installed = Version(transformers.__version__)
    for model_type, release in _ROUTED_FROM.items():
        if model_type in FAMILIES and installed < Version(release):
            family = FAMILIES.pop(model_type)
            for alias in family.model_types:
                NOT_ROUTED[alias] = (
                    f"routed from transformers {release}: under the installed {transformers.__version__} its router "
                    f"({family.router_class}) returns another output or routes differently, and labkit's exact "
                    "recomputation does not hold (tests fail), so it is refused rather than routed wrongly"
                )


_gate_by_transformers_version()


def supported_families() -> str:
    """One line naming every routed family with its ``model_type`` (for messages and docs)."""
    return ", ".join(f"{f.name} ({f.model_types[0]!r})" for f in FAMILIES.values())


@dataclass(frozen=True)
class MoELayer:
    """One MoE layer of a concrete model: its true index, its router module and its family."""

    layer: int
    router: torch.nn.Module
    n_experts: int
    top_k: int
    family: RouterFamily | None = None

    def read(self, output) -> tuple[Tensor, Tensor, Tensor]:
        """``(router_logits, topk_weights, topk_indices)`` from the router module's output."""
        return (self.family.read if self.family is not None else read_standard)(output, self.router)


def family_of_config(config: Any) -> RouterFamily:
    """The :class:`RouterFamily` of a model config (its ``model_type``).

    Raises:
        ValueError: a dense model, a MoE family labkit does not route (the message says why), or
            an unknown type; the message lists the supported ``model_type`` values.
    """
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    reason = f" labkit does not route {model_type!r}: {NOT_ROUTED[model_type]}." if model_type in NOT_ROUTED else ""
    architectures = getattr(config, "architectures", None) or [type(config).__name__]
    raise ValueError(
        f"Model of type {model_type!r} ({architectures[0]}) has no mixture-of-experts "
        f"router labkit knows.{reason} Supported families: {supported_families()}. Routing traces and "
        "expert masks need one of these; for a dense model use labkit.hooks / steering instead."
    )


def decoder_layers(hf_model: torch.nn.Module) -> torch.nn.ModuleList:
    base = getattr(hf_model, "model", hf_model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(hf_model).__name__} has no .model.layers ModuleList; cannot find routers.")
    return layers


_MODULE_STATE = frozenset({"training"})


def router_keys(router: torch.nn.Module) -> set[str]:
    """Public attributes, parameters, buffers and submodules a router module holds."""
    plain = {name for name in vars(router) if not name.startswith("_")} - _MODULE_STATE
    return plain | set(router._parameters) | set(router._buffers) | set(router._modules)


def check_router(family: RouterFamily, router: torch.nn.Module, layer: int) -> None:
    """Refuse a router holding configuration the family's scheme does not account for.

    Raises:
        ValueError: the router has attributes / parameters / buffers / submodules not in
            ``family.router_keys`` (a routing option labkit would otherwise silently ignore),
            or an option value the family's scheme does not implement.
    """
    unknown = sorted(router_keys(router) - family.router_keys)
    if unknown:
        raise ValueError(
            f"{family.name} router {type(router).__name__} at layer {layer} has routing configuration labkit "
            f"does not know: {unknown} (known: {sorted(family.router_keys)}). A new routing option must not be "
            "silently ignored: teach labkit.moe.families this option (scheme and router_keys) first."
        )
    family.scheme_for(router)  # raises on an option value the scheme does not implement


def find_routers_in(hf_model: torch.nn.Module) -> list[MoELayer]:
    """Every MoE layer of a Hugging Face model, with its true layer index and router module.

    The router of a layer is the one module of class ``family.router_class`` inside it.

    Raises:
        ValueError: dense / unsupported model, a supported family with no MoE layer, or a
            router with routing configuration labkit does not know (see :func:`check_router`).
    """
    family = family_of_config(hf_model.config)
    found = []
    for index, layer in enumerate(decoder_layers(hf_model)):
        routers = [module for module in layer.modules() if type(module).__name__ == family.router_class]
        if not routers:
            continue
        if len(routers) > 1:
            raise ValueError(
                f"{family.name} layer {index} holds {len(routers)} {family.router_class} modules; labkit expects one."
            )
        router = routers[0]
        check_router(family, router, index)
        found.append(MoELayer(index, router, int(getattr(router, family.n_experts_attr)), int(router.top_k), family))
    if not found:
        raise ValueError(
            f"{family.name} model {type(hf_model).__name__} has no MoE layer ({family.dense_rule}); "
            "nothing to trace or mask."
        )
    return found
