"""Per-family router specs: where each MoE layer's router lives and how it chooses experts.

One declarative :class:`RouterFamily` entry per architecture (the TransformerLens adapter idea:
one dict per family). Every Hugging Face router module of the supported families is called as
``router(hidden_states)`` and returns ``(router_logits, topk_weights, topk_indices)`` over the
flattened ``batch * pos`` tokens, so labkit hooks the router module itself with a plain ``torch``
forward hook — tracing reads that output, masking replaces it — on the plain twin
(:func:`labkit.models.hf_model_of`). DeepSeek-V3, which TransformerLens gives no routing hooks,
is handled like every other family.

Each family's ``route`` function recomputes ``(topk_indices, topk_weights)`` from the router
logits with the *exact* tensor ops of ``transformers`` 5.x (read from
``transformers/models/<family>/modeling_<family>.py``), optionally under a per-expert selection
adjustment (see :class:`Selection`):

==============  =========================================================================
family          router math (transformers 5.x)
==============  =========================================================================
OLMoE           softmax over all experts (float32) → top-k → renormalise iff norm_topk_prob
Qwen2-MoE       same as OLMoE; plus an always-on shared expert with its own sigmoid gate
Qwen3-MoE       same as OLMoE; dense layers: ``mlp_only_layers``, ``decoder_sparse_step``
Mixtral         softmax over all (float32) → top-k → always renormalise (weights stay float32)
GPT-OSS         top-k on the (biased) logits → softmax over the k chosen logits
DeepSeek-V3     sigmoid scores; choose on scores + e_score_correction_bias within the top
                ``topk_group`` of ``n_group`` groups (group score = sum of its top-2); weight
                with the unbiased scores, renormalise iff norm_topk_prob, × routed_scaling_factor;
                dense first ``first_k_dense_replace`` layers; always-on shared experts
==============  =========================================================================

TransformerLens 4.3 boots all six families (its ``MoEBridge`` wraps the Hugging Face block and
calls its forward); it exposes ``blocks.{L}.mlp.hook_expert_indices`` / ``hook_expert_weights``
for five of them, but none for DeepSeek-V3 (only ``hook_router_scores``), and editing its
router-logits hook changes nothing downstream. labkit therefore never routes through the bridge.

Layers without experts keep their true layer numbers: :func:`moe_layers` of a Qwen3-MoE with
``mlp_only_layers=[1]`` and three layers is ``[0, 2]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = [
    "RouterFamily",
    "Selection",
    "FAMILIES",
    "MoELayer",
    "family_of",
    "find_routers",
    "moe_layers",
    "hf_of",
]


@dataclass(frozen=True)
class Selection:
    """A per-expert adjustment of one layer's expert *selection* (never of the weights).

    Attributes:
        off: boolean ``[expert]``: never select these experts (the next best takes the slot).
        on: boolean ``[expert]``: always select these experts.
        bias: float ``[expert]`` or ``None``: added to the score the family's top-k runs on —
            the router logit for the softmax families and GPT-OSS (applied as ``probs *
            exp(bias)`` for the softmax families, which ranks exactly like ``logit + bias``), the
            sigmoid score (beside ``e_score_correction_bias``) for DeepSeek-V3.

    The weights of the chosen experts are always the family's own weights computed from the
    *unadjusted* scores (as DeepSeek-V3 does with its correction bias), renormalised exactly
    where the family renormalises. An *on* expert therefore keeps its natural weight.
    """

    off: Tensor
    on: Tensor
    bias: Tensor | None = None


def _adjust(selection_scores: Tensor, selection: Selection | None) -> Tensor:
    """Apply off / on to a score tensor the family runs top-k on (no-op when ``None``)."""
    if selection is None:
        return selection_scores
    if selection.off.any():
        selection_scores = selection_scores.masked_fill(selection.off.to(selection_scores.device), float("-inf"))
    if selection.on.any():
        selection_scores = selection_scores.masked_fill(selection.on.to(selection_scores.device), float("inf"))
    return selection_scores


def route_softmax(
    router: torch.nn.Module,
    router_logits: Float[Tensor, "token expert"],
    selection: Selection | None = None,
    *,
    renormalise: bool | None = None,
    cast_back: bool = True,
) -> tuple[Int[Tensor, "token k"], Float[Tensor, "token k"]]:
    """OLMoE / Qwen2-MoE / Qwen3-MoE / Mixtral: softmax over all, top-k, maybe renormalise.

    With ``selection=None`` these are the router's own ops, bit for bit.
    """
    router_probs = torch.nn.functional.softmax(router_logits, dtype=torch.float, dim=-1)
    if selection is None:
        router_top_value, router_indices = torch.topk(router_probs, router.top_k, dim=-1)
    else:
        choice = router_probs if selection.bias is None else router_probs * selection.bias.to(router_probs).exp()
        router_indices = torch.topk(_adjust(choice, selection), router.top_k, dim=-1)[1]
        router_top_value = router_probs.gather(1, router_indices)
    norm = getattr(router, "norm_topk_prob", True) if renormalise is None else renormalise
    if norm:
        router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
    if cast_back:
        router_top_value = router_top_value.to(router_logits.dtype)
    return router_indices, router_top_value


def route_mixtral(router, router_logits, selection=None):
    """Mixtral: always renormalises; its weights stay float32 (no cast back)."""
    return route_softmax(router, router_logits.float(), selection, renormalise=True, cast_back=False)


def route_gpt_oss(
    router: torch.nn.Module,
    router_logits: Float[Tensor, "token expert"],
    selection: Selection | None = None,
) -> tuple[Int[Tensor, "token k"], Float[Tensor, "token k"]]:
    """GPT-OSS: top-k on the logits (router bias included), softmax over the k chosen logits."""
    if selection is None:
        router_top_value, router_indices = torch.topk(router_logits, router.top_k, dim=-1)
    else:
        choice = router_logits if selection.bias is None else router_logits + selection.bias.to(router_logits)
        router_indices = torch.topk(_adjust(choice, selection), router.top_k, dim=-1)[1]
        router_top_value = router_logits.gather(1, router_indices)
    router_scores = torch.nn.functional.softmax(router_top_value, dim=1, dtype=router_top_value.dtype)
    return router_indices, router_scores


def route_deepseek_v3(
    router: torch.nn.Module,
    router_logits: Float[Tensor, "token expert"],
    selection: Selection | None = None,
) -> tuple[Int[Tensor, "token k"], Float[Tensor, "token k"]]:
    """DeepSeek-V3: sigmoid scores, group-limited choice on biased scores, unbiased weights.

    Under a selection, off experts are ``-inf`` in the choice scores (a group whose experts are
    all off scores ``-inf``: it is never preferred), and every group holding an *on* expert is
    forced into the chosen groups (its group score set to ``+inf``), then the on experts
    themselves to ``+inf``, so no ``inf - inf`` NaN can arise.
    """
    n_group, n_experts = router.num_group, router.num_experts
    scores = router_logits.sigmoid()
    scores_for_choice = scores + router.e_score_correction_bias
    if selection is not None:
        if selection.bias is not None:
            scores_for_choice = scores_for_choice + selection.bias.to(scores_for_choice)
        if selection.off.any():
            scores_for_choice = scores_for_choice.masked_fill(selection.off.to(scores.device), float("-inf"))
    group_scores = (
        scores_for_choice.view(-1, n_group, n_experts // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    )
    if selection is not None and selection.on.any():
        forced_groups = selection.on.to(scores.device).view(n_group, -1).any(dim=-1)
        group_scores = group_scores.masked_fill(forced_groups, float("inf"))
    group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, n_experts // n_group).reshape(-1, n_experts)
    scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), float("-inf"))
    if selection is not None and selection.on.any():
        scores_for_choice = scores_for_choice.masked_fill(selection.on.to(scores.device), float("inf"))
    topk_indices = torch.topk(scores_for_choice, k=router.top_k, dim=-1, sorted=False)[1]
    topk_weights = scores.gather(1, topk_indices)
    if router.norm_topk_prob:
        denominator = topk_weights.sum(dim=-1, keepdim=True) + 1e-20
        topk_weights /= denominator
    topk_weights = topk_weights * router.routed_scaling_factor
    return topk_indices, topk_weights


RouteFn = Callable[..., tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class RouterFamily:
    """How one architecture routes.

    Attributes:
        name: human-readable family name.
        model_types: ``config.model_type`` values of the family.
        router_path: path of the router module inside a decoder layer.
        router_class: class name of the Hugging Face router module (a layer whose module at
            ``router_path`` is not of this class is dense).
        route: ``route(router, router_logits, selection) -> (topk_indices, topk_weights)``.
        shared_experts: path of the always-on shared expert inside the MoE block, or ``None``.
        dense_rule: how the family marks dense layers, for error messages.
    """

    name: str
    model_types: tuple[str, ...]
    router_path: str
    router_class: str
    route: RouteFn
    shared_experts: str | None = None
    dense_rule: str = "every layer is a MoE layer"
    groups: bool = field(default=False)


FAMILIES: dict[str, RouterFamily] = {
    family.model_types[0]: family
    for family in (
        RouterFamily("OLMoE", ("olmoe",), "mlp.gate", "OlmoeTopKRouter", route_softmax),
        RouterFamily(
            "Qwen2-MoE", ("qwen2_moe",), "mlp.gate", "Qwen2MoeTopKRouter", route_softmax,
            shared_experts="mlp.shared_expert",
            dense_rule="layers in mlp_only_layers or with (layer + 1) % decoder_sparse_step != 0 are dense",
        ),
        RouterFamily(
            "Qwen3-MoE", ("qwen3_moe",), "mlp.gate", "Qwen3MoeTopKRouter", route_softmax,
            dense_rule="layers in mlp_only_layers or with (layer + 1) % decoder_sparse_step != 0 are dense",
        ),
        RouterFamily("Mixtral", ("mixtral",), "mlp.gate", "MixtralTopKRouter", route_mixtral),
        RouterFamily("GPT-OSS", ("gpt_oss",), "mlp.router", "GptOssTopKRouter", route_gpt_oss),
        RouterFamily(
            "DeepSeek-V3", ("deepseek_v3",), "mlp.gate", "DeepseekV3TopkRouter", route_deepseek_v3,
            shared_experts="mlp.shared_experts",
            dense_rule="the first first_k_dense_replace layers are dense",
            groups=True,
        ),
    )
}


@dataclass(frozen=True)
class MoELayer:
    """One MoE layer of a concrete model: its true index and its router module."""

    layer: int
    router: torch.nn.Module
    n_experts: int
    top_k: int


def hf_of(model) -> torch.nn.Module:
    """The plain Hugging Face model to run: the twin of a labkit bridge, or ``model`` itself."""
    from labkit.engines import is_engine_model
    from labkit.models import lab_model_or_none

    if is_engine_model(model):
        return model.skeleton  # the model class on the meta device: modules and config, no weights
    record = lab_model_or_none(model)
    if record is not None:
        return record.twin
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(
            f"Expected a labkit bridge (labkit.load_model) or a Hugging Face PreTrainedModel, got "
            f"{type(model).__name__}."
        )
    if type(model).__name__ == "TransformerBridge":
        raise TypeError(
            "This TransformerBridge was not made by labkit, so it has no plain twin to route on. "
            "Wrap the Hugging Face model with labkit.models.from_hf(hf_model, tokenizer)."
        )
    return model


def family_of(model) -> RouterFamily:
    """The :class:`RouterFamily` of a model (bridge or Hugging Face).

    Raises:
        ValueError: the model is dense or of an unsupported family; the message lists the
            supported ``model_type`` values.
    """
    config = hf_of(model).config
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = ", ".join(f"{f.name} ({f.model_types[0]!r})" for f in FAMILIES.values())
    raise ValueError(
        f"Model of type {model_type!r} ({type(hf_of(model)).__name__}) has no mixture-of-experts "
        f"router labkit knows. Supported families: {supported}. Routing traces and expert masks "
        "need one of these; for a dense model use labkit.hooks / steering instead."
    )


def _decoder_layers(hf_model: torch.nn.Module) -> torch.nn.ModuleList:
    base = getattr(hf_model, "model", hf_model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(hf_model).__name__} has no .model.layers ModuleList; cannot find routers.")
    return layers


def n_layers_of(model) -> int:
    """Number of decoder layers (dense and MoE)."""
    return len(_decoder_layers(hf_of(model)))


def find_routers(model) -> list[MoELayer]:
    """Every MoE layer of the model (plain twin), with its true layer index and router module.

    Raises:
        ValueError: dense / unsupported model, or a supported family with no MoE layer.
    """
    family = family_of(model)
    hf_model = hf_of(model)
    found = []
    for index, layer in enumerate(_decoder_layers(hf_model)):
        try:
            router = layer.get_submodule(family.router_path)
        except AttributeError:
            continue
        if type(router).__name__ != family.router_class:
            continue
        found.append(MoELayer(index, router, int(router.num_experts), int(router.top_k)))
    if not found:
        raise ValueError(
            f"{family.name} model {type(hf_model).__name__} has no MoE layer ({family.dense_rule}); "
            "nothing to trace or mask."
        )
    return found


def moe_layers(model) -> list[int]:
    """True layer indices of the model's MoE layers (dense layers skipped, numbers kept).

    Args:
        model: a labkit bridge or a Hugging Face model of a supported family.

    Returns:
        e.g. ``[1, 2, 3]`` for a DeepSeek-V3 with ``first_k_dense_replace=1`` and 4 layers.

    Raises:
        ValueError: the model is dense or of an unsupported family (the message lists the
            supported families).

    Example:
        >>> moe_layers(model)  # doctest: +SKIP
        [0, 1, 2, ..., 15]
    """
    return [moe_layer.layer for moe_layer in find_routers(model)]
