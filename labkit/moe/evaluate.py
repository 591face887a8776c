"""The MoTE evaluation table: behaviour, false positives and task accuracy under expert masks.

MoTE ("Mixture of Tunable Experts", 2025, section 4) switches off the top-N refusal experts
found by fTRI and reports (a) the refusal rate on sensitive prompts, (b) performance on
unrelated tasks, against two controls: switching off N *random* experts (smaller, noisier
shifts) and *forcing* the top experts on (more refusals). :func:`compare_conditions` runs
exactly that grid with ``labkit.generate`` inside ``labkit.moe.masked`` and returns one
``pandas.DataFrame``; :func:`labkit.viz.condition_plot` draws it.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["compare_conditions"]

CONDITIONS = ("baseline", "top_off", "random_off", "random_off_mean", "top_on", "top_bias")


def _experts_label(experts: Sequence[tuple[int, int]]) -> str:
    return " ".join(f"L{layer}E{expert}" for layer, expert in experts)


def _check(
    attribution, behavior_prompts, control_prompts, task_sets, n_values, random_seeds, batch_size
) -> None:
    if not callable(getattr(attribution, "top", None)):
        raise TypeError(
            f"compare_conditions: attribution is a {type(attribution).__name__} without .top(n); pass the "
            "ExpertAttribution from labkit.moe.attribute_experts."
        )
    for name, prompts in (("behavior_prompts", behavior_prompts), ("control_prompts", control_prompts)):
        if isinstance(prompts, str) or len(prompts) == 0:
            raise ValueError(f"compare_conditions: {name} must be a non-empty list of prompts, got {prompts!r}.")
    for name, pair in task_sets.items():
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(
                f"compare_conditions: task_sets[{name!r}] must be (prompts, answers), got {type(pair).__name__}."
            )
        prompts, answers = pair
        if len(prompts) != len(answers) or not prompts:
            raise ValueError(
                f"compare_conditions: task_sets[{name!r}] has {len(prompts)} prompts and {len(answers)} answers; "
                "give one answer per prompt (and at least one)."
            )
    for n in n_values:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"compare_conditions: n_values must be ints >= 1, got {tuple(n_values)!r}.")
    if len(set(random_seeds)) != len(tuple(random_seeds)):
        raise ValueError(f"compare_conditions: random_seeds repeat: {tuple(random_seeds)!r}.")
    if batch_size < 1:
        raise ValueError(f"compare_conditions: batch_size={batch_size!r} must be >= 1.")


def _random_mask(model, top_mask, exclude, seed):
    """Random-N off, matched per layer to ``top_mask`` and disjoint from ``exclude``.

    Falls back to excluding only the top-N experts themselves when a layer has too few experts
    left outside ``exclude`` (tiny models); warns when it does.
    """
    from labkit.moe.masking import ExpertMask

    try:
        return ExpertMask.random(model, seed=seed, exclude=exclude, match_layers_of=top_mask)
    except ValueError as error:
        warnings.warn(
            f"compare_conditions: random mask (seed {seed}) cannot avoid all {len(exclude)} attributed "
            f"experts ({error}); it avoids only the {len(top_mask)} experts of the top-N mask.",
            stacklevel=3,
        )
        return ExpertMask.random(model, seed=seed, match_layers_of=top_mask)


def compare_conditions(
    model,
    *,
    attribution,
    behavior_prompts: Sequence[str],
    control_prompts: Sequence[str],
    task_sets: Mapping[str, tuple[Sequence[str], Sequence[str]]] | None = None,
    detector: Callable[[str], bool] | None = None,
    n_values: Sequence[int] = (2, 5, 10),
    random_seeds: Sequence[int] = (0, 1, 2, 3, 4),
    force_on: bool = True,
    bias_values: Sequence[float] = (),
    bias_n: int | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    chat: bool = False,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    normalize: Any = "default",
    confidence: float = 0.95,
    progress: bool = True,
):
    """Measure behaviour and off-target skills under expert masks: MoTE's table (section 4).

    Conditions (column ``condition``):

    * ``baseline`` -- no mask.
    * ``top_off`` -- the top-``n`` attributed experts switched off, for each ``n`` in
      ``n_values``.
    * ``random_off`` -- ``n`` random experts off, one row per seed in ``random_seeds``: as many
      per layer as the top-``n`` mask has (matched layers), none of them among the top
      ``max(n_values)`` attributed experts (falls back, with a warning, to avoiding only the
      top-``n`` when a layer is too small). ``random_off_mean`` rows give the mean over seeds,
      with the spread across seeds in the ``*_sd`` columns.
    * ``top_on`` -- the top-``n`` experts forced on (``force_on=True``), run on the control
      prompts only: MoTE's forced activation raised refusals, i.e. the false-positive rate. A
      token takes only ``top_k`` experts, so at most ``top_k`` per layer are forced (the best
      ``n`` under that cap, column ``experts``); an ``n`` whose capped set equals a smaller
      ``n``'s is not run again.
    * ``top_bias`` -- a soft selection bias ``b`` (column ``bias``) on the top-``bias_n``
      experts for each ``b`` in ``bias_values`` (negative: less often chosen).

    Every condition generates with the same seed and settings, so rows differ only by the mask.

    Args:
        model: a labkit bridge of a MoE model.
        attribution: an :class:`~labkit.moe.attribution.ExpertAttribution` (or any object with
            ``.top(n) -> [(layer, expert), ...]``).
        behavior_prompts: prompts that elicit the behaviour (use held-out ones, not the prompts
            the experts were attributed on).
        control_prompts: prompts that should not; their behaviour rate is the false-positive rate.
        task_sets: ``{name: (prompts, answers)}`` off-target tasks scored by exact match.
        detector: ``callable(text) -> bool``; default :class:`labkit.evals.RefusalDetector()`.
        n_values: mask sizes N.
        random_seeds: seeds of the random masks.
        force_on: add ``top_on`` rows.
        bias_values: selection biases for ``top_bias`` rows (empty: none).
        bias_n: how many top experts get the bias (default ``max(n_values)``).
        max_new_tokens, temperature, top_p, seed, chat: passed to :func:`labkit.generate`.
        batch_size: prompts per ``generate`` call.
        normalize: answer normalisation for :func:`labkit.evals.exact_match_accuracy`.
        confidence: level of the Wilson intervals.
        progress: show a ``tqdm`` bar over generate calls.

    Returns:
        A ``pandas.DataFrame``, one row per (condition, n, seed, bias), with columns
        ``condition, n, seed, bias, experts``, then for ``behavior`` and ``control``:
        ``*_rate, *_ci_low, *_ci_high, *_count, *_n, *_sd``, and per task set ``<name>_accuracy,
        <name>_ci_low, <name>_ci_high, <name>_sd``. Cells a condition does not measure are NaN.
        ``frame.attrs["examples"]`` maps ``"<condition> n=<n> seed=<seed> bias=<b>"`` to the first
        three behaviour completions (to spot a garbled "non-refusal").

    Raises:
        ValueError: empty prompt sets, task sets whose prompts and answers differ in length,
            bad ``n_values`` / ``batch_size``, or repeated seeds.
        TypeError: ``attribution`` has no ``.top``.

    Example:
        >>> table = compare_conditions(model, attribution=attribution,  # doctest: +SKIP
        ...     behavior_prompts=split.behavior_heldout, control_prompts=split.control_heldout,
        ...     task_sets={"addition": (questions, answers)}, n_values=(2, 5))
    """
    from labkit.evals import RefusalDetector

    task_sets = dict(task_sets or {})
    behavior_prompts, control_prompts = list(behavior_prompts), list(control_prompts)
    _check(attribution, behavior_prompts, control_prompts, task_sets, n_values, random_seeds, batch_size)
    detector = RefusalDetector() if detector is None else detector
    n_values = tuple(n_values)
    bias_n = max(n_values) if bias_n is None else bias_n
    all_sets = ("behavior", "control", *task_sets)
    plan = _plan(model, attribution, n_values, random_seeds, force_on, bias_values, bias_n, all_sets)
    sets = {"behavior": (behavior_prompts, None), "control": (control_prompts, None)}
    sets.update({name: (list(prompts), list(answers)) for name, (prompts, answers) in task_sets.items()})
    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, chat=chat)
    rows, examples = _measure(
        model, plan, sets, settings, detector=detector, normalize=normalize, confidence=confidence,
        batch_size=batch_size, progress=progress,
    )
    value_columns = [f"{name}_rate" for name in ("behavior", "control")] + [f"{name}_accuracy" for name in task_sets]
    return _frame(_with_random_means(rows, random_seeds, value_columns), task_sets, examples, detector)


#: One planned condition: its row key (condition, n, seed, bias, experts), its mask (``None``:
#: no mask) and the prompt sets it is measured on.
_PlannedRow = tuple[dict[str, Any], Any, tuple[str, ...]]


def _plan(model, attribution, n_values, random_seeds, force_on, bias_values, bias_n, all_sets) -> list[_PlannedRow]:
    """Every condition of :func:`compare_conditions`, in table order, with its mask."""
    from labkit.moe.masking import ExpertMask

    excluded = attribution.top(max(n_values)) if n_values else []
    top_k = getattr(attribution, "top_k", None)
    forced_sets: list[list[tuple[int, int]]] = []
    plan: list[_PlannedRow] = [
        ({"condition": "baseline", "n": 0, "seed": math.nan, "bias": math.nan, "experts": ""}, None, all_sets)
    ]
    for n in n_values:
        top = attribution.top(n)
        top_mask = ExpertMask.from_attribution(attribution, n, mode="off", model=model)
        key = {"n": n, "seed": math.nan, "bias": math.nan, "experts": _experts_label(top)}
        plan.append(({"condition": "top_off", **key}, top_mask, all_sets))
        for random_seed in random_seeds:
            mask = _random_mask(model, top_mask, excluded, random_seed)
            row = {"condition": "random_off", "n": n, "seed": random_seed, "bias": math.nan}
            plan.append(({**row, "experts": _experts_label(mask.experts())}, mask, all_sets))
        if force_on:
            # a token takes only top_k experts, so at most top_k per layer can be forced on: the
            # best n under that cap (fewer when n > layers x top_k; a set already run is skipped)
            forced = attribution.top(n, per_layer_cap=top_k) if top_k else top
            if forced and forced not in forced_sets:
                forced_sets.append(forced)
                row = {"condition": "top_on", "n": n, "seed": math.nan, "bias": math.nan}
                plan.append(({**row, "experts": _experts_label(forced)}, ExpertMask.on(forced, model=model), ("control",)))
    for value in bias_values:
        mask = ExpertMask.from_attribution(attribution, bias_n, mode="bias", value=float(value), model=model)
        key = {"condition": "top_bias", "n": bias_n, "seed": math.nan, "bias": float(value)}
        plan.append(({**key, "experts": _experts_label(attribution.top(bias_n))}, mask, all_sets))
    return plan


def _measure(model, plan: list[_PlannedRow], sets, settings, *, detector, normalize, confidence, batch_size, progress):
    """Generate every planned condition's completions under its mask and score them.

    Returns:
        ``(rows, examples)``: one dict per planned condition (its key plus the measured
        columns), and the first three behaviour completions per condition.
    """
    from tqdm.auto import tqdm

    from labkit.evals import behavior_rate, exact_match_accuracy
    from labkit.generation import generate
    from labkit.moe.masking import masked

    calls = sum(math.ceil(len(sets[name][0]) / batch_size) for _, _, names in plan for name in names)
    rows, examples = [], {}
    with tqdm(total=calls, desc="compare_conditions", disable=not progress) as bar:
        for key, mask, names in plan:
            row = dict(key)
            with contextlib.ExitStack() as stack:
                if mask is not None and len(mask):
                    stack.enter_context(masked(model, mask))
                for name in names:
                    prompts, answers = sets[name]
                    texts: list[str] = []
                    for start in range(0, len(prompts), batch_size):
                        texts += generate(model, prompts[start : start + batch_size], **settings).texts
                        bar.update(1)
                    if answers is None:
                        rate = behavior_rate(texts, detector, confidence=confidence)
                        row.update({
                            f"{name}_rate": rate.rate, f"{name}_ci_low": rate.ci_low,
                            f"{name}_ci_high": rate.ci_high, f"{name}_count": rate.count, f"{name}_n": rate.n,
                        })
                        if name == "behavior":
                            label = f"{key['condition']} n={key['n']} seed={key['seed']} bias={key['bias']}"
                            examples[label] = texts[:3]
                    else:
                        accuracy = exact_match_accuracy(texts, answers, normalize=normalize, confidence=confidence)
                        row.update({
                            f"{name}_accuracy": accuracy.rate, f"{name}_ci_low": accuracy.ci_low,
                            f"{name}_ci_high": accuracy.ci_high,
                        })
            rows.append(row)
    return rows, examples


def _with_random_means(rows: list[dict[str, Any]], random_seeds, value_columns: list[str]) -> list[dict[str, Any]]:
    """The rows with a ``random_off_mean`` row (mean and sd over seeds) after each N's last random seed."""
    import numpy as np

    ordered = []
    for row in rows:
        ordered.append(row)
        if row["condition"] == "random_off" and row["seed"] == random_seeds[-1]:
            same = [r for r in rows if r["condition"] == "random_off" and r["n"] == row["n"]]
            mean = {"condition": "random_off_mean", "n": row["n"], "seed": math.nan, "bias": math.nan, "experts": ""}
            for column in value_columns:
                values = np.array([r.get(column, math.nan) for r in same], dtype=float)
                stem = column.rsplit("_", 1)[0]
                mean[column] = float(values.mean())
                mean[f"{stem}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            ordered.append(mean)
    return ordered


def _frame(ordered: list[dict[str, Any]], task_sets, examples, detector):
    """The rows as the documented ``pandas.DataFrame`` (fixed columns; examples and detector in ``attrs``)."""
    import pandas as pd

    columns = ["condition", "n", "seed", "bias", "experts"]
    for name in ("behavior", "control"):
        columns += [f"{name}_{s}" for s in ("rate", "ci_low", "ci_high", "count", "n", "sd")]
    for name in task_sets:
        columns += [f"{name}_{s}" for s in ("accuracy", "ci_low", "ci_high", "sd")]
    frame = pd.DataFrame(ordered).reindex(columns=columns)
    frame["n"] = frame["n"].astype(int)
    frame["seed"] = frame["seed"].astype("Int64")  # <NA> where a condition has no seed
    frame.attrs["examples"] = examples
    frame.attrs["detector"] = repr(detector)
    return frame
