"""A feature panel: click through SAE features, see each one's top contexts and activation profile.

:func:`feature_figure` is a pure function (statistics in, plotly figure out); :class:`FeaturePanel`
is the ipywidgets panel around it: a feature picker (a number box, previous / next buttons and an
optional short list, e.g. the top features of a steering vector), the figure, and the feature's
top-activating contexts with the token highlighted.
"""

from __future__ import annotations

from collections.abc import Sequence

from labkit.cache import ActivationCache
from labkit.sae.features import FeatureStatistics, top_contexts

__all__ = ["FeaturePanel", "feature_figure"]


def feature_figure(statistics: FeatureStatistics, feature: int, contexts: Sequence | None = None):
    """A plotly figure of one feature: its top activations (bars, one per context) and its firing rate.

    Args:
        statistics: from :func:`labkit.sae.feature_statistics`.
        feature: feature index.
        contexts: its :class:`~labkit.sae.features.Context` list (bar labels); default: unlabeled.

    Returns:
        A ``plotly.graph_objects.Figure``.
    """
    import plotly.graph_objects as go

    values = [v for v in statistics.top_values[feature].tolist() if v > 0]
    labels = [f"{i + 1}. {c.token!r}" for i, c in enumerate(contexts or [])][: len(values)] or [str(i + 1) for i in range(len(values))]
    figure = go.Figure(go.Bar(x=labels, y=values, marker_color="#f9a825", hovertemplate="%{x}: %{y:.2f}<extra></extra>"))
    rate = float(statistics.firing_rate[feature])
    figure.update_layout(
        title=f"feature {feature}: fires on {100 * rate:.2f}% of tokens, max {float(statistics.max_activation[feature]):.1f}",
        xaxis_title="top contexts (activating token)", yaxis_title="activation", height=300,
        margin=dict(l=40, r=10, t=40, b=40),
    )
    return figure


class FeaturePanel:
    """Click through SAE features: picker, activation figure, top contexts.

    Args:
        statistics: from :func:`labkit.sae.feature_statistics` on ``cache``.
        cache: the activation cache the statistics came from (for the context text).
        tokenizer: decodes the cache's token ids (``labkit.models.tokenizer_of(model)``).
        features: an optional short list offered in a dropdown (e.g. a vector's top features).
        start: the feature shown first (default the first of ``features``, else 0).
        window: context tokens on each side.

    Attributes:
        feature: the ``IntText`` holding the shown feature (set ``.value`` to drive the panel).
        figure: the ``plotly`` ``FigureWidget``; contexts: the ``HTML`` widget; widget: the root.

    Example:
        >>> FeaturePanel(stats, cache, tokenizer_of(model), features=[12, 40])  # doctest: +SKIP
    """

    def __init__(self, statistics: FeatureStatistics, cache: ActivationCache, tokenizer, *,
                 features: Sequence[int] | None = None, start: int | None = None, window: int = 8) -> None:
        import ipywidgets as widgets
        import plotly.graph_objects as go

        d_sae = statistics.top_rows.shape[0]
        self.statistics, self.cache, self.tokenizer, self.window = statistics, cache, tokenizer, window
        listed = [int(f) for f in (features or [])]
        bad = [f for f in listed if not 0 <= f < d_sae]
        if bad:
            raise ValueError(f"FeaturePanel: features {bad} out of range 0..{d_sae - 1}.")
        first = start if start is not None else (listed[0] if listed else 0)
        self.feature = widgets.BoundedIntText(value=first, min=0, max=d_sae - 1, description="feature")
        self.previous = widgets.Button(description="◀ previous")
        self.next = widgets.Button(description="next ▶")
        self.choices = widgets.Dropdown(options=[("pick…", -1)] + [(str(f), f) for f in listed], value=-1, description="listed")
        self.figure = go.FigureWidget()
        self.contexts = widgets.HTML()
        self.previous.on_click(lambda _b: self._step(-1))
        self.next.on_click(lambda _b: self._step(+1))
        self.choices.observe(self._on_choice, names="value")
        self.feature.observe(lambda _change: self.render(), names="value")
        controls = [self.feature, self.previous, self.next] + ([self.choices] if listed else [])
        self.widget = widgets.VBox([widgets.HBox(controls), self.figure, self.contexts])
        self.widget.add_class("labkit-feature-panel")
        self.render()

    def _step(self, delta: int) -> None:
        self.feature.value = min(max(self.feature.value + delta, self.feature.min), self.feature.max)

    def _on_choice(self, change) -> None:
        if change["new"] is not None and change["new"] >= 0:
            self.feature.value = change["new"]

    def render(self) -> None:
        """Redraw for the current feature."""
        feature = int(self.feature.value)
        contexts = top_contexts(self.statistics, self.cache, self.tokenizer, feature, window=self.window)
        fresh = feature_figure(self.statistics, feature, contexts)
        with self.figure.batch_update():
            self.figure.data = []
            self.figure.add_traces(fresh.data)
            self.figure.layout = fresh.layout
        rows = "".join(f"<li>{c.html()}</li>" for c in contexts) or "<li>never active on this cache</li>"
        self.contexts.value = f"<ol class='labkit-feature-contexts'>{rows}</ol>"

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
