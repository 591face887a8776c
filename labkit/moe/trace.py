"""Routing traces: which experts every MoE layer chose for every real token of a prompt set.

A :class:`RoutingTrace` is plain data (a frozen dataclass of tensors): per traced MoE layer and
per kept (non-padding) token, the ``top_k`` experts the router chose and their routing weights,
optionally the raw router logits, plus the bookkeeping that ties each token back to its prompt.
It is the input of expert attribution (fTRI in *Mixture of Tunable Experts*, 2025, §3: count how
often each expert fires on behaviour prompts versus control prompts).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from labkit import storage
from labkit.backends import backend_of
from labkit.checks import check_positive_int, check_prompts, check_scope, check_token_ids
from labkit.moe.families import find_routers
from labkit.tokens import encode_prompt, lab_tokenizer

__all__ = ["RoutingTrace", "trace_routing"]

TRACE_KIND = "labkit.RoutingTrace"
TRACE_VERSION = 1
_TENSOR_FIELDS = ("topk_indices", "topk_weights", "router_logits", "token_ids", "prompt_index", "position")


@dataclass(frozen=True)
class RoutingTrace:
    """The routing decisions of a MoE model over a set of prompts.

    Tokens of all prompts are concatenated along the ``token`` axis in prompt order (padding
    excluded); ``prompt_index`` and ``position`` say where each came from.

    Attributes:
        topk_indices: expert chosen, per traced MoE layer, per kept (non-pad) token, in the
            order the family's router returns them.
        topk_weights: routing weight of each chosen expert, exactly as the family's router
            outputs it (after renormalisation / scaling where the family does that), stored
            as float32 (a lossless up-cast for bfloat16 / float16 models).
        router_logits: raw router logits over all experts, or ``None`` when not requested.
        token_ids: vocabulary id of each kept token.
        prompt_index: which prompt (0..n_prompts-1) each token came from.
        position: position of the token within its prompt's real tokens (0-based).
        layers: true model layer index of each traced layer (dense layers are skipped, so this
            need not be ``0..n-1``).
        n_experts: routed experts per MoE layer.
        top_k: experts chosen per token.
        n_prompts: number of prompts traced.
        model_name: name of the traced model.
    """

    topk_indices: Int[Tensor, "layer token k"]
    topk_weights: Float[Tensor, "layer token k"]
    router_logits: Float[Tensor, "layer token expert"] | None
    token_ids: Int[Tensor, "token"]
    prompt_index: Int[Tensor, "token"]
    position: Int[Tensor, "token"]
    layers: tuple[int, ...]
    n_experts: int
    top_k: int
    n_prompts: int
    model_name: str

    def __post_init__(self) -> None:
        n_layers, n_tokens = len(self.layers), self.token_ids.shape[0]
        expected = {
            "topk_indices": (n_layers, n_tokens, self.top_k),
            "topk_weights": (n_layers, n_tokens, self.top_k),
            "token_ids": (n_tokens,),
            "prompt_index": (n_tokens,),
            "position": (n_tokens,),
        }
        if self.router_logits is not None:
            expected["router_logits"] = (n_layers, n_tokens, self.n_experts)
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(
                    f"RoutingTrace: {name} has shape {got}, expected {shape} "
                    f"(layer={n_layers}, token={n_tokens}, k={self.top_k}, expert={self.n_experts})."
                )
        object.__setattr__(self, "layers", tuple(int(layer) for layer in self.layers))

    @property
    def n_tokens(self) -> int:
        """Number of traced (non-padding) tokens over all prompts."""
        return int(self.token_ids.shape[0])

    def metadata(self) -> dict[str, Any]:
        """The non-tensor fields plus ``kind``/``version`` (JSON-serialisable)."""
        return {
            "kind": TRACE_KIND,
            "version": TRACE_VERSION,
            "layers": list(self.layers),
            "n_experts": self.n_experts,
            "top_k": self.top_k,
            "n_prompts": self.n_prompts,
            "model_name": self.model_name,
        }

    def to_dict(self) -> dict[str, Any]:
        """A dict of tensors and plain values; inverse of :meth:`from_dict`."""
        out = self.metadata()
        for name in _TENSOR_FIELDS:
            out[name] = getattr(self, name)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RoutingTrace":
        """Rebuild a trace from :meth:`to_dict` output.

        Raises:
            ValueError: ``data`` is not a dict, has no or another ``kind``, a ``version`` newer
                than supported, or lacks a field (the message names the missing keys).
        """
        storage.check_kind(data, TRACE_KIND, TRACE_VERSION, caller="RoutingTrace.from_dict", source="the dict")
        storage.require_keys(
            data,
            ("topk_indices", "topk_weights", "token_ids", "prompt_index", "position", "layers", "n_experts", "top_k", "n_prompts", "model_name"),
            caller="RoutingTrace.from_dict",
            source="the dict",
        )
        return cls(
            topk_indices=torch.as_tensor(data["topk_indices"]),
            topk_weights=torch.as_tensor(data["topk_weights"]),
            router_logits=None if data.get("router_logits") is None else torch.as_tensor(data["router_logits"]),
            token_ids=torch.as_tensor(data["token_ids"]),
            prompt_index=torch.as_tensor(data["prompt_index"]),
            position=torch.as_tensor(data["position"]),
            layers=tuple(data["layers"]),
            n_experts=int(data["n_experts"]),
            top_k=int(data["top_k"]),
            n_prompts=int(data["n_prompts"]),
            model_name=str(data["model_name"]),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``<stem>.json`` (metadata) and ``<stem>.safetensors`` (tensors); no pickle.

        Args:
            path: the stem, or either file's path (``refusal``, ``refusal.safetensors``, ...).

        Returns:
            The ``.json`` path (what :meth:`load` takes). Layout: :mod:`labkit.storage`.
        """
        tensors = {name: getattr(self, name) for name in _TENSOR_FIELDS if getattr(self, name) is not None}
        return storage.save(path, kind=TRACE_KIND, version=TRACE_VERSION, metadata=self.metadata(), tensors=tensors)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RoutingTrace":
        """Load a trace written by :meth:`save` (the stem or either file's path).

        Raises:
            FileNotFoundError: no saved trace there, or half of the pair is missing.
            ValueError: the files hold another kind of labkit object (the message names the
                kind found), are not JSON / safetensors, or lack a field.
        """
        metadata, tensors = storage.load(
            path, kind=TRACE_KIND, version=TRACE_VERSION, caller="RoutingTrace.load", writer="RoutingTrace.save"
        )
        return cls.from_dict({**metadata, "router_logits": None, **tensors})


