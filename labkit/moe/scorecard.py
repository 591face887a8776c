"""The selection scorecard: does a rule's top-N beat N random experts of the same layers?

For every rule (:mod:`labkit.moe.selection`), every N and both interventions -- the top-N
switched **off** and forced **on** (MoTE 2025 §4; SteerMoE §3.2) -- three scores are measured
on held-out prompts: the **behaviour** score (where switching off should lower it; forcing on is
measured on the ``induce`` set, where it should raise it), an **off-target** score and a
**fluency** score. Each is compared with ``n_random`` random expert sets drawn with the same
number of experts in every layer and none of the rule's own (layer-matched random-N, MoTE's
control). The headline is **selected minus random** with a bootstrap interval that resamples
both the prompts (paired: the same prompts for both) and the random seeds:

    for b in 1..B:  prompts* = P draws with replacement,  seeds* = S draws with replacement
        diff*_b = mean_{i in prompts*} v_i - mean_{s in seeds*} mean_{i in prompts*} r_{s,i}

and the percentile interval of ``diff*`` (:func:`difference_interval`). Every masked evaluation
is a *cell* (one mask, one prompt set) persisted as JSON under ``out_dir``; a rerun loads the cells
already done and computes only the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from labkit.backends import backend_of
from labkit.checks import check_int

__all__ = ["METRICS", "ScoreSet", "difference_interval", "selection_scorecard"]

METRICS = ("behavior", "off_target", "fluency")
SCORES = ("probability", "logprob", "generated")
CELL_VERSION = 1


@dataclass(frozen=True)
class ScoreSet:
    """Prompts and how each is scored (one number per prompt).

    Attributes:
        name: a label for tables (``"sensitive"``, ``"addition"``).
        prompts: the prompts.
        targets: one continuation per prompt (a single string is used for every prompt):
            teacher-forced for ``"probability"`` / ``"logprob"``, the exact-match answer for
            ``"generated"`` without a detector.
        score: ``"probability"`` -- ``p(target | prompt)``; ``"logprob"`` -- mean log-probability
            per target token (nats); ``"generated"`` -- greedy text scored 1/0 by ``detector``
            (or by exact match with ``targets`` after :func:`labkit.evals.normalize_answer`).
            Teacher-forced scores need the Hugging Face backend; ``"generated"`` runs on both.
        detector: ``callable(text) -> bool`` for ``"generated"``.
        max_new_tokens: generation length for ``"generated"``.
    """

    name: str
    prompts: tuple[str, ...]
    targets: tuple[str, ...] | None = None
    score: Literal["probability", "logprob", "generated"] = "probability"
    detector: Callable[[str], bool] | None = None
    max_new_tokens: int = 8

    def __post_init__(self) -> None:
        where = f"ScoreSet({self.name!r})"
        if self.score not in SCORES:
            raise ValueError(f"{where}: score={self.score!r}; allowed: {SCORES}.")
        if isinstance(self.prompts, str) or not len(self.prompts) or not all(isinstance(p, str) for p in self.prompts):
            raise ValueError(f"{where}: prompts must be a non-empty list of strings, got {self.prompts!r:.80}.")
        object.__setattr__(self, "prompts", tuple(self.prompts))
        targets = self.targets
        if isinstance(targets, str):
            targets = (targets,) * len(self.prompts)
        if targets is not None:
            targets = tuple(targets)
            if len(targets) != len(self.prompts):
                raise ValueError(f"{where}: {len(targets)} targets for {len(self.prompts)} prompts; give one or one per prompt.")
        object.__setattr__(self, "targets", targets)
        if self.score != "generated" and targets is None:
            raise ValueError(f"{where}: score={self.score!r} needs targets (the continuation to score).")
        if self.score == "generated" and self.detector is None and targets is None:
            raise ValueError(f"{where}: score='generated' needs a detector or targets (exact-match answers).")
        check_int(self.max_new_tokens, "max_new_tokens", caller=where, minimum=1)

    def fingerprint(self) -> str:
        """A hash of everything that decides the scores (the detector by its ``repr``)."""
        document = [self.prompts, self.targets, self.score, repr(self.detector), self.max_new_tokens]
        return hashlib.sha1(json.dumps(document).encode()).hexdigest()[:16]

    def evaluate(self, model, *, batch_size: int = 32) -> np.ndarray:
        """Score every prompt under whatever interventions are open; ``float64[prompt]``.

        Raises:
            ValueError: a teacher-forced score on the vLLM engine (use ``score="generated"``).
        """
        if self.score == "generated":
            from labkit.evals import normalize_answer
            from labkit.generation import generate

            texts: list[str] = []
            for start in range(0, len(self.prompts), batch_size):
                texts += generate(model, list(self.prompts[start:start + batch_size]), max_new_tokens=self.max_new_tokens).texts
            if self.detector is not None:
                return np.array([float(bool(self.detector(t))) for t in texts])
            return np.array([float(normalize_answer(t) == normalize_answer(r)) for t, r in zip(texts, self.targets)])
        if not backend_of(model).supports("forward"):
            raise ValueError(
                f"ScoreSet({self.name!r}): score={self.score!r} is teacher-forced and needs the Hugging Face backend; "
                "on the vLLM engine use score='generated' (with a detector or exact-match targets)."
            )
        from labkit.moe.causal import target_logprobs

        logprob = target_logprobs(model, list(self.prompts), list(self.targets), batch_size=batch_size).double().numpy()
        if self.score == "probability":
            return np.exp(logprob)
        tokenizer = _tokenizer(model)
        lengths = np.array([len(tokenizer.encode(t, add_special_tokens=False)) for t in self.targets], dtype=np.float64)
        return logprob / lengths


def _tokenizer(model):
    return backend_of(model).tokenizer


# --- statistics ------------------------------------------------------------------------------------


def difference_interval(
    selected: Sequence[float], random: Sequence[Sequence[float]], *, n_bootstrap: int = 2000, confidence: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Means and percentile bootstrap intervals of the selected set, the random sets and their difference.

    The prompts are the same for the selected and every random set (paired); one bootstrap draw
    resamples ``P`` prompt indices and ``S`` seed indices with replacement (numpy
    ``default_rng(seed)``: first a ``(B, P)`` array of prompt indices, then a ``(B, S)`` array of
    seed indices) and computes ``sel* = mean v[prompts*]``, ``rnd* = mean_s* mean r[s*, prompts*]``
    and ``sel* - rnd*``.

    Args:
        selected: ``v[prompt]``, the score of each prompt with the rule's experts masked.
        random: ``r[seed][prompt]``, the same with each random set.
        n_bootstrap: draws ``B`` (≥ 1).
        confidence: interval level in (0, 1).
        seed: seeds the draws.

    Returns:
        ``selected, selected_low, selected_high, random, random_low, random_high, random_sd``
        (sd of the per-seed means), ``difference, difference_low, difference_high``.

    Raises:
        ValueError: empty or ragged inputs, prompt counts that differ, bad ``n_bootstrap`` /
            ``confidence``.
    """
    v = np.asarray(selected, dtype=np.float64)
    r = np.asarray(random, dtype=np.float64)
    if v.ndim != 1 or v.size == 0 or r.ndim != 2 or r.shape[0] == 0 or r.shape[1] != v.size:
        raise ValueError(
            f"difference_interval: selected must be [prompt] and random [seed, prompt] with the same prompts; got "
            f"{v.shape} and {r.shape}."
        )
    check_int(n_bootstrap, "n_bootstrap", caller="difference_interval", minimum=1)
    if not 0 < confidence < 1:
        raise ValueError(f"difference_interval: confidence={confidence!r} must lie in (0, 1).")
    rng = np.random.default_rng(seed)
    n_prompts, n_seeds = v.size, r.shape[0]
    prompts = rng.integers(0, n_prompts, size=(n_bootstrap, n_prompts))
    seeds = rng.integers(0, n_seeds, size=(n_bootstrap, n_seeds))
    sel = v[prompts].mean(axis=1)
    rnd = r[seeds[:, :, None], prompts[:, None, :]].mean(axis=(1, 2))
    q = ((1 - confidence) / 2, (1 + confidence) / 2)

    def interval(draws):
        low, high = np.quantile(draws, q)
        return float(low), float(high)

    seed_means = r.mean(axis=1)
    out = {"selected": float(v.mean()), "random": float(seed_means.mean()), "difference": float(v.mean() - seed_means.mean())}
    out["selected_low"], out["selected_high"] = interval(sel)
    out["random_low"], out["random_high"] = interval(rnd)
    out["difference_low"], out["difference_high"] = interval(sel - rnd)
    out["random_sd"] = float(seed_means.std(ddof=1)) if n_seeds > 1 else 0.0
    return out


