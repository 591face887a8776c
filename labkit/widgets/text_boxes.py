"""The panels' text boxes and rate labels, as HTML strings (pure functions, no widgets)."""

from __future__ import annotations

import html

__all__ = ["TEXT_STYLE", "format_rate", "text_box"]

#: CSS of a completion box: monospace, wrapped, framed.
TEXT_STYLE = (
    "white-space:pre-wrap;font-family:var(--jp-code-font-family,monospace);"
    "border:1px solid var(--jp-border-color1,#ccc);padding:6px;min-height:5em;"
)


def text_box(title: str, text: str, css_class: str, body_html: str | None = None) -> str:
    """A titled box holding ``text`` (escaped) or ready ``body_html``; CSS classes ``{css_class}-box`` / ``-text``."""
    body = html.escape(text) if body_html is None else body_html
    return (
        f'<div class="{css_class}-box"><b>{html.escape(title)}</b>'
        f'<div class="{css_class}-text" style="{TEXT_STYLE}">{body}</div></div>'
    )


def format_rate(rate) -> str:
    """A float or a :class:`labkit.evals.Rate` as ``"93% [85–97%]"``; ``"…"`` while pending."""
    if rate is None:
        return "…"
    if hasattr(rate, "rate"):
        return f"{rate.rate:.0%} [{rate.ci_low:.0%}–{rate.ci_high:.0%}]"
    return f"{float(rate):.0%}"
