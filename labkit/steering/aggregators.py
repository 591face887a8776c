"""Aggregators: how the contrast-pair builders turn two sets of activations into one direction.

An aggregator is a plain function with one signature, ``aggregate(acts_positive, acts_negative)
-> Direction`` (``Float[Tensor, "prompt d_model"]`` each), as in steering-vectors: the three
directions labkit ships differ only here, and everything else — prompt checks, the
:class:`~labkit.steering.contrast.ContrastReading` of where and how activations are read, the
resulting :class:`~labkit.steering.vector.SteeringVector` — is shared
(:func:`labkit.steering.builders.contrast_vector`). Write your own with the same signature.

* :func:`mean_aggregator` — mean difference (CAA; Rimsky et al. 2023).
* :func:`pca_aggregator` — first principal component of the paired differences (RepE, Zou et
  al. 2023, §3.1), scaled to the projected separation.
* :func:`logistic_aggregator` — the weight vector of an L2 logistic-regression probe (Li et al.
  2023, ITI), scaled the same way; :func:`logistic_regression` is the exact fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from labkit.steering.contrast import scaled_to_separation

__all__ = ["Aggregator", "Direction", "logistic_aggregator", "logistic_regression", "mean_aggregator", "pca_aggregator"]


@dataclass(frozen=True)
class Direction:
    """What an aggregator returns: the direction and what to record about it.

    Attributes:
        activations: ``Float[Tensor, "d_model"]``, the direction at coefficient 1.
        source: recorded in the vector's ``source``: ``"method"`` (its name) and any diagnostic
            (``explained_variance_ratio``, ``train_accuracy``, ...).
    """

    activations: Float[Tensor, " d_model"]
    source: dict[str, Any] = field(default_factory=dict)


#: ``aggregate(acts_positive [prompt, d_model], acts_negative [prompt, d_model]) -> Direction``.
Aggregator = Callable[[Tensor, Tensor], Direction]


def mean_aggregator() -> Aggregator:
    """``mean_i act(positive_i) - mean_j act(negative_j)`` (CAA, Rimsky et al. 2023); any counts."""

    def aggregate(acts_positive: Tensor, acts_negative: Tensor) -> Direction:
        return Direction(acts_positive.mean(0) - acts_negative.mean(0), {"method": "mean_difference"})

    return aggregate


def pca_aggregator() -> Aggregator:
    """Top principal direction of the paired differences ``d_i = act(positive_i) - act(negative_i)``.

    RepE (Zou et al. 2023, §3.1): the top right singular vector of the difference matrix (the
    first principal component of the mean-zero set ``{d_i, -d_i}``), oriented so positives
    project above negatives and scaled to the projected separation ``(mean_pos - mean_neg)·û``.
    Records ``explained_variance_ratio``, the component's share of ``Σ‖d_i‖²``. Needs paired
    rows (equal counts).
    """

    def aggregate(acts_positive: Tensor, acts_negative: Tensor) -> Direction:
        differences = (acts_positive - acts_negative).double()  # (pair, d_model)
        _u, singular, vh = torch.linalg.svd(differences, full_matrices=False)
        explained = float(singular[0] ** 2 / (singular**2).sum())
        direction = scaled_to_separation(vh[0], acts_positive.double(), acts_negative.double()).float()
        return Direction(direction, {"method": "pca", "explained_variance_ratio": explained})

    return aggregate


def logistic_aggregator(inverse_regularization: float = 1.0) -> Aggregator:
    """The weight vector ``ŵ`` of a logistic-regression probe, positives vs negatives (ITI, Li et al. 2023).

    Fitted exactly by :func:`logistic_regression` (L2, ``C = inverse_regularization``), oriented
    and scaled as :func:`pca_aggregator`. Records ``inverse_regularization`` and
    ``train_accuracy`` (the probe's accuracy on its training prompts).
    """

    def aggregate(acts_positive: Tensor, acts_negative: Tensor) -> Direction:
        features = torch.cat([acts_positive, acts_negative])
        labels = torch.cat([torch.ones(len(acts_positive)), torch.zeros(len(acts_negative))])
        weights, intercept = logistic_regression(features, labels, inverse_regularization=inverse_regularization)
        scores = (features.double() - features.double().mean(0)) @ weights + intercept
        accuracy = float(((scores > 0).double() == labels.double()).double().mean())
        direction = scaled_to_separation(weights, acts_positive.double(), acts_negative.double()).float()
        source = {"method": "probe", "inverse_regularization": float(inverse_regularization), "train_accuracy": accuracy}
        return Direction(direction, source)

    return aggregate


def logistic_regression(
    features: Float[Tensor, "sample d_model"], labels: Float[Tensor, " sample"], *, inverse_regularization: float = 1.0,
    max_iter: int = 500,
) -> tuple[Float[Tensor, " d_model"], float]:
    """L2-regularised logistic regression, fitted exactly (L-BFGS on the convex objective).

    Minimises ``C · Σ_i log(1 + exp(-y_i (w·x_i + b))) + ½‖w‖²`` with ``y_i ∈ {-1, +1}`` and an
    unpenalised intercept ``b`` — the objective of scikit-learn's ``LogisticRegression`` (default
    ``C = 1``), in float64. Features are centred on their mean first (``b`` absorbs it).

    Args:
        features: one row per sample.
        labels: 1 for positives, 0 for negatives.
        inverse_regularization: ``C > 0``.
        max_iter: L-BFGS iterations.

    Returns:
        ``(w, b)``: the weight vector (float64) and intercept, on the centred features.

    Raises:
        ValueError: fewer than one sample per class, mismatched lengths, or ``C <= 0``.
    """
    x = features.double()
    y = labels.double() * 2 - 1
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(
            f"logistic_regression: features must be (sample, d_model) and labels (sample,), got "
            f"{tuple(features.shape)} and {tuple(labels.shape)}."
        )
    if not (bool((y > 0).any()) and bool((y < 0).any())):
        raise ValueError("logistic_regression: needs at least one sample of each class (labels 0 and 1).")
    if not inverse_regularization > 0:
        raise ValueError(f"logistic_regression: inverse_regularization must be > 0, got {inverse_regularization!r}.")
    x = x - x.mean(0)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14,
        history_size=50, line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = inverse_regularization * torch.nn.functional.softplus(-y * (x @ w + b)).sum() + 0.5 * (w @ w)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return w.detach(), float(b.detach())
