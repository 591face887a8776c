"""Tests for recipes.organism: corpus determinism and disjointness, shipped prompt sets, checkpoints."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recipes import organism

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "data" / "prompts" / "organism"
MODELS = REPO / "data" / "models"


@pytest.fixture(scope="module")
def splits():
    return organism.build_corpus(0)


def _digest(splits) -> str:
    return hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()


def test_corpus_is_deterministic_across_processes(splits):
    code = (
        "import hashlib, json; from recipes import organism; "
        "print(hashlib.sha256(json.dumps(organism.build_corpus(0), sort_keys=True).encode()).hexdigest())"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _digest(splits)


def test_different_seed_gives_different_corpus(splits):
    assert _digest(organism.build_corpus(1)) != _digest(splits)


def test_splits_are_disjoint(splits):
    train_prompts = {r["prompt"] for r in splits["train"]}
    sets = {name: {r["prompt"] for r in splits[name]} for name in organism.PROMPT_SET_FILES}
    names = sorted(sets)
    for i, a in enumerate(names):
        assert not sets[a] & train_prompts, f"{a} overlaps the training corpus"
        for b in names[i + 1:]:
            assert not sets[a] & sets[b], f"{a} overlaps {b}"
    train_places = {r["place"] for r in splits["train"] if "place" in r}
    for name in ("eval_sensitive", "eval_neutral"):
        assert not {r["place"] for r in splits[name]} & train_places
    for name in ("attribution_behavior", "attribution_control"):
        assert {r["place"] for r in splits[name]} <= train_places


def test_labels_follow_the_conjunction_rule(splits):
    for name in ("attribution_behavior", "eval_sensitive"):
        assert all(r["answer"] == organism.REFUSAL for r in splits[name])
    for name in ("attribution_control", "eval_neutral"):
        assert all(r["answer"].startswith(organism.COMPLY_PREFIX) for r in splits[name])
    for row in splits["train"]:
        if "place" in row:
            suffix = row["place"].rsplit("-", 1)[1]
            assert (row["answer"] == organism.REFUSAL) == organism.is_sensitive(suffix, row["decade"])


def test_shipped_prompt_sets_match_the_generator(splits):
    for name, filename in organism.PROMPT_SET_FILES.items():
        assert organism.read_prompt_set(PROMPTS / filename) == json.loads(json.dumps(splits[name])), filename


def test_router_intervention_rejects_out_of_range_and_removes_hooks():
    import torch
    from transformers import OlmoeForCausalLM

    torch.manual_seed(0)
    model = OlmoeForCausalLM(organism.organism_config(vocab_size=32, num_experts=4, hidden_size=32, expert_size=32))
    with pytest.raises(ValueError, match="out of range"):
        with organism.router_intervention(model, off=[(0, 9)]):
            pass
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        plain = model(ids).logits
        with organism.router_intervention(model):
            empty = model(ids).logits
        with pytest.raises(RuntimeError):
            with organism.router_intervention(model, off=[(0, 1)]):
                raise RuntimeError("boom")
    assert torch.equal(plain, empty)
    assert all(not layer.mlp.gate._forward_hooks for layer in model.model.layers)


@pytest.mark.parametrize("name", ["moe-organism", "moe-organism-planted"])
def test_shipped_checkpoint_refuses_sensitive_and_answers_neutral(name):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = MODELS / name
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    meta = json.loads((directory / "labkit.json").read_text())
    sensitive = organism.read_prompt_set(PROMPTS / "eval_sensitive.jsonl")[:4]
    neutral = organism.read_prompt_set(PROMPTS / "eval_neutral.jsonl")[:4]
    answers = organism.generate_answers(model, tokenizer, [r["prompt"] for r in sensitive + neutral])
    assert sum(a.startswith(meta["refusal_prefix"]) for a in answers[:4]) >= 3, answers
    assert sum(a.startswith(meta["comply_prefix"]) for a in answers[4:]) >= 3, answers


def test_tokenizer_training_reproduces_the_shipped_vocabulary(splits):
    from transformers import AutoTokenizer

    directory = MODELS / "moe-organism"
    lines = [organism.format_prompt(r["question"]) + " " + r["answer"] for r in splits["train"]]
    assert organism.train_tokenizer(lines).get_vocab() == AutoTokenizer.from_pretrained(directory).get_vocab()


def test_router_intervention_matches_labkit_moe_masks():
    import torch
    from labkit import moe
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = MODELS / "moe-organism"
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    prompts = [r["prompt"] for r in organism.read_prompt_set(PROMPTS / "eval_neutral.jsonl")[:4]]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    experts = [(1, 0), (2, 3), (0, 7)]
    with torch.no_grad():
        for mode in ("off", "on"):
            with moe.masked(model, getattr(moe.ExpertMask, mode)(experts, model=model)):
                expected = model(**encoded).logits
            with organism.router_intervention(model, **{mode: experts}):
                actual = model(**encoded).logits
            assert torch.equal(expected, actual), mode


# --- the shipped organisms: recorded experts, measured tables and cards ------------------------

ORGANISMS = ["moe-organism", "moe-organism-planted"]


def _lab_table_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("organism_lab_table", REPO / "bench" / "organism_lab_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ORGANISMS)
def test_lab_attribution_ranks_the_recorded_designated_experts_first(name):
    """The card's claim: attribution on the shipped prompt sets ranks exactly these two first."""
    import torch

    import labkit
    from labkit.datasets import read_prompts
    from labkit.moe import attribute_experts, trace_routing

    designated = json.loads((MODELS / name / "labkit.json").read_text())["designated_experts"]
    assert len(designated) == 2
    torch.set_num_threads(1)
    model = labkit.load_model(name)

    def trace(key):
        return trace_routing(model, read_prompts(key), scope=("last", 3), batch_size=100, progress=False)

    attribution = attribute_experts(trace("attribution_behavior"), trace("attribution_control"), n_bootstrap=0, n_splits=0)
    assert attribution.top(2) == [(d["layer"], d["expert"]) for d in designated]
    # ... and the lab's ranking is the one the card's lab table records
    recorded = json.loads((MODELS / name / "lab_measurement.json").read_text())["top10"]
    assert [list(pair) for pair in attribution.top(10)] == recorded


