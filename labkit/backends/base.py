"""The backend protocol: what every engine labkit runs on implements, and one refusal for what it cannot.

Three backends implement it: the TransformerLens bridge with its plain Hugging Face twin
(:class:`labkit.backends.hf.LabModel`), a plain Hugging Face model (:class:`labkit.backends.hf.
PlainHFBackend`) and the vLLM engine (:class:`labkit.engines.vllm.VLLMModel`). Every public function
resolves the backend once (:func:`labkit.backends.backend_of`) and calls its methods; none asks
which backend it runs on. A method a backend cannot serve raises :class:`NotOnBackendError`, which
names the backend, the capability and what to use instead.

The contract of an open intervention (``steered``, ``masked``) differs by backend and is stated
here once:

* Hugging Face (bridge and plain): the intervention is an eager hook. Every forward pass of the
  model inside the ``with`` block sees it — labkit's functions, the bridge's ``forward``,
  ``run_with_cache`` and ``generate``, and the user's own calls.
* vLLM: the intervention is data attached to each request labkit sends (an
  :class:`labkit.interventions.InterventionSpec`). Every labkit call on that handle inside the
  block carries it; a direct ``handle.llm.generate(...)`` bypasses labkit and is not intervened.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from labkit.checks import check_context_lengths
from labkit.interventions import Selection
from labkit.sources import same_model
from labkit.tokens import encode_with

__all__ = ["CAPABILITIES", "Backend", "NotOnBackendError", "check_vector_fits"]

#: Every capability a backend may declare.
CAPABILITIES: dict[str, str] = {
    "generate": "generate token ids (labkit.generate, the panels)",
    "steer": "add steering vectors at residual-stream hook points (labkit.steered)",
    "steer_any_hook": "steer at any module input/output hook point (hook_attn_out, hook_mlp_out, hook_resid_mid, hook_embed)",
    "steer_rows": "different steering per batch row inside one forward pass (steered(rows=...))",
    "ablate": "directional ablation (operation='ablate')",
    "capture_resid": "read the residual stream (the vector builders)",
    "mask": "expert masks (labkit.moe.masked)",
    "trace": "record MoE routing (labkit.moe.trace_routing)",
    "forward": "run forward passes in this process with hooks and logits (perplexity, the lens, causal attribution)",
    "cache": "cache activations at hook points over prompt datasets (labkit.cache_activations)",
    "logprobs": "log-probabilities of a text's own tokens (labkit.evals.perplexity)",
    "stream": "stream tokens as they are generated (transformers streamers)",
}


def check_vector_fits(vector: Any, model_name: str, d_model: int) -> None:
    """Raise unless a steering vector was made for this model (by name) and has its width.

    Raises:
        ValueError: another model name, or another ``d_model``.
    """
    if vector.model_name and not same_model(vector.model_name, model_name):
        raise ValueError(
            f"{vector!r} was made for model {vector.model_name!r} and refuses to apply to "
            f"{model_name!r}. Recompute it on this model, or, if the two really are the same "
            f"weights, relabel it: dataclasses.replace(vector, model_name={model_name!r})."
        )
    if vector.d_model != d_model:
        raise ValueError(
            f"{vector!r} has width d_model={vector.d_model}, but model {model_name!r} has "
            f"d_model={d_model}; a vector only applies to a model of its own width."
        )


class NotOnBackendError(TypeError):
    """A capability the backend does not have; the message names the backend and the alternative.

    A ``TypeError`` (the model handle is the wrong kind of object for the call), so existing
    ``except TypeError`` code keeps working.
    """


class Backend(abc.ABC):
    """One model handle's engine: tokenisation, hook points, interventions, generation, records.

    Attributes (every backend):
        name: the canonical model name (vectors, masks and traces record it).
        tokenizer: labkit's tokenizer (left padding, pad token set).
        kind: ``"transformer_lens"``, ``"hugging_face"`` or ``"vllm"``.
        capabilities: the subset of :data:`CAPABILITIES` this backend serves.
    """

    kind: ClassVar[str] = "?"
    capabilities: ClassVar[frozenset[str]] = frozenset()
    #: what to use for a capability this backend lacks
    alternative: ClassVar[str] = ""
    #: the backend schedules its own batches (labkit sends all rows in one call)
    schedules_batches: ClassVar[bool] = False

    name: str
    tokenizer: Any

    # -- facts ----------------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def module(self) -> torch.nn.Module:
        """The Hugging Face module tree (the twin; the model itself; the engine's weightless
        ``meta`` skeleton) — what MoE router lookups read."""

    @property
    def config(self) -> Any:
        return self.module.config

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.config.hidden_size)

    @property
    @abc.abstractmethod
    def n_ctx(self) -> int | None:
        """The context window in tokens (``None``: the config states none)."""

    @property
    def vocab_size(self) -> int | None:
        size = getattr(self.config, "vocab_size", None)
        return size if isinstance(size, int) and size > 0 else None

    @property
    @abc.abstractmethod
    def eos_ids(self) -> set[int]:
        """The ids that end a completion (:func:`labkit.tokens.eos_token_ids`)."""

    # -- capabilities ---------------------------------------------------------------------

    def supports(self, capability: str) -> bool:
        if capability not in CAPABILITIES:
            raise ValueError(f"unknown capability {capability!r}; known: {sorted(CAPABILITIES)}.")
        return capability in self.capabilities

    def require(self, capability: str, caller: str, alternative: str = "") -> None:
        """Raise :class:`NotOnBackendError` unless this backend has ``capability``."""
        if not self.supports(capability):
            raise NotOnBackendError(
                f"{caller}: {CAPABILITIES[capability]} is not available on the {self.kind} backend "
                f"({self!r}). {alternative or self.alternative}".rstrip()
            )

    # -- prompts --------------------------------------------------------------------------

    @abc.abstractmethod
    def encode(self, prompt: str, *, chat: bool = False, prepend_bos: bool | None = None) -> list[int]:
        """Token ids of one prompt under the lab's one rule (:func:`labkit.tokens.encode_prompt`)."""

    def encode_prompts(
        self, prompts: Any, *, caller: str, chat: bool = False, prepend_bos: bool | None = None, hint: str = ""
    ) -> tuple[list[str], list[list[int]]]:
        """Validate and tokenise prompts: ``(prompts, token rows)`` (see :func:`labkit.tokens.encode_with`)."""
        return encode_with(self.encode, prompts, caller=caller, chat=chat, prepend_bos=prepend_bos, hint=hint)

    def check_context(self, lengths: Sequence[int], *, new_tokens: int = 0, caller: str = "labkit") -> None:
        """Refuse prompts longer than the context window (:func:`labkit.checks.check_context_lengths`)."""
        check_context_lengths(lengths, self.n_ctx, new_tokens=new_tokens, caller=caller)

    # -- hook points and interventions ---------------------------------------------------

    def check_hook_point(self, hook_name: str, where: str) -> None:
        """Raise unless steering / reading at ``hook_name`` works on this backend."""
        self.require("steer", where)

    def check_vector(self, vector: Any) -> None:
        """Raise unless a steering vector applies here (model name, width, hook point, operation)."""
        self.require("steer", "steered")

    @contextlib.contextmanager
    def steered(self, vectors: Sequence[Any], rows: Sequence[Sequence[Any]] | None = None) -> Iterator[Any]:
        """Open steering: ``vectors`` on every row, ``rows[b]`` on batch row ``b`` only (checked first)."""
        self.require("steer", "steered")
        yield self

    def open_selections(self, layer: int) -> list[Selection]:
        """The selections of the masks open on MoE ``layer`` now (what a new mask merges with)."""
        return []

    def check_mask_dispatch(self, caller: str) -> None:
        """Raise where this backend cannot apply expert masks to this model (family, parallelism)."""

    @contextlib.contextmanager
    def masked(self, selections: Mapping[int, Selection]) -> Iterator[Any]:
        """Open an expert mask: ``{layer: Selection}`` (validated by the caller against this model)."""
        self.require("mask", "masked")
        yield self

    # -- runs -----------------------------------------------------------------------------

    def generate_ids(self, rows: list[list[int]], *, max_new_tokens: int, **options: Any) -> list[list[int]]:
        """New token ids per prompt row (up to and including EOS) under the open interventions."""
        self.require("generate", "generate")
        raise NotImplementedError

    def record_routing(
        self, rows: Sequence[Sequence[int]], keep_from: Sequence[int], *, include_router_logits: bool = False
    ) -> list[dict[str, Tensor]]:
        """The router's own choice on every token of each row from ``keep_from[row]`` on, under
        the open interventions: per row ``topk_indices`` ``[layer, kept, k]``, ``topk_weights``
        (float32) and, if asked, ``router_logits`` ``[layer, kept, expert]``."""
        self.require("trace", "trace_routing")
        raise NotImplementedError

    def check_tokenizer_override(self, caller: str) -> None:
        """Raise where a caller's own tokenizer cannot be used (the engine tokenises itself)."""

    def residual_activations(self, rows: Sequence[Sequence[int]], hook_name: str) -> list[Tensor]:
        """The residual stream at ``hook_name`` for each token row: ``[len(row), d_model]`` each."""
        self.require("capture_resid", "residual_activations")
        raise NotImplementedError

    # -- activation caching -------------------------------------------------------------

    def check_cache_point(self, hook_name: str, where: str) -> None:
        """Raise unless ``cache_activations`` can read ``hook_name`` here (unknown names: the closest real ones)."""
        self.require("cache", where)

    def activation_shapes(self, hook_names: Sequence[str], row: Sequence[int]) -> dict[str, tuple[int, ...]]:
        """Per-position trailing shape of each hook point (``row``: a short prompt to probe with)."""
        self.require("cache", "cache_activations")
        raise NotImplementedError

    def capture(
        self, rows: Sequence[Sequence[int]], keep: Sequence[Sequence[int]], hook_names: Sequence[str]
    ) -> dict[str, Tensor]:
        """One batch of ``cache_activations``: run ``rows`` (token ids) under the open interventions
        and return ``{hook name: Float[Tensor, "kept *shape"]}`` — the positions ``keep[0]`` of
        row 0, then ``keep[1]`` of row 1, ..., in that order. Each row's values equal the row
        run alone (padding, where the backend pads, is masked and position ids count real tokens)."""
        self.require("cache", "cache_activations")
        raise NotImplementedError

    def token_logprobs(self, rows: Sequence[Sequence[int]]) -> list[Tensor]:
        """Natural-log probability of each token given the tokens before it, under the open
        interventions: ``Float[Tensor, "len(row)-1"]`` (float32, CPU) per row (token 0 is not predicted)."""
        self.require("logprobs", "perplexity")
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's parameters (what activations are stored in by default)."""
        return next(self.module.parameters()).dtype

    def close(self) -> None:
        """Release what the backend holds (engine processes); a no-op in process."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
