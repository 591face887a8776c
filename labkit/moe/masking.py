"""Expert masks: switch routed experts off, force them on, or bias their selection.

The intervention of *Mixture of Tunable Experts* (MoTE, 2025, §4): with the experts most tied to
a behaviour found (:mod:`labkit.moe.attribution`), switch them off (or force them on) at
inference time and watch the behaviour change; a random mask of the same size and layer spread
is the control.

An :class:`ExpertMask` is plain data: a sorted tuple of :class:`ExpertEdit` ``(layer, expert,
mode, value)`` plus the model it was made for. ``with masked(model, mask): ...`` puts one plain
``torch`` forward hook on the router module of each layer the mask touches (on the plain twin,
so ``labkit.generate`` inside the block is masked, KV cache and all). The hook takes the
router's own logits and recomputes ``(topk_weights, topk_indices)`` with the family's exact
router math (:mod:`labkit.moe.families`) under a *selection* adjustment:

* **off** — the expert is never selected; the next best expert takes its slot. Weights are the
  family's weights of the experts actually chosen, from the unchanged scores, renormalised and
  scaled exactly where the family does (OLMoE/Qwen with ``norm_topk_prob=False`` keep the raw
  softmax probabilities; Mixtral, ``norm_topk_prob=True`` and DeepSeek-V3 renormalise; GPT-OSS /
  Granite re-softmax over the chosen logits; Llama 4 takes the sigmoid of each chosen logit).
* **on** — the expert is always selected and keeps its natural weight (its softmax probability
  / sigmoid score / logit under the same rules as above); it displaces the weakest choice.
  Group-limited families (DeepSeek-V3 and variants, DeepSeek-V2): the group holding it is forced
  into the ``topk_group`` chosen groups.
* **bias** — a finite number added to the score the family's top-k ranks by (the router logit;
  for the sigmoid families the sigmoid score, beside ``e_score_correction_bias``). Like
  DeepSeek's own correction bias it changes *which* experts are chosen, never their weights.

Every family's rule is one :class:`labkit.moe.families.Scheme`; see that module's table.

Layers the mask does not touch get no hook, so an empty mask is bit-identical to no mask. Masks
nest and compose (``contextlib.ExitStack``): all active masks on a router are merged. Editing
only TransformerLens's router-logits hook would change nothing (the HF block reads the
router's weights and indices), editing only indices would give a new expert zero weight, and
rewriting scores before DeepSeek's routing shifts choices even with nothing masked — hence a
full recomputation from the logits with the router's own ops.

The mask type (:class:`ExpertMask`, :class:`ExpertEdit`) lives in :mod:`labkit.moe.expert_mask`
and is re-exported here; this module checks a mask against a model and applies it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

from labkit.backends import backend_of
from labkit.interventions import Selection, merge_selections, selection_from_edits
from labkit.models import same_model
from labkit.moe.expert_mask import ExpertEdit, ExpertMask, model_meta
from labkit.moe.families import MoELayer, RouterFamily, family_of, find_routers

__all__ = ["ExpertEdit", "ExpertMask", "masked"]

# applying ------------------------------------------------------------------------------------


def check_mask_fits(mask: ExpertMask, model, routers: list[MoELayer]) -> None:
    meta = model_meta(model)
    if mask.n_layers is not None and mask.n_layers != meta["n_layers"]:
        raise ValueError(
            f"ExpertMask was made for a model with {mask.n_layers} layers ({mask.model_name!r}); this model "
            f"({meta['model_name']!r}) has {meta['n_layers']}. Make the mask for this model."
        )
    if mask.n_experts is not None and mask.n_experts != meta["n_experts"]:
        raise ValueError(
            f"ExpertMask was made for a model with {mask.n_experts} experts per layer ({mask.model_name!r}); "
            f"this model ({meta['model_name']!r}) has {meta['n_experts']}. Make the mask for this model."
        )
    if mask.model_name is not None and not same_model(mask.model_name, meta["model_name"]):
        raise ValueError(
            f"ExpertMask was made for model {mask.model_name!r}, not {meta['model_name']!r}. If the two are the "
            "same model, rebind it with mask.for_model(model)."
        )
    n_layers, n_experts = meta["n_layers"], meta["n_experts"]
    by_layer = {r.layer: r for r in routers}
    family = family_of(model)
    shared = f" ({family.name} also has always-on shared experts, which are not routed and cannot be masked)" if family.shared_experts else ""
    for edit in mask.edits:
        if edit.layer >= n_layers:
            raise ValueError(
                f"ExpertMask: layer {edit.layer} out of range; model has {n_layers} layers (0..{n_layers - 1}); "
                f"MoE layers: {sorted(by_layer)}."
            )
        if edit.layer not in by_layer:
            raise ValueError(
                f"ExpertMask: layer {edit.layer} is a dense layer with no routed experts ({family.dense_rule}); "
                f"MoE layers: {sorted(by_layer)}."
            )
        if edit.expert >= n_experts:
            raise ValueError(
                f"ExpertMask: layer {edit.layer} expert {edit.expert} out of range; model has {n_experts} "
                f"experts per layer (0..{n_experts - 1}){shared}."
            )


def check_selection(selection: Selection, moe_layer: MoELayer, family: RouterFamily) -> None:
    """Refuse selections the router cannot honour; warn about DeepSeek groups emptied."""
    layer, k, n = moe_layer.layer, moe_layer.top_k, moe_layer.n_experts
    both = (selection.off & selection.on).nonzero().flatten().tolist()
    if both:
        raise ValueError(f"ExpertMask: layer {layer} experts {both} are both off and on (from nested masks).")
    n_off, n_on = int(selection.off.sum()), int(selection.on.sum())
    if n - n_off < k:
        raise ValueError(
            f"ExpertMask: layer {layer} switches off {n_off} of {n} experts, leaving {n - n_off} selectable, but "
            f"each token needs top_k={k} experts. Switch off at most {n - k} experts per layer."
        )
    if n_on > k:
        raise ValueError(
            f"ExpertMask: layer {layer} forces {n_on} experts on, but each token takes only top_k={k}. "
            f"Force at most {k} per layer."
        )
    scheme = family.scheme_for(moe_layer.router)
    if scheme.groups is not None:
        router = moe_layer.router
        n_group, topk_group = int(router.num_group), int(router.topk_group)
        selectable = (~selection.off).view(n_group, -1).sum(-1).tolist()
        on_groups = int(selection.on.view(n_group, -1).any(-1).sum())
        if on_groups > topk_group:
            raise ValueError(
                f"ExpertMask: layer {layer} forces on experts in {on_groups} expert groups, but {family.name} routes "
                f"each token within topk_group={topk_group} of n_group={n_group} groups. Force experts on in at "
                f"most {topk_group} groups."
            )
        emptied = [g for g, count in enumerate(selectable) if count == 0]
        # a group scored by the sum of its top-2 with one selectable expert left is never preferred
        starved = [g for g, count in enumerate(selectable) if count == 1] if scheme.groups == "top2_sum" else []
        if emptied or starved:
            parts = [f"expert groups {emptied} are emptied"] if emptied else []
            parts += [f"expert groups {starved} keep a single expert"] if starved else []
            warnings.warn(
                f"ExpertMask: layer {layer}: {' and '.join(parts)}; {family.name} scores a group by the sum of its "
                "top-2 choice scores, so such a group is never preferred and tokens route within the other "
                f"groups (topk_group={topk_group} of n_group={n_group}).",
                stacklevel=4,
            )
        preferred = sorted(c for c in selectable if c >= 2)
        rest = sorted(c for c in selectable if c < 2)
        worst = sum(preferred[:topk_group]) if len(preferred) >= topk_group else sum(preferred) + sum(rest[: topk_group - len(preferred)])
        if worst < k:
            raise ValueError(
                f"ExpertMask: layer {layer}: after this mask, the {topk_group} groups a token may be routed to can "
                f"hold only {worst} selectable experts, fewer than top_k={k}. Switch off fewer experts per group."
            )


def selections_for(mask: ExpertMask, routers: list[MoELayer]) -> dict[int, Selection]:
    """``{layer: Selection}`` of a mask's edits (CPU tensors; the backend moves them)."""
    by_layer = {r.layer: r for r in routers}
    return {
        layer: selection_from_edits(
            [(e.mode, e.expert, e.value) for e in mask.edits if e.layer == layer], by_layer[layer].n_experts
        )
        for layer in mask.layers
    }


