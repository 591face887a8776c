"""Behaviour metrics: topic-word frequency, perplexity, refusal rate, exact match.

Pure functions over texts / token ids / models; the notebooks and
``labkit.moe.compare_conditions`` call them, the widgets show them.
"""

from __future__ import annotations

# --- steering metrics (ActAdd evaluation: topic frequency, perplexity) ---------------------


# --- behaviour detectors and task accuracy (MoTE evaluation: refusal rate, exact match) ----