Scope = Literal["all", "generated"] | tuple[Literal["last"], int]


def _encode(backend, tokenizer, prompts: Sequence[Any], chat: bool, prepend_bos: bool | None) -> list[list[int]]:
    """Token ids per prompt: the backend's rule (BOS included) with its own tokenizer; a plain
    tokenizer call (``prepend_bos`` added by hand) with a tokenizer the caller passed."""
    rows = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            try:
                if tokenizer is None:
                    ids = backend.encode(prompt, chat=chat, prepend_bos=prepend_bos)
                else:
                    ids = encode_prompt(tokenizer, prompt, chat=chat, prepend_bos=bool(prepend_bos))
            except ValueError as error:
                raise ValueError(f"trace_routing: {error}") from None
        elif isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise ValueError(
                f"trace_routing: prompt {i} is {type(prompt).__name__}; pass strings or lists of token ids."
            )
        if not ids:
            raise ValueError(f"trace_routing: prompt {i} ({prompt!r}) tokenises to zero tokens.")
        rows.append(list(ids))
    return rows


def keep_from_for(kind: str, last_k: int, prompt_lengths: Sequence[int]) -> list[int]:
    """The first kept position of each traced row: 0 (``"all"``), ``len - k`` (``("last", k)``),
    or the prompt's length (``"generated"``: the answer tokens after it)."""
    if kind == "generated":
        return list(prompt_lengths)
    if kind == "last":
        return [max(0, n - last_k) for n in prompt_lengths]
    return [0] * len(prompt_lengths)


