"""Routing traces: which experts every MoE layer chose for every real token of a prompt set.

A :class:`RoutingTrace` is plain data (a frozen dataclass of tensors): per traced MoE layer and
per kept (non-padding) token, the ``top_k`` experts the router chose and their routing weights,
optionally the raw router logits, plus the bookkeeping that ties each token back to its prompt.
It is the input of expert attribution (fTRI in *Mixture of Tunable Experts*, 2025, §3: count how
often each expert fires on behaviour prompts versus control prompts).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

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
            outputs it (after renormalisation / scaling where the family does that).
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
            ValueError: ``kind`` is not a routing trace or ``version`` is newer than supported.
        """
        kind = data.get("kind", TRACE_KIND)
        if kind != TRACE_KIND:
            raise ValueError(f"RoutingTrace.from_dict: kind is {kind!r}, expected {TRACE_KIND!r}.")
        version = int(data.get("version", TRACE_VERSION))
        if version > TRACE_VERSION:
            raise ValueError(
                f"RoutingTrace.from_dict: version {version} is newer than this labkit supports "
                f"({TRACE_VERSION}); upgrade labkit."
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
        """Save as ``<path>`` (safetensors tensors) plus ``<path>.json`` (metadata); no pickle.

        Args:
            path: target file, conventionally ``something.safetensors``.

        Returns:
            The safetensors path written.
        """
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {
            name: getattr(self, name).detach().cpu().contiguous()
            for name in _TENSOR_FIELDS
            if getattr(self, name) is not None
        }
        metadata = self.metadata()
        save_file(tensors, str(path), metadata={"labkit": json.dumps(metadata)})
        _sidecar(path).write_text(json.dumps(metadata, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RoutingTrace":
        """Load a trace written by :meth:`save`.

        Raises:
            FileNotFoundError: ``path`` does not exist.
        """
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"RoutingTrace.load: no file at {str(path)!r}.")
        tensors = load_file(str(path))
        sidecar = _sidecar(path)
        if sidecar.is_file():
            metadata = json.loads(sidecar.read_text())
        else:
            with safe_open(str(path), framework="pt") as handle:
                metadata = json.loads(handle.metadata()["labkit"])
        return cls.from_dict({**metadata, "router_logits": None, **tensors})


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def trace_routing(*args, **kwargs) -> RoutingTrace:  # replaced below once implemented
    raise NotImplementedError("trace_routing is being implemented")
