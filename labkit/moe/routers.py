"""Per-family router specs: where each MoE layer's router lives and how it chooses experts.

One declarative :class:`RouterFamily` entry per architecture (the TransformerLens adapter idea:
one dict per family), built from a handful of shared :class:`Scheme` values: a family that is a
variant of another (DeepSeek-V3 routing reused by GLM-4.5, dots1, Kimi, MiMo, ...) is the same
``Scheme`` with its own model types and router class, not a copy of code. The Hugging Face router
module of every supported family is called once per MoE layer on the flattened ``batch * pos``
tokens; labkit hooks that module with a plain ``torch`` forward hook on the plain twin
(:func:`labkit.moe.families.hf_of`): tracing reads its output, masking replaces it.

Each family's routing is recomputed from the router's own logits by one function,
:func:`route`, driven by the family's :class:`Scheme` — the *exact* tensor ops of
``transformers`` 5.23 (read from ``transformers/models/<family>/modeling_<family>.py``), so that
with no selection adjustment the recomputation equals the router's output bit for bit (tested
for every family). The schemes:

===================  ==========================================================================
scheme               router math (transformers 5.23)
===================  ==========================================================================
softmax top-k        softmax over all experts (float32) → top-k → renormalise per flag /
                     always / never (OLMoE, Qwen-MoE, Mixtral, MiniMax, Jamba, Hunyuan, ...)
top-k then softmax   top-k on the logits → softmax over the k chosen (GPT-OSS, Granite-MoE,
                     Aria, Cohere2-MoE ``expert_selection_fn="softmax"``)
top-k then sigmoid   top-k on the logits (+ correction bias) → sigmoid of the k chosen
                     (Llama 4, Kolibri, Cohere2-MoE ``"sigmoid"``)
sigmoid (+bias)      sigmoid scores; choose on scores + ``e_score_correction_bias`` (a router
                     buffer or a block tensor passed to the router); optionally within the
                     top ``topk_group`` of ``n_group`` groups (group score = sum of its top-2;
                     AXK2 fills unchosen groups with 0, not -inf); weight with the unbiased
                     scores; renormalise; × a scaling factor (DeepSeek-V3 and its variants,
                     MiniMax-M2, Hunyuan-V3, AFMoE, LFM2-MoE, Laguna, Flint, ...)
DeepSeek-V2          softmax; greedy or group-limited greedy (group score = max), never
                     renormalised, × ``routed_scaling_factor``
ERNIE 4.5            softmax; choose on probabilities + ``moe_statics`` correction bias;
                     renormalise with the sum clamped at ``moe_norm_min``
LongCat-Flash        softmax over routed + zero (identity) experts; choose on + correction
                     bias; × ``routed_scaling_factor``; zero experts are indices ≥ ``n_routed``
===================  ==========================================================================

A family's entry also names every attribute, parameter, buffer and submodule of its router
that the scheme accounts for; :func:`find_routers` refuses a router with any other (a routing
option a future ``transformers`` adds must never be silently ignored), and option values the
scheme does not implement (DeepSeek-V2 ``topk_method``, Cohere2 ``expert_selection_fn``,
Inkling-2 ``scoring_func``) are refused by name.

Families of the pinned ``transformers`` that labkit does *not* route are listed with the reason
in :data:`NOT_ROUTED`; ``tests/test_moe_families.py`` lists every MoE text-generation family
``transformers`` ships and fails on one that is in neither table.

TransformerLens 4.3 boots most of these families (its ``MoEBridge`` wraps the Hugging Face block
and calls its forward); labkit never routes through the bridge, only through the plain twin.

Layers without experts keep their true layer numbers: :func:`moe_layers` of a Qwen3-MoE with
``mlp_only_layers=[1]`` and three layers is ``[0, 2]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from labkit.interventions import Selection

__all__ = [
    "RouterFamily",
    "Scheme",
    "Selection",
    "FAMILIES",
    "NOT_ROUTED",
    "MoELayer",
    "check_router",
    "decoder_layers",
    "family_of_config",
    "find_routers_in",
    "route",
    "router_keys",
    "supported_families",
]


@dataclass(frozen=True)
class Scheme:
    """The routing rule of a family, as data (see the module table).

    Attributes:
        score: ``"softmax"`` / ``"sigmoid"`` over all experts before the choice, or ``"none"``
            (top-k runs on the logits themselves).
        softmax_float: softmax computed in float32 (``dtype=torch.float``), else in the
            logits' dtype.
        upcast: logits cast to float32 before scoring (Mixtral's ``router_logits.float()``).
        correction: where the selection-only correction bias comes from: ``None``; ``"attr:<name>"``
            a router attribute / buffer (dotted path allowed; squeezed); ``"input"`` the router's
            second forward argument (the block's ``e_score_correction_bias`` / ``expert_bias``).
        choose_plus_bias: the plain softmax families rank by ``probs * exp(user bias)``; the
            others by ``score + user bias``.
        groups: ``None``; ``"top2_sum"`` (DeepSeek-V3: group score = sum of its top-2 choice
            scores); ``"max"`` (DeepSeek-V2: max score in the group).
        group_fill: value given to experts outside the chosen groups (``-inf`` or ``0.0``).
        group_sorted: ``sorted=`` of the group top-k (irrelevant to the set chosen).
        sorted: ``sorted=`` of the final top-k.
        weight: ``"score"`` (gather the unbiased scores), ``"softmax_of_chosen"`` /
            ``"sigmoid_of_chosen"`` (of the chosen logits).
        weight_float: the softmax / sigmoid over the chosen is computed in float32 (else in the
            logits' dtype).
        renormalise: ``True``, ``False`` or the router attribute holding the flag.
        eps: added to the renormalisation denominator.
        clamp_attr: router attribute whose value clamps the denominator from below (ERNIE).
        scale: router attribute holding a scaling factor applied after renormalisation.
        cast: final dtype of the weights: ``"logits"``, ``"input"`` (hidden states) or ``None``.
    """

    score: str = "softmax"
    softmax_float: bool = True
    upcast: bool = False
    correction: str | None = None
    choose_plus_bias: bool = False
    groups: str | None = None
    group_fill: float = -math.inf
    group_sorted: bool = False
    sorted: bool = True
    weight: str = "score"
    weight_float: bool = False
    renormalise: bool | str = False
    eps: float = 0.0
    clamp_attr: str | None = None
    scale: str | None = None
    cast: str | None = "logits"


def _correction(scheme: Scheme, router: torch.nn.Module, args: tuple, kwargs: dict) -> Tensor | None:
    if scheme.correction is None:
        return None
    if scheme.correction == "input":
        if len(args) > 1:
            return args[1]
        for name in ("expert_bias", "e_score_correction_bias"):
            if name in kwargs:
                return kwargs[name]
        raise ValueError(f"{type(router).__name__} was called without its correction-bias argument.")
    owner: Any = router
    for part in scheme.correction.removeprefix("attr:").split("."):
        owner = getattr(owner, part)
    return owner.squeeze()


def route(
    scheme: Scheme,
    router: torch.nn.Module,
    router_logits: Float[Tensor, "token expert"],
    selection: Selection | None = None,
    args: tuple = (),
    kwargs: dict | None = None,
) -> tuple[Int[Tensor, "token k"], Float[Tensor, "token k"]]:
    """Recompute ``(topk_indices, topk_weights)`` from the router's logits under a selection.

    With ``selection=None`` these are the family router's own tensor ops (transformers 5.23),
    bit for bit. Under a selection, off experts score ``-inf`` and on experts ``+inf`` in the
    choice (group-limited families: every group holding an on expert is forced into the chosen
    groups, and off experts stay ``-inf`` even where unchosen groups are filled with 0); the
    weights are gathered from the unadjusted scores.

    Args:
        scheme: the family's :class:`Scheme`.
        router: the Hugging Face router module (its ``top_k``, flags and buffers are read).
        router_logits: ``[token, expert]`` logits the router returned.
        selection: per-expert off / on / bias, or ``None``.
        args, kwargs: the router's forward inputs (for a correction bias passed as an argument,
            and the hidden-state dtype).

    Returns:
        ``topk_indices`` ``[token, k]`` (int64) and ``topk_weights`` ``[token, k]``.
    """
    kwargs = kwargs or {}
    k = int(router.top_k)
    logits = router_logits.float() if scheme.upcast else router_logits
    if scheme.score == "softmax":
        if scheme.softmax_float:
            scores = torch.nn.functional.softmax(logits, dim=-1, dtype=torch.float)
        else:
            scores = torch.nn.functional.softmax(logits, dim=-1, dtype=logits.dtype)
    elif scheme.score == "sigmoid":
        scores = logits.sigmoid()
    else:
        scores = logits
    correction = _correction(scheme, router, args, kwargs)
    choice = scores if correction is None else scores + correction
    if selection is not None and selection.bias is not None:
        if scheme.score == "softmax" and not scheme.choose_plus_bias:
            choice = choice * selection.bias.to(choice).exp()
        else:
            choice = choice + selection.bias.to(choice)
    off = on = None
    if selection is not None:
        off = selection.off.to(choice.device) if selection.off.any() else None
        on = selection.on.to(choice.device) if selection.on.any() else None
    if off is not None:
        choice = choice.masked_fill(off, -math.inf)
    weight_source = scores
    if scheme.groups is not None:
        n_group, n_experts = int(router.num_group), choice.shape[-1]
        grouped = choice.view(-1, n_group, n_experts // n_group)
        if scheme.groups == "top2_sum":
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        else:
            group_scores = grouped.max(dim=-1).values
        if on is not None:
            group_scores = group_scores.masked_fill(on.view(n_group, -1).any(dim=-1), math.inf)
        group_idx = torch.topk(group_scores, k=int(router.topk_group), dim=-1, sorted=scheme.group_sorted)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, n_experts // n_group).reshape(-1, n_experts)
        choice = choice.masked_fill(~score_mask.bool(), scheme.group_fill)
        if scheme.groups == "max":  # DeepSeek-V2 weights with the group-masked scores themselves
            weight_source = scores.masked_fill(~score_mask.bool(), scheme.group_fill)
        if off is not None and scheme.group_fill != -math.inf:
            choice = choice.masked_fill(off, -math.inf)
    if on is not None:
        choice = choice.masked_fill(on, math.inf)
    if selection is None and scheme.groups == "max":
        topk_weights, topk_indices = torch.topk(choice, k=k, dim=-1, sorted=scheme.sorted)
    else:
        topk_indices = torch.topk(choice, k=k, dim=-1, sorted=scheme.sorted)[1]
        topk_weights = weight_source.gather(1, topk_indices)
    if scheme.weight == "softmax_of_chosen":
        dtype = torch.float if scheme.weight_float else topk_weights.dtype
        topk_weights = torch.nn.functional.softmax(topk_weights, dim=-1, dtype=dtype)
    elif scheme.weight == "sigmoid_of_chosen":
        topk_weights = (topk_weights.float() if scheme.weight_float else topk_weights).sigmoid()
    norm = scheme.renormalise
    if isinstance(norm, str):
        norm = bool(getattr(router, norm))
    if norm:
        denominator = topk_weights.sum(dim=-1, keepdim=True)
        if scheme.clamp_attr is not None:
            denominator = torch.clamp(denominator, min=getattr(router, scheme.clamp_attr))
        elif scheme.eps:
            denominator = denominator + scheme.eps
        topk_weights = topk_weights / denominator
    if scheme.scale is not None:
        topk_weights = topk_weights * getattr(router, scheme.scale)
    if scheme.cast == "logits":
        topk_weights = topk_weights.to(router_logits.dtype)
    elif scheme.cast == "input" and args:
        topk_weights = topk_weights.to(args[0].dtype)
    return topk_indices, topk_weights


# --- router output protocols ------------------------------------------------------------------


def _read_standard(output, router) -> tuple[Tensor, Tensor, Tensor]:
    """``(router_logits, topk_weights, topk_indices, ...)``: the transformers 5.x router output."""
    return output[0], output[1], output[2]


def _write_standard(output, router, topk_indices, topk_weights):
    return (output[0], topk_weights, topk_indices, *output[3:])


def _read_llama4(output, router) -> tuple[Tensor, Tensor, Tensor]:
    """Llama 4 returns ``(router_scores [token, expert], router_logits)``; scores are 0 off the top-k.

    The chosen experts are those with a non-zero score, in the router's order (by logit).
    """
    router_scores, router_logits = output
    ranked = router_logits.masked_fill(router_scores == 0, -math.inf)
    topk_indices = torch.topk(ranked, int(router.top_k), dim=-1)[1]
    return router_logits, router_scores.gather(1, topk_indices), topk_indices


def _write_llama4(output, router, topk_indices, topk_weights):
    router_scores, router_logits = output
    scores = torch.zeros_like(router_scores).scatter_(1, topk_indices, topk_weights.to(router_scores.dtype))
    return scores, router_logits


# --- schemes (the routing rules, shared by the families that use them) ------------------------

SOFTMAX_FLAG = Scheme("softmax", renormalise="norm_topk_prob")
SOFTMAX_ALWAYS = Scheme("softmax", renormalise=True)
SOFTMAX_NEVER_INPUT = Scheme("softmax", renormalise=False, cast="input")
MIXTRAL = Scheme("softmax", upcast=True, renormalise=True, cast=None)
TOPK_SOFTMAX = Scheme("none", weight="softmax_of_chosen", cast=None)
GRANITE = Scheme("none", upcast=True, weight="softmax_of_chosen", cast="input")
LLAMA4 = Scheme("none", weight="sigmoid_of_chosen", weight_float=True)
DEEPSEEK_V3 = Scheme(
    "sigmoid", correction="attr:e_score_correction_bias", groups="top2_sum", sorted=False,
    renormalise="norm_topk_prob", eps=1e-20, scale="routed_scaling_factor", cast=None,
)
SIGMOID_BIAS_SCALED = Scheme(
    "sigmoid", correction="attr:e_score_correction_bias", sorted=False, renormalise=True, eps=1e-20,
    scale="routed_scaling_factor", cast=None,
)

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
    read: Callable = field(default=_read_standard, repr=False)
    write: Callable = field(default=_write_standard, repr=False)
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
        "in_features", "out_features", "bias"}), read=_read_llama4, write=_write_llama4,
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
        return (self.family.read if self.family is not None else _read_standard)(output, self.router)


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