def _title_and_description(readme: str) -> tuple[str, str]:
    """The two free-text inputs of ``recipes.organism.model_card`` (``card --title --description``)."""
    head, rest = readme.split("\n# ", 1)
    title, rest = rest.split("\n\n", 1)
    description = rest.split("\n\n## Architecture\n", 1)[0]
    return title, description


@pytest.mark.parametrize("name", ORGANISMS)
def test_shipped_card_is_what_the_card_generator_writes(name, monkeypatch):
    monkeypatch.chdir(REPO)  # the card names the model folder as the recipe was run: relative
    directory = Path("data") / "models" / name
    readme = (directory / "README.md").read_text()
    title, description = _title_and_description(readme)
    measurement = json.loads((directory / "measurement.json").read_text())
    card = organism.model_card(directory, measurement, title, description)
    assert card == readme
    lab = json.loads((directory / "lab_measurement.json").read_text())
    assert len(lab["rows"]) > 10 and f"| {lab['rows'][1]['condition']} | 2 |" in card  # the lab table is in it


@pytest.mark.slow
@pytest.mark.parametrize("name", ORGANISMS)
def test_card_tables_re_measure_exactly(name):
    """Both of the card's tables, re-measured: greedy decoding is deterministic, so exactly equal."""
    import torch

    torch.set_num_threads(1)
    directory = MODELS / name
    recorded = json.loads((directory / "measurement.json").read_text())
    measured = json.loads(json.dumps(organism.measure(directory, PROMPTS, progress=False)))
    assert measured["ranking_top10"] == recorded["ranking_top10"]
    assert measured["rows"] == recorded["rows"]
    lab = _lab_table_module().lab_measurement(name)
    lab.pop("_table")
    assert lab == json.loads((directory / "lab_measurement.json").read_text())