def trace_routing(
    model,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
    scope: Scope = "all",
    max_new_tokens: int = 32,
    include_router_logits: bool = False,
    chat: bool = False,
    prepend_bos: bool | None = None,
    tokenizer: Any = None,
    progress: bool = True,
) -> RoutingTrace:
    """Record which experts every MoE layer chooses for every real token of the prompts.

    This is the measurement step of fTRI (*Mixture of Tunable Experts*, 2025, §3): run the
    prompts, read each router's top-k choice per token. Prompts run in left-padded batches on
    the plain twin with position ids counting real tokens only, so a batch traces exactly what
    each prompt traces alone; padding tokens are dropped. A forward hook on each router module
    reads the router's own output, so the recorded weights are what the experts were weighted
    with (and an active :func:`labkit.moe.masked` mask is reflected).

    Args:
        model: a labkit bridge or a Hugging Face MoE model (OLMoE, Qwen2-MoE, Qwen3-MoE, Mixtral,
            GPT-OSS, DeepSeek-V3).
        prompts: strings, or lists of token ids (used as given).
        batch_size: prompts per forward pass (≥ 1).
        scope: which tokens to keep: ``"all"`` real tokens; ``("last", k)`` the last ``k`` real
            tokens of each prompt; ``"generated"`` generate a greedy answer of up to
            ``max_new_tokens`` tokens (up to and including the first end-of-sequence token),
            then trace prompt + answer in one pass and keep the answer tokens (their
            ``position`` continues after the prompt's).
        max_new_tokens: answer length for ``scope="generated"``.
        include_router_logits: also keep the raw router logits (``layer token expert``).
        chat: wrap each text prompt as one user turn with the tokenizer's chat template.
        prepend_bos: override the BOS rule for text prompts (``None``: the model's rule for a
            labkit bridge, no BOS for a plain Hugging Face model).
        tokenizer: needed only for a plain Hugging Face model given text prompts.
        progress: show a ``tqdm`` progress bar over batches.

    Returns:
        A :class:`RoutingTrace`; tokens ordered by prompt, then position.

    Raises:
        ValueError: dense / unsupported model, bad scope, batch_size or max_new_tokens, empty
            prompt list, a prompt that tokenises to nothing, a token id outside the model's
            vocabulary, or a prompt (plus ``max_new_tokens`` for ``scope="generated"``) longer
            than the model's context window.

    Example:
        >>> trace = trace_routing(model, ["What happened in 1989?"], scope=("last", 4))  # doctest: +SKIP
        >>> trace.topk_indices.shape  # (layer, token, k)  # doctest: +SKIP
        torch.Size([16, 4, 8])
    """
    from tqdm.auto import tqdm

    backend = backend_of(model)
    backend.require("trace", "trace_routing")
    kind, last_k = check_scope(scope)
    check_positive_int("batch_size", batch_size, caller="trace_routing")
    if kind == "generated":
        check_positive_int("max_new_tokens", max_new_tokens, caller="trace_routing")
    prompts = check_prompts(prompts, caller="trace_routing", token_ids=True)
    if tokenizer is not None:
        backend.check_tokenizer_override("trace_routing")
        tokenizer = lab_tokenizer(tokenizer)
    backend.check_mask_dispatch("trace_routing")
    routers = find_routers(model)
    rows = _encode(backend, tokenizer, prompts, chat, prepend_bos)
    check_token_ids(rows, backend.vocab_size)
    backend.check_context(
        [len(row) for row in rows], new_tokens=max_new_tokens if kind == "generated" else 0, caller="trace_routing"
    )
    n_prompts = len(rows)
    if backend.schedules_batches:  # the engine batches its own requests
        batches = [list(range(n_prompts))]
    else:
        order = sorted(range(n_prompts), key=lambda i: len(rows[i]))  # similar lengths batch together
        batches = [order[i : i + batch_size] for i in range(0, n_prompts, batch_size)]
    per_prompt: list[dict[str, Tensor] | None] = [None] * n_prompts
    for batch in tqdm(batches, desc="trace_routing", unit="batch", disable=not progress):
        batch_rows = [rows[i] for i in batch]
        keep_from = keep_from_for(kind, last_k, [len(r) for r in batch_rows])
        if kind == "generated":
            answers = backend.generate_ids(batch_rows, max_new_tokens=max_new_tokens)
            batch_rows = [r + a for r, a in zip(batch_rows, answers)]
        records = backend.record_routing(batch_rows, keep_from, include_router_logits=include_router_logits)
        for b, prompt in enumerate(batch):
            row = batch_rows[b]
            entry = dict(records[b])
            entry["token_ids"] = torch.tensor(row[keep_from[b] :], dtype=torch.long)
            entry["position"] = torch.arange(keep_from[b], len(row), dtype=torch.long)
            per_prompt[prompt] = entry

    def cat(name: str, dim: int) -> Tensor:
        return torch.cat([entry[name] for entry in per_prompt], dim=dim)

    return RoutingTrace(
        topk_indices=cat("topk_indices", 1),
        topk_weights=cat("topk_weights", 1),
        router_logits=cat("router_logits", 1) if include_router_logits else None,
        token_ids=cat("token_ids", 0),
        prompt_index=torch.cat(
            [torch.full((entry["token_ids"].shape[0],), i, dtype=torch.long) for i, entry in enumerate(per_prompt)]
        ),
        position=cat("position", 0),
        layers=tuple(moe_layer.layer for moe_layer in routers),
        n_experts=routers[0].n_experts,
        top_k=routers[0].top_k,
        n_prompts=n_prompts,
        model_name=backend.name,
    )
