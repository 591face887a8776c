"""Pure functions from labkit results to plotly figures: no model access, no global state.

Every function takes plain data (an :class:`~labkit.moe.attribution.ExpertAttribution`, an
:class:`~labkit.moe.masking.ExpertMask`, the table of :func:`labkit.moe.compare_conditions`) and
returns a new ``plotly.graph_objects.Figure``; the same input gives the same figure (snapshot
tests compare ``fig.to_dict()``), in the spirit of CircuitsVis.

The figures live in three modules by what they show — :mod:`labkit.viz.experts` (the expert
heatmap, minimal masks), :mod:`labkit.viz.conditions` (masking conditions, the selection
scorecard) and :mod:`labkit.viz.steering` (residual norms, topic sweeps, trade-offs,
steerability) — and are all importable from here.
"""

from __future__ import annotations

from labkit.viz.conditions import condition_plot, scorecard_plot
from labkit.viz.experts import MASK_MARKERS, expert_heatmap, minimal_mask_plot
from labkit.viz.steering import (
    residual_norm_heatmap,
    steerability_plot,
    steering_tradeoff,
    sweep_heatmap,
    topic_sweep_heatmaps,
)

__all__ = [
    "MASK_MARKERS", "condition_plot", "expert_heatmap", "minimal_mask_plot", "residual_norm_heatmap", "scorecard_plot",
    "steerability_plot", "steering_tradeoff", "sweep_heatmap", "topic_sweep_heatmaps",
]
