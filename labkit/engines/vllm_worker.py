"""The labkit side inside every vLLM worker process: interventions applied per request.

vLLM mixes this class into its worker (``LLM(worker_extension_cls=
"labkit.engines.vllm_worker.LabkitWorkerExtension")``); the driver calls its methods by name
through ``LLM.collective_rpc`` on every tensor-parallel rank. Arguments and results are JSON
strings and safetensors bytes only — no callable and no pickle crosses a process boundary, so
``VLLM_ALLOW_INSECURE_SERIALIZATION`` is never needed.

What runs where (vLLM 0.32, eager mode):

* **Which token belongs to which request** — vLLM flattens the tokens of all scheduled requests
  into one ``[tokens, d_model]`` batch. :class:`_BatchView` reads the model runner's input batch
  (request ids in batch order, query start offsets, each request's prompt length and
  ``SamplingParams.extra_args``); it is the *only* code that touches vLLM's private runner
  internals, so a vLLM upgrade is checked in one place.
* **Steering** — a forward pre-hook on decoder layer ``L`` adds the per-token steering tensor to
  the layer's ``hidden_states`` argument. Most of vLLM's decoder layers take ``(positions,
  hidden_states, residual)`` and the residual stream entering layer ``L``
  (TransformerLens ``blocks.L.hook_resid_pre``) is ``hidden_states + residual`` (``residual is
  None`` at layer 0), so adding to ``hidden_states`` adds to the residual stream. A new tensor is
  returned (the fused add-RMSNorm writes into its inputs). Which tokens get the vector follows
  from each token's absolute position (``positions``) and its request's prompt length, so the
  position modes stay exact across prefill chunks, decode steps and recomputation. Steering at
  ``hook_resid_post`` of the last layer, ``hook_attn_out`` and ``hook_mlp_out`` adds to the output
  of the layer / its attention / its feed-forward child in a forward hook instead.
* **Activation capture** — the same four sites are read for capturing requests
  (:meth:`LabkitWorkerExtension.labkit_collect_activations`); only the chosen prompt positions'
  rows are copied to the CPU, so ``positions="last"`` moves one row per prompt off the workers.
* **Expert selection** — each MoE layer's router (the fused-MoE runner's ``router``) computes
  ``(topk_weights, topk_ids)`` from the router logits in ``_compute_routing``; labkit replaces it
  on the instance with the family's exact router math from :mod:`labkit.moe.families`, under
  each request's expert mask, and records routing traces for traced requests — one generic seam
  for every family (:mod:`labkit.engines.vllm_router`). A family labkit does not route keeps
  vLLM's routing (plain and steered generation only).
* **Layer inputs** — :class:`labkit.engines.vllm_layers.LayerInputs` finds ``hidden_states``
  and ``residual`` in each layer's arguments by name (vLLM's layer signatures differ by family).

Only what the driver registered (:meth:`LabkitWorkerExtension.labkit_register`) is applied, and
only to requests whose ``extra_args["labkit"]`` names it; other requests run the stock model
(with the exact family routing).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor

from labkit.engines.vllm_layers import LayerInputs, add_to_output, block_children, layer_output_stream
from labkit.engines.vllm_router import find_moe_runners, install_routing
from labkit.interventions import InterventionSpec, steering_positions

__all__ = ["LabkitWorkerExtension", "EXTRA_ARGS_KEY"]

EXTRA_ARGS_KEY = "labkit"


class _BatchView:
    """The one adapter over vLLM's private model-runner state (vLLM 0.32 ``GPUModelRunner``).

    ``rows()`` lists, for the batch about to run, each request's
    ``(spec key or None, first token row, end row, prompt length)`` in flattened-token order.
    """

    def __init__(self, model_runner) -> None:
        self.runner = model_runner

    def rows(self, n_tokens: int) -> list[tuple[str | None, int, int, int]]:
        runner = self.runner
        batch = runner.input_batch
        num_reqs = int(batch.num_reqs)
        if num_reqs == 0:
            return []
        starts = runner.query_start_loc.np[: num_reqs + 1]
        if int(starts[num_reqs]) > n_tokens:  # a dummy / profiling run with stale state
            return []
        out = []
        for index, req_id in enumerate(batch.req_ids[:num_reqs]):
            state = runner.requests.get(req_id)
            params = getattr(state, "sampling_params", None)
            extra = getattr(params, "extra_args", None) or {}
            key = extra.get(EXTRA_ARGS_KEY)
            out.append((key, int(starts[index]), int(starts[index + 1]), int(state.num_prompt_tokens)))
        return out


class _Plan:
    """What to do in the forward pass about to run (built once per model step)."""

    def __init__(self) -> None:
        self.steering: dict[tuple[int, str], Tensor] = {}  # (layer, site) -> (tokens, d_model) addition
        self.masks: dict[int, list[tuple[Tensor, Any]]] = {}  # layer -> [(token rows, Selection)]
        self.traced: list[tuple[str, Tensor, Tensor]] = []  # (key, token rows, positions)
        self.captured: dict[tuple[int, str], list[tuple[str, Tensor, Tensor]]] = {}  # (layer, site) -> [(key, rows, positions)]


class LabkitWorkerExtension:
    """Methods vLLM mixes into its worker; called by name through ``collective_rpc``.

    All names start with ``labkit_`` (vLLM refuses an extension attribute that clashes with the
    worker's own).
    """

    # -- installation ----------------------------------------------------------------------

    def labkit_install(self, settings_json: str) -> str:
        """Hook the model once: a step observer, decoder-layer steering hooks, exact routing.

        Args:
            settings_json: :func:`labkit.engines.vllm_router.router_settings` (``model_type``,
                ``routed``, per MoE layer ``n_experts`` / ``top_k`` / router attributes).

        Returns:
            JSON ``{"n_layers", "layers_here", "moe_layers", "d_model"}`` (what this rank holds).

        Raises:
            RuntimeError: a decoder layer has no ``hidden_states`` argument, its MoE kernel is
                monolithic (it would route inside the kernel and skip labkit's selection step), or
                vLLM's MoE layers disagree with the config's.
        """
        settings = json.loads(settings_json)
        if getattr(self, "_labkit", None) is not None:
            return json.dumps(self._labkit["info"])
        runner = self.model_runner
        model = runner.model
        base = getattr(model, "model", model)
        layers = getattr(base, "layers", None)
        if layers is None:
            raise RuntimeError(f"labkit: {type(model).__name__} has no .model.layers; cannot hook it.")
        start, end = int(getattr(base, "start_layer", 0)), int(getattr(base, "end_layer", len(layers)))
        state: dict[str, Any] = {
            "specs": {},
            "plan": _Plan(),
            "view": _BatchView(runner),
            "traces": {},
            "captures": {},
            "settings": settings,
            "handles": [],
        }
        self._labkit = state
        d_model = None
        moe_layers = []
        family = None
        if settings.get("routed"):
            from labkit.moe.routers import FAMILIES

            family = FAMILIES[settings["model_type"]]
        sites: dict[str, list[str]] = {}
        for index in range(start, end):
            layer = layers[index]
            state["handles"].append(layer.register_forward_pre_hook(self._labkit_steer_hook(index, LayerInputs(layer, index)), with_kwargs=True))
            state["handles"].append(layer.register_forward_hook(self._labkit_output_hook(index, "hook_resid_post")))
            children = block_children(layer)
            for site, child in children.items():
                state["handles"].append(child.register_forward_hook(self._labkit_output_hook(index, site)))
            sites[str(index)] = ["hook_resid_pre", "hook_resid_post", *children]
            runners = find_moe_runners(layer)
            for runner in runners:
                entry = settings.get("layers", {}).get(str(index))
                if family is not None and entry is None:
                    raise RuntimeError(
                        f"labkit: vLLM's layer {index} holds a MoE router, but the {family.name} model's config has "
                        f"no MoE layer {index} (MoE layers: {sorted(map(int, settings['layers']))})."
                    )
                if family is not None:  # else vLLM's own routing stays (plain and steered runs only)
                    install_routing(family, entry, runner, lambda: self._labkit["plan"], self._labkit_record, index)
            if runners:
                moe_layers.append(index)
            if d_model is None:
                d_model = int(getattr(layer, "hidden_size", 0)) or None
        state["handles"].append(model.register_forward_pre_hook(self._labkit_observe, with_kwargs=True))
        state["info"] = {
            "n_layers": len(layers),
            "layers_here": [start, end],
            "moe_layers": moe_layers,
            "d_model": d_model,
            "sites": sites,
            "layer_classes": sorted({type(layers[i]).__name__ for i in range(start, end)}),
        }
        return json.dumps(state["info"])

    # -- registry ----------------------------------------------------------------------------

    def labkit_register(self, key: str, spec_json: str, tensors: bytes) -> str:
        """Store one intervention under its content key (an :class:`InterventionSpec` on the wire)."""
        state = self._labkit
        if key in state["specs"]:
            return key
        parameter = next(self.model_runner.model.parameters())
        state["specs"][key] = InterventionSpec.from_wire(spec_json, tensors, device=parameter.device, dtype=parameter.dtype)
        return key

    def labkit_release(self, keys_json: str) -> int:
        """Forget registered interventions (and their traces); returns how many were held."""
        state = self._labkit
        count = 0
        for key in json.loads(keys_json):
            count += state["specs"].pop(key, None) is not None
            state["traces"].pop(key, None)
            state["captures"].pop(key, None)
        return count

    def labkit_collect_activations(self, keys_json: str) -> bytes:
        """Captured activations of capturing requests as one safetensors blob.

        For the ``i``-th key and each captured ``(layer L, site S)`` this rank holds:
        ``{i}.position.L.S`` ``[token]`` and ``{i}.value.L.S`` ``[token d_model]`` (float32), sorted
        by position (a position recorded twice keeps its last record). Under tensor parallelism
        every rank holds the full (all-reduced) tensors; under pipeline parallelism each rank
        returns its own layers.
        """
        from safetensors.torch import save as save_safetensors

        out: dict[str, Tensor] = {}
        for i, key in enumerate(json.loads(keys_json)):
            for (layer, site), parts in self._labkit["captures"].get(key, {}).items():
                positions = torch.cat([p for p, _ in parts])
                last = {int(p): j for j, p in enumerate(positions.tolist())}
                order = torch.tensor([last[p] for p in sorted(last)], dtype=torch.long)
                out[f"{i}.position.{layer}.{site}"] = positions[order]
                out[f"{i}.value.{layer}.{site}"] = torch.cat([a for _, a in parts])[order].float()
        return save_safetensors({k: v.contiguous().cpu() for k, v in out.items()}) if out else b""

    def labkit_collect_traces(self, keys_json: str) -> bytes:
        """Routing records of traced requests as one safetensors blob (tokens sorted by position).

        For the ``i``-th key: ``{i}.position`` ``[token]``, and per MoE layer ``L``:
        ``{i}.topk_indices.L`` ``[token k]`` (int64), ``{i}.topk_weights.L`` ``[token k]`` and
        ``{i}.router_logits.L`` ``[token expert]`` (float32). A position recorded twice
        (recomputation after a preemption) keeps its last record.
        """
        from safetensors.torch import save as save_safetensors

        out: dict[str, Tensor] = {}
        for i, key in enumerate(json.loads(keys_json)):
            for layer, parts in self._labkit["traces"].get(key, {}).items():
                positions = torch.cat([p for p, *_ in parts])
                last = {int(p): j for j, p in enumerate(positions.tolist())}
                order = torch.tensor([last[p] for p in sorted(last)], dtype=torch.long)
                out[f"{i}.position"] = positions[order]
                out[f"{i}.topk_indices.{layer}"] = torch.cat([x for _, x, _, _ in parts])[order].to(torch.int64)
                out[f"{i}.topk_weights.{layer}"] = torch.cat([w for _, _, w, _ in parts])[order].float()
                out[f"{i}.router_logits.{layer}"] = torch.cat([g for _, _, _, g in parts])[order].float()
        return save_safetensors({k: v.contiguous().cpu() for k, v in out.items()}) if out else b""

    # -- hooks -----------------------------------------------------------------------------

    def _labkit_observe(self, _module, args, kwargs):
        """Model forward pre-hook: build this step's plan from the batch and its requests."""
        state = self._labkit
        plan = state["plan"] = _Plan()
        if not state["specs"]:
            return None
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        if positions is None or positions.ndim != 1:
            return None
        n_tokens = int(positions.shape[0])
        for key, start, end, prompt_length in state["view"].rows(n_tokens):
            spec = state["specs"].get(key) if key is not None else None
            if spec is None or end <= start:
                continue
            rows = torch.arange(start, end, device=positions.device)
            pos = positions[start:end]
            recorded = pos < prompt_length  # captures and traces: prompt tokens (or the chosen ones)
            if spec.capture_positions is not None:
                recorded &= torch.isin(pos, torch.tensor(spec.capture_positions, device=pos.device, dtype=pos.dtype))
            for entry in spec.steering:
                tensor = entry.tensor
                keep, offset = steering_positions(entry.positions, pos, prompt_length, front_length=int(tensor.shape[0]))
                if not bool(keep.any()):
                    continue
                target = rows[keep]
                if entry.positions == "front":  # token at position p gets row p of the ActAdd vector
                    addition = tensor[offset[keep]]
                else:
                    addition = tensor.expand(int(target.shape[0]), -1)
                delta = plan.steering.get((entry.layer, entry.site))
                if delta is None:
                    delta = plan.steering[(entry.layer, entry.site)] = torch.zeros(
                        n_tokens, tensor.shape[-1], dtype=tensor.dtype, device=tensor.device
                    )
                delta.index_add_(0, target, addition)
            for layer, selection in spec.masks.items():
                plan.masks.setdefault(layer, []).append((rows, selection))
            if spec.trace:
                plan.traced.append((key, rows[recorded], pos[recorded]))
            for site in spec.capture:
                plan.captured.setdefault(site, []).append((key, rows[recorded], pos[recorded]))
        return None

    def _labkit_steer_hook(self, index: int, inputs: LayerInputs):
        """Decoder layer ``index``'s forward pre-hook: steer and read ``hook_resid_pre``."""
        site = (index, "hook_resid_pre")

        def hook(_module, args, kwargs):
            plan = self._labkit["plan"]
            delta = plan.steering.get(site)
            captured = plan.captured.get(site)
            if delta is None and not captured:
                return None
            hidden_states = inputs.get(args, kwargs, "hidden_states")
            # [tokens, d_model]; vLLM's Transformers backend (e.g. FlexOlmo) passes [1, tokens, d_model]
            n = hidden_states.reshape(-1, hidden_states.shape[-1]).shape[0]
            if delta is not None:
                hidden_states = hidden_states + delta[:n].to(hidden_states.dtype).view(hidden_states.shape)
                args, kwargs = inputs.replace(args, kwargs, "hidden_states", hidden_states)
            if captured:  # the residual stream entering this layer (TransformerLens hook_resid_pre)
                self._labkit_keep(site, captured, inputs.stream(args, kwargs), n)
            if delta is None:
                return None
            return args, kwargs

        return hook

    def _labkit_output_hook(self, index: int, name: str):
        """Forward hook on decoder layer ``index`` (``hook_resid_post``) or on its attention /
        feed-forward child (``hook_attn_out`` / ``hook_mlp_out``): steer and read its output."""
        site = (index, name)

        def hook(_module, _args, output):
            plan = self._labkit["plan"]
            delta = plan.steering.get(site)
            captured = plan.captured.get(site)
            if delta is None and not captured:
                return None
            first = output[0] if isinstance(output, tuple) else output
            n = first.reshape(-1, first.shape[-1]).shape[0]
            if delta is not None:
                output = add_to_output(output, delta[:n])
            if captured:
                value = layer_output_stream(output) if name == "hook_resid_post" else (output[0] if isinstance(output, tuple) else output)
                self._labkit_keep(site, captured, value, n)
            return output if delta is not None else None

        return hook

    def _labkit_keep(self, site: tuple[int, str], captured, value: Tensor, n: int) -> None:
        """Copy the recorded requests' rows of ``value`` to the CPU (indexing copies: vLLM's fused
        add-RMSNorm later writes into the tensors the layer passed on)."""
        value = value.reshape(-1, value.shape[-1])
        for key, rows, pos in captured:
            here = rows < n
            records = self._labkit["captures"].setdefault(key, {}).setdefault(site, [])
            records.append((pos[here].cpu(), value[rows[here]].float().cpu()))

    def _labkit_record(self, key, index, positions, topk_indices, topk_weights, router_logits) -> None:
        """Keep one traced request's routing at one MoE layer (on the CPU)."""
        records = self._labkit["traces"].setdefault(key, {}).setdefault(index, [])
        records.append((positions.cpu(), topk_indices.cpu(), topk_weights.float().cpu(), router_logits.float().cpu()))