# --- cells: one mask, one prompt set, persisted ----------------------------------------------------


def _mask_key(mask) -> list[list[Any]]:
    return [] if mask is None else [[e.layer, e.expert, e.mode, e.value] for e in mask.edits]


class _Cells:
    """Per-prompt scores of (mask, score set), in memory and, with ``out_dir``, one JSON file each."""

    def __init__(self, out_dir, model_name: str):
        self.dir = None if out_dir is None else Path(out_dir) / "cells"
        self.model_name = model_name
        self.memory: dict[str, np.ndarray] = {}

    def key(self, mask, score_set: ScoreSet) -> str:
        document = [self.model_name, _mask_key(mask), score_set.fingerprint(), CELL_VERSION]
        return hashlib.sha1(json.dumps(document).encode()).hexdigest()[:20]

    def get(self, key: str) -> np.ndarray | None:
        if key in self.memory:
            return self.memory[key]
        if self.dir is not None and (self.dir / f"{key}.json").is_file():
            document = json.loads((self.dir / f"{key}.json").read_text(encoding="utf-8"))
            self.memory[key] = np.array(document["values"], dtype=np.float64)
            return self.memory[key]
        return None

    def put(self, key: str, mask, score_set: ScoreSet, values: np.ndarray) -> None:
        self.memory[key] = values
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            document = {"kind": "labkit.ScorecardCell", "version": CELL_VERSION, "model_name": self.model_name,
                        "mask": _mask_key(mask), "score_set": score_set.name, "values": [float(x) for x in values]}
            temporary = self.dir / f"{key}.json.tmp"
            temporary.write_text(json.dumps(document) + "\n", encoding="utf-8")
            os.replace(temporary, self.dir / f"{key}.json")  # a cell is written whole or not at all


