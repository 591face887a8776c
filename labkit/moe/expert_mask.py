"""The expert mask as plain data: which routed experts to switch off, force on, or bias, for one model.

An :class:`ExpertMask` is a sorted tuple of :class:`ExpertEdit` ``(layer, expert, mode, value)``
plus the model it was made for (name, layer and expert counts); it is built from pairs, from an
attribution's top experts, or drawn at random as the control (MoTE, 2025, §4), and saved as
``<stem>.json`` + ``<stem>.safetensors``. Applying it — ``with masked(model, mask): ...`` — and the
routing rules of each mode are :mod:`labkit.moe.masking` (which re-exports these names).
"""

from __future__ import annotations

import math
import operator
import os
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from labkit.backends import backend_of
from labkit.models import same_model
from labkit.moe.families import find_routers, n_layers_of
from labkit import storage

__all__ = ["MASK_KIND", "MASK_VERSION", "MODES", "ExpertEdit", "ExpertMask", "Mode", "model_meta"]

MASK_KIND = "labkit.ExpertMask"
MASK_VERSION = 1
MODES = ("off", "on", "bias")
Mode = Literal["off", "on", "bias"]


@dataclass(frozen=True, order=True)
class ExpertEdit:
    """One routed expert's edit.

    Attributes:
        layer: true model layer index (dense layers have no routed experts).
        expert: routed expert index within the layer.
        mode: ``"off"``, ``"on"`` or ``"bias"``.
        value: the selection bias for ``mode="bias"`` (finite); 0.0 otherwise.
    """

    layer: int
    expert: int
    mode: str = "off"
    value: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.expert, str) and self.expert == "shared":
            raise ValueError(
                f"ExpertMask: layer {self.layer}: shared experts cannot be masked — they are not routed "
                "(every token always uses them), so routing cannot switch them off or on. Mask routed "
                "experts (0..n_experts-1) only."
            )
        for name in ("layer", "expert"):
            object.__setattr__(self, name, _index(getattr(self, name), name))
        if self.mode not in MODES:
            raise ValueError(f"ExpertMask: unknown mode {self.mode!r}; allowed modes: {', '.join(MODES)}.")
        if isinstance(self.value, bool):
            value = None
        else:
            try:
                value = float(self.value)
            except (TypeError, ValueError):
                value = None
        if value is None:
            raise ValueError(
                f"ExpertMask: layer {self.layer} expert {self.expert}: value must be a number, got "
                f"{self.value!r} of type {type(self.value).__name__}."
            )
        if self.mode == "bias" and not math.isfinite(value):
            raise ValueError(
                f"ExpertMask: layer {self.layer} expert {self.expert}: bias must be a finite number, got "
                f"{self.value!r}. Use mode 'off' for -inf or 'on' for +inf."
            )
        if self.mode != "bias" and value != 0.0:
            raise ValueError(f"ExpertMask: mode {self.mode!r} takes no value (got {self.value!r}); use mode 'bias'.")
        object.__setattr__(self, "value", value)


def _index(value: Any, name: str) -> int:
    """``value`` as a Python int ≥ 0: ints, numpy / torch integer scalars; not bools or floats."""
    dtype = getattr(value, "dtype", None)
    is_bool = isinstance(value, bool) or dtype is torch.bool or str(dtype) == "bool"
    try:
        index = None if is_bool else operator.index(value)
    except TypeError:
        index = None
    if index is None:
        raise ValueError(
            f"ExpertMask: {name} must be an integer ≥ 0 (int, numpy or torch integer scalar), got {value!r} "
            f"of type {type(value).__name__}; pass a whole number (convert an integral float with int(...))."
        )
    if index < 0:
        raise ValueError(f"ExpertMask: {name} must be an integer ≥ 0, got {index}.")
    return index


