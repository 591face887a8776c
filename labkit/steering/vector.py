"""The steering vector type: plain frozen data (a TransformerLens hook point, a tensor, a coefficient).

A :class:`SteeringVector` says where (``hook_name``), what (``activations`` × ``coefficient``) and
on which tokens (``positions``: ActAdd's ``"front"``, or ``"all" | "prompt" | "generated"``) to add
a direction — or, with ``operation="ablate"``, to project one out. Saved as ``<stem>.json`` +
``<stem>.safetensors`` (``kind`` + ``version``), never pickle. Every backend applies it
(:func:`labkit.steering.steered`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from labkit import storage
from labkit.backends import backend_of
from labkit.checks import check_coefficient, layer_of
from labkit.interventions import POSITIONS

__all__ = ["KIND", "OPERATIONS", "POSITIONS", "SteeringVector", "VERSION", "flatten_vectors"]

Positions = Literal["front", "all", "prompt", "generated"]
Operation = Literal["add", "ablate"]
OPERATIONS: tuple[str, ...] = ("add", "ablate")
KIND = "labkit.SteeringVector"
VERSION = 1


# --------------------------------------------------------------------------------------------
# The data type
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SteeringVector:
    """A steering vector: what to add, where, and how strongly. Plain data; never mutated.

    The tensor added to the residual stream is ``coefficient * activations`` (see
    :attr:`steering_vector`); a coefficient sweep is ``vector.with_coefficient(c)``.

    Attributes:
        hook_name: TransformerLens hook point, e.g. ``"blocks.6.hook_resid_pre"``.
        activations: ``Float[Tensor, "pos d_model"]`` for ActAdd (added to the first ``pos``
            tokens of the prompt, ``positions="front"``) or ``Float[Tensor, "d_model"]`` for a
            single direction (``positions`` ``"all"``, ``"prompt"`` or ``"generated"``).
        coefficient: finite multiplier (0 = no effect).
        positions: ``"front"`` | ``"all"`` | ``"prompt"`` | ``"generated"``.
        model_name: the model the vector was made on (``""`` = unchecked); applying it to a
            model of another name or width raises.
        source: JSON-able provenance, e.g. ``{"method": "actadd", "plus": ..., "minus": ...}``.
        operation: ``"add"`` (default: ``x + coefficient * activations``) or ``"ablate"``
            (directional ablation, Arditi et al. 2024 §2.4: ``x - coefficient * (x·r̂) r̂`` with
            ``r̂ = activations / ‖activations‖``; coefficient 1 projects the direction out fully).
            :func:`directional_ablation` builds one per residual hook point of every layer.

    Raises:
        ValueError: activations of the wrong rank, empty, or holding NaN/inf; an unknown
            ``positions``; a ``pos × d_model`` vector with positions other than ``"front"`` (or
            the reverse); a non-finite coefficient; an unknown ``operation``, or ``"ablate"`` with
            a ``pos × d_model`` or all-zero tensor.
    """

    hook_name: str
    activations: Float[Tensor, "pos d_model"] | Float[Tensor, " d_model"]
    coefficient: float = 1.0
    positions: Positions = "all"
    model_name: str = ""
    source: Mapping[str, Any] = field(default_factory=dict)
    operation: Operation = "add"

    def __post_init__(self) -> None:
        if not isinstance(self.hook_name, str) or not self.hook_name:
            raise TypeError(
                f"SteeringVector: hook_name must be a TransformerLens hook name such as "
                f"'blocks.6.hook_resid_pre', got {self.hook_name!r}."
            )
        acts = self.activations
        if not isinstance(acts, Tensor):
            raise TypeError(
                f"SteeringVector: activations must be a torch.Tensor, got {type(acts).__name__}."
            )
        if acts.ndim not in (1, 2) or acts.numel() == 0 or not acts.is_floating_point():
            raise ValueError(
                f"SteeringVector: activations must be a non-empty float tensor of shape "
                f"(pos, d_model) or (d_model,), got dtype {acts.dtype} shape {tuple(acts.shape)}."
            )
        bad = (~torch.isfinite(acts)).sum().item()
        if bad:
            raise ValueError(
                f"SteeringVector: activations hold {bad} NaN/inf value(s) (shape "
                f"{tuple(acts.shape)}); every entry must be finite. Recompute the vector, e.g. "
                "check the prompts ran without overflow."
            )
        object.__setattr__(self, "coefficient", check_coefficient(self.coefficient, "SteeringVector"))
        if self.positions not in POSITIONS:
            raise ValueError(
                f"SteeringVector: positions={self.positions!r} is not allowed; use one of "
                f"{', '.join(map(repr, POSITIONS))}."
            )
        if acts.ndim == 2 and self.positions != "front":
            raise ValueError(
                f"SteeringVector: a (pos, d_model) = {tuple(acts.shape)} vector is ActAdd-style and "
                f"is added to the front positions; positions must be 'front', got "
                f"{self.positions!r}. For a single direction pass a (d_model,) tensor."
            )
        if acts.ndim == 1 and self.positions == "front":
            raise ValueError(
                f"SteeringVector: positions='front' needs a (pos, d_model) tensor, got shape "
                f"{tuple(acts.shape)}; use positions 'all', 'prompt' or 'generated' for a direction."
            )
        if self.operation not in OPERATIONS:
            raise ValueError(
                f"SteeringVector: operation={self.operation!r} is not allowed; use 'add' (add "
                "coefficient * activations) or 'ablate' (project the direction out)."
            )
        if self.operation == "ablate" and acts.ndim != 1:
            raise ValueError(
                f"SteeringVector: operation='ablate' projects out one direction and needs a "
                f"(d_model,) tensor, got shape {tuple(acts.shape)}."
            )
        if self.operation == "ablate" and not bool(acts.abs().sum() > 0):
            raise ValueError("SteeringVector: operation='ablate' needs a non-zero direction, got all zeros.")
        object.__setattr__(self, "activations", acts.detach().clone())
        object.__setattr__(self, "source", dict(self.source))

    # -- derived -------------------------------------------------------------------------------

    @property
    def d_model(self) -> int:
        """Width of the residual stream the vector was made for."""
        return int(self.activations.shape[-1])

    @property
    def n_positions(self) -> int | None:
        """Number of front positions (ActAdd), or ``None`` for a direction."""
        return int(self.activations.shape[0]) if self.activations.ndim == 2 else None

    @property
    def layer(self) -> int | None:
        """Block index parsed from :attr:`hook_name` (``None`` for non-block hook points)."""
        return layer_of(self.hook_name)

    @property
    def steering_vector(self) -> Float[Tensor, "..."]:
        """What is added: ``coefficient * activations``."""
        return self.coefficient * self.activations

    def with_coefficient(self, coefficient: float) -> "SteeringVector":
        """A copy with another coefficient (the original is unchanged)."""
        return replace(self, coefficient=coefficient)

    def with_positions(self, positions: Positions) -> "SteeringVector":
        """A copy applied at other positions (directions only: all / prompt / generated)."""
        return replace(self, positions=positions)

    # -- serialisation -------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """JSON-able description of everything but the tensor."""
        return {
            "kind": KIND,
            "version": VERSION,
            "hook_name": self.hook_name,
            "layer": self.layer,
            "coefficient": self.coefficient,
            "positions": self.positions,
            "model_name": self.model_name,
            "d_model": self.d_model,
            "shape": list(self.activations.shape),
            "source": self.source,
            "operation": self.operation,
        }

    def to_dict(self) -> dict[str, Any]:
        """:meth:`metadata` plus ``"activations"`` (the tensor)."""
        return {**self.metadata(), "activations": self.activations}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SteeringVector":
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: the dict is not a labkit steering vector, is of a newer version, or lacks
                a field (named).
        """
        storage.check_kind(data, KIND, VERSION, caller="SteeringVector.from_dict", source="the dict")
        storage.require_keys(
            data, ("hook_name", "activations", "coefficient", "positions"), caller="SteeringVector.from_dict", source="the dict"
        )
        return cls(
            hook_name=data["hook_name"],
            activations=torch.as_tensor(data["activations"]),
            coefficient=data["coefficient"],
            positions=data["positions"],
            model_name=data.get("model_name", ""),
            source=data.get("source", {}),
            operation=data.get("operation", "add"),
        )

    def save(self, path: str | Path) -> Path:
        """Write ``<stem>.json`` (metadata) and ``<stem>.safetensors`` (the tensor); no pickle.

        Args:
            path: the stem, or either file's path (``wedding_L6``, ``wedding_L6.json``, ...).

        Returns:
            The ``.json`` path (what :meth:`load` takes). Layout: :mod:`labkit.storage`.
        """
        return storage.save(
            path, kind=KIND, version=VERSION, metadata=self.metadata(), tensors={"activations": self.activations}
        )

    @classmethod
    def load(cls, path: str | Path) -> "SteeringVector":
        """Read a vector written by :meth:`save` (the stem or either file's path).

        Raises:
            FileNotFoundError: no saved vector there, or half of the pair is missing.
            ValueError: the files hold another kind of labkit object (named) or are damaged.
        """
        metadata, tensors = storage.load(
            path, kind=KIND, version=VERSION, caller="SteeringVector.load", writer="SteeringVector.save"
        )
        return cls.from_dict({**metadata, **tensors})

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.activations.shape))
        return (
            f"SteeringVector({self.hook_name!r}, [{shape}], coefficient={self.coefficient:g}, "
            f"positions={self.positions!r}, model={self.model_name!r}"
            + (f", operation={self.operation!r})" if self.operation != "add" else ")")
        )

    # -- checks against a model ----------------------------------------------------------------

    def check_compatible(self, model) -> None:
        """Raise unless this vector can be applied to ``model`` (any backend).

        Raises:
            ValueError: another model name, another width, a layer out of range, or a hook
                point the backend cannot steer at.
        """
        backend_of(model).check_vector(self)