# --- the plan --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    """One (rule, mode, N) row of the scorecard: its selected mask and its random masks."""

    rule: str
    mode: str
    n: int
    n_label: str
    experts: tuple[tuple[int, int], ...]
    selected: Any  # ExpertMask
    randoms: tuple[Any, ...]


def _label(experts) -> str:
    return " ".join(f"L{layer}E{expert}" for layer, expert in experts)


def _check_model(model, selections: Mapping[str, Any]):
    from labkit.models import same_model
    from labkit.moe.families import find_routers

    routers = find_routers(model)
    layers, n_experts, top_k = tuple(r.layer for r in routers), routers[0].n_experts, routers[0].top_k
    name = backend_of(model).name
    for label, selection in selections.items():
        if not callable(getattr(selection, "top", None)) or not hasattr(selection, "layers"):
            raise TypeError(
                f"selection_scorecard: selections[{label!r}] is a {type(selection).__name__}; pass ExpertSelection "
                "objects from labkit.moe.selection."
            )
        if tuple(selection.layers) != layers or selection.n_experts != n_experts or not same_model(selection.model_name, name):
            raise ValueError(
                f"selection_scorecard: selections[{label!r}] scores model {selection.model_name!r} (layers "
                f"{tuple(selection.layers)}, {selection.n_experts} experts) but the model is {name!r} (layers {layers}, "
                f"{n_experts} experts); select experts on the model you evaluate."
            )
    return name or "model", layers, n_experts, top_k


def _n_grid(n_values, budget, n_cells) -> list[tuple[int, str]]:
    grid = []
    for n in n_values:
        check_int(n, "n_values item", caller="selection_scorecard", minimum=1)
        grid.append((n, str(n)))
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < 1:
            raise ValueError(f"selection_scorecard: budget={budget!r} must be a fraction of all routed experts in (0, 1), or None.")
        grid.append((max(1, round(budget * n_cells)), f"budget {budget:.1%}"))
    if not grid:
        raise ValueError("selection_scorecard: n_values is empty and budget is None; nothing to measure.")
    return grid


def _plan(model, selections, grid, modes, seeds, too_few, n_experts, top_k) -> tuple[list[_Row], list[str]]:
    from labkit.moe.masking import ExpertMask

    rows, skipped = [], []
    for rule, selection in selections.items():
        for mode in modes:
            cap = top_k if mode == "on" else n_experts - top_k
            for n, n_label in grid:
                try:
                    experts = tuple(selection.top(n, per_layer_cap=cap))
                except ValueError as error:
                    if too_few == "error":
                        raise ValueError(
                            f"selection_scorecard: rule {rule!r}, mode {mode!r}, N={n} ({n_label}): {error} "
                            "Pass too_few='skip' to leave such rows out (listed in frame.attrs['skipped'])."
                        ) from None
                    skipped.append(f"{rule} {mode} N={n} ({n_label}): {error}")
                    continue
                make = ExpertMask.on if mode == "on" else ExpertMask.off
                selected = make(list(experts), model=model)
                randoms = tuple(
                    ExpertMask.random(model, seed=s, exclude=experts, match_layers_of=selected, mode=mode) for s in seeds
                )
                rows.append(_Row(rule, mode, n, n_label, experts, selected, randoms))
    return rows, skipped


