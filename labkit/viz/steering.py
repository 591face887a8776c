"""Figures of steering results: residual-stream norms, topic sweeps, method trade-offs, steerability.

Pure functions from the tables of :mod:`labkit.lens` and :mod:`labkit.evals` to a new
``plotly.graph_objects.Figure`` (re-exported by :mod:`labkit.viz`).
"""

from __future__ import annotations

import math

from labkit.checks import check_columns

__all__ = ["residual_norm_heatmap", "steerability_plot", "steering_tradeoff", "sweep_heatmap", "topic_sweep_heatmaps"]


def residual_norm_heatmap(norms, *, title: str | None = None):
    """Layer × position heatmap of mean residual-stream norms.

    Args:
        norms: the DataFrame from :func:`labkit.lens.residual_norms` (columns ``hook``,
            ``position``, ``mean_norm``); hook names of the form ``blocks.{L}.…``.
        title: optional figure title.

    Returns:
        A ``plotly.graph_objects.Figure`` (layers on the y axis, positions on the x axis).

    Raises:
        TypeError: ``norms`` is not a pandas DataFrame.
        ValueError: a required column is missing or a hook name has no ``blocks.{L}.`` layer.

    Example:
        >>> fig = residual_norm_heatmap(labkit.lens.residual_norms(cache, hook_names))  # doctest: +SKIP
    """
    import pandas as pd
    import plotly.graph_objects as go

    if not isinstance(norms, pd.DataFrame):
        raise TypeError(
            f"residual_norm_heatmap: norms is a {type(norms).__name__}; expected the pandas DataFrame "
            "returned by labkit.lens.residual_norms(cache, hook_names)."
        )
    missing = [column for column in ("hook", "position", "mean_norm") if column not in norms.columns]
    if missing:
        raise ValueError(
            f"residual_norm_heatmap: norms lacks column(s) {missing} (has {list(norms.columns)}); pass the "
            "DataFrame from labkit.lens.residual_norms."
        )
    layer_of = norms["hook"].astype(str).str.extract(r"^blocks\.(\d+)\.", expand=False)
    if layer_of.isna().any():
        bad = norms["hook"][layer_of.isna()].iloc[0]
        raise ValueError(
            f"residual_norm_heatmap: hook {bad!r} names no layer; expected hook names like 'blocks.3.hook_resid_post'."
        )

    frame = norms.assign(layer=layer_of.astype(int))
    grid = frame.pivot_table(index="layer", columns="position", values="mean_norm").sort_index()
    figure = go.Figure(
        go.Heatmap(
            z=grid.to_numpy(),
            x=[int(c) for c in grid.columns],
            y=[int(i) for i in grid.index],
            colorscale="Viridis",
            colorbar={"title": "mean ‖resid‖"},
            hovertemplate="layer %{y}, position %{x}<br>mean norm %{z:.1f}<extra></extra>",
        )
    )
    figure.update_layout(
        title=title or "Residual-stream norm by layer and position",
        xaxis_title="position (real tokens)",
        yaxis_title="layer",
        template="plotly_white",
    )
    return figure



