"""The result every expert-selection rule returns: :class:`ExpertSelection`, and rule agreement.

Plain data (a score per ``(layer, expert)`` cell, the rule's filter of eligible cells, the source
equation), saved as ``<stem>.json`` + ``<stem>.safetensors``; :func:`rule_agreement` compares
several rules' scores. The rules themselves are :mod:`labkit.moe.selection.trace_rules` and
:mod:`labkit.moe.selection.model_rules`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from labkit import storage
from labkit.checks import check_int

__all__ = ["KIND", "RULES", "VERSION", "BaseRule", "ExpertSelection", "nan_as_lowest", "rule_agreement", "selection_from_scores"]

KIND = "labkit.ExpertSelection"
VERSION = 1
RULES = ("frequency_difference", "risk_difference", "npmi", "stability_selection", "ablation_effect", "first_order_effect")
BaseRule = Literal["frequency_difference", "risk_difference", "npmi"]


@dataclass(frozen=True)
class ExpertSelection:
    """One rule's score for every routed expert, and which experts its filter keeps.

    Attributes:
        rule: the rule's name (one of :data:`RULES`, or your own).
        score: ``Float[Tensor, "layer expert"]``; higher means more tied to the behaviour.
        eligible: ``Bool[Tensor, "layer expert"]``; the cells the rule's own filter keeps
            (e.g. a positive difference, a selection probability above the threshold).
        tiebreak: ``Float[Tensor, "layer expert"]``; second sort key (stability selection: the
            base rule's full-data score), zeros where the rule has none.
        layers: true model layer of each row.
        n_experts, top_k: routing shape of the model.
        model_name: the model the scores come from.
        filter: the eligibility rule in words.
        source: the paper, section and equation the score implements.
        settings: the rule's settings (JSON-able), for the record.
    """

    rule: str
    score: Float[Tensor, "layer expert"]
    eligible: Bool[Tensor, "layer expert"]
    layers: tuple[int, ...]
    n_experts: int
    top_k: int
    model_name: str
    filter: str
    source: str
    tiebreak: Float[Tensor, "layer expert"] | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shape = (len(self.layers), self.n_experts)
        if self.tiebreak is None:
            object.__setattr__(self, "tiebreak", torch.zeros(shape, dtype=torch.float64))
        for name in ("score", "eligible", "tiebreak"):
            value = getattr(self, name)
            if not isinstance(value, Tensor) or tuple(value.shape) != shape:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"ExpertSelection({self.rule!r}).{name} must have shape (layer, expert) = {shape}, got {got}.")
        object.__setattr__(self, "eligible", self.eligible.bool())
        object.__setattr__(self, "layers", tuple(int(layer) for layer in self.layers))

    @property
    def n_eligible(self) -> int:
        """How many cells the rule's filter keeps."""
        return int(self.eligible.sum())

    def ranked(self) -> list[tuple[int, int]]:
        """Every eligible cell as ``(layer, expert)``, best first (score, then tiebreak, then layer, expert)."""
        score, tiebreak = self.score.flatten().tolist(), self.tiebreak.flatten().tolist()
        eligible = self.eligible.flatten().tolist()
        order = sorted(
            (i for i in range(len(score)) if eligible[i]),
            key=lambda i: (-nan_as_lowest(score[i]), -nan_as_lowest(tiebreak[i]), i),
        )
        return [(self.layers[i // self.n_experts], i % self.n_experts) for i in order]

    def top(self, n: int, per_layer_cap: int | None = None) -> list[tuple[int, int]]:
        """The ``n`` best eligible experts as ``[(layer, expert), ...]``, true layer numbers.

        Args:
            n: how many (≥ 1).
            per_layer_cap: at most this many from one layer (forcing on: ``top_k``; switching
                off: ``n_experts - top_k``, so every token keeps ``top_k`` choices).

        Raises:
            ValueError: ``n < 1``, a cap < 1, or fewer than ``n`` eligible experts under the cap
                (the message names the rule's filter and how many it keeps).
        """
        check_int(n, "n", caller=f"ExpertSelection({self.rule!r}).top", minimum=1)
        if per_layer_cap is not None:
            check_int(per_layer_cap, "per_layer_cap", caller=f"ExpertSelection({self.rule!r}).top", minimum=1)
        chosen: list[tuple[int, int]] = []
        per_layer: dict[int, int] = {}
        for layer, expert in self.ranked():
            if len(chosen) == n:
                break
            if per_layer_cap is not None and per_layer.get(layer, 0) >= per_layer_cap:
                continue
            per_layer[layer] = per_layer.get(layer, 0) + 1
            chosen.append((layer, expert))
        if len(chosen) < n:
            cap = "" if per_layer_cap is None else f"; under the cap of {per_layer_cap} per layer only {len(chosen)} can be chosen"
            raise ValueError(
                f"ExpertSelection({self.rule!r}).top: asked for n={n} experts but the rule's filter "
                f"({self.filter}) keeps {self.n_eligible} of {self.score.numel()}{cap}. Ask for fewer, or relax the "
                "rule's filter."
            )
        return chosen

    def to_frame(self):
        """One row per cell (``layer, expert, score, tiebreak, eligible, rank``), best first."""
        import pandas as pd

        ranked = {cell: rank for rank, cell in enumerate(self.ranked(), start=1)}
        rows = [
            {
                "layer": layer, "expert": expert, "score": float(self.score[r, expert]),
                "tiebreak": float(self.tiebreak[r, expert]), "eligible": bool(self.eligible[r, expert]),
                "rank": ranked.get((layer, expert), math.nan),
            }
            for r, layer in enumerate(self.layers)
            for expert in range(self.n_experts)
        ]
        frame = pd.DataFrame(rows)
        return frame.sort_values(["rank", "layer", "expert"], na_position="last").reset_index(drop=True)

    def __repr__(self) -> str:
        best = self.ranked()[:3]
        return (
            f"ExpertSelection({self.rule}, {len(self.layers)} layers x {self.n_experts} experts, "
            f"{self.n_eligible} eligible ({self.filter}), top {best})"
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``<stem>.json`` + ``<stem>.safetensors`` (:mod:`labkit.storage`); return the JSON path."""
        tensors = {"score": self.score.double(), "eligible": self.eligible.to(torch.uint8), "tiebreak": self.tiebreak.double()}
        metadata = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in tensors}
        metadata["layers"] = list(self.layers)
        return storage.save(path, kind=KIND, version=VERSION, metadata=metadata, tensors=tensors)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ExpertSelection":
        """Read what :meth:`save` wrote (the stem or either file).

        Raises:
            FileNotFoundError / ValueError: as :func:`labkit.storage.load`.
        """
        metadata, tensors = storage.load(path, kind=KIND, version=VERSION, caller="ExpertSelection.load", writer="ExpertSelection.save")
        names = ["rule", "layers", "n_experts", "top_k", "model_name", "filter", "source"]
        storage.require_keys(metadata, names, caller="ExpertSelection.load", source=repr(str(path)))
        values = {name: metadata[name] for name in names}
        values["layers"] = tuple(values["layers"])
        return cls(
            score=tensors["score"], eligible=tensors["eligible"].bool(), tiebreak=tensors["tiebreak"],
            settings=dict(metadata.get("settings", {})), **values,
        )


def nan_as_lowest(value: float) -> float:
    """``value``, with NaN as minus infinity (ranks last in a descending sort)."""
    return -math.inf if math.isnan(value) else value



def selection_from_scores(rule, score, eligible, trace, *, filter, source, tiebreak=None, settings=None) -> ExpertSelection:
    """An :class:`ExpertSelection` of a trace rule from numpy ``[layer, expert]`` arrays, shaped by ``trace``."""
    def as_tensor(array):
        return torch.as_tensor(np.asarray(array, dtype=np.float64))

    return ExpertSelection(
        rule=rule, score=as_tensor(score), eligible=torch.as_tensor(np.asarray(eligible, dtype=bool)),
        layers=tuple(trace.layers), n_experts=int(trace.n_experts), top_k=int(trace.top_k),
        model_name=str(trace.model_name), filter=filter, source=source,
        tiebreak=None if tiebreak is None else as_tensor(tiebreak), settings=dict(settings or {}),
    )


# --- agreement -------------------------------------------------------------------------------------


def rule_agreement(selections):
    """Spearman rank correlation between every two rules' scores over all ``layer x expert`` cells.

    Args:
        selections: ``{name: ExpertSelection}`` (or a list, named by ``rule``), all of one model.

    Returns:
        A square ``pandas.DataFrame`` of ρ (``scipy.stats.spearmanr``), rows and columns named
        by rule; NaN where a rule's scores are constant.

    Raises:
        ValueError: fewer than two selections, or selections of different models / shapes.
    """
    import pandas as pd
    from scipy.stats import spearmanr

    items = dict(selections) if isinstance(selections, dict) else {s.rule: s for s in selections}
    if len(items) < 2:
        raise ValueError(f"rule_agreement: needs at least two selections, got {len(items)}.")
    first = next(iter(items.values()))
    for name, selection in items.items():
        if (selection.model_name, selection.layers, selection.n_experts) != (first.model_name, first.layers, first.n_experts):
            raise ValueError(
                f"rule_agreement: {name!r} scores model {selection.model_name!r} layers {selection.layers} x "
                f"{selection.n_experts} experts, but {first.rule!r} scores {first.model_name!r} {first.layers} x "
                f"{first.n_experts}; compare selections of one model."
            )
    names = list(items)
    matrix = np.eye(len(names))
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            x, y = items[a].score.flatten().numpy(), items[names[j]].score.flatten().numpy()
            rho = np.nan if np.ptp(x) == 0 or np.ptp(y) == 0 else float(spearmanr(x, y).statistic)
            matrix[i, j] = matrix[j, i] = rho
    return pd.DataFrame(matrix, index=names, columns=names)