@contextlib.contextmanager
def masked(model, mask: ExpertMask) -> Iterator[torch.nn.Module]:
    """Apply an expert mask to every forward pass of the model's plain twin inside the block.

    MoTE (2025, §4): switch the experts tied to a behaviour off (or on) at inference time. One
    forward hook per touched router module recomputes the router's choice with the family's
    exact math (see the module docstring for what off / on / bias mean per family). The hooks
    are registered in front of any other hook on the router (so a routing trace taken inside
    the block records the masked choice) and removed in ``finally`` — none survives an exception
    or a ``KeyboardInterrupt``. Masks nest; the masks active on a router are merged.

    Every way of running the model is masked: labkit's functions on the plain twin
    (``labkit.generate``, ``trace_routing``, ``cache_activations``) and the TransformerLens
    bridge itself (``model(tokens)``, ``run_with_cache``, ``generate``), whose MoE blocks call
    the original router modules — hooked too.

    Args:
        model: a labkit bridge or a Hugging Face MoE model.
        mask: an :class:`ExpertMask`.

    Yields:
        The plain Hugging Face model that is masked (the twin for a bridge).

    Raises:
        ValueError: the model is dense; the mask was made for another model; a layer or expert
            out of range or a dense layer; fewer than ``top_k`` selectable experts left in a
            layer; more than ``top_k`` forced on; an expert both off and on; DeepSeek-V3 group
            limits that cannot be met.
        TypeError: ``mask`` is not an :class:`ExpertMask`.

    Example:
        >>> with masked(model, ExpertMask.off([(3, 17)])):  # doctest: +SKIP
        ...     labkit.generate(model, "What happened in 1989?").texts
    """
    if not isinstance(mask, ExpertMask):
        raise TypeError(f"masked: expected an ExpertMask, got {type(mask).__name__}.")
    backend = backend_of(model)
    backend.require("mask", "masked")
    backend.check_mask_dispatch("masked")
    family = family_of(model)
    routers = find_routers(model)
    check_mask_fits(mask, model, routers)
    selections = selections_for(mask, routers)
    by_layer = {r.layer: r for r in routers}
    for layer, selection in selections.items():  # what the router will run: this mask merged with the open ones
        check_selection(merge_selections([*backend.open_selections(layer), selection]), by_layer[layer], family)
    with backend.masked(selections) as handle:
        yield handle
