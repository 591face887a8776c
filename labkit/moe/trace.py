"""Routing traces: which experts every MoE layer chose for every real token of a prompt set.

A :class:`RoutingTrace` is plain data (a frozen dataclass of tensors): per traced MoE layer and
per kept (non-padding) token, the ``top_k`` experts the router chose and their routing weights,
optionally the raw router logits, plus the bookkeeping that ties each token back to its prompt.
It is the input of expert attribution (fTRI in *Mixture of Tunable Experts*, 2025, §3: count how
often each expert fires on behaviour prompts versus control prompts).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from labkit import storage
from labkit.generation import eos_token_ids, generate_token_ids
from labkit.moe.families import MoELayer, find_routers, hf_of
from labkit.models import check_context, encode_prompt, left_pad

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


def _tokenizer_for(model, tokenizer):
    """labkit's tokenizer for a bridge; a left-padding deep copy of ``tokenizer`` otherwise.

    A deep copy: a shallow one shares the backend tokenizer and special-token state, so setting
    the pad token / padding side on it would change the caller's tokenizer.
    """
    import copy

    from labkit.models import lab_model_or_none

    record = lab_model_or_none(model)
    if tokenizer is None:
        if record is None:
            raise ValueError(
                "A plain Hugging Face model has no tokenizer attached: pass tokenizer=..., or "
                "prompts as lists of token ids, or wrap it with labkit.models.from_hf."
            )
        return record.tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _vocab_size(hf_model) -> int | None:
    """Rows of the input embedding (what a token id indexes), else ``config.vocab_size``."""
    embeddings = hf_model.get_input_embeddings() if hasattr(hf_model, "get_input_embeddings") else None
    if embeddings is not None and hasattr(embeddings, "num_embeddings"):
        return int(embeddings.num_embeddings)
    size = getattr(hf_model.config, "vocab_size", None)
    return size if isinstance(size, int) and size > 0 else None


def _check_token_ids(rows: Sequence[Sequence[int]], vocab_size: int | None) -> None:
    """Refuse token ids outside ``0..vocab_size-1`` (torch would raise a bare IndexError)."""
    for i, row in enumerate(rows):
        bad = [t for t in row if t < 0 or (vocab_size is not None and t >= vocab_size)]
        if bad:
            allowed = f"0..{vocab_size - 1}" if vocab_size is not None else "≥ 0"
            raise ValueError(
                f"trace_routing: prompt {i} has token id {bad[0]} outside the model's vocabulary "
                f"({allowed}; {len(bad)} such id(s) in this prompt). Pass ids from this model's tokenizer, "
                "or pass text."
            )


def _encode(tokenizer, prompts: Sequence[Any], chat: bool, record=None, prepend_bos: bool | None = None) -> list[list[int]]:
    """Token ids per prompt: the lab's rule (:meth:`LabModel.encode`, BOS included) for a labkit
    bridge; a plain Hugging Face call (or ``prepend_bos`` added by hand) for a plain model."""

    rows = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError(f"trace_routing: prompt {i} is text but no tokenizer is available.")
            try:
                if record is not None and tokenizer is record.tokenizer:
                    ids = record.encode(prompt, chat=chat, prepend_bos=prepend_bos)
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


def _check_scope(scope) -> tuple[str, int]:
    if scope in ("all", "generated"):
        return scope, 0
    if (
        isinstance(scope, tuple)
        and len(scope) == 2
        and scope[0] == "last"
        and isinstance(scope[1], int)
        and not isinstance(scope[1], bool)
        and scope[1] >= 1
    ):
        return "last", scope[1]
    raise ValueError(
        f"trace_routing: scope {scope!r} is not allowed; use 'all', 'generated', or ('last', k) with k ≥ 1."
    )


@contextlib.contextmanager
def recording(routers: Sequence[MoELayer]) -> Iterator[list[list[tuple[Tensor, Tensor, Tensor]]]]:
    """Record every router call's ``(router_logits, topk_weights, topk_indices)`` per layer.

    A plain forward hook per router module reads the router's own output (so the recorded
    choice is the one the model used, including any expert mask applied by a hook registered
    before this one); handles are removed in ``finally``.

    Yields:
        One list per MoE layer (in ``routers`` order) that fills with one tuple per call.
    """
    records: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in routers]
    handles = []
    try:
        for slot, moe_layer in zip(records, routers):

            def hook(_module, _inputs, output, slot=slot, moe_layer=moe_layer):
                router_logits, topk_weights, topk_indices = moe_layer.read(output)
                slot.append((router_logits.detach(), topk_weights.detach(), topk_indices.detach()))

            handles.append(moe_layer.router.register_forward_hook(hook))
        yield records
    finally:
        for handle in handles:
            handle.remove()


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

    from labkit.checks import check_prompts
    from labkit.engines import is_engine_model

    prompts = check_prompts(prompts, caller="trace_routing", token_ids=True)
    if is_engine_model(model):
        return model.trace_routing(
            prompts, batch_size=batch_size, scope=scope, max_new_tokens=max_new_tokens,
            include_router_logits=include_router_logits, chat=chat, prepend_bos=prepend_bos,
            tokenizer=tokenizer, progress=progress,
        )
    kind, last_k = _check_scope(scope)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"trace_routing: batch_size must be an int ≥ 1, got {batch_size!r}.")
    if kind == "generated" and (
        isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1
    ):
        raise ValueError(f"trace_routing: max_new_tokens must be an int ≥ 1, got {max_new_tokens!r}.")

    hf_model = hf_of(model)
    routers = find_routers(model)
    n_experts, top_k = routers[0].n_experts, routers[0].top_k
    needs_tokenizer = tokenizer is not None or any(isinstance(p, str) for p in prompts) or kind == "generated"
    tok = _tokenizer_for(model, tokenizer) if needs_tokenizer else None
    from labkit.models import lab_model_or_none

    rows = _encode(tok, prompts, chat, lab_model_or_none(model), prepend_bos)
    _check_token_ids(rows, _vocab_size(hf_model))
    check_context(
        model, [len(row) for row in rows], new_tokens=max_new_tokens if kind == "generated" else 0, caller="trace_routing"
    )
    pad_id = tok.pad_token_id if tok is not None else (hf_model.config.pad_token_id or 0)
    device = next(hf_model.parameters()).device

    n_prompts = len(rows)
    order = sorted(range(n_prompts), key=lambda i: len(rows[i]))  # similar lengths batch together
    batches = [order[i : i + batch_size] for i in range(0, n_prompts, batch_size)]
    per_prompt: list[dict[str, Tensor] | None] = [None] * n_prompts

    eos_ids = eos_token_ids(hf_model, tok)

    bar = tqdm(batches, desc="trace_routing", unit="batch", disable=not progress)
    with torch.inference_mode():
        for batch in bar:
            batch_rows = [rows[i] for i in batch]
            keep_from = [0] * len(batch)
            if kind == "generated":
                answers = generate_token_ids(
                    hf_model, batch_rows, pad_id=pad_id, eos_ids=eos_ids, max_new_tokens=max_new_tokens
                )
                keep_from = [len(r) for r in batch_rows]
                batch_rows = [r + a for r, a in zip(batch_rows, answers)]
            elif kind == "last":
                keep_from = [max(0, len(r) - last_k) for r in batch_rows]
            input_ids, attention_mask, position_ids = left_pad(batch_rows, pad_id, device)
            width = input_ids.shape[1]
            with recording(routers) as records:
                hf_model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    use_cache=False,
                    logits_to_keep=1,
                )
            # keep[b, s]: real token at or after keep_from (left padding: real tokens end the row)
            keep = torch.zeros((len(batch), width), dtype=torch.bool)
            for b, row in enumerate(batch_rows):
                keep[b, width - len(row) + keep_from[b] :] = True
            counts = keep.sum(-1).tolist()
            keep_device = keep.to(device).reshape(-1)
            per_layer = []
            for record in records:
                (logits, weights, indices), = record
                picked = [indices[keep_device], weights[keep_device].float()]
                if include_router_logits:
                    picked.append(logits[keep_device].float())
                per_layer.append([t.cpu() for t in picked])
            # stack layers: (layer, kept tokens, k) then split per prompt
            stacked = [torch.stack([layer[j] for layer in per_layer]) for j in range(len(per_layer[0]))]
            splits = [torch.split(t, counts, dim=1) for t in stacked]
            for b, prompt in enumerate(batch):
                row = batch_rows[b]
                entry = {"topk_indices": splits[0][b], "topk_weights": splits[1][b]}
                if include_router_logits:
                    entry["router_logits"] = splits[2][b]
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
        n_experts=n_experts,
        top_k=top_k,
        n_prompts=n_prompts,
        model_name=_model_name(model),
    )


def _model_name(model) -> str:
    """labkit's name for a bridge; ``config.name_or_path`` (or the class name) for a HF model."""
    from labkit.engines import is_engine_model
    from labkit.models import lab_model_or_none

    if is_engine_model(model):
        return model.name
    record = lab_model_or_none(model)
    if record is not None:
        return record.name
    return getattr(model.config, "name_or_path", None) or type(model).__name__
