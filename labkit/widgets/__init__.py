"""Live panels for JupyterLab: slide a control, watch the model change.

Two panels, each a thin ipywidgets shell over labkit functions and the tested logic in
:mod:`labkit.live`:

* :class:`SteeringPanel` — a prompt, a hook point, a coefficient slider, the contrast prompts of
  an ActAdd vector (or a loaded :class:`~labkit.steering.SteeringVector`) and the generation
  settings. Any change regenerates: the steered completion streams in token by token beside the
  unsteered one, with the words that differ highlighted.
* :class:`ExpertPanel` — for MoE models: a plotly ``FigureWidget`` heatmap (layer × expert) of an
  :class:`~labkit.moe.ExpertAttribution`; a click on a cell cycles that expert normal → off →
  on; "top-N off" and "random N off" set whole masks. The masked completion streams beside the
  baseline, the behaviour rate on a small evaluation set updates, and the mask exports as JSON.

Both run model work on a :class:`~labkit.live.LatestOnly` worker: a burst of slider moves cancels
stale generations and only the newest request runs to completion; an exception shows in the
panel's error area. Each takes its model and data as arguments, and every labkit call it makes
can be replaced by a keyword argument (a callable), which is how the unit tests drive them.

The panels live in :mod:`labkit.widgets.steering_panel` and :mod:`labkit.widgets.expert_panel`;
the labkit calls they make by default in :mod:`labkit.widgets.defaults`.

Users import from here (``labkit`` itself does not import ipywidgets)::

    from labkit.widgets import SteeringPanel
    panel = SteeringPanel(model, layers=range(4, 12))
    panel            # displays in JupyterLab; panel.coefficient.value = 8 drives it from code
"""

from labkit.widgets.expert_panel import ExpertPanel
from labkit.widgets.steering_panel import SteeringPanel, SteeringRequest

__all__ = ["ExpertPanel", "SteeringPanel", "SteeringRequest"]
