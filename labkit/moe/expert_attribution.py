"""The result of an expert attribution: scores, counts, rates, tests and intervals per (layer, expert).

:class:`ExpertAttribution` is plain data (a frozen dataclass of ``[layer, expert]`` tensors and
the settings that made them), saved as ``<stem>.json`` + ``<stem>.safetensors``
(:mod:`labkit.storage`). :func:`labkit.moe.attribution.attribute_experts` computes it;
:mod:`labkit.moe.attribution` re-exports it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from labkit import storage

__all__ = ["AGGREGATES", "KIND", "METRICS", "TESTS", "VERSION", "Aggregate", "ExpertAttribution", "Metric", "Test"]

Metric = Literal["frequency", "weight", "log_odds"]
Aggregate = Literal["token", "prompt"]
Test = Literal["auto", "fisher", "z", "welch"]

METRICS = ("frequency", "weight", "log_odds")
AGGREGATES = ("token", "prompt")
TESTS = ("auto", "fisher", "z", "welch")
KIND = "labkit.ExpertAttribution"
VERSION = 1

_TENSOR_FIELDS = (
    "score",
    "behavior_counts",
    "control_counts",
    "behavior_rate",
    "control_rate",
    "p_value",
    "q_value",
    "ci_low",
    "ci_high",
)


@dataclass(frozen=True)
class ExpertAttribution:
    """How much more each routed expert serves the behaviour prompts than the control prompts.

    Rows are the traced layers in order (``layers[i]`` is the true model layer of row ``i``);
    columns are experts ``0..n_experts-1``. Positive scores mean "more for the behaviour".

    Attributes:
        score: the attribution score per cell (see ``metric``).
        behavior_counts: number of behaviour tokens whose top-k held the expert.
        control_counts: the same for the control tokens.
        behavior_rate: aggregated selection rate (``metric="weight"``: mean routing weight) on
            the behaviour set, after the chosen aggregation.
        control_rate: the same for the control set.
        p_value: two-sided p-value of the per-cell test (``test``).
        q_value: Benjamini-Hochberg adjusted p-value over all ``layer x expert`` cells.
        ci_low: lower bound of the bootstrap percentile interval of ``score`` (prompts
            resampled within each set), level ``1 - alpha``.
        ci_high: upper bound of that interval.
        noise_floor: the ``1 - alpha`` quantile over random control-vs-control splits of the
            largest |score| across all cells; a score below it is indistinguishable from noise.
        behavior_tokens, control_tokens: tokens counted per set.
        behavior_prompts, control_prompts: prompts per set.
        metric, aggregate, test: how the scores and p-values were computed.
        alpha: the level used for q-values, intervals and the noise floor.
        n_bootstrap: bootstrap resamples (0: no intervals, ``ci_*`` are NaN).
        seed: seed of the bootstrap and the split-half draws.
        layers: true model layer numbers of the rows.
        n_experts, top_k: routing shape of the model.
        model_name: the model both traces came from.
        last_tokens: if set, only the last this many tokens of every prompt were counted.
    """

    score: Float[Tensor, "layer expert"]
    behavior_counts: Int[Tensor, "layer expert"]
    control_counts: Int[Tensor, "layer expert"]
    behavior_rate: Float[Tensor, "layer expert"]
    control_rate: Float[Tensor, "layer expert"]
    p_value: Float[Tensor, "layer expert"]
    q_value: Float[Tensor, "layer expert"]
    ci_low: Float[Tensor, "layer expert"]
    ci_high: Float[Tensor, "layer expert"]
    noise_floor: float
    behavior_tokens: int
    control_tokens: int
    behavior_prompts: int
    control_prompts: int
    metric: str
    aggregate: str
    test: str
    alpha: float
    n_bootstrap: int
    seed: int
    layers: tuple[int, ...]
    n_experts: int
    top_k: int
    model_name: str
    last_tokens: int | None = None

    def __post_init__(self) -> None:
        shape = (len(self.layers), self.n_experts)
        for name in _TENSOR_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, Tensor) or tuple(value.shape) != shape:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"ExpertAttribution.{name} must be a tensor of shape (layer, expert) = {shape}, "
                    f"got {got}."
                )
        if self.metric not in METRICS:
            raise ValueError(f"ExpertAttribution.metric {self.metric!r} not in {METRICS}.")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"ExpertAttribution.aggregate {self.aggregate!r} not in {AGGREGATES}.")

    # --- queries ------------------------------------------------------------------------------

    def _cells_by_score(self) -> list[tuple[int, int, float]]:
        """All cells as ``(row, expert, score)``, highest score first; ties by (row, expert)."""
        flat = self.score.flatten().tolist()
        order = sorted(range(len(flat)), key=lambda i: (-_nan_low(flat[i]), i))
        return [(i // self.n_experts, i % self.n_experts, flat[i]) for i in order]

    def top(self, n: int, per_layer_cap: int | None = None) -> list[tuple[int, int]]:
        """The ``n`` highest-scoring experts as ``(layer, expert)`` with true model layer numbers.

        Ranks by ``score`` alone (ties broken by layer, then expert); whether a cell is
        significant or above the noise floor is for the caller to check (:meth:`significant`,
        :attr:`noise_floor`). This is the list MoTE and SteerMoE switch off.

        Args:
            n: how many experts to return (at most ``layers x experts``).
            per_layer_cap: at most this many experts from any one layer (``None``: no cap).

        Returns:
            ``[(layer, expert), ...]``, best first.

        Raises:
            ValueError: ``n`` is negative or larger than the number of cells, or the cap is < 1.
        """
        total = len(self.layers) * self.n_experts
        if not isinstance(n, int) or n < 0 or n > total:
            raise ValueError(
                f"top(n={n!r}): n must be an int in 0..{total} "
                f"({len(self.layers)} layers x {self.n_experts} experts)."
            )
        if per_layer_cap is not None and per_layer_cap < 1:
            raise ValueError(f"top(per_layer_cap={per_layer_cap!r}): the cap must be >= 1 or None.")
        chosen: list[tuple[int, int]] = []
        per_layer: dict[int, int] = {}
        for row, expert, _ in self._cells_by_score():
            if len(chosen) == n:
                break
            if per_layer_cap is not None and per_layer.get(row, 0) >= per_layer_cap:
                continue
            per_layer[row] = per_layer.get(row, 0) + 1
            chosen.append((self.layers[row], expert))
        return chosen

    def significant(
        self, alpha: float | None = None, *, above_noise_floor: bool = False, direction: str = "up"
    ) -> list[tuple[int, int]]:
        """Cells whose q-value is below ``alpha``, highest score first.

        Args:
            alpha: FDR level; default the ``alpha`` the attribution was computed with.
            above_noise_floor: also require ``|score| > noise_floor``.
            direction: ``"up"`` (more for the behaviour, the default), ``"down"`` or ``"both"``.

        Returns:
            ``[(layer, expert), ...]`` with true model layer numbers.
        """
        if direction not in ("up", "down", "both"):
            raise ValueError(f"significant(direction={direction!r}): use 'up', 'down' or 'both'.")
        alpha = self.alpha if alpha is None else alpha
        q = self.q_value.flatten().tolist()
        out = []
        for row, expert, score in self._cells_by_score():
            if not q[row * self.n_experts + expert] < alpha:
                continue
            if direction == "up" and not score > 0 or direction == "down" and not score < 0:
                continue
            if above_noise_floor and not abs(score) > self.noise_floor:
                continue
            out.append((self.layers[row], expert))
        return out

    def to_frame(self):
        """One row per (layer, expert) cell as a ``pandas.DataFrame``, highest score first.

        Columns: ``layer`` (true model layer), ``expert``, ``score``, ``ci_low``, ``ci_high``,
        ``p_value``, ``q_value``, ``significant`` (q < alpha), ``above_noise_floor``,
        ``behavior_count``, ``control_count``, ``behavior_rate``, ``control_rate``.
        """
        import pandas as pd

        n_layers, n_experts = len(self.layers), self.n_experts
        frame = pd.DataFrame(
            {
                "layer": np.repeat(np.asarray(self.layers, dtype=np.int64), n_experts),
                "expert": np.tile(np.arange(n_experts, dtype=np.int64), n_layers),
                "score": self.score.flatten().double().numpy(),
                "ci_low": self.ci_low.flatten().double().numpy(),
                "ci_high": self.ci_high.flatten().double().numpy(),
                "p_value": self.p_value.flatten().double().numpy(),
                "q_value": self.q_value.flatten().double().numpy(),
                "behavior_count": self.behavior_counts.flatten().numpy(),
                "control_count": self.control_counts.flatten().numpy(),
                "behavior_rate": self.behavior_rate.flatten().double().numpy(),
                "control_rate": self.control_rate.flatten().double().numpy(),
            }
        )
        frame.insert(7, "significant", frame["q_value"] < self.alpha)
        frame.insert(8, "above_noise_floor", frame["score"].abs() > self.noise_floor)
        order = [row * n_experts + expert for row, expert, _ in self._cells_by_score()]
        return frame.iloc[order].reset_index(drop=True)

    def summary(self, n: int = 10) -> str:
        """A short text report: settings, noise floor and the top ``n`` cells with statistics."""
        lines = [
            f"ExpertAttribution({self.model_name!r}, metric={self.metric}, aggregate={self.aggregate}, "
            f"test={self.test}): {self.behavior_prompts} behaviour / {self.control_prompts} control "
            f"prompts, {len(self.layers)} layers x {self.n_experts} experts, top-{self.top_k}",
            f"noise floor (split-half control, {1 - self.alpha:.0%} quantile of max |score|): "
            f"{self.noise_floor:.4f}; significant (q < {self.alpha}): {len(self.significant())}",
        ]
        frame = self.to_frame().head(n)
        for row in frame.itertuples():
            lines.append(
                f"  L{row.layer:<3d} E{row.expert:<4d} score {row.score:+.4f} "
                f"[{row.ci_low:+.4f}, {row.ci_high:+.4f}]  q={row.q_value:.2g}"
                f"{'  *' if row.significant else ''}{'' if row.above_noise_floor else '  (below noise floor)'}"
            )
        return "\n".join(lines)

    # --- serialisation ------------------------------------------------------------------------

    def _metadata(self) -> dict[str, Any]:
        meta = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _TENSOR_FIELDS}
        meta["layers"] = list(self.layers)
        return {"kind": KIND, "version": VERSION, **meta}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``kind``/``version`` keys; tensors as nested lists)."""
        data = self._metadata()
        for name in _TENSOR_FIELDS:
            data[name] = getattr(self, name).tolist()
        return _json_safe(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExpertAttribution":
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: ``data`` is not a dict, its ``kind`` is not ``"labkit.ExpertAttribution"``,
                its version is newer than supported, or a field is missing (named).
        """
        storage.check_kind(data, KIND, VERSION, caller="ExpertAttribution.from_dict", source="the dict")
        _require_fields(data, caller="ExpertAttribution.from_dict", source="the dict")
        kwargs = {k: v for k, v in data.items() if k not in ("kind", "version")}
        for name in _TENSOR_FIELDS:
            if name.endswith("_counts"):
                kwargs[name] = torch.tensor(kwargs[name], dtype=torch.int64)
            else:  # JSON null (NaN, e.g. intervals skipped with n_bootstrap=0) back to NaN
                kwargs[name] = torch.as_tensor(np.array(kwargs[name], dtype=np.float64))
        return cls._from_parts(kwargs)

    @classmethod
    def _from_parts(cls, kwargs: dict[str, Any]) -> "ExpertAttribution":
        kwargs = dict(kwargs)
        kwargs["layers"] = tuple(int(layer) for layer in kwargs["layers"])
        kwargs["noise_floor"] = float("nan") if kwargs["noise_floor"] is None else float(kwargs["noise_floor"])
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"ExpertAttribution: unknown fields {unknown}; known: {sorted(known)}.")
        return cls(**kwargs)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``<stem>.json`` (settings) and ``<stem>.safetensors`` (the tensors); no pickle.

        Args:
            path: the stem, or either file's path (``refusal``, ``refusal.safetensors``, ...).

        Returns:
            The ``.json`` path (what :meth:`load` takes). Layout: :mod:`labkit.storage`.
        """
        metadata = _json_safe({k: v for k, v in self._metadata().items() if k not in ("kind", "version")})
        tensors = {name: getattr(self, name) for name in _TENSOR_FIELDS}
        return storage.save(path, kind=KIND, version=VERSION, metadata=metadata, tensors=tensors)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ExpertAttribution":
        """Read an attribution written by :meth:`save` (the stem or either file's path).

        Raises:
            FileNotFoundError: no saved attribution there, or half of the pair is missing.
            ValueError: the files hold another kind of labkit object (the message names the
                kind found), are not JSON / safetensors, or lack a field (named).
        """
        data, tensors = storage.load(
            path, kind=KIND, version=VERSION, caller="ExpertAttribution.load", writer="ExpertAttribution.save"
        )
        _require_fields({**data, **tensors}, caller="ExpertAttribution.load", source=repr(str(path)))
        kwargs = {k: v for k, v in data.items() if k not in ("kind", "version", "tensors")}
        kwargs.update({name: tensors[name] for name in _TENSOR_FIELDS})
        return cls._from_parts(kwargs)


def _nan_low(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def _json_safe(value):
    """Replace NaN/inf floats by None (JSON has no NaN) recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _require_fields(data: dict[str, Any], *, caller: str, source: str) -> None:
    """Every dataclass field without a default must be present."""
    from dataclasses import MISSING

    needed = [f.name for f in fields(ExpertAttribution) if f.default is MISSING and f.default_factory is MISSING]
    storage.require_keys(data, needed, caller=caller, source=source)
