"""Activation capture and token log-probabilities on the Hugging Face path.

``cache_activations`` runs :func:`capture_batch` per batch; ``evals.perplexity`` runs
:func:`token_logprobs`.

One batch is one left-padded forward pass (attention mask set, position ids counting real tokens
only, so every row equals the prompt run alone) with one hook per requested hook point
(:func:`labkit.backends.hooks.attach`: a ``torch`` hook on the plain twin where the hook point is a
module's input or output, the bridge's own hook point otherwise). Each hook copies only the kept
rows (advanced indexing: no view pins the whole batch).

The router logits of a MoE layer, ``blocks.{L}.mlp.hook_router_logits`` (labkit's name;
TransformerLens has no per-position hook point for them), are read from the layer's router with
the family's own reader (:mod:`labkit.moe.routers`) — the values ``trace_routing(...,
include_router_logits=True)`` returns.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

from labkit.backends.hooks import attach, module_hooks, resolve_hook
from labkit.moe.routers import find_routers_in
from labkit.tokens import left_pad

__all__ = ["ROUTER_LOGITS", "capture_batch", "check_cache_point", "probe_shapes", "token_logprobs"]

#: labkit's hook point (after ``blocks.{L}.``) for a MoE layer's router logits, ``[pos, n_experts]``.
ROUTER_LOGITS = "mlp.hook_router_logits"
_ROUTER_NAME = re.compile(r"^blocks\.(\d+)\.mlp\.hook_router_logits$")


def _router_layer(name: str) -> int | None:
    match = _ROUTER_NAME.match(name)
    return int(match.group(1)) if match else None


def _routers(backend) -> dict:
    return {router.layer: router for router in find_routers_in(backend.module)}


def check_cache_point(backend, name: str, where: str) -> None:
    """Raise unless ``name`` is a hook point (or a MoE layer's router logits) of this model.

    Raises:
        ValueError: an unknown hook name (with the closest real names), a hook point that never
            fires, or router logits of a layer with no router.
    """
    layer = _router_layer(name)
    if layer is None:
        resolve_hook(backend, name)
        return
    routers = _routers(backend)
    if layer not in routers:
        raise ValueError(
            f"{where}: {name!r}: layer {layer} has no MoE router on this model (MoE layers: {sorted(routers)})."
        )


def _run(backend, hooks, routed: dict[int, list], input_ids, attention_mask, position_ids) -> None:
    """One forward pass with ``hooks`` attached and the routers of ``routed`` read."""
    # The logits are not cached: the twin computes the last position's only (the unembedding is a
    # fifth of SmolLM2's forward), unless a hook point is the unembedding's own output.
    reads_logits = any((resolve_hook(backend, name).module_path or "").endswith("lm_head") for name, _fn in hooks)
    routers = _routers(backend) if routed else {}

    def reader(slot: list, moe_layer):
        def hook(_module, _inputs, output):
            slot.append(moe_layer.read(output)[0])

        return hook

    paths = {id(module): path for path, module in backend.twin.named_modules()} if routed else {}
    router_hooks = []
    for layer, slot in routed.items():
        twin_router = routers[layer].router
        # the twin's router fires when the twin runs; the original module at the same path when
        # the bridge runs (bridge-only hook points in the same call)
        original = backend.original_modules.get(paths[id(twin_router)])
        for module in {id(m): m for m in (twin_router, original) if m is not None}.values():
            router_hooks.append((module, reader(slot, routers[layer])))
    with torch.inference_mode(), attach(backend, hooks) as runner, module_hooks(router_hooks):
        if runner is backend.bridge:
            runner(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        else:
            runner(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                **({} if reads_logits else {"logits_to_keep": 1}),
            )


def probe_shapes(backend, hook_names: Sequence[str], ids: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Per-position trailing shape of each hook point, from a forward pass on one short prompt.

    Raises:
        ValueError: a hook point whose activation is not ``[batch, pos, ...]`` (attention patterns).
    """
    shapes: dict[str, tuple[int, ...]] = {}
    length = len(ids)

    def record(activation: Tensor, site) -> None:
        if activation.dim() < 2 or activation.shape[0] != 1 or activation.shape[1] != length:
            raise ValueError(
                f"hook point {site.name!r} produces shape {tuple(activation.shape)}, not "
                "[batch, pos, ...]; cache_activations keeps per-position activations. Use "
                "model.run_with_cache for attention patterns and other per-head tensors."
            )
        shapes[site.name] = tuple(activation.shape[2:])

    plain = [name for name in hook_names if _router_layer(name) is None]
    routed = {_router_layer(name): [] for name in hook_names if _router_layer(name) is not None}
    input_ids, attention_mask, position_ids = left_pad([list(ids)], 0, backend.device)
    _run(backend, [(name, record) for name in plain], routed, input_ids, attention_mask, position_ids)
    for name in hook_names:
        layer = _router_layer(name)
        if layer is not None:
            shapes[name] = (int(routed[layer][0].shape[-1]),)
    return {name: shapes[name] for name in hook_names}


def capture_batch(
    backend, rows: Sequence[Sequence[int]], keep: Sequence[Sequence[int]], hook_names: Sequence[str]
) -> dict[str, Tensor]:
    """One batch of ``cache_activations`` (see :meth:`labkit.backends.Backend.capture`).

    Returns:
        ``{hook name: Tensor[kept, *shape]}`` in the model's dtype, kept positions row by row.
    """
    device = backend.device
    input_ids, attention_mask, position_ids = left_pad([list(r) for r in rows], backend.pad_id, device)
    batch, width = input_ids.shape
    batch_idx, seq_idx = [], []
    for i, (row, chosen) in enumerate(zip(rows, keep)):
        offset = width - len(row)
        batch_idx += [i] * len(chosen)
        seq_idx += [offset + int(p) for p in chosen]
    b_idx = torch.tensor(batch_idx, dtype=torch.long, device=device)
    s_idx = torch.tensor(seq_idx, dtype=torch.long, device=device)
    out: dict[str, Tensor] = {}

    def keep_rows(activation: Tensor, site) -> None:
        # Advanced indexing copies exactly the kept rows: no view pins the whole batch.
        out[site.name] = activation[b_idx, s_idx]

    plain = [name for name in hook_names if _router_layer(name) is None]
    routed = {_router_layer(name): [] for name in hook_names if _router_layer(name) is not None}
    _run(backend, [(name, keep_rows) for name in plain], routed, input_ids, attention_mask, position_ids)
    for name in hook_names:
        layer = _router_layer(name)
        if layer is not None:
            (logits,) = routed[layer]  # [batch * width, n_experts] (the routers flatten tokens)
            out[name] = logits.reshape(batch, width, -1)[b_idx, s_idx]
    return out


def token_logprobs(backend, rows: Sequence[Sequence[int]]) -> list[Tensor]:
    """Log-probability of every token of each row given the tokens before it (one left-padded
    forward pass of the twin, no KV cache): ``[len(row) - 1]`` float32 per row, on the CPU."""
    input_ids, mask, positions = left_pad([list(r) for r in rows], backend.pad_id, backend.device)
    width = input_ids.shape[1]
    with torch.no_grad():
        logits = backend.twin(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        picked = logprobs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1).cpu()
    return [picked[b, width - len(row):] for b, row in enumerate(rows)]