def flatten_vectors(vectors: Iterable[Any], where: str = "steered", *, interventions: bool = False) -> list[Any]:
    """Vectors from nested lists (``None`` dropped).

    Objects marked ``labkit_intervention`` (e.g. :class:`labkit.sae.FeatureClamp`, which runs inside
    the forward pass) are kept only where ``interventions`` is true (``steered`` / ``generate``'s
    shared ``steering=``); elsewhere (per-row sweeps) they are refused with their own
    ``refusal(where)`` message.

    Raises:
        TypeError: an item that is neither a vector, a list of them, ``None`` nor an intervention.
        ValueError: an intervention where only vectors apply.
    """
    flat: list[Any] = []
    for item in vectors:
        if item is None:
            continue
        if isinstance(item, SteeringVector):
            flat.append(item)
        elif isinstance(item, (list, tuple)):
            flat.extend(flatten_vectors(item, where, interventions=interventions))
        elif getattr(item, "labkit_intervention", False):
            if not interventions:
                raise ValueError(item.refusal(where))
            flat.append(item)
        else:
            raise TypeError(
                f"{where}: expected SteeringVector objects, got {type(item).__name__} {item!r}. "
                "Build vectors with labkit.actadd(...) or labkit.mean_difference(...)."
            )
    return flat
