"""Reading activations and routing off the vLLM workers, at TransformerLens hook names.

Every read runs each prompt as one prefill request (``max_tokens=1``) that carries its own
intervention spec (the open steering and masks, what to record, which positions, a nonce): the
nonce gives the request its own prefix-cache salt, so every prompt token runs every layer, and the
records of one request are its own. The workers keep only the chosen positions' rows
(:meth:`labkit.engines.vllm_worker.LabkitWorkerExtension.labkit_collect_activations`), return them
as safetensors bytes, and the driver checks that every chosen position was recorded — a token that
skipped a layer (a prefix-cache hit) is an error, never a missing row.

Hook points read on the engine (``L`` any decoder layer):

================================ ============================================ ===================
hook name                        what the workers read                        shape per position
================================ ============================================ ===================
``blocks.L.hook_resid_pre``      the stream entering decoder layer ``L``      ``[d_model]``
``blocks.L.hook_resid_mid``      ``hook_resid_pre + hook_attn_out`` (summed   ``[d_model]``
                                 in float32 on the driver: the stream after
                                 attention of a pre-norm block)
``blocks.L.hook_resid_post``     the stream leaving layer ``L``               ``[d_model]``
``blocks.L.hook_attn_out``       the attention child's output (all-reduced)   ``[d_model]``
``blocks.L.hook_mlp_out``        the MLP / MoE child's output (all-reduced)   ``[d_model]``
``blocks.L.mlp.hook_router_logits`` the MoE router's logits before top-k      ``[n_experts]``
                                 (labkit's name; what ``trace_routing(...,
                                 include_router_logits=True)`` returns)
================================ ============================================ ===================
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from labkit.checks import check_layer, check_token_ids

__all__ = [
    "BLOCK_SITE_FAMILIES", "ENGINE_CACHE_POINTS", "ROUTER_LOGITS", "capture_activations", "check_block_point",
    "engine_reads", "prefill_records", "prompt_logprobs", "routing_records", "shapes_on_engine",
]

#: labkit's hook point for a MoE layer's router logits (TransformerLens has no per-position name
#: for them): ``blocks.{L}.mlp.hook_router_logits``, ``[pos, n_experts]``.
ROUTER_LOGITS = "mlp.hook_router_logits"
#: The hook points (after ``blocks.{L}.``) the engine caches.
ENGINE_CACHE_POINTS: tuple[str, ...] = (
    "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out", ROUTER_LOGITS,
)
_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")
#: Hook points inside a block, whose engine meaning depends on how the family's vLLM layer is built.
BLOCK_POINTS = ("hook_attn_out", "hook_mlp_out", "hook_resid_mid")
#: Families whose vLLM decoder layer is a pre-norm block (``x + attn(norm(x))``, then
#: ``+ mlp(norm(.))``), so the attention / feed-forward child's output is TransformerLens's
#: ``hook_attn_out`` / ``hook_mlp_out``: checked equal to the HF path by the family matrix
#: (tests/test_vllm_families.py), or, for multi-head latent attention (whose kernels differ from
#: transformers' in value), the same ``DeepseekV2DecoderLayer`` structure read in vLLM 0.32's source.
#: Elsewhere (e.g. FlexOlmo and AFMoE normalise the attention output before adding it: measured
#: 0.84-1.0 relative error at ``hook_resid_mid``) only the stream between blocks and the router
#: logits are served.
BLOCK_SITE_FAMILIES = frozenset({
    "olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "gpt_oss", "glm4_moe", "ernie4_5_moe", "minimax_m2", "llama4_text",
    "deepseek_v2", "deepseek_v3", "glm4_moe_lite",
})


def check_block_point(handle, hook_name: str, point: str, where: str) -> None:
    """Refuse a point inside the block on a family whose engine meaning is not established.

    Raises:
        ValueError: ``hook_attn_out`` / ``hook_mlp_out`` / ``hook_resid_mid`` on a family outside
            :data:`BLOCK_SITE_FAMILIES`.
    """
    model_type = getattr(handle.config, "model_type", "?")
    if point in BLOCK_POINTS and model_type not in BLOCK_SITE_FAMILIES:
        raise ValueError(
            f"{where}: {hook_name!r} is not served on the vLLM engine for {model_type!r} models: labkit has not "
            "established that vLLM's attention / feed-forward child output there is TransformerLens's value (some "
            "families normalise the attention output before adding it). The stream between blocks "
            "(hook_resid_pre, hook_resid_post) and the router logits are; or use engine='hf'."
        )


def engine_reads(handle, hook_name: str, where: str) -> tuple[int, str, tuple[tuple[int, str], ...]]:
    """``(layer, point, worker sites)`` the engine reads for one hook name.

    Raises:
        ValueError: a name outside :data:`ENGINE_CACHE_POINTS`, a layer out of range, a site this
            layer does not have on this model (a hybrid layer has no attention block), router
            logits of a layer with no router, or of a model labkit does not route on the engine.
    """
    match = _NAME.match(hook_name) if isinstance(hook_name, str) else None
    if match is None or match.group(2) not in ENGINE_CACHE_POINTS:
        raise ValueError(
            f"{where}: hook point {hook_name!r} is not cached on the vLLM engine; it caches "
            + ", ".join(f"blocks.{{L}}.{p}" for p in ENGINE_CACHE_POINTS)
            + ". Other hook points (per-head q/k/v, attention patterns, norms) need engine='hf'."
        )
    layer, point = int(match.group(1)), match.group(2)
    check_layer(layer, handle.cfg.n_layers, f"{where} {hook_name!r}")
    if point != ROUTER_LOGITS:
        handle.check_stream_scale(where)
    parallel = handle.parallel
    if int(getattr(parallel, "data_parallel_size", 1)) > 1 or bool(getattr(parallel, "enable_expert_parallel", False)):
        raise ValueError(
            f"{where}: reading activations under data- or expert-parallel dispatch is not supported "
            f"(data_parallel_size={parallel.data_parallel_size}, enable_expert_parallel={parallel.enable_expert_parallel}): "
            "a request's tokens run on other ranks than the one that would record them. Load the model with tensor "
            "parallelism only."
        )
    check_block_point(handle, hook_name, point, where)
    if point == ROUTER_LOGITS:
        handle.check_mask_dispatch(where)  # a model labkit does not route: the reason
        moe_layers = sorted(int(k) for k in handle.routing.get("layers", {}))
        if layer not in moe_layers:
            raise ValueError(f"{where}: {hook_name!r}: layer {layer} has no MoE router (MoE layers: {moe_layers}).")
        return layer, point, ()
    wanted = ("hook_resid_pre", "hook_attn_out") if point == "hook_resid_mid" else (point,)
    available = handle.layer_sites.get(layer, ())
    missing = [site for site in wanted if site not in available]
    if missing:
        raise ValueError(
            f"{where}: {hook_name!r}: vLLM's decoder layer {layer} of this model has no {missing[0][5:]} block "
            f"that labkit can find (it reads {sorted(available)} there); a hybrid (Mamba / conv) layer has no attention."
        )
    return layer, point, tuple((layer, site) for site in wanted)


def prefill_records(
    handle,
    rows: Sequence[Sequence[int]],
    *,
    capture: Sequence[tuple[int, str]] = (),
    trace: bool = False,
    positions: Sequence[Sequence[int]] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Run each row as one prefill request under the open interventions and collect its records.

    Args:
        handle: the :class:`labkit.engines.vllm.VLLMModel`.
        rows: token ids per request.
        capture: ``(layer, site)`` pairs to read (sites: :data:`labkit.interventions.ENGINE_SITES`).
        trace: record routing (``topk_indices`` / ``topk_weights`` / ``router_logits``) too.
        positions: per row, the prompt positions to record (``None``: all of them).

    Returns:
        ``(activations, traces)``: the workers' safetensors records merged over ranks (keys as
        :meth:`~labkit.engines.vllm_worker.LabkitWorkerExtension.labkit_collect_activations` and
        ``labkit_collect_traces`` name them).
    """
    from safetensors.torch import load as load_safetensors
    from vllm import SamplingParams

    vectors = handle.open_vectors()
    mask = handle.open_mask()
    nonce = uuid.uuid4().hex
    specs = [
        handle.request_spec(
            vectors, mask, trace=trace, capture=tuple(capture), nonce=f"{nonce}.{i}",
            positions=None if positions is None else tuple(int(p) for p in positions[i]),
        )
        for i in range(len(rows))
    ]
    keys = [spec[0] for spec in specs]
    activations: dict[str, Tensor] = {}
    traces: dict[str, Tensor] = {}
    try:
        handle.run_requests([list(r) for r in rows], specs, lambda extra: SamplingParams(max_tokens=1, temperature=0.0, extra_args=extra))
        if capture:
            for blob in handle.llm.collective_rpc("labkit_collect_activations", args=(json.dumps(keys),)):
                if blob:  # every rank under tensor parallelism (the same tensors); its own layers under PP
                    activations.update(load_safetensors(blob))
        if trace:
            blob = handle.llm.collective_rpc("labkit_collect_traces", args=(json.dumps(keys),))[0]
            traces = load_safetensors(blob) if blob else {}
    finally:
        handle.llm.collective_rpc("labkit_release", args=(json.dumps(keys),))
    return activations, traces


