"""The nbval sanitizer (tests/nbval_sanitize.cfg), read and applied the way nbval does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from nbval.plugin import get_sanitize_patterns

CONFIG = Path(__file__).with_name("nbval_sanitize.cfg")
REPO = Path(__file__).resolve().parents[1]


def sanitize(text: str) -> str:
    for regex, replace in get_sanitize_patterns(CONFIG.read_text()):
        text = re.sub(regex, replace, text)
    return text


@pytest.mark.parametrize(
    "text, expected",
    [
        ("took 0.27 s per step", "took TIME per step"),
        ("first token 0.009 s, 8 tokens 12ms", "first token TIME, 8 tokens TIME"),
        ("Wall time: 469 s (3 seconds idle, 2.5sec)", "Wall time: TIME (TIME idle, TIME)"),
        ("What happened in Ravengard in the 1900s?", "What happened in Ravengard in the 1900s?"),
        ("the 1950s, 1930s and 1990s", "the 1950s, 1930s and 1990s"),
        ("a 1950 s pause", "a TIME pause"),  # a number, a space, a unit: a timing
        ("object at 0x7f3a9c2b10d0", "object at 0xADDRESS"),
    ],
)
def test_sanitizer_rewrites_timings_not_decades(text, expected):
    assert sanitize(text) == expected


def test_every_nbval_marker_is_one_nbval_reads():
    """nbval reads a marker only when the comment is exactly the marker: ``# NBVAL_IGNORE_OUTPUT
    (why)`` is silently ignored and the cell's output is compared after all (seen in notebook 06)."""
    import json

    from nbval.plugin import comment_markers

    wrong = []
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        for index, cell in enumerate(json.loads(path.read_text())["cells"]):
            if cell["cell_type"] != "code":
                continue
            for line in "".join(cell["source"]).splitlines():
                comment = line.strip().lstrip("#").strip()
                if line.strip().startswith("#") and comment.upper().startswith("NBVAL") and comment not in comment_markers:
                    wrong.append(f"{path.name} cell {index}: {line.strip()!r}")
    assert not wrong, "put the marker alone on its line:\n" + "\n".join(wrong)


def test_no_notebook_stores_widget_state():
    """Executing a notebook with live panels saves every widget's state (plotly.js included: 5 MB for
    notebook 07) in its metadata; the state is useless offline and must be stripped before commit."""
    import json

    stored = [p.name for p in sorted((REPO / "notebooks").glob("*.ipynb")) if "widgets" in json.loads(p.read_text())["metadata"]]
    assert not stored, f"strip metadata['widgets'] from {stored}"
