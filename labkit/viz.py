"""Pure functions from labkit results to plotly figures: no model access, no global state.

Every function takes plain data (an :class:`~labkit.moe.attribution.ExpertAttribution`, an
:class:`~labkit.moe.masking.ExpertMask`, the table of :func:`labkit.moe.compare_conditions`) and
returns a new ``plotly.graph_objects.Figure``; the same input gives the same figure (snapshot
tests compare ``fig.to_dict()``), in the spirit of CircuitsVis.
"""

from __future__ import annotations

import math

__all__ = [
    "condition_plot", "expert_heatmap", "residual_norm_heatmap", "scorecard_plot", "steerability_plot", "steering_tradeoff",
    "sweep_heatmap",
]

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
    import numpy as np
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
    x_values = list(range(n_experts))
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
    figure = go.Figure(
        go.Heatmap(
            z=score.tolist(),
            x=x_values,
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
    )
    q = attribution.q_value.double().numpy()
    rows, columns = np.nonzero(q < attribution.alpha)
    figure.add_trace(
        go.Scatter(
            x=[int(c) for c in columns],
            y=[y_labels[r] for r in rows],
            mode="markers",
            marker=dict(symbol="circle-open", size=14, color="gold", line=dict(width=2, color="gold")),
            name=f"q < {attribution.alpha:g}",
            hoverinfo="skip",
        )
    )
    if mask is not None:
        edits = [e for e in _mask_edits(mask) if e[0] in layers]
        for mode in ("off", "on", "bias"):
            chosen = [e for e in edits if e[2] == mode]
            if not chosen:
                continue
            figure.add_trace(
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
    if title is None:
        floor = attribution.noise_floor
        floor_text = "n/a" if floor is None or not math.isfinite(floor) else f"{floor:.3f}"
        title = (
            f"{attribution.model_name}: {attribution.metric} ({attribution.aggregate}-level), "
            f"{attribution.behavior_prompts} behaviour vs {attribution.control_prompts} control prompts; "
            f"noise floor {floor_text}"
        )
    figure.update_layout(
        title=dict(text=title, font=dict(size=13)),
        xaxis=dict(title="expert", dtick=1 if n_experts <= 32 else None, showgrid=False),
        yaxis=dict(title="layer", autorange="reversed", type="category", showgrid=False),
        height=height or max(260, 60 + 36 * len(layers)),
        legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1.0),
        plot_bgcolor="white",
        template="plotly_white",
    )
    return figure


def _label(row) -> str:
    condition, n = row["condition"], int(row["n"])
    if condition == "baseline":
        return "baseline"
    if condition == "top_off":
        return f"top-{n} off"
    if condition == "random_off":
        return f"random-{n} off"
    if condition == "random_off_mean":
        return f"random-{n} off"
    if condition == "top_on":
        return f"top-{n} on"
    if condition == "top_bias":
        return f"top-{n} bias {row['bias']:+g}"
    return f"{condition} {n}"


def _panels(table) -> list[tuple[str, str, str]]:
    """``(title, value column, stem)`` for behaviour, control and each task set."""
    panels = [("behaviour rate", "behavior_rate", "behavior"), ("control (false-positive) rate", "control_rate", "control")]
    for column in table.columns:
        if column.endswith("_accuracy"):
            stem = column[: -len("_accuracy")]
            panels.append((f"{stem} accuracy", column, stem))
    return panels


def condition_plot(table, *, title: str | None = None):
    """Bar chart of the :func:`labkit.moe.compare_conditions` table: one panel per measure.

    Panels: behaviour rate, control (false-positive) rate, then accuracy per task set. Bars
    are the conditions in table order; error bars are the Wilson intervals, except for the
    random-mask bars, which show the mean over seeds with +/- one standard deviation *across
    seeds* and the individual seeds as grey dots (MoTE, section 4: random deactivation gives
    smaller, noisier shifts). Conditions a panel does not measure (e.g. forced-on on behaviour
    prompts) are left out of that panel.

    Args:
        table: the ``pandas.DataFrame`` returned by ``compare_conditions``.
        title: figure title.

    Returns:
        A ``plotly.graph_objects.Figure``.

    Raises:
        ValueError: the table lacks the ``condition``/``n`` columns or any measure column.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    missing = [c for c in ("condition", "n") if c not in table.columns]
    if missing:
        raise ValueError(
            f"condition_plot: the table lacks columns {missing}; pass the DataFrame from compare_conditions."
        )
    panels = [p for p in _panels(table) if p[1] in table.columns]
    if not panels:
        raise ValueError("condition_plot: the table has no *_rate or *_accuracy columns to plot.")
    summary = table[table.condition != "random_off"]
    seeds = table[table.condition == "random_off"]
    labels = [_label(row) for _, row in summary.iterrows()]
    colours = {
        "baseline": "#7f7f7f",
        "top_off": "#d62728",
        "random_off_mean": "#aec7e8",
        "top_on": "#2ca02c",
        "top_bias": "#9467bd",
    }
    figure = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[0] for p in panels], shared_yaxes=True)
    for index, (_, column, stem) in enumerate(panels, start=1):
        xs, ys, plus, minus, colour, hover = [], [], [], [], [], []
        for label, (_, row) in zip(labels, summary.iterrows()):
            value = row[column]
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            if row["condition"] == "random_off_mean":
                spread = row.get(f"{stem}_sd", 0.0)
                spread = 0.0 if spread is None or math.isnan(spread) else float(spread)
                plus.append(spread)
                minus.append(spread)
                hover.append(f"{label}: mean {value:.3f} +/- {spread:.3f} (sd over seeds)")
            else:
                low, high = row.get(f"{stem}_ci_low", value), row.get(f"{stem}_ci_high", value)
                plus.append(float(high - value))
                minus.append(float(value - low))
                hover.append(f"{label}: {value:.3f} [{low:.3f}, {high:.3f}]")
            xs.append(label)
            ys.append(float(value))
            colour.append(colours.get(row["condition"], "#1f77b4"))
        figure.add_trace(
            go.Bar(
                x=xs,
                y=ys,
                marker_color=colour,
                error_y=dict(type="data", array=plus, arrayminus=minus, visible=True),
                hovertext=hover,
                hoverinfo="text",
                showlegend=False,
                name=column,
            ),
            row=1,
            col=index,
        )
        if column in seeds.columns and seeds[column].notna().any():
            figure.add_trace(
                go.Scatter(
                    x=[_label(row) for _, row in seeds.iterrows()],
                    y=[float(v) for v in seeds[column]],
                    mode="markers",
                    marker=dict(color="#444444", size=6, symbol="circle"),
                    name="random seeds",
                    showlegend=index == 1,
                    text=[f"seed {int(s)}" for s in seeds["seed"]],
                    hovertemplate="%{x}, %{text}: %{y:.3f}<extra></extra>",
                ),
                row=1,
                col=index,
            )
    figure.update_yaxes(range=[0, 1.05], title_text="rate", row=1, col=1)
    figure.update_xaxes(categoryorder="array", categoryarray=list(dict.fromkeys(labels)), tickangle=-40)
    figure.update_layout(
        title=dict(text=title or "Expert masking: behaviour and off-target skills", font=dict(size=14)),
        height=420,
        width=max(700, 320 * len(panels)),
        template="plotly_white",
        bargap=0.25,
    )
    return figure


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


# --- steering: sweep heatmap, method trade-off, per-prompt steerability ----------------------


def _check_columns(table, needed: set[str], where: str) -> None:
    columns = set(getattr(table, "columns", ()))
    if not needed <= columns:
        raise ValueError(f"{where}: the table needs columns {sorted(needed)}, got {sorted(columns)}.")


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

    _check_columns(table, {"method", "layer", "coefficient", "topic_fraction", "perplexity"}, "sweep_heatmap")
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
        _check_columns(table, {"layer", "coefficient", "ratio", "perplexity_ratio"}, f"topic_sweep_heatmaps[{topic!r}]")
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

    _check_columns(table, {"method", "layer", "coefficient", "topic_fraction", "perplexity"}, "steering_tradeoff")
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

    _check_columns(slopes, {"method", "layer", "prompt", "slope"}, "steerability_plot")
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


_SCORECARD_COLUMNS = {"rule", "mode", "n", "n_label", "metric", "difference", "difference_low", "difference_high"}
_SCORECARD_METRICS = {"behavior": "behaviour", "off_target": "off-target", "fluency": "fluency"}


def scorecard_plot(frame, *, title: str | None = None):
    """Selected minus random, per rule and N: the headline of :func:`labkit.moe.selection_scorecard`.

    One panel per (mode, metric): rows are the modes present (``off``: experts switched off,
    ``on``: forced on), columns the metrics (behaviour, off-target, fluency). In each panel the
    x axis is N (``n_label``, the budget last), one line of markers per rule, with the bootstrap
    interval of ``difference`` (prompts and random seeds resampled) as error bars; the dashed
    zero line is "no better than random". Pure function of the frame.

    Args:
        frame: the ``pandas.DataFrame`` returned by ``selection_scorecard``.
        title: figure title.

    Returns:
        A ``plotly.graph_objects.Figure``.

    Raises:
        ValueError: the frame lacks scorecard columns, or has no rows.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    _check_columns(frame, _SCORECARD_COLUMNS, "scorecard_plot")
    if len(frame) == 0:
        raise ValueError("scorecard_plot: the frame has no rows (every row skipped?); nothing to draw.")
    modes = [m for m in ("off", "on") if (frame["mode"] == m).any()]
    metrics = [m for m in _SCORECARD_METRICS if (frame["metric"] == m).any()]
    order = list(dict.fromkeys(frame.sort_values("n", kind="stable")["n_label"]))
    budget = [label for label in order if label.startswith("budget")]
    order = [label for label in order if label not in budget] + budget
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    rules = list(dict.fromkeys(frame["rule"]))
    titles = [f"{'switched off' if mode == 'off' else 'forced on'}: {_SCORECARD_METRICS[m]}" for mode in modes for m in metrics]
    figure = make_subplots(rows=len(modes), cols=len(metrics), subplot_titles=titles, horizontal_spacing=0.07, vertical_spacing=0.16)
    for r, mode in enumerate(modes, start=1):
        for c, metric in enumerate(metrics, start=1):
            for k, rule in enumerate(rules):
                part = frame[(frame["mode"] == mode) & (frame["metric"] == metric) & (frame["rule"] == rule)]
                part = part.set_index("n_label").reindex([label for label in order if label in set(part["n_label"])])
                if part.empty:
                    continue
                figure.add_trace(
                    go.Scatter(
                        x=list(part.index), y=part["difference"].astype(float), mode="lines+markers", name=rule,
                        legendgroup=rule, showlegend=r == 1 and c == 1, line=dict(color=palette[k % len(palette)], width=1),
                        marker=dict(size=7, color=palette[k % len(palette)]),
                        error_y=dict(type="data", visible=True,
                                     array=(part["difference_high"] - part["difference"]).astype(float),
                                     arrayminus=(part["difference"] - part["difference_low"]).astype(float)),
                        hovertemplate=f"{rule}, N=%{{x}}: %{{y:.3f}}<extra></extra>",
                    ),
                    row=r, col=c,
                )
            figure.add_hline(y=0.0, line=dict(color="#555555", dash="dash", width=1), row=r, col=c)
            figure.update_xaxes(type="category", categoryorder="array", categoryarray=order, title_text="N", row=r, col=c)
        figure.update_yaxes(title_text="selected − random", row=r, col=1)
    figure.update_layout(
        title=dict(text=title or "Expert-selection rules against layer-matched random experts", font=dict(size=14)),
        height=300 * len(modes) + 80, width=max(720, 330 * len(metrics)), template="plotly_white",
        legend=dict(orientation="h", yanchor="bottom", y=1.06, xanchor="right", x=1.0),
    )
    return figure
