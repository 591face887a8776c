"""Interventions as plain data, and the two rules every backend applies them by.

This module holds what the Hugging Face hooks and the vLLM workers must agree on, written once:

* :func:`steering_positions` — which tokens a steering vector reaches (``positions="front" |
  "all" | "prompt" | "generated"``), from each token's absolute position and the prompt length.
  ``labkit.steering``'s hook calls it on padded ``[batch, pos]`` grids; the vLLM worker calls it
  on the flat token list of one request.
* :class:`Selection`, :func:`selection_from_edits` and :func:`merge_selections` — one layer's
  expert adjustment (off / on / bias) built from mask edits, and nested masks merged: ``off``
  and ``on`` are unions, biases add. ``labkit.moe.masking`` merges the masks open on a router with
  it; the vLLM driver merges the masks open on the engine with it and ships the merged selection.
* :class:`InterventionSpec` — everything one engine request carries (steering tensors per
  layer, merged selections, trace / capture flags) as JSON + safetensors bytes, addressed by the
  SHA-256 of both. The driver builds it (:meth:`InterventionSpec.to_wire`), the worker parses it
  (:meth:`InterventionSpec.from_wire`); no callable and no pickle crosses a process boundary.

It imports nothing from labkit above :mod:`labkit.checks`, so both processes can load it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = [
    "ENGINE_SITES",
    "POSITIONS",
    "InterventionSpec",
    "Selection",
    "SteeringEntry",
    "merge_selections",
    "selection_from_edits",
    "selection_from_json",
    "selection_to_json",
    "steering_positions",
]

POSITIONS: tuple[str, ...] = ("front", "all", "prompt", "generated")


# --------------------------------------------------------------------------------------------
# The steering position rule
# --------------------------------------------------------------------------------------------


def steering_positions(
    mode: str,
    positions: Int[Tensor, "..."],
    prompt_length: int | Int[Tensor, "..."],
    *,
    front_start: int | Int[Tensor, "..."] = 0,
    front_length: int | Int[Tensor, "..."] = 0,
) -> tuple[Bool[Tensor, "..."], Int[Tensor, "..."]]:
    """Which tokens a steering vector reaches, and (for ``"front"``) which row of it each gets.

    ActAdd (Turner et al. 2023, §3) adds a ``pos × d_model`` vector to the first ``pos`` tokens of
    the prompt (``"front"``); a single direction is added at every token (``"all"``), the prompt's
    tokens only (``"prompt"``) or the generated tokens only (``"generated"``).

    Args:
        mode: one of :data:`POSITIONS`.
        positions: the absolute position of each token (any shape; broadcast with the rest).
        prompt_length: tokens before this position are prompt tokens.
        front_start: the position of the prompt's first real token (left padding on a padded
            grid; 0 on the engine).
        front_length: rows of a ``"front"`` vector.

    Returns:
        ``(keep, offset)``: a boolean tensor (broadcast shape) of the tokens that get the vector,
        and ``positions - front_start`` — the row of a ``"front"`` vector each token gets
        (meaningful where ``keep``).

    Raises:
        ValueError: an unknown ``mode``.
    """
    in_prompt = positions < prompt_length
    offset = positions - front_start
    if mode == "all":
        keep = torch.ones_like(in_prompt)
    elif mode == "prompt":
        keep = in_prompt
    elif mode == "generated":
        keep = ~in_prompt
    elif mode == "front":
        keep = in_prompt & (offset >= 0) & (offset < front_length)
    else:
        raise ValueError(f"steering positions {mode!r} is not allowed; use one of {', '.join(POSITIONS)}.")
    return keep, offset


# --------------------------------------------------------------------------------------------
# Expert selections and the one mask merge
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Selection:
    """A per-expert adjustment of one layer's expert *selection* (never of the weights).

    Attributes:
        off: boolean ``[expert]``: never select these experts (the next best takes the slot).
        on: boolean ``[expert]``: always select these experts.
        bias: float ``[expert]`` or ``None``: added to the score the family's top-k runs on —
            the router logit for the top-k-on-logits families, the sigmoid / softmax score
            (beside any correction bias) for the families that choose on scores plus a
            correction bias; the plain softmax families apply it as ``probs * exp(bias)``,
            which ranks exactly like ``logit + bias``.

    The weights of the chosen experts are always the family's own weights computed from the
    *unadjusted* scores (as DeepSeek-V3 does with its correction bias), renormalised and scaled
    exactly where the family does. An *on* expert therefore keeps its natural weight.

    Compared by identity (``eq=False``): it holds tensors, and two open masks may be equal.
    """

    off: Bool[Tensor, " expert"]
    on: Bool[Tensor, " expert"]
    bias: Float[Tensor, " expert"] | None = None


def selection_from_edits(
    edits: Iterable[tuple[str, int, float | None]], n_experts: int, device: str | torch.device | None = None
) -> Selection:
    """One layer's :class:`Selection` from ``(mode, expert, value)`` edits (``mode`` off / on / bias).

    Biases of the same expert add (as nested masks do).
    """
    off = torch.zeros(n_experts, dtype=torch.bool, device=device)
    on = torch.zeros(n_experts, dtype=torch.bool, device=device)
    bias = None
    for mode, expert, value in edits:
        if mode == "off":
            off[expert] = True
        elif mode == "on":
            on[expert] = True
        elif mode == "bias":
            if bias is None:
                bias = torch.zeros(n_experts, dtype=torch.float32, device=device)
            bias[expert] += float(value)
        else:
            raise ValueError(f"expert edit mode {mode!r} is not allowed; use 'off', 'on' or 'bias'.")
    return Selection(off=off, on=on, bias=bias)


def merge_selections(selections: Sequence[Selection]) -> Selection:
    """The one merge of nested expert masks on a layer: ``off`` and ``on`` are unions, biases add.

    Raises:
        ValueError: no selections.
    """
    if not selections:
        raise ValueError("merge_selections: need at least one Selection.")
    off = torch.stack([s.off for s in selections]).any(0)
    on = torch.stack([s.on for s in selections]).any(0)
    biases = [s.bias for s in selections if s.bias is not None]
    bias = torch.stack(biases).sum(0) if biases else None
    return Selection(off=off, on=on, bias=bias)


def selection_to_json(selection: Selection) -> dict[str, Any]:
    """A selection as plain JSON: ``{"n_experts": n, "off": [...], "on": [...], "bias": [n floats] | None}``."""
    return {
        "n_experts": int(selection.off.numel()),
        "off": selection.off.nonzero().flatten().tolist(),
        "on": selection.on.nonzero().flatten().tolist(),
        "bias": None if selection.bias is None else selection.bias.float().cpu().tolist(),
    }


def selection_from_json(data: Mapping[str, Any], device: str | torch.device | None = None) -> Selection:
    """The inverse of :func:`selection_to_json` (exact: float32 biases round-trip through JSON)."""
    n = int(data["n_experts"])
    selection = selection_from_edits(
        [("off", int(e), None) for e in data.get("off", [])] + [("on", int(e), None) for e in data.get("on", [])], n, device
    )
    bias = data.get("bias")
    if bias is not None:
        selection = Selection(selection.off, selection.on, torch.tensor(bias, dtype=torch.float32, device=device))
    return selection


# --------------------------------------------------------------------------------------------
# One engine request's interventions
# --------------------------------------------------------------------------------------------


#: Where inside a decoder layer the engine adds or reads, by TransformerLens hook point:
#: ``hook_resid_pre`` (the layer's input stream), ``hook_resid_post`` (its output stream),
#: ``hook_attn_out`` (the attention block's output), ``hook_mlp_out`` (the MLP / MoE block's output).
ENGINE_SITES: tuple[str, ...] = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out")


@dataclass(frozen=True)
class SteeringEntry:
    """One steering vector as the engine applies it: at ``site`` of decoder ``layer``."""

    layer: int
    positions: str
    tensor: Float[Tensor, "*pos d_model"]
    hook_name: str = ""
    site: str = "hook_resid_pre"


@dataclass(frozen=True)
class InterventionSpec:
    """Everything one engine request carries, as plain data.

    Attributes:
        steering: the vectors, in the order they are added.
        masks: ``{layer: Selection}``, already merged across nested masks.
        trace: record the router's choice on every prompt token (or on ``capture_positions``).
        capture: ``(layer, site)`` pairs whose activations to record (sites: :data:`ENGINE_SITES`).
        capture_positions: prompt positions to record (captures and traces); ``None``: every
            prompt position. Only these rows leave the workers.
        nonce: makes otherwise equal specs distinct (each traced / capturing request owns its
            records and its prefix-cache salt).
    """

    steering: tuple[SteeringEntry, ...] = ()
    masks: Mapping[int, Selection] = field(default_factory=dict)
    trace: bool = False
    capture: tuple[tuple[int, str], ...] = ()
    capture_positions: tuple[int, ...] | None = None
    nonce: str = ""

    KIND = "labkit.vllm.Intervention"
    VERSION = 3

    def __post_init__(self) -> None:
        for entry in self.steering:
            if entry.site not in ENGINE_SITES:
                raise ValueError(f"SteeringEntry.site {entry.site!r} is not one of {ENGINE_SITES}.")
        for layer, site in self.capture:
            if site not in ENGINE_SITES:
                raise ValueError(f"InterventionSpec.capture site {site!r} (layer {layer}) is not one of {ENGINE_SITES}.")

    @property
    def empty(self) -> bool:
        return not (self.steering or self.masks or self.trace or self.capture)

    def to_wire(self) -> tuple[str, str, bytes]:
        """``(key, spec_json, safetensors bytes)``; ``key`` is the SHA-256 of JSON and bytes."""
        from safetensors.torch import save as save_safetensors

        tensors, steering = {}, []
        for i, entry in enumerate(self.steering):
            name = f"steering.{i}"
            tensors[name] = entry.tensor.detach().to(torch.float32).cpu().contiguous()
            steering.append(
                {"layer": int(entry.layer), "positions": entry.positions, "tensor": name, "hook_name": entry.hook_name, "site": entry.site}
            )
        spec = {
            "kind": self.KIND,
            "version": self.VERSION,
            "steering": steering,
            "mask": {str(layer): selection_to_json(sel) for layer, sel in sorted(self.masks.items())},
            "trace": bool(self.trace),
            "capture": sorted([int(layer), str(site)] for layer, site in set(self.capture)),
            "capture_positions": None if self.capture_positions is None else [int(p) for p in self.capture_positions],
            "nonce": self.nonce,
        }
        spec_json = json.dumps(spec, sort_keys=True)
        blob = save_safetensors(tensors) if tensors else b""
        key = "labkit-" + hashlib.sha256(spec_json.encode() + b"\0" + blob).hexdigest()[:32]
        return key, spec_json, blob

    @classmethod
    def from_wire(
        cls, spec_json: str, blob: bytes, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> "InterventionSpec":
        """Parse what :meth:`to_wire` made (tensors moved to ``device`` / ``dtype``).

        Raises:
            ValueError: another kind or version.
        """
        from safetensors.torch import load as load_safetensors

        spec = json.loads(spec_json)
        if spec.get("kind") != cls.KIND or spec.get("version") != cls.VERSION:
            raise ValueError(
                f"labkit: expected a {cls.KIND} v{cls.VERSION}, got {spec.get('kind')!r} v{spec.get('version')!r}."
            )
        arrays = load_safetensors(blob) if blob else {}
        steering = tuple(
            SteeringEntry(
                layer=int(item["layer"]),
                positions=item["positions"],
                tensor=arrays[item["tensor"]].to(device=device, dtype=dtype),
                hook_name=item.get("hook_name", ""),
                site=item.get("site", "hook_resid_pre"),
            )
            for item in spec.get("steering", [])
        )
        masks = {int(layer): selection_from_json(data, device) for layer, data in (spec.get("mask") or {}).items()}
        return cls(
            steering=steering,
            masks=masks,
            trace=bool(spec.get("trace")),
            capture=tuple((int(layer), str(site)) for layer, site in spec.get("capture", [])),
            capture_positions=None if spec.get("capture_positions") is None else tuple(spec["capture_positions"]),
            nonce=spec.get("nonce", ""),
        )