def _checked(records: dict[str, Tensor], key: str, position_key: str, expected: list[int], where: str, what: str) -> Tensor:
    got = records.get(position_key)
    if got is None or got.tolist() != expected:
        raise RuntimeError(
            f"{where}: the vLLM workers recorded positions {None if got is None else got.tolist()} at {what}, "
            f"expected {expected}; a token skipped the layer (prefix cache?). Nothing was returned."
        )
    return records[key]


def capture_activations(
    handle, rows: Sequence[Sequence[int]], keep: Sequence[Sequence[int]], hook_names: Sequence[str], *, caller: str = "cache_activations"
) -> dict[str, Tensor]:
    """``cache_activations``' read of one batch on the engine (see :meth:`labkit.backends.Backend.capture`).

    Returns:
        ``{hook name: Float[Tensor, "kept *shape"]}`` (float32, on the CPU), the kept positions of
        row 0, then row 1, ..., each in the order of ``keep``.

    Raises:
        ValueError: a hook point the engine does not cache (:func:`engine_reads`).
        RuntimeError: a chosen position was not recorded (a token skipped a layer).
    """
    reads = {name: engine_reads(handle, name, caller) for name in hook_names}
    keep = [list(k) for k in keep]
    sites = sorted({site for _layer, _point, wanted in reads.values() for site in wanted})
    trace = any(point == ROUTER_LOGITS for _layer, point, _wanted in reads.values())
    rows = [list(map(int, r)) for r in rows]
    check_token_ids(rows, int(handle.config.vocab_size), caller=caller)
    ordered = [sorted(set(map(int, k))) for k in keep]
    activations, traces = prefill_records(handle, rows, capture=sites, trace=trace, positions=ordered)
    out: dict[str, list[Tensor]] = {name: [] for name in hook_names}
    for i, (chosen, sorted_keep) in enumerate(zip(keep, ordered)):
        row_of = {p: j for j, p in enumerate(sorted_keep)}  # a dict: list.index per position is quadratic
        back = torch.tensor([row_of[int(p)] for p in chosen], dtype=torch.long)  # the caller's order
        for name, (layer, point, wanted) in reads.items():
            if point == ROUTER_LOGITS:
                value = _checked(traces, f"{i}.router_logits.{layer}", f"{i}.position", sorted_keep, caller, name)
            else:
                parts = [
                    _checked(activations, f"{i}.value.{l}.{s}", f"{i}.position.{l}.{s}", sorted_keep, caller, name)
                    for l, s in wanted
                ]
                value = parts[0] if len(parts) == 1 else parts[0] + parts[1]  # resid_mid = resid_pre + attn_out
            out[name].append(value[back])
    return {name: torch.cat(parts) for name, parts in out.items()}


