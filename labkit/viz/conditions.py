"""Figures of MoE evaluation tables: masking conditions and the selection-rule scorecard.

Pure functions from the tables of :func:`labkit.moe.compare_conditions` and
:func:`labkit.moe.selection_scorecard` to a new ``plotly.graph_objects.Figure`` (re-exported by
:mod:`labkit.viz`).
"""

from __future__ import annotations

import math

from labkit.checks import check_columns

__all__ = ["condition_plot", "scorecard_plot"]


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
    figure = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[0] for p in panels], shared_yaxes=True)
    for index, (_, column, stem) in enumerate(panels, start=1):
        figure.add_trace(_condition_bars(summary, labels, column, stem), row=1, col=index)
        if column in seeds.columns and seeds[column].notna().any():
            figure.add_trace(_seed_markers(seeds, column, show_legend=index == 1), row=1, col=index)
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


#: Bar colour per condition (others: plotly's default blue).
_CONDITION_COLOURS = {
    "baseline": "#7f7f7f",
    "top_off": "#d62728",
    "random_off_mean": "#aec7e8",
    "top_on": "#2ca02c",
    "top_bias": "#9467bd",
}


def _condition_bars(summary, labels: list[str], column: str, stem: str):
    """One panel's bars: Wilson intervals as error bars, the random mean with +/- one sd across seeds.

    Conditions the panel does not measure (a missing or NaN value) are left out.
    """
    import plotly.graph_objects as go

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
        colour.append(_CONDITION_COLOURS.get(row["condition"], "#1f77b4"))
    return go.Bar(
        x=xs,
        y=ys,
        marker_color=colour,
        error_y=dict(type="data", array=plus, arrayminus=minus, visible=True),
        hovertext=hover,
        hoverinfo="text",
        showlegend=False,
        name=column,
    )


def _seed_markers(seeds, column: str, *, show_legend: bool):
    """The individual random-mask seeds as grey dots over their mean's bar."""
    import plotly.graph_objects as go

    return go.Scatter(
        x=[_label(row) for _, row in seeds.iterrows()],
        y=[float(v) for v in seeds[column]],
        mode="markers",
        marker=dict(color="#444444", size=6, symbol="circle"),
        name="random seeds",
        showlegend=show_legend,
        text=[f"seed {int(s)}" for s in seeds["seed"]],
        hovertemplate="%{x}, %{text}: %{y:.3f}<extra></extra>",
    )


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

    check_columns(frame, _SCORECARD_COLUMNS, "scorecard_plot")
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
