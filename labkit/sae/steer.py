"""Steer and clamp by SAE feature.

* :func:`feature_vector` — a :class:`labkit.SteeringVector` along one feature's decoder direction,
  Neuronpedia's steering (strength × decoder direction, added at every token). It is an ordinary
  vector: ``labkit.generate(..., steering=...)``, ``steered(...)``, sweeps, the steering panel and
  the vLLM engine (at ``hook_resid_pre`` / ``hook_resid_post``) take it as they take any other.
* :class:`FeatureClamp` — set features to fixed values *inside* the forward pass, keeping the SAE's
  error term (Templeton et al. 2024, "Scaling Monosemanticity", §"Feature steering": the
  reconstruction with the feature clamped, plus the error ``x − x̂``): at the hook point
  ``x ← x̂(f′) + (x − x̂(f)) = x + (f′ − f) · W_dec`` where ``f = encode(x)`` and ``f′`` is ``f`` with the
  clamped entries replaced. Features not clamped, and clamps to a feature's own value, change
  nothing: the added term is an exact zero. Apply with ``labkit.steered(model, clamp)``,
  ``labkit.generate(..., steering=clamp)`` or the steering panel; every entry point of the handle
  (``model(tokens)``, ``run_with_cache``, ``model.generate``) sees it. The vLLM engine refuses it
  (it would need the whole encoder inside its workers): steer there with :func:`feature_vector`.

**Strength scale.** A feature vector adds ``strength × d̂_i`` with ``d̂_i`` the unit-norm decoder row, so
``strength`` is in residual-stream units along the feature, the units of the feature's own
activation (the shipped SAE's decoder rows are unit norm): strength 10 adds what the feature
writes when it fires at 10. Neuronpedia's steering uses the same product (its decoder rows are unit
norm for most SAEs). For scale, the card of the shipped SAE and ``notebooks/08`` give the typical
activations and the residual norm at the hook point.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from labkit.backends.hf_steering import call_mask
from labkit.hooks import intervene
from labkit.sae.model import SparseAutoencoder
from labkit.steering import SteeringVector

__all__ = ["FeatureClamp", "feature_vector"]


def _check_feature(sae: SparseAutoencoder, feature, where: str) -> int:
    if isinstance(feature, bool) or not isinstance(feature, numbers.Integral):
        raise TypeError(f"{where}: feature must be an int in 0..{sae.d_sae - 1}, got {type(feature).__name__} {feature!r}.")
    if not 0 <= int(feature) < sae.d_sae:
        raise ValueError(f"{where}: feature {feature} out of range; {sae!r} has {sae.d_sae} features (0..{sae.d_sae - 1}).")
    return int(feature)


def _check_value(value, where: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{where}: {name} must be a finite real number, got {value!r}.")
    return float(value)


def feature_vector(
    sae: SparseAutoencoder,
    feature: int,
    strength: float = 1.0,
    *,
    positions: Literal["all", "prompt", "generated"] = "all",
) -> SteeringVector:
    """A steering vector along one SAE feature's decoder direction (Neuronpedia-style steering).

    Args:
        sae: the SAE.
        feature: feature index, ``0 .. d_sae-1``.
        strength: the vector's coefficient: residual-stream units along the unit decoder
            direction (see the module docstring); negative steers away.
        positions: ``"all"`` (Neuronpedia's choice), ``"prompt"`` or ``"generated"``.

    Returns:
        A :class:`labkit.SteeringVector` at ``sae.hook_name`` with ``activations`` the unit decoder
        row (``(d_model,)``, float32) and ``coefficient = strength``; ``with_coefficient`` changes
        the strength.

    Raises:
        TypeError / ValueError: a feature out of range, a non-finite strength, positions ``"front"``.

    Example:
        >>> labkit.generate(model, "I think", steering=feature_vector(sae, 1234, 8.0)).texts  # doctest: +SKIP
    """
    where = "feature_vector"
    feature = _check_feature(sae, feature, where)
    strength = _check_value(strength, where, "strength")
    if positions not in ("all", "prompt", "generated"):
        raise ValueError(f"{where}: positions={positions!r} is not allowed; use 'all', 'prompt' or 'generated'.")
    return SteeringVector(
        hook_name=sae.hook_name,
        activations=sae.decoder_directions()[feature],
        coefficient=strength,
        positions=positions,
        model_name=sae.model_name,
        source={"method": "sae_feature", "feature": feature, "d_sae": sae.d_sae,
                "scale": "strength x unit decoder direction (residual-stream units)"},
    )


class _Positions:
    """Observes each top-level forward call: which tokens are real and which is a text's first."""

    def __init__(self) -> None:
        self.keep: Tensor | None = None  # (batch, past + new): real tokens, each row's first one excluded
        self.past = 0

    def observe(self, args: tuple, kwargs: dict) -> None:
        mask, past, _new = call_mask(args, kwargs)
        batch = int(mask.shape[0])
        keep = mask.bool().clone()
        keep[torch.arange(batch), mask.int().argmax(dim=1)] = False
        self.keep, self.past = keep, past


@dataclass(frozen=True, eq=False)
class FeatureClamp:
    """Clamp SAE features to fixed values inside the forward pass, keeping the SAE error term.

    Plain data; apply with ``labkit.steered(model, clamp)`` or ``labkit.generate(..., steering=clamp)``.
    At every real token but each text's first (the BOS token, which the SAE was not trained on),
    prompt and generated alike: ``x ← x + Σ_i (v_i − f_i(x)) · W_dec[i]`` (module docstring).

    Attributes:
        sae: the SAE whose features are clamped.
        values: ``{feature: value}``; ``0`` switches a feature off (ablation), a large value
            forces it on.

    Raises:
        TypeError / ValueError: a feature out of range, a non-finite value, an empty mapping.
    """

    sae: SparseAutoencoder
    values: Mapping[int, float] = field(default_factory=dict)

    #: marks an intervention ``labkit.steered`` / ``labkit.generate(steering=...)`` accept beside vectors
    labkit_intervention = True

    def __post_init__(self) -> None:
        where = "FeatureClamp"
        if not isinstance(self.sae, SparseAutoencoder):
            raise TypeError(f"{where}: sae must be a labkit.sae.SparseAutoencoder, got {type(self.sae).__name__}.")
        if not isinstance(self.values, Mapping) or not self.values:
            raise ValueError(f"{where}: values must be a non-empty {{feature: value}} mapping, got {self.values!r}.")
        checked = {_check_feature(self.sae, f, where): _check_value(v, where, f"value of feature {f}") for f, v in self.values.items()}
        object.__setattr__(self, "values", checked)

    def with_value(self, value: float) -> "FeatureClamp":
        """Every clamped feature set to ``value`` (for a slider)."""
        return FeatureClamp(self.sae, {f: value for f in self.values})

    def with_coefficient(self, coefficient: float) -> "FeatureClamp":
        """:meth:`with_value` under the name the steering panel's slider calls."""
        return self.with_value(coefficient)

    def check_compatible(self, model) -> None:
        """Raise unless the SAE fits the model (name, width, hook point on labkit's fast path)."""
        self.sae.check_compatible(model, where="FeatureClamp")
        SteeringVector(self.sae.hook_name, self.sae.decoder_directions()[0], model_name=self.sae.model_name).check_compatible(model)

    def refusal(self, where: str) -> str:
        """Why this clamp cannot run where vectors are only added (the engine, per-row sweeps)."""
        return (
            f"{where}: {self!r} runs the SAE inside the forward pass (it reads each token's features), so it "
            "applies to every row of a labkit HF model only: use labkit.steered(model, clamp) or "
            "labkit.generate(model, prompts, steering=clamp). The vLLM engine and per-row sweeps add fixed vectors; "
            "steer there with labkit.sae.feature_vector(sae, feature, strength)."
        )

    @contextlib.contextmanager
    def applied(self, model) -> Iterator[None]:
        """The clamp as an open intervention (:func:`labkit.hooks.intervene`) on every entry point."""
        self.check_compatible(model)
        sae = self.sae
        features = torch.tensor(sorted(self.values))
        targets = torch.tensor([self.values[int(f)] for f in features])
        rows = sae.W_dec.float()[features]  # (n_clamped, d_model)
        positions = _Positions()

        def clamp(activation: Tensor, _site) -> Tensor | None:
            if activation.ndim != 3 or positions.keep is None:
                return None
            new = activation.shape[1]
            keep = positions.keep[:, positions.past:positions.past + new].to(activation.device)
            current = sae.encode(activation.float())[..., features.to(activation.device)]  # (batch, new, n_clamped)
            change = (targets.to(current.device) - current) * keep.unsqueeze(-1)
            if not bool(change.any()):
                return None
            return activation + (change @ rows.to(current.device)).to(activation.dtype)

        with intervene(model, [(sae.hook_name, clamp)], observe=positions.observe, caller="FeatureClamp"):
            yield

    def __repr__(self) -> str:
        shown = ", ".join(f"{f}: {v:g}" for f, v in list(self.values.items())[:4])
        return f"FeatureClamp({{{shown}{', ...' if len(self.values) > 4 else ''}}} at {self.sae.hook_name!r})"