def _pairs(experts: Any) -> list[tuple[int, int]]:
    """``[(layer, expert), ...]`` from pairs or a ``{layer: [experts]}`` mapping."""
    allowed = "(layer, expert) pairs or a {layer: [experts]} mapping"
    if isinstance(experts, Mapping):
        for layer, group in experts.items():
            if isinstance(group, (str, bytes)) or not isinstance(group, Iterable):
                raise TypeError(f"ExpertMask: experts[{layer!r}] must be a list of expert indices, got {group!r}.")
        return [(layer, expert) for layer, group in experts.items() for expert in group]
    if isinstance(experts, (str, bytes)) or not isinstance(experts, Iterable):
        raise TypeError(f"ExpertMask: experts must be {allowed}, got {type(experts).__name__}: {experts!r:.80}.")
    pairs = []
    for item in experts:
        if not (isinstance(item, (tuple, list)) and len(item) >= 2):
            raise ValueError(
                f"ExpertMask: expected (layer, expert) pairs or a {{layer: [experts]}} mapping, got item {item!r}."
            )
        pairs.append((item[0], item[1]))  # longer tuples (layer, expert, score, ...) are cut to the pair
    return pairs


def model_meta(model) -> dict[str, Any]:
    """``model_name``, ``n_layers``, ``n_experts`` of a model (any backend)."""
    routers = find_routers(model)
    return {"model_name": backend_of(model).name, "n_layers": n_layers_of(model), "n_experts": routers[0].n_experts}


def _is_model(value: Any) -> bool:
    """Whether ``value`` is a model handle labkit serves (and not, e.g., a shape tuple)."""
    if isinstance(value, (tuple, list, str, int, float)) or value is None:
        return False
    try:
        backend_of(value)
    except TypeError:
        return False
    return True