def shapes_on_engine(handle, hook_names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Per-position shape of each hook point (from the config; no forward pass)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name in hook_names:
        layer, point, _wanted = engine_reads(handle, name, "cache_activations")
        if point == ROUTER_LOGITS:
            shapes[name] = (int(handle.routing["layers"][str(layer)]["n_experts"]),)
        else:
            shapes[name] = (int(handle.cfg.d_model),)
    return shapes


def routing_records(handle, rows: Sequence[Sequence[int]], keep_from: Sequence[int], fields: Sequence[str]) -> list[dict[str, Any]]:
    """Per row ``{field: [layer, kept, ...]}`` of the router's own choice (``trace_routing`` on the engine)."""
    from labkit.moe.routers import find_routers_in

    rows = [list(row) for row in rows]
    _, traces = prefill_records(handle, rows, trace=True)
    layers = [r.layer for r in find_routers_in(handle.skeleton)]
    out = []
    for i, row in enumerate(rows):
        positions = traces.get(f"{i}.position")
        if positions is None or not torch.equal(positions, torch.arange(len(row))):
            raise RuntimeError(
                f"trace_routing: the vLLM workers recorded positions {None if positions is None else positions.tolist()} "
                f"for prompt {i}, expected 0..{len(row) - 1}; a token skipped the router (prefix cache?)."
            )
        keep = slice(keep_from[i], len(row))
        out.append({name: torch.stack([traces[f"{i}.{name}.{layer}"][keep] for layer in layers]) for name in fields})
    return out


def prompt_logprobs(handle, rows: Sequence[Sequence[int]]) -> list[Tensor]:
    """Log-probability of every prompt token given the tokens before it, from vLLM's prompt
    logprobs (``SamplingParams(prompt_logprobs=0)``: the prompt token's own logprob; vLLM never
    reads the prefix cache for such a request), under the open steering and masks.

    Returns:
        ``[len(row) - 1]`` float32 per row (token 0 is not predicted), on the CPU.
    """
    from vllm import SamplingParams

    rows = [list(map(int, r)) for r in rows]
    vectors, mask = handle.open_vectors(), handle.open_mask()
    specs = [handle.request_spec(vectors, mask) for _ in rows]
    outputs = handle.run_requests(
        rows, specs, lambda extra: SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, extra_args=extra)
    )
    out = []
    for row, output in zip(rows, outputs):
        entries = output.prompt_logprobs[1:]  # position 0 has none
        out.append(torch.tensor([entry[token].logprob for entry, token in zip(entries, row[1:])], dtype=torch.float32))
    return out
