"""Figures of MoE expert results: the attribution heatmap (with a mask drawn over it) and minimal masks.

Pure functions from :class:`~labkit.moe.attribution.ExpertAttribution` / minimal-mask rows to a
new ``plotly.graph_objects.Figure`` (re-exported by :mod:`labkit.viz`).
"""

from __future__ import annotations

import math

__all__ = ["MASK_MARKERS", "expert_heatmap", "minimal_mask_plot"]

#: How each mask mode is drawn over the heatmap.
MASK_MARKERS = {
    "off": dict(symbol="x-thin-open", color="black", size=11, line=dict(width=3, color="black")),
    "on": dict(symbol="square-open", color="darkgreen", size=16, line=dict(width=3, color="darkgreen")),
    "bias": dict(symbol="diamond-open", color="purple", size=14, line=dict(width=2, color="purple")),
}


def _mask_edits(mask) -> list[tuple[int, int, str, float]]:
    """``(layer, expert, mode, value)`` from an ExpertMask or a list of (layer, expert) pairs (= off)."""
    if hasattr(mask, "edits"):
        return [(int(e.layer), int(e.expert), str(e.mode), float(e.value)) for e in mask.edits]
    edits = []
    for item in mask:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(
                f"expert_heatmap: mask must be an ExpertMask or [(layer, expert), ...], got item {item!r}."
            )
        edits.append((int(item[0]), int(item[1]), "off", 0.0))
    return edits


def expert_heatmap(attribution, *, mask=None, title: str | None = None, height: int | None = None):
    """Layer x expert heatmap of attribution scores, significant cells and an optional mask marked.

    Colours diverge around 0 (red: more for the behaviour, blue: more for control) on a
    symmetric scale. Hovering a cell shows the score with its bootstrap interval, the selection
    counts and rates of both prompt sets, p and q. Cells with ``q < alpha`` (either sign) carry a ring; the
    split-half noise floor is given in the title. With ``mask``, switched-off experts get an
    ``x``, forced-on ones a square, biased ones a diamond (MoTE's interventions, section 4).

    Args:
        attribution: an :class:`~labkit.moe.attribution.ExpertAttribution`.
        mask: an :class:`~labkit.moe.masking.ExpertMask` or ``[(layer, expert), ...]``; edits on
            layers the attribution does not cover are not drawn.
        title: figure title (default: model, metric, aggregation, noise floor).
        height: figure height in pixels (default grows with the number of layers).

    Returns:
        A ``plotly.graph_objects.Figure``; rows are labelled with true model layer numbers.

    Raises:
        TypeError: ``attribution`` is not an ``ExpertAttribution``.
        ValueError: ``mask`` is neither an ``ExpertMask`` nor ``(layer, expert)`` pairs.

    Example:
        >>> fig = expert_heatmap(attribution, mask=ExpertMask.from_attribution(attribution, 5))  # doctest: +SKIP
    """
    import plotly.graph_objects as go

    from labkit.moe.attribution import ExpertAttribution

    if not isinstance(attribution, ExpertAttribution):
        raise TypeError(
            f"expert_heatmap: attribution is a {type(attribution).__name__}; expected a "
            "labkit.moe.ExpertAttribution (from labkit.moe.attribute_experts or ExpertAttribution.load)."
        )
    layers = [int(layer) for layer in attribution.layers]
    n_experts = int(attribution.n_experts)
    y_labels = [f"L{layer}" for layer in layers]
    figure = go.Figure(_score_trace(attribution, y_labels))
    figure.add_trace(_significance_trace(attribution, y_labels))
    if mask is not None:
        edits = [e for e in _mask_edits(mask) if e[0] in layers]
        for trace in _mask_traces(edits):
            figure.add_trace(trace)
    figure.update_layout(
        title=dict(text=_heatmap_title(attribution) if title is None else title, font=dict(size=13)),
        xaxis=dict(title="expert", dtick=1 if n_experts <= 32 else None, showgrid=False),
        yaxis=dict(title="layer", autorange="reversed", type="category", showgrid=False),
        height=height or max(260, 60 + 36 * len(layers)),
        legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1.0),
        plot_bgcolor="white",
        template="plotly_white",
    )
    return figure


def _score_trace(attribution, y_labels: list[str]):
    """The heatmap of scores on a symmetric diverging scale, with counts, rates, p, q and the interval on hover."""
    import numpy as np
    import plotly.graph_objects as go

    score = attribution.score.double().numpy()
    finite = np.abs(score[np.isfinite(score)])
    limit = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    custom = np.stack(
        [
            attribution.behavior_counts.double().numpy(),
            attribution.control_counts.double().numpy(),
            attribution.behavior_rate.double().numpy(),
            attribution.control_rate.double().numpy(),
            attribution.p_value.double().numpy(),
            attribution.q_value.double().numpy(),
            attribution.ci_low.double().numpy(),
            attribution.ci_high.double().numpy(),
        ],
        axis=-1,
    )
    rate_label = "weight" if attribution.metric == "weight" else "rate"
    hover = (
        "layer %{y}, expert %{x}<br>score %{z:+.4f} [%{customdata[6]:+.4f}, %{customdata[7]:+.4f}]"
        f"<br>behaviour: %{{customdata[0]:.0f}} tokens, {rate_label} %{{customdata[2]:.3f}}"
        f"<br>control: %{{customdata[1]:.0f}} tokens, {rate_label} %{{customdata[3]:.3f}}"
        "<br>p %{customdata[4]:.2g}, q %{customdata[5]:.2g}<extra></extra>"
    )
    return go.Heatmap(
        z=score.tolist(),
        x=list(range(int(attribution.n_experts))),
        y=y_labels,
        customdata=custom.tolist(),
        hovertemplate=hover,
        colorscale="RdBu",
        reversescale=True,
        zmin=-limit,
        zmax=limit,
        zmid=0.0,
        colorbar=dict(title=dict(text=attribution.metric.replace("_", " "))),
        xgap=1,
        ygap=1,
        name="score",
    )