def _measure(model, rows, sets_for, baseline_sets, cells: _Cells, batch_size, progress) -> None:
    """Evaluate every (mask, set) cell not yet in ``cells``, one masked context per mask."""
    from tqdm.auto import tqdm

    from labkit.moe.masking import masked

    work: dict[str, tuple[Any, list[ScoreSet]]] = {}
    for mask, sets in [(None, baseline_sets)] + [(m, sets_for[row.mode]) for row in rows for m in (row.selected, *row.randoms)]:
        pending = [s for s in sets if cells.get(cells.key(mask, s)) is None]
        if pending:
            slot = work.setdefault(json.dumps(_mask_key(mask)), (mask, []))
            slot[1].extend(s for s in pending if s not in slot[1])
    total = sum(len(sets) for _, sets in work.values())
    with tqdm(total=total, desc="selection_scorecard", unit="cell", disable=not progress) as bar:
        for mask, sets in work.values():
            if mask is None:
                for score_set in sets:
                    cells.put(cells.key(None, score_set), None, score_set, score_set.evaluate(model, batch_size=batch_size))
                    bar.update(1)
                continue
            with masked(model, mask):
                for score_set in sets:
                    cells.put(cells.key(mask, score_set), mask, score_set, score_set.evaluate(model, batch_size=batch_size))
                    bar.update(1)