@dataclass(frozen=True)
class ExpertMask:
    """Which routed experts to switch off, force on, or bias, for one model.

    Attributes:
        edits: sorted, one per ``(layer, expert)``.
        model_name: name of the model it was made for (``None``: not bound to a model).
        n_layers: that model's number of decoder layers (``None``: unknown).
        n_experts: that model's routed experts per MoE layer (``None``: unknown).

    Raises:
        ValueError: an ``(layer, expert)`` given twice, or out of the recorded ranges.

    Example:
        >>> mask = ExpertMask.off([(3, 17), (5, 2)])
        >>> [(e.layer, e.expert, e.mode) for e in mask.edits]
        [(3, 17, 'off'), (5, 2, 'off')]
    """

    edits: tuple[ExpertEdit, ...] = ()
    model_name: str | None = None
    n_layers: int | None = None
    n_experts: int | None = None

    def __post_init__(self) -> None:
        edits = tuple(sorted(e if isinstance(e, ExpertEdit) else ExpertEdit(*e) for e in self.edits))
        seen = set()
        for edit in edits:
            key = (edit.layer, edit.expert)
            if key in seen:
                raise ValueError(f"ExpertMask: layer {edit.layer} expert {edit.expert} appears twice; give each once.")
            seen.add(key)
            if self.n_layers is not None and edit.layer >= self.n_layers:
                raise ValueError(
                    f"ExpertMask: layer {edit.layer} out of range; model has {self.n_layers} layers "
                    f"(0..{self.n_layers - 1})."
                )
            if self.n_experts is not None and edit.expert >= self.n_experts:
                raise ValueError(
                    f"ExpertMask: layer {edit.layer} expert {edit.expert} out of range; model has "
                    f"{self.n_experts} experts per layer (0..{self.n_experts - 1})."
                )
        object.__setattr__(self, "edits", edits)

    # constructors -------------------------------------------------------------------------

    @classmethod
    def _make(cls, edits: list[ExpertEdit], model, meta: Mapping[str, Any] | None) -> "ExpertMask":
        """Bind to ``model`` if given (its name and sizes win), else to ``meta`` where known."""
        meta = {k: v for k, v in (meta or {}).items() if v is not None}
        if model is None:
            return cls(tuple(edits), **meta)
        info = model_meta(model)
        if "model_name" in meta and not same_model(str(meta["model_name"]), info.get("model_name")):
            raise ValueError(
                f"ExpertMask: the attribution was computed on model {meta['model_name']!r} but model= is "
                f"{info.get('model_name')!r}; its top experts are another model's. Attribute on this model, "
                "or pass the model the attribution came from."
            )
        for key in ("n_layers", "n_experts"):
            if key in meta and int(meta[key]) != info[key]:
                raise ValueError(
                    f"ExpertMask: the attribution has {key}={meta[key]} but the model has {key}={info[key]}; "
                    "it was computed on another model."
                )
        return cls(tuple(edits), **info)

    @classmethod
    def off(cls, experts, *, model=None) -> "ExpertMask":
        """Switch experts off: ``experts`` is ``[(layer, expert), ...]`` or ``{layer: [experts]}``.

        Args:
            experts: which routed experts.
            model: optional model to bind to (records name, n_layers, n_experts; checks ranges).
        """
        return cls._make([ExpertEdit(layer, expert, "off") for layer, expert in _pairs(experts)], model, None)

    @classmethod
    def on(cls, experts, *, model=None) -> "ExpertMask":
        """Force experts on (always selected, natural weight); same arguments as :meth:`off`."""
        return cls._make([ExpertEdit(layer, expert, "on") for layer, expert in _pairs(experts)], model, None)

    @classmethod
    def bias(cls, experts, value: float | None = None, *, model=None) -> "ExpertMask":
        """Bias experts' selection: ``{(layer, expert): bias}``, or pairs plus one ``value``.

        Raises:
            ValueError: pairs without ``value``, or a non-finite bias.
        """
        if isinstance(experts, Mapping) and all(isinstance(k, tuple) for k in experts):
            items = [(layer, expert, b) for (layer, expert), b in experts.items()]
        else:
            if value is None:
                raise ValueError(
                    "ExpertMask.bias: give {(layer, expert): bias, ...} or (layer, expert) pairs and value=..."
                )
            items = [(layer, expert, value) for layer, expert in _pairs(experts)]
        return cls._make([ExpertEdit(layer, expert, "bias", b) for layer, expert, b in items], model, None)

    @classmethod
    def from_attribution(cls, attribution, n: int, mode: Mode = "off", value: float | None = None, *, model=None) -> "ExpertMask":
        """Mask the ``n`` top experts of an attribution result (anything with ``.top(n)``).

        ``attribution.top(n)`` must return ``[(layer, expert), ...]`` (longer tuples are cut to
        their first two items); ``model_name`` / ``n_layers`` / ``n_experts`` attributes of the
        attribution, where present, are recorded.

        Raises:
            ValueError: unknown mode, ``n < 1``, or an object without ``.top``; with ``model=``, an
                attribution whose ``model_name`` / ``n_layers`` / ``n_experts`` is another model's.
        """
        if mode not in MODES:
            raise ValueError(f"ExpertMask.from_attribution: unknown mode {mode!r}; allowed modes: {', '.join(MODES)}.")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"ExpertMask.from_attribution: n must be an int ≥ 1, got {n!r}.")
        if not callable(getattr(attribution, "top", None)):
            raise ValueError(
                f"ExpertMask.from_attribution: {type(attribution).__name__} has no .top(n) method returning "
                "[(layer, expert), ...]."
            )
        pairs = [(int(item[0]), int(item[1])) for item in attribution.top(n)]
        if mode == "bias" and value is None:
            raise ValueError("ExpertMask.from_attribution: mode='bias' needs value=...")
        edits = [ExpertEdit(layer, expert, mode, value if mode == "bias" else 0.0) for layer, expert in pairs]
        meta = {key: getattr(attribution, key, None) for key in ("model_name", "n_layers", "n_experts")}
        return cls._make(edits, model, meta)

    @classmethod
    def random(
        cls,
        model_or_shape,
        n: int | None = None,
        seed: int = 0,
        *,
        exclude: Iterable[tuple[int, int]] = (),
        match_layers_of: "ExpertMask | None" = None,
        mode: Mode = "off",
        value: float | None = None,
    ) -> "ExpertMask":
        """A random control mask (MoTE §4: random deactivation as the baseline).

        Args:
            model_or_shape: a model (its MoE layers and expert count; at most ``n_experts -
                top_k`` experts per layer are switched off), or ``(n_layers, n_experts)``
                (every layer a candidate).
            n: number of experts; with ``match_layers_of`` it may be omitted (= that mask's size).
            seed: seeds the draw (same seed → same mask).
            exclude: ``(layer, expert)`` pairs never drawn. With ``match_layers_of``, that mask's
                experts are excluded as well.
            match_layers_of: draw exactly as many experts in each layer as this mask has.
            mode, value: as in :meth:`from_attribution`.

        Raises:
            ValueError: bad shape, ``n`` not matching ``match_layers_of``, or more experts asked
                for than the layers can give.
        """
        if mode not in MODES:
            raise ValueError(f"ExpertMask.random: unknown mode {mode!r}; allowed modes: {', '.join(MODES)}.")
        if mode == "bias" and value is None:
            raise ValueError("ExpertMask.random: mode='bias' needs value=...")
        layers, n_experts, cap, meta = _random_candidates(model_or_shape, mode)
        excluded = set(map(tuple, exclude))
        if match_layers_of is not None:
            per_layer = _layer_quota(match_layers_of, n, layers, excluded)
        else:
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"ExpertMask.random: n must be an int ≥ 1, got {n!r}.")
            per_layer = None
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"ExpertMask.random: seed must be an int, got {type(seed).__name__}: {seed!r:.40}.")
        rng = random.Random(seed)
        if per_layer is not None:
            chosen = _draw_per_layer(rng, per_layer, n_experts, excluded)
        else:
            chosen = _draw_capped(rng, n, layers, n_experts, cap, excluded)
        edits = [ExpertEdit(l, e, mode, value if mode == "bias" else 0.0) for l, e in chosen]
        return cls(tuple(edits), **meta)

    # views -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.edits)

    @property
    def layers(self) -> tuple[int, ...]:
        """Layers the mask touches, ascending."""
        return tuple(sorted({edit.layer for edit in self.edits}))

    def experts(self, mode: Mode | None = None) -> list[tuple[int, int]]:
        """``[(layer, expert), ...]`` of all edits, or of one mode."""
        return [(e.layer, e.expert) for e in self.edits if mode is None or e.mode == mode]

    def for_model(self, model) -> "ExpertMask":
        """The same edits bound to ``model`` (records its name and sizes; checks ranges)."""
        return ExpertMask(self.edits, **model_meta(model))

    # serialisation -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with ``kind`` / ``version``; inverse of :meth:`from_dict`."""
        return {
            "kind": MASK_KIND,
            "version": MASK_VERSION,
            "model_name": self.model_name,
            "n_layers": self.n_layers,
            "n_experts": self.n_experts,
            "edits": [
                {"layer": e.layer, "expert": e.expert, "mode": e.mode, **({"value": e.value} if e.mode == "bias" else {})}
                for e in self.edits
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ExpertMask":
        """Rebuild from :meth:`to_dict` output.

        Raises:
            ValueError: not a dict, no or a wrong ``kind``, a newer ``version``, or invalid edits
                (an edit lacking ``layer`` / ``expert`` is named with the missing key).
        """
        return cls._from_checked(data, caller="ExpertMask.from_dict", source="the dict")

    @classmethod
    def _from_checked(cls, data: Any, *, caller: str, source: str) -> "ExpertMask":
        storage.check_kind(data, MASK_KIND, MASK_VERSION, caller=caller, source=source)
        raw_edits = data.get("edits", [])
        if not isinstance(raw_edits, (list, tuple)):
            raise ValueError(
                f"{caller}: {source}: 'edits' is a {type(raw_edits).__name__}, expected a list of "
                '{"layer": ..., "expert": ..., "mode": ...} objects.'
            )
        edits = []
        for number, edit in enumerate(raw_edits):
            if not isinstance(edit, Mapping):
                raise ValueError(
                    f"{caller}: {source}: edit {number} is {edit!r}, expected an object with keys "
                    "'layer', 'expert' and optionally 'mode', 'value'."
                )
            missing = [key for key in ("layer", "expert") if key not in edit]
            if missing:
                raise ValueError(
                    f"{caller}: {source}: edit {number} ({dict(edit)!r}) lacks {', '.join(map(repr, missing))}; "
                    "every edit needs 'layer' and 'expert' (and optionally 'mode', 'value')."
                )
            edits.append(ExpertEdit(edit["layer"], edit["expert"], edit.get("mode", "off"), edit.get("value", 0.0)))
        return cls(tuple(edits), data.get("model_name"), data.get("n_layers"), data.get("n_experts"))

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``<stem>.json`` (:meth:`to_dict`; a mask has no tensors); return that path.

        Args:
            path: the stem or the ``.json`` path (``refusal_top2``, ``refusal_top2.json``).

        Layout: :mod:`labkit.storage`; the file is plain, hand-editable JSON.
        """
        metadata = {k: v for k, v in self.to_dict().items() if k not in ("kind", "version")}
        return storage.save(path, kind=MASK_KIND, version=MASK_VERSION, metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ExpertMask":
        """Read a mask written by :meth:`save` (or by hand, in the same JSON shape).

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: the file is not JSON (e.g. a safetensors file), is another kind of
                labkit object (the message names the kind found), or has invalid edits.
        """
        data, _ = storage.load(path, kind=MASK_KIND, version=MASK_VERSION, caller="ExpertMask.load", writer="ExpertMask.save")
        return cls._from_checked(data, caller="ExpertMask.load", source=repr(str(storage.file_pair(path)[0])))


# random control masks ------------------------------------------------------------------------


def _random_candidates(model_or_shape, mode: str) -> tuple[list[int], int, int, dict[str, Any]]:
    """``(layers, n_experts, cap per layer, meta)`` a random mask draws from.

    A model: its MoE layers, and at most ``n_experts - top_k`` experts per layer off (``top_k``
    on); a shape ``(n_layers, n_experts)``: every layer, no cap below ``n_experts``.
    """
    if _is_model(model_or_shape):
        routers = find_routers(model_or_shape)
        n_experts = routers[0].n_experts
        cap = n_experts - routers[0].top_k if mode == "off" else (routers[0].top_k if mode == "on" else n_experts)
        return [r.layer for r in routers], n_experts, cap, model_meta(model_or_shape)
    if (
        isinstance(model_or_shape, (tuple, list))
        and len(model_or_shape) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in model_or_shape)
    ):
        n_layers, n_experts = model_or_shape
        return list(range(n_layers)), n_experts, n_experts, {"n_layers": n_layers, "n_experts": n_experts}
    raise ValueError(
        f"ExpertMask.random: model_or_shape must be a model or (n_layers, n_experts), got {model_or_shape!r}."
    )


def _layer_quota(match: ExpertMask, n: int | None, layers: list[int], excluded: set) -> dict[int, int]:
    """Experts per layer of ``match`` (whose experts join ``excluded``), checked against ``n`` and ``layers``."""
    per_layer: dict[int, int] = {}
    for edit in match.edits:
        per_layer[edit.layer] = per_layer.get(edit.layer, 0) + 1
        excluded.add((edit.layer, edit.expert))
    if n is not None and n != len(match):
        raise ValueError(
            f"ExpertMask.random: n={n} but match_layers_of has {len(match)} experts; "
            "omit n or make them equal."
        )
    bad = sorted(set(per_layer) - set(layers))
    if bad:
        raise ValueError(f"ExpertMask.random: match_layers_of uses layers {bad}, not among {layers}.")
    return per_layer


def _draw_per_layer(rng: random.Random, per_layer: dict[int, int], n_experts: int, excluded: set) -> list[tuple[int, int]]:
    """Exactly ``per_layer[layer]`` experts in each layer, none excluded."""
    chosen: list[tuple[int, int]] = []
    for layer, count in sorted(per_layer.items()):
        pool = [e for e in range(n_experts) if (layer, e) not in excluded]
        if count > len(pool):
            raise ValueError(
                f"ExpertMask.random: layer {layer} needs {count} experts but only {len(pool)} are not excluded."
            )
        chosen += [(layer, e) for e in rng.sample(pool, count)]
    return chosen


def _draw_capped(rng: random.Random, n: int, layers: list[int], n_experts: int, cap: int, excluded: set) -> list[tuple[int, int]]:
    """``n`` experts drawn over all layers, at most ``cap`` per layer, none excluded."""
    pool = [(l, e) for l in layers for e in range(n_experts) if (l, e) not in excluded]
    rng.shuffle(pool)
    chosen: list[tuple[int, int]] = []
    counts: dict[int, int] = {}
    for layer, expert in pool:
        if len(chosen) == n:
            break
        if counts.get(layer, 0) < cap:
            counts[layer] = counts.get(layer, 0) + 1
            chosen.append((layer, expert))
    if len(chosen) < n:
        raise ValueError(
            f"ExpertMask.random: asked for {n} experts but only {len(chosen)} can be drawn "
            f"({len(layers)} layers × at most {cap} per layer, minus exclusions)."
        )
    return chosen
