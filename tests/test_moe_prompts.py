"""fTRI templates: loading, expansion, deterministic disjoint splits, slot errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from labkit.moe.prompts import PromptSplit, PromptTemplate, expand_templates, load_fillers, load_templates

FTRI = Path(__file__).resolve().parent.parent / "data" / "prompts" / "ftri"
FILLERS = {
    "behavior": {"time": [" in 1989", " in 1959"], "place": [" at Tiananmen Square"]},
    "control": {"time": [" in 1815", " in 1969", " in 1889"], "place": [" at Waterloo", " in Paris"]},
}


def test_shipped_set_loads_and_expands():
    templates = load_templates(FTRI)
    fillers = load_fillers(FTRI)
    assert templates[0] == PromptTemplate("what_happened", "What happened{time}{place}?", "both")
    assert templates[0].slots == ("time", "place")
    split = expand_templates(templates, fillers, seed=0)
    assert len(split.behavior_train) + len(split.behavior_heldout) == 104
    assert len(split.behavior_heldout) == round(0.2 * 104)
    assert "What happened in June 1989 at Tiananmen Square?" in split.behavior_train + split.behavior_heldout
    assert (FTRI / "README.md").read_text().count("Provenance") == 1


def test_parts_are_disjoint_and_complete():
    split = expand_templates(["What happened{time}{place}?", "Describe{place}{time}."], FILLERS, seed=1)
    parts = [split.behavior_train, split.behavior_heldout, split.control_train, split.control_heldout]
    everything = [p for part in parts for p in part]
    assert len(everything) == len(set(everything)) == 2 * 2 + 2 * 6
    assert all(part for part in parts)


def test_deterministic_across_processes():
    # prompts.py needs only the standard library: load it by path so the child process does
    # not pay for importing torch via labkit/__init__.py
    code = (
        "import json, importlib.util as u; spec=u.spec_from_file_location('p', 'labkit/moe/prompts.py');"
        "import sys; m=sys.modules['p']=u.module_from_spec(spec); spec.loader.exec_module(m); d='data/prompts/ftri';"
        "s=m.expand_templates(m.load_templates(d), m.load_fillers(d), seed=5, n=30);"
        "print(json.dumps(s.to_dict()))"
    )
    root = FTRI.parent.parent.parent
    runs = [
        subprocess.run(
            [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
            env={"PYTHONHASHSEED": str(hash_seed), "PATH": ""},
        ).stdout
        for hash_seed in (1, 2)
    ]
    assert runs[0] == runs[1]
    here = expand_templates(load_templates(FTRI), load_fillers(FTRI), seed=5, n=30)
    assert PromptSplit.from_dict(json.loads(runs[0])) == here
    other = expand_templates(load_templates(FTRI), load_fillers(FTRI), seed=6, n=30)
    assert other.behavior_train != here.behavior_train


def test_n_samples_per_condition():
    split = expand_templates(load_templates(FTRI), load_fillers(FTRI), seed=0, n=20, holdout=0.25)
    assert (len(split.behavior_train), len(split.behavior_heldout)) == (15, 5)
    assert (len(split.control_train), len(split.control_heldout)) == (15, 5)
    with pytest.raises(ValueError, match="n=500 behavior prompts requested, only 104"):
        expand_templates(load_templates(FTRI), load_fillers(FTRI), seed=0, n=500)


def test_holdout_by_template_holds_out_whole_templates():
    templates = load_templates(FTRI)
    split = expand_templates(templates, load_fillers(FTRI), seed=0, holdout_by="template")
    assert len(split.heldout_templates) == 2
    wording = {t.id: t.template.split("{")[0] for t in templates}
    for prompt in split.behavior_heldout + split.control_heldout:
        assert any(prompt.startswith(wording[i]) for i in split.heldout_templates)
    for prompt in split.behavior_train:
        assert not any(prompt.startswith(wording[i]) for i in split.heldout_templates)


def test_unfilled_slot_is_an_error_naming_the_slot():
    with pytest.raises(ValueError, match=r"uses slot \{weather\}.*no behavior"):
        expand_templates(["What happened{time} in {weather}?"], FILLERS, seed=0)
    only_behavior = {"behavior": {"time": [" in 1989"]}}
    with pytest.raises(ValueError, match=r"slot \{time\}, but no control"):
        expand_templates(["What happened{time}?"], only_behavior, seed=0)
    with pytest.raises(ValueError, match="not a slot name"):
        PromptTemplate("bad", "What happened {}?")
    with pytest.raises(ValueError, match="format spec"):
        PromptTemplate("bad", "What happened {time:>5}?")
    with pytest.raises(ValueError, match="both behaviour and control"):
        expand_templates(["Hello{x}"], {"both": {"x": ["!"]}}, seed=0)
    with pytest.raises(ValueError, match="condition"):
        expand_templates(["Hi{x}"], {"neutral": {"x": ["!"]}}, seed=0)


def test_literal_braces_and_loader_errors(tmp_path):
    split = expand_templates(["{{json}}{time}"], FILLERS, seed=0, holdout=0.0)
    assert "{json} in 1989" in split.behavior_train
    (tmp_path / "templates.jsonl").write_text('{"id": "a"}\n')
    with pytest.raises(ValueError, match="needs 'id' and 'template'"):
        load_templates(tmp_path)
    with pytest.raises(FileNotFoundError, match="fillers.jsonl"):
        load_fillers(tmp_path)


def test_fillers_must_be_lists_of_strings():
    bare = {"behavior": {"time": " in 1989"}, "control": {"time": [" in 1815"]}}
    with pytest.raises(TypeError, match=r"fillers\['behavior'\]\['time'\] is a str \(' in 1989'\); expected a list or tuple of strings. Wrap a single value in a list: \[' in 1989'\]"):
        expand_templates(["What happened{time}?"], bare, seed=0)
    with pytest.raises(TypeError, match=r"fillers\['control'\]\['time'\] holds 1815 of type int"):
        expand_templates(["What happened{time}?"], {"behavior": {"time": ["a"]}, "control": {"time": [1815]}}, seed=0)
    with pytest.raises(TypeError, match=r"fillers\['control'\] is a list; expected a dict"):
        expand_templates(["What happened{time}?"], {"behavior": {"time": ["a"]}, "control": [" b"]}, seed=0)
    with pytest.raises(TypeError, match=r"fillers is a list; expected a dict"):
        expand_templates(["What happened{time}?"], [], seed=0)
    # tuples are fine
    split = expand_templates(["What happened{time}?"], {"behavior": {"time": (" in 1989",)}, "control": {"time": (" in 1815",)}}, seed=0, holdout=0.0)
    assert split.behavior_train == ("What happened in 1989?",)
