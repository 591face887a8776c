"""Shipped prompt sets by name, and the renamed name that still reads."""

from __future__ import annotations

import pytest

from labkit.datasets import ORGANISM_PROMPT_SETS, DataNotFoundError, read_prompt_set, read_prompts


def test_every_shipped_set_reads_by_name():
    for name in ORGANISM_PROMPT_SETS:
        rows = read_prompt_set(name, limit=2)
        assert len(rows) == 2 and all(isinstance(row, dict) and row for row in rows), name


def test_the_old_behaviour_spelling_reads_the_same_rows_with_a_warning():
    with pytest.warns(DeprecationWarning, match="'attribution_behaviour' is now 'attribution_behavior'"):
        old = read_prompts("attribution_behaviour", limit=5)
    assert old == read_prompts("attribution_behavior", limit=5)


def test_unknown_names_list_the_shipped_sets():
    with pytest.raises(DataNotFoundError, match="shipped sets: attribution_behavior, "):
        read_prompt_set("nope")
