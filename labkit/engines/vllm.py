"""labkit's objects on vLLM: steering vectors, expert masks and routing traces, tensor-parallel.

``labkit.load_model(name, engine="vllm", tensor_parallel_size=N)`` starts a vLLM engine
(``vllm.LLM``) on the model and returns a :class:`VLLMModel`. ``labkit.generate``,
``labkit.steered``, ``labkit.moe.masked`` and ``labkit.moe.trace_routing`` accept it and give
the same answers as the single-process Hugging Face path (greedy, float32, the same prompt token
ids; ``tests/test_vllm.py`` checks every position mode, mixed batches, prefill chunks, masks,
traces and TP=2 against TP=1).

How it works. Every intervention of one request — the steering vectors, the merged expert
mask, whether to trace — is one *spec*: JSON plus a safetensors blob of tensors, addressed by
the SHA-256 of both. The driver registers a spec on every worker by method name
(``collective_rpc("labkit_register", ...)`` on :class:`labkit.engines.vllm_worker.
LabkitWorkerExtension`, mixed into vLLM's worker with ``worker_extension_cls``) and sends each
request with ``SamplingParams(extra_args={"labkit": key})``; the workers apply it to that
request's tokens only, so one batch may mix different vectors, masks and unsteered prompts. No
callable and no pickle crosses a process boundary (``VLLM_ALLOW_INSECURE_SERIALIZATION`` is
never set).

Guarantees and refusals:

* **Prefix caching never skips an intervention**: an intervened request carries
  ``cache_salt=<spec key>``, so it never reuses KV blocks computed without (or with another)
  intervention, while a repeat of the same intervention still hits its own cache. Traced
  requests get a salt of their own (a cached token would not run the router).
* **Eager only**: hooks under vLLM's ``torch.compile`` are silently ignored or frozen into the
  graph, so ``enforce_eager=True`` is forced and ``enforce_eager=False`` / a
  ``compilation_config`` is refused with an error.
* **Exact family routing**: each MoE router's selection step runs the family's own math from
  :mod:`labkit.moe.families` (stock vLLM's OLMoE ignores ``norm_topk_prob``), through one
  generic seam on vLLM's router step for every family (:mod:`labkit.engines.vllm_router`). A
  MoE family labkit does not route still loads and generates (plain and steered) with vLLM's
  own routing; traces and masks on it are refused with the reason.
* Refused with a clear error: speculative decoding, a vLLM outside :data:`TESTED_VLLM`, a
  monolithic MoE kernel (it routes inside the kernel), expert masks under data- or
  expert-parallel dispatch, steering at hook points other than ``blocks.{L}.hook_resid_pre`` /
  ``hook_resid_post`` / ``hook_attn_out`` / ``hook_mlp_out``, directional ablation
  (``operation="ablate"`` also projects at ``hook_resid_mid`` inside each block).

Activations are read on the engine too (:mod:`labkit.engines.vllm_capture`):
``cache_activations`` caches the residual stream, attention and MLP outputs and the router logits
at TransformerLens names, and :meth:`VLLMModel.residual_activations` gives the vector builders
(``actadd`` / ``mean_difference`` / ``pca_direction`` / ``probe_direction``) and both widget
panels the residual stream. The engine is started by :func:`labkit.engines.vllm_load.load_vllm`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from labkit.backends.base import Backend, check_vector_fits
from labkit.checks import check_layer, layer_of
from labkit.engines.vllm_capture import (
    ROUTER_LOGITS, capture_activations, check_block_point, engine_reads, prompt_logprobs, routing_records,
    shapes_on_engine,
)
from labkit.engines.vllm_requests import generate_rows, run_requests
from labkit.interventions import InterventionSpec, Selection, SteeringEntry, merge_selections
from labkit.tokens import encode_prompt, eos_token_ids, tokenizer_bos_eos

__all__ = ["VLLMModel"]


class VLLMModel(Backend):
    """A labkit model handle on a vLLM engine (what ``load_model(..., engine="vllm")`` returns).

    It is its own backend (:class:`labkit.backends.Backend`): interventions are data attached to
    each request labkit sends (:class:`labkit.interventions.InterventionSpec`); a direct
    ``handle.llm.generate(...)`` bypasses them.

    Attributes:
        name: canonical model name (steering vectors and masks record it).
        llm: the ``vllm.LLM`` engine.
        tokenizer: labkit's tokenizer (left padding, pad token set).
        config: the model's Hugging Face config.
        cfg: ``n_layers``, ``d_model``, ``n_ctx``, ``default_prepend_bos`` (the BOS rule), as on a bridge.
        tensor_parallel_size: the engine's TP degree.
        last_cached_tokens: per request of the latest engine call, the prompt tokens vLLM served
            from its prefix cache (``RequestOutput.num_cached_tokens``); tests use it to prove a
            cache hit happened (or, for an intervened request, did not reuse unintervened blocks).
    """

    kind = "vllm"
    capabilities = frozenset({"generate", "steer", "steer_any_hook", "capture_resid", "mask", "trace", "cache", "logprobs"})
    alternative = "Run it on the Hugging Face path: load it with engine='hf' (the default)."
    schedules_batches = True

    def __init__(
        self, name: str, llm, tokenizer, config, *, prepend_bos: bool, tensor_parallel_size: int, max_model_len: int,
        generation_config: Any = None, dtype: torch.dtype = torch.float32,
    ):
        self.name = name
        self.llm = llm
        self.tokenizer = tokenizer
        self._config = config
        self.tensor_parallel_size = int(tensor_parallel_size)
        prepends, appends = tokenizer_bos_eos(tokenizer)
        self.generation_config = generation_config
        self.cfg = SimpleNamespace(
            n_layers=int(config.num_hidden_layers),
            d_model=int(config.hidden_size),
            n_ctx=int(max_model_len),
            default_prepend_bos=bool(prepend_bos),
            tokenizer_prepends_bos=bool(prepends),
            tokenizer_appends_eos=bool(appends),
        )
        self._steering: list[list] = []  # open labkit.steered contexts
        self._masks: list[dict[int, Selection]] = []  # open labkit.moe.masked contexts
        self._skeleton = None
        self._closed = False
        self.last_cached_tokens: list[int | None] = []
        self._dtype = dtype
        #: the routing settings sent to the workers (:func:`labkit.engines.vllm_router.router_settings`)
        self.routing: dict[str, Any] = {}
        #: what each worker rank reported at install (layers held, MoE layers, sites per layer)
        self.layout: list[dict[str, Any]] = []

    # -- model facts -------------------------------------------------------------------------

    @property
    def config(self) -> Any:
        """The model's Hugging Face config (``Backend.config`` reads a module tree; the engine
        keeps the config it was started with)."""
        return self._config

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the engine runs in (``load_model(..., dtype=)``)."""
        return self._dtype

    @property
    def skeleton(self) -> torch.nn.Module:
        """The Hugging Face model class on the ``meta`` device (no weights): its modules and config
        answer the questions labkit's MoE checks ask (layers, routers, expert counts)."""
        if self._skeleton is None:
            from transformers import AutoModelForCausalLM

            with torch.device("meta"):
                self._skeleton = AutoModelForCausalLM.from_config(self.config)
            self._skeleton.config.name_or_path = self.name
        return self._skeleton

    @skeleton.setter
    def skeleton(self, module: torch.nn.Module) -> None:
        """Set the skeleton built before the engine started (vLLM's Transformers backend patches HF classes)."""
        module.config.name_or_path = self.name
        self._skeleton = module

    @property
    def module(self) -> torch.nn.Module:
        return self.skeleton

    @property
    def n_ctx(self) -> int:
        return int(self.cfg.n_ctx)

    @property
    def eos_ids(self) -> set[int]:
        return eos_token_ids(self.generation_config, self.tokenizer)

    @property
    def parallel(self):
        return self.llm.llm_engine.vllm_config.parallel_config

    def encode(self, prompt: str, *, chat: bool = False, prepend_bos: bool | None = None) -> list[int]:
        """Token ids of one prompt under the lab's one tokenisation rule (see ``labkit.models.encode_prompt``)."""
        return encode_prompt(
            self.tokenizer,
            prompt,
            chat=chat,
            prepend_bos=self.cfg.default_prepend_bos if prepend_bos is None else bool(prepend_bos),
            tokenizer_prepends_bos=self.cfg.tokenizer_prepends_bos,
            tokenizer_appends_eos=self.cfg.tokenizer_appends_eos,
        )

    # -- steering vectors --------------------------------------------------------------------

    @property
    def layer_sites(self) -> dict[int, tuple[str, ...]]:
        """Per decoder layer, the sites the workers steer and read there (:data:`labkit.interventions.ENGINE_SITES`)."""
        sites: dict[int, tuple[str, ...]] = {}
        for info in self.layout:
            for layer, names in info.get("sites", {}).items():
                sites[int(layer)] = tuple(names)
        return sites

    #: vLLM decoder layers that rescale the residual stream in float16 (DeepSeek-V2/V3's FP16
    #: overflow fix: stream and MLP outputs × 1 / routed_scaling_factor from layer 0 on)
    FP16_RESCALED_LAYERS = ("DeepseekV2DecoderLayer",)

    def check_stream_scale(self, where: str) -> None:
        """Refuse to steer or read the stream where vLLM runs it rescaled (float16 DeepSeek-V2/V3 layers).

        Raises:
            ValueError: the engine runs in float16 and its layers rescale the stream.
        """
        classes = {name for info in self.layout for name in info.get("layer_classes", ())}
        rescaled = sorted(classes & set(self.FP16_RESCALED_LAYERS))
        if self.dtype == torch.float16 and rescaled:
            raise ValueError(
                f"{where}: in float16 vLLM's {rescaled[0]} divides the residual stream by routed_scaling_factor "
                "(its FP16 overflow fix), so a vector added there or an activation read there would be off by that "
                "factor. Load the engine with dtype=torch.bfloat16 or torch.float32."
            )

    def open_vectors(self) -> list:
        """The steering vectors of every open ``steered`` context, in opening order."""
        return [v for group in self._steering for v in group]

    def check_vector(self, vector) -> tuple[int, str]:
        """Raise unless ``vector`` applies here (the HF path's messages); return ``(layer, site)`` it hooks."""
        check_vector_fits(vector, self.name, self.cfg.d_model)
        if vector.operation != "add":
            raise ValueError(
                f"{vector!r}: operation={vector.operation!r} is not supported on the vLLM engine, which adds "
                "vectors only; directional ablation also projects at hook_resid_mid inside each block. Run it "
                "with engine='hf' (the default)."
            )
        return self.steering_site(vector.hook_name, "SteeringVector")

    def steering_site(self, hook_name: str, where: str) -> tuple[int, str]:
        """``(decoder layer, site)`` where the workers add a vector named ``hook_name``.

        ``blocks.{L}.hook_resid_post`` (``L < n_layers - 1``) is the input of layer ``L + 1``; the
        last layer's is its output. ``hook_attn_out`` / ``hook_mlp_out`` are the outputs of the
        layer's attention / feed-forward child.

        Raises:
            ValueError: a layer out of range, another hook point, or a child this layer lacks.
        """
        layer = layer_of(hook_name)
        if layer is not None:
            check_layer(layer, self.cfg.n_layers, f"{where} {hook_name!r}")
        self.check_stream_scale(where)
        point = hook_name.split(".", 2)[-1] if layer is not None else hook_name
        if point == "hook_resid_pre":
            return layer, point
        if point == "hook_resid_post":
            return (layer + 1, "hook_resid_pre") if layer < self.cfg.n_layers - 1 else (layer, point)
        if point in ("hook_attn_out", "hook_mlp_out"):
            check_block_point(self, hook_name, point, where)
            if point not in self.layer_sites.get(layer, ()):
                raise ValueError(
                    f"{where}: vLLM's decoder layer {layer} of this model has no {point[5:]} block labkit can find "
                    f"(it steers {sorted(self.layer_sites.get(layer, ()))} there)."
                )
            return layer, point
        raise ValueError(
            f"{where}: hook point {hook_name!r} is not supported on the vLLM engine; it steers "
            "blocks.{L}.hook_resid_pre, hook_resid_post, hook_attn_out and hook_mlp_out."
        )

    def check_hook_point(self, hook_name: str, where: str) -> None:
        """Raise unless the vector builders can read ``hook_name`` here (a residual-stream, attention
        or MLP output hook point: :func:`labkit.engines.vllm_capture.engine_reads`)."""
        _layer, point, _sites = engine_reads(self, hook_name, where)
        if point == ROUTER_LOGITS:
            raise ValueError(f"{where}: {hook_name!r} holds router logits, not a d_model activation to build a vector from.")

    def residual_activations(self, token_ids: Sequence[Sequence[int]], hook_name: str) -> list[Tensor]:
        """``labkit.steering.residual_activations`` on this engine: activations at one hook point.

        Each sequence runs as one prefill request with its own cache salt under the open steering
        and masks (:func:`labkit.engines.vllm_capture.capture_activations`); ``actadd``,
        ``mean_difference``, ``pca_direction`` and ``probe_direction`` build their vectors through it.

        Returns:
            One ``(len(seq), d_model)`` float32 tensor per sequence (on the CPU).

        Raises:
            ValueError: a hook point the engine does not read, an empty sequence, a sequence
                longer than the context window.
            RuntimeError: the workers recorded other positions than the sequence's (a token
                skipped the layer).
        """
        self.check_hook_point(hook_name, "residual_activations")
        rows = [list(map(int, ids)) for ids in token_ids]
        if not rows or any(not row for row in rows):
            raise ValueError("residual_activations: need at least one non-empty token sequence.")
        self.check_context([len(r) for r in rows], caller="residual_activations")
        values = capture_activations(
            self, rows, [range(len(row)) for row in rows], [hook_name], caller="residual_activations"
        )[hook_name]
        return list(torch.split(values, [len(row) for row in rows]))

    # -- activation caching ------------------------------------------------------------------

    def check_cache_point(self, hook_name: str, where: str) -> None:
        """Raise unless ``cache_activations`` reads ``hook_name`` here (:func:`labkit.engines.vllm_capture.engine_reads`)."""
        engine_reads(self, hook_name, where)

    def activation_shapes(self, hook_names: Sequence[str], row: Sequence[int]) -> dict[str, tuple[int, ...]]:
        """Per-position shape of each hook point, from the config (no engine call)."""
        return shapes_on_engine(self, hook_names)

    def capture(self, rows: Sequence[Sequence[int]], keep: Sequence[Sequence[int]], hook_names: Sequence[str]) -> dict[str, Tensor]:
        """``cache_activations``' read of one batch (:func:`labkit.engines.vllm_capture.capture_activations`)."""
        return capture_activations(self, rows, keep, hook_names)

    def token_logprobs(self, rows: Sequence[Sequence[int]]) -> list[Tensor]:
        """``evals.perplexity``'s read: vLLM's prompt logprobs (:func:`labkit.engines.vllm_capture.prompt_logprobs`)."""
        return prompt_logprobs(self, rows)

    @contextlib.contextmanager
    def steered(self, vectors: Sequence[Any], rows: Sequence[Sequence[Any]] | None = None) -> Iterator["VLLMModel"]:
        """``labkit.steered`` on this engine: every labkit call on the handle inside the block is steered.

        Raises:
            ValueError: ``rows`` (batch rows are not prompts on the engine), or a vector that does
                not apply here.
        """
        if rows is not None:
            raise ValueError(
                "steered(rows=...): the vLLM engine schedules its own batches, so batch rows are not "
                "prompts there; pass one entry per prompt to labkit.generate(..., steering_per_row=...)."
            )
        flat = list(vectors)
        for vector in flat:
            self.check_vector(vector)
        self._steering.append(flat)
        try:
            yield self
        finally:
            self._steering[:] = [open_ for open_ in self._steering if open_ is not flat]

    # -- expert masks ------------------------------------------------------------------------

    def check_mask_dispatch(self, caller: str) -> None:
        """Refuse MoE models the workers do not route (with the reason), and data- / expert-parallel dispatch."""
        from labkit.moe.routers import family_of_config

        routing = self.routing or {}
        if not routing.get("routed"):
            family_of_config(self.config)  # a dense or unrouted family: the HF path's message, with the reason
            raise ValueError(
                f"{caller}: labkit does not route this {self.config.model_type!r} model on the vLLM engine: "
                f"{routing.get('reason') or 'no routing was installed'}. Plain and steered generation still run."
            )
        parallel = self.parallel
        if caller == "masked" and (
            int(getattr(parallel, "data_parallel_size", 1)) > 1 or bool(getattr(parallel, "enable_expert_parallel", False))
        ):
            raise ValueError(
                "masked: per-request expert masks are not supported under data- or expert-parallel dispatch "
                f"(data_parallel_size={parallel.data_parallel_size}, enable_expert_parallel="
                f"{parallel.enable_expert_parallel}): tokens of one request are routed on other ranks. "
                "Load the model with tensor parallelism only."
            )

    def open_selections(self, layer: int) -> list[Selection]:
        return [masks[layer] for masks in self._masks if layer in masks]

    def open_mask(self, extra: Sequence[Mapping[int, Selection]] = ()) -> dict[int, Selection]:
        """The open masks (+ per-call ones) merged per layer with the one merge rule."""
        layers = sorted({layer for masks in [*self._masks, *extra] for layer in masks})
        return {
            layer: merge_selections([masks[layer] for masks in [*self._masks, *extra] if layer in masks]) for layer in layers
        }

    @contextlib.contextmanager
    def masked(self, selections: Mapping[int, Selection]) -> Iterator["VLLMModel"]:
        """``labkit.moe.masked`` on this engine: every labkit call inside the block is masked (MoTE 2025, §4).

        ``selections`` were validated by ``labkit.moe.masked`` against this model and the open masks.
        """
        layers = dict(selections)
        self._masks.append(layers)
        try:
            yield self
        finally:  # by identity: selections hold tensors, and two nested masks may be equal
            self._masks[:] = [open_ for open_ in self._masks if open_ is not layers]

    # -- specs on the workers ----------------------------------------------------------------

    def request_spec(
        self,
        vectors: list,
        mask: Mapping[int, Selection],
        *,
        trace: bool = False,
        capture: Sequence[tuple[int, str]] = (),
        positions: Sequence[int] | None = None,
        nonce: str = "",
    ) -> tuple[str, str, bytes] | None:
        """``(key, spec_json, tensors)`` for one request's interventions, or ``None`` for none."""
        steering = []
        for vector in vectors:
            layer, site = self.check_vector(vector)
            steering.append(SteeringEntry(layer, vector.positions, vector.steering_vector, vector.hook_name, site=site))
        spec = InterventionSpec(
            steering=tuple(steering), masks=dict(mask), trace=trace, capture=tuple(capture),
            capture_positions=None if positions is None else tuple(positions), nonce=nonce,
        )
        return None if spec.empty else spec.to_wire()

    def run_requests(self, token_rows: list[list[int]], specs: list, params_for) -> list:
        """Register the specs, run every row as one request, release the specs
        (:func:`labkit.engines.vllm_requests.run_requests`)."""
        return run_requests(self, token_rows, specs, params_for)

    # -- generation --------------------------------------------------------------------------

    def generate_ids(self, rows: list[list[int]], *, max_new_tokens: int, **options: Any) -> list[list[int]]:
        """``labkit.generate``'s run on this engine (:func:`labkit.engines.vllm_requests.generate_rows`)."""
        return generate_rows(self, rows, max_new_tokens=max_new_tokens, **options)

    # -- routing traces ----------------------------------------------------------------------

    def check_tokenizer_override(self, caller: str) -> None:
        raise ValueError(f"{caller}: the vLLM engine uses its own tokenizer; drop tokenizer=.")

    def record_routing(
        self, rows: Sequence[Sequence[int]], keep_from: Sequence[int], *, include_router_logits: bool = False
    ) -> list[dict[str, Tensor]]:
        """``labkit.moe.trace_routing``'s run on this engine (see :meth:`labkit.backends.Backend.record_routing`).

        Each row runs as one prefill request (``max_tokens=1``) with its own cache salt, so every
        token runs the router; the router's own choice (under the open masks and steering) is
        recorded on the workers and collected as safetensors bytes.

        Raises:
            RuntimeError: the workers recorded other positions than the row's (a token skipped the router).
        """
        fields = ["topk_indices", "topk_weights"] + (["router_logits"] if include_router_logits else [])
        return routing_records(self, rows, keep_from, fields)

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Shut the engine down (its worker processes too). The handle is unusable afterwards."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self.llm.llm_engine.engine_core.shutdown()

    def __enter__(self) -> "VLLMModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VLLMModel({self.name!r}, tensor_parallel_size={self.tensor_parallel_size})"
