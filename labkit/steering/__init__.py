"""Steering vectors: ActAdd as published, mean-difference (CAA), PCA and probe directions,
directional ablation, steered forward passes, one-batch sweeps.

Data flow: ``actadd(model, " wedding", " ", layer=6)`` or ``mean_difference(model, pos, neg,
layer=6)`` → a :class:`SteeringVector` (plain frozen data, saved as safetensors + JSON) →
``with steered(model, vector): ...`` (or ``labkit.generate(model, prompts, steering=vector)``).

How a vector is applied. :func:`steered` opens one intervention (:func:`labkit.hooks.intervene`):
one hook per vector at its TransformerLens hook point (``blocks.6.hook_resid_pre`` = input of
``model.layers.6``) on the plain twin *and* on the bridge, plus one observer that reads each
call's attention mask and cache length. So the bridge's ``forward``, ``run_with_cache`` and
``generate`` are steered inside the block as much as ``labkit.generate`` is. From the observer
the hook knows the absolute position of every token it sees, where each left-padded row's real
tokens start, and where the prompt ends (``labkit.generate`` declares it; otherwise a call
without a KV cache is all prompt and a call extending a cache is a decode step). So:

* ``positions="front"`` (ActAdd): the ``pos × d_model`` vector is added to the first ``pos``
  real tokens of each row's prompt. With the KV cache that happens on the prompt pass only (the
  cache then carries it); without the cache it is re-added on every full pass — same result.
* ``positions="all" | "prompt" | "generated"`` (a single ``d_model`` direction): added at
  every real token / prompt tokens only / generated tokens only, on every pass and decode step.

Vectors compose: several in one :func:`steered` call, nested contexts, same or different
layers — additions sum. ``operation="ablate"`` vectors project a direction out instead
(:func:`directional_ablation`). ``steered(model, rows=[...])`` gives each batch row its own
vectors (``labkit.generate(..., steering_per_row=...)``): a sweep of settings in one batch, each
row bit-for-bit the arithmetic of its solo run.
"""

from labkit.steering.aggregators import Aggregator, Direction, logistic_aggregator, mean_aggregator, pca_aggregator
from labkit.steering.apply import steered
from labkit.steering.builders import (
    actadd,
    contrast_vector,
    directional_ablation,
    logistic_regression,
    mean_difference,
    pca_direction,
    probe_direction,
)
from labkit.steering.contrast import ContrastReading, residual_activations
from labkit.steering.vector import KIND, OPERATIONS, POSITIONS, VERSION, SteeringVector, flatten_vectors

__all__ = [
    "KIND",
    "OPERATIONS",
    "POSITIONS",
    "VERSION",
    "Aggregator",
    "ContrastReading",
    "Direction",
    "SteeringVector",
    "actadd",
    "contrast_vector",
    "directional_ablation",
    "flatten_vectors",
    "logistic_aggregator",
    "logistic_regression",
    "mean_aggregator",
    "mean_difference",
    "pca_aggregator",
    "pca_direction",
    "probe_direction",
    "residual_activations",
    "steered",
]
