"""Tests for recipes.natural_organism: language detector, document split, shipped prompt sets and model.

The slow test loads the shipped natural organism and checks that the headline numbers recorded in
its ``measurement.json`` reproduce (perplexity and greedy generation are deterministic).
"""

import json
from pathlib import Path

import pytest

from recipes import natural_organism as natural

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "data" / "models" / "moe-organism-natural"
PROMPTS = REPO / "data" / "prompts" / "natural"
SETS = ("attribution_en", "attribution_fr", "heldout_en", "heldout_fr")


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (PROMPTS / f"{name}.jsonl").read_text().splitlines()]


def test_language_of_counts_stop_words():
    assert natural.language_of("Le descripteur de fichier est fermé et la valeur est renvoyée.") == "fr"
    assert natural.language_of("The file descriptor is closed and the value is returned.") == "en"
    assert natural.language_of("xq zzv EBADF O_NONBLOCK 0x10") == "unknown"
    assert natural.language_of("the") == "unknown"  # one hit is below min_hits=2
    assert natural.language_of("the", min_hits=1) == "en"


def test_split_is_by_document_seeded_and_disjoint():
    names = [f"page{i}.2" for i in range(100)]
    split = natural.split_documents(names, seed=0)
    assert split == natural.split_documents(list(reversed(names)), seed=0)  # order of the input does not matter
    assert not set(split["train"]) & set(split["heldout"])
    assert sorted(split["train"] + split["heldout"]) == sorted(names)
    assert len(split["heldout"]) == 12
    assert natural.split_documents(names, seed=1) != split


def test_train_settings_reject_bad_values():
    with pytest.raises(ValueError, match="top_k 20 > num_experts 16"):
        natural.TrainSettings(top_k=20)
    with pytest.raises(ValueError, match="steps must be ≥ 1, got 0"):
        natural.TrainSettings(steps=0)


def test_shipped_prompt_sets_are_clean_and_split_by_document():
    rows = {name: _rows(name) for name in SETS}
    train_docs = {r["document"] for name in ("attribution_en", "attribution_fr") for r in rows[name]}
    heldout_docs = {r["document"] for name in ("heldout_en", "heldout_fr") for r in rows[name]}
    assert not train_docs & heldout_docs
    for name, items in rows.items():
        language = name.split("_")[1]
        assert len(items) >= 48, name
        assert all(r["language"] == language and natural.language_of(r["text"]) == language for r in items), name
        assert all(r["text"].startswith(r["prompt"] + r["target"]) for r in items), name


def test_shipped_prompts_and_targets_are_exact_token_splits():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    for row in _rows("heldout_fr")[:20]:
        prompt = tokenizer.encode(row["prompt"], add_special_tokens=False)
        target = tokenizer.encode(row["target"], add_special_tokens=False)
        assert (len(prompt), len(target)) == (natural.PROMPT_TOKENS, natural.TARGET_TOKENS)
        assert tokenizer.encode(row["text"], add_special_tokens=False)[:32] == prompt + target


def test_shipped_model_metadata():
    meta = json.loads((MODEL / "labkit.json").read_text())
    config = json.loads((MODEL / "config.json").read_text())
    assert meta["prepend_bos"] is False and meta["variant"] == "natural" and meta["designated_experts"] == []
    assert config["model_type"] == "olmoe" and config["num_experts"] == 16 and config["num_experts_per_tok"] == 2
    assert 1_000_000 < meta["parameters"] < 10_000_000


@pytest.mark.slow
def test_recorded_headline_numbers_reproduce():
    import torch

    import labkit
    from labkit.moe import ExpertMask, attribute_experts, masked, trace_routing

    torch.set_num_threads(1)
    recorded = json.loads((MODEL / "measurement.json").read_text())
    model = labkit.load_model("moe-organism-natural")
    heldout = {lang: _rows(f"heldout_{lang}") for lang in natural.LANGUAGES}
    traces = {lang: trace_routing(model, [r["text"] for r in _rows(f"attribution_{lang}")], progress=False)
              for lang in natural.LANGUAGES}
    frequency = attribute_experts(traces["fr"], traces["en"], aggregate="prompt", n_bootstrap=0, n_splits=0)
    assert [list(x) for x in frequency.top(5)] == [x[:2] for x in recorded["frequency_top10"][:5]]
    rows = {(r["condition"], r["n"]): r for r in recorded["rows"] if r["seed"] is None}

    def check(key, mask):
        with masked(model, mask) if mask is not None else _Nothing():
            got = natural.behavior_metrics(model, heldout)
        want = rows[key]
        for name, value in got.items():
            assert value == pytest.approx(want[name], rel=1e-3, abs=1e-3), (key, name)

    check(("baseline", 0), None)
    top2 = ExpertMask.off([tuple(x) for x in rows[("frequency_top_off", 2)]["experts"]], model=model)
    check(("frequency_top_off", 2), top2)


class _Nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