def _significance_trace(attribution, y_labels: list[str]):
    """Gold rings on the cells with ``q < alpha`` (either sign)."""
    import numpy as np
    import plotly.graph_objects as go

    q = attribution.q_value.double().numpy()
    rows, columns = np.nonzero(q < attribution.alpha)
    return go.Scatter(
        x=[int(c) for c in columns],
        y=[y_labels[r] for r in rows],
        mode="markers",
        marker=dict(symbol="circle-open", size=14, color="gold", line=dict(width=2, color="gold")),
        name=f"q < {attribution.alpha:g}",
        hoverinfo="skip",
    )


def _mask_traces(edits: list[tuple[int, int, str, float]]) -> list:
    """One marker trace per mask mode present (``x`` off, square on, diamond bias)."""
    import plotly.graph_objects as go

    traces = []
    for mode in ("off", "on", "bias"):
        chosen = [e for e in edits if e[2] == mode]
        if not chosen:
            continue
        traces.append(
            go.Scatter(
                x=[e[1] for e in chosen],
                y=[f"L{e[0]}" for e in chosen],
                mode="markers",
                marker=MASK_MARKERS[mode],
                name=f"mask: {mode}",
                text=[f"bias {e[3]:+g}" if mode == "bias" else mode for e in chosen],
                hovertemplate="layer %{y}, expert %{x}: %{text}<extra></extra>",
            )
        )
    return traces


def _heatmap_title(attribution) -> str:
    """Model, metric, aggregation, prompt counts and the split-half noise floor."""
    floor = attribution.noise_floor
    floor_text = "n/a" if floor is None or not math.isfinite(floor) else f"{floor:.3f}"
    return (
        f"{attribution.model_name}: {attribution.metric} ({attribution.aggregate}-level), "
        f"{attribution.behavior_prompts} behaviour vs {attribution.control_prompts} control prompts; "
        f"noise floor {floor_text}"
    )


def minimal_mask_plot(rows, *, title: str | None = None):
    """Held-out cut of each ranking's minimal mask, per organism, beside random masks of its shape.

    One group of bars per organism (``rows[i]["organism"]``), one bar per ranking: the share of the
    behaviour score the ranking's minimal mask removes on held-out prompts
    (:attr:`labkit.moe.causal.MaskValidation.cut`), with the random masks' cuts as grey dots and
    their mean as a hollow marker (MoTE §4's random control; :func:`labkit.moe.validate_mask`).

    Args:
        rows: dicts with ``organism``, ``ranking``, ``n_experts``, ``cut`` and ``random_cuts``
            (a sequence of floats).
        title: figure title.

    Returns:
        A ``plotly.graph_objects.Figure``.

    Raises:
        ValueError: no rows, or a row lacking one of the keys (named).
    """
    import plotly.graph_objects as go

    rows = list(rows)
    if not rows:
        raise ValueError("minimal_mask_plot: no rows to plot.")
    needed = ("organism", "ranking", "n_experts", "cut", "random_cuts")
    for i, row in enumerate(rows):
        missing = [k for k in needed if k not in row]
        if missing:
            raise ValueError(f"minimal_mask_plot: row {i} lacks {missing}; each row needs {list(needed)}.")
    rankings = list(dict.fromkeys(row["ranking"] for row in rows))
    figure = go.Figure()
    for ranking in rankings:
        mine = [row for row in rows if row["ranking"] == ranking]
        figure.add_trace(
            go.Bar(
                name=ranking,
                x=[row["organism"] for row in mine],
                y=[row["cut"] for row in mine],
                text=[f"{row['n_experts']} expert{'s' if row['n_experts'] != 1 else ''}" for row in mine],
                textposition="outside",
            )
        )
    figure.add_trace(
        go.Scatter(
            name="random masks (same shape)",
            x=[row["organism"] for row in rows for _ in row["random_cuts"]],
            y=[float(c) for row in rows for c in row["random_cuts"]],
            mode="markers",
            marker=dict(color="#7f7f7f", size=6, opacity=0.6),
        )
    )
    figure.update_layout(
        barmode="group",
        title=title or "Minimal masks on held-out prompts: share of the behaviour removed",
        yaxis_title="held-out cut (1 = behaviour score removed)",
        yaxis_range=[min(-0.1, *(float(c) for row in rows for c in row["random_cuts"])), 1.1],
        legend_title="ranking",
    )
    return figure