def selection_scorecard(
    model,
    selections,
    *,
    behavior: ScoreSet,
    off_target: ScoreSet,
    fluency: ScoreSet,
    induce: ScoreSet | None = None,
    n_values: Sequence[int] = (1, 2, 5, 10),
    budget: float | None = 0.05,
    modes: Sequence[str] = ("off", "on"),
    n_random: int = 10,
    seed: int = 0,
    too_few: Literal["error", "skip"] = "error",
    out_dir: str | os.PathLike | None = None,
    confidence: float = 0.95,
    n_bootstrap: int = 2000,
    batch_size: int = 32,
    progress: bool = True,
):
    """Score every rule's top-N, switched off and forced on, against layer-matched random-N sets.

    For each rule in ``selections``, each N in ``n_values`` plus the ``budget`` (a share of all
    routed experts, rounded, at least 1: SteerMoE switches ~5 % of OLMoE's experts, MoTE 0.07 %
    of R1's, SAFEx 0.2 % of Qwen3-30B-A3B's) and each mode:

    * ``off``: the rule's top N (at most ``n_experts - top_k`` per layer) switched off; the
      behaviour score is measured on ``behavior`` (it should fall).
    * ``on``: the top N under a cap of ``top_k`` per layer forced on; the behaviour score is
      measured on ``induce`` (default ``behavior``; e.g. control prompts, where it should rise).

    ``off_target`` and ``fluency`` are measured under every mask. Each row is compared with
    ``n_random`` masks of the same mode drawn by :meth:`ExpertMask.random` with seeds
    ``seed .. seed + n_random - 1``, the same number of experts in each layer and none of the
    rule's experts. Intervals: :func:`difference_interval` (prompts and seeds resampled).

    Resumable: with ``out_dir`` every (mask, prompt set) evaluation is written to
    ``out_dir/cells/<hash>.json`` as soon as it is done (the hash covers the model name, the
    mask and the prompt set with its scoring); a rerun -- after an interruption, or with more
    rules, N or seeds -- loads those and evaluates only what is missing. Identical masks (two
    rules with the same top N) are evaluated once.

    Args:
        model: a labkit model (Hugging Face bridge, or the vLLM engine with ``"generated"`` sets).
        selections: ``{name: ExpertSelection}`` (or a list, named by ``rule``).
        behavior, off_target, fluency: :class:`ScoreSet` s.
        induce: the behaviour set for ``on`` rows (default ``behavior``).
        n_values: the N grid.
        budget: share of all routed experts for one more N (``None``: none).
        modes: any of ``"off"``, ``"on"``.
        n_random: random sets per row (≥ 1; the issue's standard is ≥ 10).
        seed: first random-mask seed; also seeds the bootstrap.
        too_few: ``"error"``: an N above what a rule's filter keeps raises; ``"skip"``: such rows
            are left out and listed in ``frame.attrs["skipped"]``.
        out_dir: folder for the persisted cells (``None``: memory only).
        confidence: interval level.
        n_bootstrap: bootstrap draws per interval.
        batch_size: prompts per forward / generate call.
        progress: a ``tqdm`` bar over the cells still to evaluate.

    Returns:
        A ``pandas.DataFrame``, one row per (rule, mode, N, metric) with ``metric`` in
        :data:`METRICS`: ``rule, mode, n, n_label, experts, metric, score_set, baseline,
        selected, selected_low, selected_high, random, random_low, random_high, random_sd,
        difference, difference_low, difference_high, n_prompts, n_random, random_values``
        (the per-seed means). ``attrs``: ``skipped``, ``settings``.

    Raises:
        ValueError: selections of another model, bad N / budget / modes / n_random /
            ``too_few``, an N a rule cannot fill (``too_few="error"``), teacher-forced sets on
            the engine.
        TypeError: a selection that is not an :class:`ExpertSelection`.

    Example:
        >>> frame = selection_scorecard(model, {"fTRI": ftri, "causal": causal},  # doctest: +SKIP
        ...     behavior=ScoreSet("sensitive", sensitive, " I cannot"),
        ...     induce=ScoreSet("neutral", neutral, " I cannot"),
        ...     off_target=ScoreSet("tasks", questions, answers, score="logprob"),
        ...     fluency=ScoreSet("answers", neutral, neutral_answers, score="logprob"),
        ...     out_dir="runs/scorecard")
    """
    import pandas as pd

    caller = "selection_scorecard"
    selections = dict(selections) if isinstance(selections, Mapping) else {s.rule: s for s in selections}
    if not selections:
        raise ValueError(f"{caller}: selections is empty; pass {{name: ExpertSelection}}.")
    for name, value in (("behavior", behavior), ("off_target", off_target), ("fluency", fluency), ("induce", induce)):
        if value is not None and not isinstance(value, ScoreSet):
            raise TypeError(f"{caller}: {name} is a {type(value).__name__}; pass a labkit.moe.scorecard.ScoreSet.")
    modes = tuple(modes)
    if not modes or any(m not in ("off", "on") for m in modes) or len(set(modes)) != len(modes):
        raise ValueError(f"{caller}: modes={modes!r}; use a non-empty subset of ('off', 'on').")
    if too_few not in ("error", "skip"):
        raise ValueError(f"{caller}: too_few={too_few!r}; allowed: 'error', 'skip'.")
    check_int(n_random, "n_random", caller=caller, minimum=1)
    check_int(seed, "seed", caller=caller)
    model_name, layers, n_experts, top_k = _check_model(model, selections)
    grid = _n_grid(tuple(n_values), budget, len(layers) * n_experts)
    induce = behavior if induce is None else induce
    seeds = tuple(range(seed, seed + n_random))
    rows, skipped = _plan(model, selections, grid, modes, seeds, too_few, n_experts, top_k)

    sets_for = {"off": [behavior, off_target, fluency], "on": [induce, off_target, fluency]}
    baseline_sets = list(dict.fromkeys([behavior, induce, off_target, fluency]))
    cells = _Cells(out_dir, model_name)
    _measure(model, rows, sets_for, baseline_sets, cells, batch_size, progress)

    records = []
    for index, row in enumerate(rows):
        for metric, score_set in zip(METRICS, sets_for[row.mode]):
            values = cells.get(cells.key(row.selected, score_set))
            random = np.stack([cells.get(cells.key(mask, score_set)) for mask in row.randoms])
            stats = difference_interval(values, random, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed)
            records.append({
                "rule": row.rule, "mode": row.mode, "n": row.n, "n_label": row.n_label, "experts": _label(row.experts),
                "metric": metric, "score_set": score_set.name,
                "baseline": float(cells.get(cells.key(None, score_set)).mean()), **stats,
                "n_prompts": int(values.size), "n_random": len(row.randoms),
                "random_values": tuple(float(x) for x in random.mean(axis=1)),
            })
    columns = ["rule", "mode", "n", "n_label", "experts", "metric", "score_set", "baseline", "selected", "selected_low",
               "selected_high", "random", "random_low", "random_high", "random_sd", "difference", "difference_low",
               "difference_high", "n_prompts", "n_random", "random_values"]
    frame = pd.DataFrame(records, columns=columns)
    frame.attrs["skipped"] = skipped
    frame.attrs["settings"] = {"model": model_name, "n_values": list(n_values), "budget": budget, "modes": list(modes),
                               "n_random": n_random, "seed": seed, "confidence": confidence, "n_bootstrap": n_bootstrap}
    return frame
