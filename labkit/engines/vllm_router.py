"""One generic seam for mixture-of-experts routing on vLLM: every router runs labkit's family math.

vLLM 0.32 routes every MoE family through one step: the fused-MoE runner (``MoERunner``) calls
its router's ``select_experts``, which calls ``_compute_routing(hidden_states, router_logits,
indices_type)`` and gets ``(topk_weights, topk_ids)`` back (``fused_moe/router/base_router.py``;
on a CPU every family's router is a ``CPURouter``). labkit replaces that one method on each
router instance with :func:`labkit.moe.families.route` under the model's :class:`RouterFamily`
— the exact ``transformers`` router math the Hugging Face path uses — so routing traces and
expert masks (off / on / bias, per request) mean the same on both paths, for every family, with
no copy of a vLLM model file.

What this module needs from each side:

* **Driver** (:func:`router_settings`): the routing configuration of every MoE layer, read from
  the Hugging Face router modules of the model's weightless skeleton (``meta`` device): the
  scalar attributes the family's scheme reads (``top_k``, ``norm_topk_prob``,
  ``routed_scaling_factor``, ``num_group``, ...), the expert count, the family's ``model_type``.
  A family labkit does not route (or not under the installed ``transformers``) is recorded with
  the reason: the engine still loads and generates, plain and steered, with vLLM's own routing;
  traces and masks are refused with that reason.
* **Worker** (:func:`install_routing`): the router instance and its loaded tensors. A family's
  correction bias (DeepSeek-V3's ``e_score_correction_bias``, ERNIE's ``moe_statics``, the bias
  AFMoE / MiniMax-M2 pass to their router) is the vLLM router's ``e_score_correction_bias``.

One convention differs between the two libraries: where vLLM's runner multiplies the *output* by
``routed_scaling_factor`` (``apply_routed_scale_to_output``) its router must not, so the family's
weights are divided by the runner's factor before they go to the kernel. Traces always record
the family's own weights (the Hugging Face path's values).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

__all__ = ["router_settings", "find_moe_runners", "install_routing", "ENGINE_ROUTING_KIND"]

ENGINE_ROUTING_KIND = "labkit.vllm.Routing"
_SCALARS = (bool, int, float, str, type(None))
_MOE_CONTAINERS = ("mlp", "block_sparse_moe", "feed_forward", "moe")


def router_settings(handle) -> dict[str, Any]:
    """The routing configuration every worker needs, as JSON-ready data (driver side).

    Args:
        handle: a :class:`labkit.engines.vllm.VLLMModel` (its ``skeleton`` answers the questions).

    Returns:
        ``{"kind", "model_type", "routed", "reason", "layers": {"L": {"n_experts", "top_k",
        "attrs"}}}``. ``routed`` is ``False`` (with ``reason``) for a dense model, a MoE family
        labkit does not route, or one whose routers it refuses; ``layers`` is then empty.
    """
    from labkit.moe.routers import find_routers_in, router_keys

    model_type = getattr(handle.config, "model_type", None)
    settings: dict[str, Any] = {"kind": ENGINE_ROUTING_KIND, "model_type": model_type, "routed": False,
                                "reason": "", "layers": {}}
    try:
        routers = find_routers_in(handle.skeleton)
    except ValueError as error:
        settings["reason"] = str(error)
        return settings
    for moe in routers:
        attrs = {}
        for key in sorted(router_keys(moe.router)):
            value = getattr(moe.router, key, None)
            if isinstance(value, _SCALARS):
                attrs[key] = value
        settings["layers"][str(moe.layer)] = {"n_experts": int(moe.n_experts), "top_k": int(moe.top_k), "attrs": attrs}
    settings["model_type"] = routers[0].family.model_types[0]
    settings["routed"] = True
    return settings


def find_moe_runners(layer) -> list[Any]:
    """The fused-MoE runners inside one vLLM decoder layer (objects whose ``router`` has ``_compute_routing``)."""
    candidates = list(layer.modules()) if isinstance(layer, torch.nn.Module) else []
    candidates += [getattr(getattr(layer, name, None), "experts", None) for name in _MOE_CONTAINERS]
    found, seen = [], set()
    for candidate in candidates:
        router = getattr(candidate, "router", None)
        if candidate is None or id(candidate) in seen or not callable(getattr(router, "_compute_routing", None)):
            continue
        seen.add(id(candidate))
        found.append(candidate)
    return found


def _proxy(family, entry: dict[str, Any], vllm_router) -> tuple[SimpleNamespace, Tensor | None]:
    """A stand-in for the Hugging Face router: its scalar attributes plus the loaded correction bias."""
    proxy = SimpleNamespace(**entry["attrs"])
    proxy.top_k = int(entry["top_k"])
    scheme = family.scheme_for(proxy)
    correction = None
    if scheme.correction is not None:
        correction = getattr(vllm_router, "e_score_correction_bias", None)
        if correction is None:
            raise RuntimeError(
                f"labkit: the {family.name} family chooses experts with a correction bias, but vLLM's router "
                f"({type(vllm_router).__name__}) holds none (e_score_correction_bias is None)."
            )
        if scheme.correction.startswith("attr:"):
            owner = proxy
            parts = scheme.correction.removeprefix("attr:").split(".")
            for part in parts[:-1]:
                if not hasattr(owner, part):
                    setattr(owner, part, SimpleNamespace())
                owner = getattr(owner, part)
            setattr(owner, parts[-1], correction)
    return proxy, correction


def install_routing(
    family,
    entry: dict[str, Any],
    runner,
    plan_of: Callable[[], Any],
    record: Callable[[str, int, Tensor, Tensor, Tensor, Tensor], None],
    index: int,
) -> None:
    """Replace ``runner.router._compute_routing`` with the family's exact routing under per-request masks.

    Args:
        family: the model's :class:`labkit.moe.families.RouterFamily`.
        entry: this layer's part of :func:`router_settings` (``n_experts``, ``top_k``, ``attrs``).
        runner: the layer's fused-MoE runner (``router``, ``routed_experts``, ``routed_scaling_factor``).
        plan_of: returns the current step's plan: ``.masks[layer] -> [(token rows, Selection)]`` and
            ``.traced -> [(key, token rows, positions)]``.
        record: ``record(key, layer, positions, topk_indices, topk_weights, router_logits)`` for traced rows.
        index: the decoder layer's index (true layer number).

    Raises:
        RuntimeError: the runner's kernel is monolithic (it selects experts inside the kernel, so
            no router step exists to replace), or the family needs a correction bias vLLM's
            router does not hold, or the expert counts disagree.
    """
    router = runner.router
    quant_method = getattr(getattr(runner, "routed_experts", None), "quant_method", None)
    if getattr(quant_method, "is_monolithic", False):
        raise RuntimeError(
            f"labkit: layer {index}'s MoE kernel ({type(quant_method).__name__}) is monolithic: it selects "
            "experts inside the kernel and skips the router's selection step, so expert masks, exact family "
            "routing and routing traces cannot apply. Use an unquantised model or a modular MoE backend."
        )
    n_experts = int(entry["n_experts"])
    served = int(getattr(router, "global_num_experts", n_experts))
    if served != n_experts:
        raise RuntimeError(
            f"labkit: layer {index}: vLLM's router serves {served} experts, the model's config {n_experts} "
            "(redundant or fused shared experts?); labkit routes logical experts only."
        )
    proxy, correction = _proxy(family, entry, router)
    scheme = family.scheme_for(proxy)
    divide = float(getattr(runner, "routed_scaling_factor", 1.0) or 1.0)

    def route(hidden_states, logits, selection):
        args = (hidden_states, correction) if scheme.correction == "input" else (hidden_states,)
        return family.route(proxy, logits, selection, args=args)

    def compute_routing(hidden_states, router_logits, indices_type, *, input_ids=None):
        plan = plan_of()
        topk_indices, topk_weights = route(hidden_states, router_logits, None)
        n = router_logits.shape[0]
        for rows, selection in plan.masks.get(index, []):
            rows = rows[rows < n]
            if rows.numel():
                sub_indices, sub_weights = route(hidden_states[rows], router_logits[rows], selection)
                topk_indices[rows] = sub_indices.to(topk_indices.dtype)
                topk_weights[rows] = sub_weights.to(topk_weights.dtype)
        for key, rows, positions in plan.traced:
            here = rows < n
            rows, positions = rows[here], positions[here]
            record(key, index, positions, topk_indices[rows], topk_weights[rows], router_logits[rows])
        weights = topk_weights.to(torch.float32)
        if not math.isclose(divide, 1.0):
            weights = weights / divide
        # the CPU fused-MoE kernel reads contiguous float32 weights and int32 ids
        return weights.contiguous(), topk_indices.to(torch.int32).contiguous()

    router._compute_routing = compute_routing
