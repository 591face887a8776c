"""Sparse autoencoders on labkit models: load, measure, read features, steer and clamp by feature.

Data flow: ``load_sae(path, model)`` (labkit, sae-lens or eai-sparsify layout) → a
:class:`SparseAutoencoder` → ``feature_activations(model, sae, prompt)`` /
``feature_statistics(sae, cache)`` → ``top_contexts`` / ``FeaturePanel`` →
``vector_features(sae, steering_vector)`` → ``feature_vector(sae, i, strength)`` (a
``SteeringVector``) or ``FeatureClamp(sae, {i: value})`` → ``labkit.generate(..., steering=...)``.
Training batches stream from an on-disk cache (:func:`activation_batches`); the shipped SAE is
built by ``recipes/sae_smollm2.py``. Nothing here imports sae-lens or eai-sparsify.
"""

from labkit.sae.data import activation_batches, count_rows
from labkit.sae.features import (
    Context,
    FeatureActivations,
    FeatureMatches,
    FeatureStatistics,
    feature_activations,
    feature_statistics,
    prompt_difference_features,
    top_contexts,
    vector_features,
)
from labkit.sae.formats import load_sae, read_sae_lens, read_sparsify, sparsify_hook_name
from labkit.sae.measure import SaeMeasurements, measure_sae
from labkit.sae.model import ACTIVATIONS, SparseAutoencoder
from labkit.sae.panel import FeaturePanel, feature_figure
from labkit.sae.steer import FeatureClamp, feature_vector

#: The SAE shipped in ``data/saes/`` (``recipes/sae_smollm2.py``): ``load_sae(SHIPPED_SMOLLM2, model)``.
SHIPPED_SMOLLM2 = "smollm2-135m-instruct-blocks.8.hook_resid_pre"

__all__ = [
    "ACTIVATIONS", "Context", "FeatureActivations", "FeatureClamp", "FeatureMatches", "FeaturePanel", "FeatureStatistics",
    "SHIPPED_SMOLLM2", "SaeMeasurements", "SparseAutoencoder", "activation_batches", "count_rows",
    "feature_activations", "feature_figure", "feature_statistics", "feature_vector", "load_sae", "measure_sae",
    "prompt_difference_features", "read_sae_lens", "read_sparsify", "sparsify_hook_name", "top_contexts",
    "vector_features",
]