def sweep_heatmap(table, *, title: str | None = None):
    """Layer × coefficient heatmaps of a topic sweep: topic fraction (left) and perplexity (right).

    Args:
        table: :func:`labkit.evals.topic_steering_sweep` output for one method swept over
            several layers (the unsteered row is shown in the title, not as a cell).
        title: figure title.

    Returns:
        A ``plotly.graph_objects.Figure`` (cells hold the values as text).

    Raises:
        ValueError: columns missing or no steered rows.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    check_columns(table, {"method", "layer", "coefficient", "topic_fraction", "perplexity"}, "sweep_heatmap")
    steered = table[table.method != "unsteered"]
    if steered.empty:
        raise ValueError("sweep_heatmap: the table has no steered rows.")
    base = table[table.method == "unsteered"]
    layers = sorted(set(steered.layer))
    coefficients = sorted(set(steered.coefficient))
    fig = make_subplots(rows=1, cols=2, subplot_titles=("topic-word fraction", "held-out perplexity"),
                        horizontal_spacing=0.14)
    for col, measure, scale in ((1, "topic_fraction", "Greens"), (2, "perplexity", "Reds")):
        grid = steered.pivot_table(index="layer", columns="coefficient", values=measure).reindex(
            index=layers, columns=coefficients)
        text = [[("" if math.isnan(v) else f"{v:.3f}" if measure == "topic_fraction" else f"{v:.0f}") for v in row]
                for row in grid.to_numpy()]
        fig.add_trace(go.Heatmap(
            z=grid.to_numpy(), x=[f"c={c:g}" for c in coefficients], y=[f"L{layer}" for layer in layers],
            text=text, texttemplate="%{text}", colorscale=scale, showscale=False,
            hovertemplate=f"%{{y}} %{{x}}<br>{measure} %{{z:.3f}}<extra></extra>",
        ), 1, col)
    fig.update_yaxes(autorange="reversed")
    suffix = ""
    if not base.empty:
        b = base.iloc[0]
        suffix = f" (unsteered: fraction {b.topic_fraction:.3f}, perplexity {b.perplexity:.1f})"
    fig.update_layout(title=(title or "topic sweep") + suffix, height=60 * len(layers) + 200, width=900)
    return fig


def topic_sweep_heatmaps(grids, *, title: str | None = None):
    """Layer × coefficient heatmaps of several topics: topic-probability ratio and perplexity ratio.

    One row per topic; left, how many times more likely the next word is a topic word than
    unsteered (:func:`labkit.evals.topic_probability`, steered / unsteered; colour on a log2
    scale, green up, purple down); right, held-out perplexity steered / unsteered (the
    off-target cost). A setting that holds is green on the left and pale on the right.

    Args:
        grids: ``{topic: table}``, each table with columns ``layer, coefficient, ratio,
            perplexity_ratio`` (one row per cell).
        title: figure title.

    Returns:
        A ``plotly.graph_objects.Figure`` (cells hold the ratios as text).

    Raises:
        ValueError: no grids, or a table without those columns.
    """
    import numpy as np
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if not grids:
        raise ValueError("topic_sweep_heatmaps: grids is empty; give {topic: table}.")
    for topic, table in grids.items():
        check_columns(table, {"layer", "coefficient", "ratio", "perplexity_ratio"}, f"topic_sweep_heatmaps[{topic!r}]")
    topics = list(grids)
    subtitles = [f"{topic}: {name}" for topic in topics for name in ("topic probability, x unsteered", "perplexity, x unsteered")]
    fig = make_subplots(rows=len(topics), cols=2, subplot_titles=subtitles, horizontal_spacing=0.12,
                        vertical_spacing=0.5 / len(topics))
    for row, topic in enumerate(topics, start=1):
        table = grids[topic]
        layers, coefficients = sorted(set(table.layer)), sorted(set(table.coefficient))
        for col, measure, scale, mid in ((1, "ratio", "PRGn", 0.0), (2, "perplexity_ratio", "Reds", None)):
            grid = table.pivot_table(index="layer", columns="coefficient", values=measure).reindex(
                index=layers, columns=coefficients).to_numpy()
            z = np.log2(grid) if measure == "ratio" else grid
            fig.add_trace(go.Heatmap(
                z=z, x=[f"c={c:g}" for c in coefficients], y=[f"L{layer}" for layer in layers],
                text=[[("" if math.isnan(v) else f"{v:.2f}") for v in line] for line in grid], texttemplate="%{text}",
                colorscale=scale, zmid=mid, showscale=False,
                hovertemplate=f"{topic} %{{y}} %{{x}}<br>{measure} %{{text}}<extra></extra>",
            ), row, col)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title or "where the vector acts: layer x coefficient", height=330 * len(topics), width=900)
    return fig


def steering_tradeoff(table, *, title: str | None = None):
    """Topic fraction against held-out perplexity, one line per method over its coefficients.

    The comparison figure of steering methods: up is more on-topic, right is more off-target
    damage; the unsteered run is the black star. A method that holds sits up and to the left.

    Args:
        table: rows with ``method, layer, coefficient, topic_fraction, perplexity`` (e.g. several
            :func:`labkit.evals.topic_steering_sweep` tables concatenated; ``label`` is used as the
            line name when present).
        title: figure title.

    Returns:
        A ``plotly.graph_objects.Figure``.

    Raises:
        ValueError: columns missing.
    """
    import plotly.graph_objects as go

    check_columns(table, {"method", "layer", "coefficient", "topic_fraction", "perplexity"}, "steering_tradeoff")
    fig = go.Figure()
    names = table["label"] if "label" in table.columns else [
        f"{m} L{layer}" if layer >= 0 else m for m, layer in zip(table.method, table.layer)]
    frame = table.assign(_name=list(names))
    for name, group in frame[frame.method != "unsteered"].groupby("_name", sort=False):
        group = group.sort_values("coefficient")
        fig.add_trace(go.Scatter(
            x=group.perplexity, y=group.topic_fraction, mode="lines+markers+text", name=name,
            text=[f"{c:g}" for c in group.coefficient], textposition="top center",
            hovertemplate=name + " c=%{text}<br>perplexity %{x:.1f}<br>fraction %{y:.3f}<extra></extra>",
        ))
    base = frame[frame.method == "unsteered"]
    if not base.empty:
        fig.add_trace(go.Scatter(x=base.perplexity[:1], y=base.topic_fraction[:1], mode="markers", name="unsteered",
                                 marker=dict(symbol="star", size=14, color="black")))
    fig.update_xaxes(title_text="held-out perplexity (log scale)", type="log")
    fig.update_yaxes(title_text="topic-word fraction")
    fig.update_layout(title=title or "steering methods: topic vs off-target cost (labels: coefficient)",
                      height=450, width=900)
    return fig


def steerability_plot(slopes, *, title: str | None = None):
    """Per-prompt steerability (slope of topic fraction per unit coefficient), one column per vector.

    Each dot is one prompt; dots below zero are anti-steerable prompts (Tan et al. 2024), and
    each vector's anti-steerable fraction is written under its name.

    Args:
        slopes: :func:`labkit.evals.steerability` output (``method, layer, prompt, slope``;
            an optional ``topic`` column is added to the names).
        title: figure title.

    Returns:
        A ``plotly.graph_objects.Figure``.

    Raises:
        ValueError: columns missing.
    """
    import plotly.graph_objects as go

    check_columns(slopes, {"method", "layer", "prompt", "slope"}, "steerability_plot")
    keys = ["topic", "method", "layer"] if "topic" in slopes.columns else ["method", "layer"]
    fig = go.Figure()
    for key, group in slopes.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        name = " ".join(str(k) if not isinstance(k, (int,)) or k >= 0 else "" for k in key[:-1])
        name = f"{name} L{key[-1]}" if key[-1] >= 0 else name
        anti = float((group.slope < 0).mean())
        fig.add_trace(go.Box(
            y=group.slope, name=f"{name}<br>anti {anti:.2f}", boxpoints="all", jitter=0.4, pointpos=0,
            text=list(group.prompt), hovertemplate="%{text}<br>slope %{y:.4f}<extra></extra>",
        ))
    fig.add_hline(y=0, line_dash="dot")
    fig.update_yaxes(title_text="slope of topic fraction per unit coefficient")
    fig.update_layout(title=title or "per-prompt steerability (below 0: anti-steerable)", height=420, width=900,
                      showlegend=False)
    return fig

