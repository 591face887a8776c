"""fTRI prompt sets: templates with slots, filled into behaviour and control prompts.

MoTE ("Mixture of Tunable Experts", 2025, section 3) elicits a behaviour with templated prompts
such as ``What happened {time}{place}?``: behaviour prompts fill the slots with values that
trigger the behaviour (a censored event), control prompts fill the *same* templates with matched
neutral values, so whatever the template wording does to routing cancels out of the attribution.

:func:`expand_templates` turns templates and fillers into a :class:`PromptSplit` -- behaviour /
control x train / held-out, disjoint, and a deterministic function of the seed (``random.Random``
seeded with a string, which Python hashes with SHA-512, never with the per-process ``hash``).
The shipped set is ``data/prompts/ftri`` (see its README for provenance).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labkit import storage

__all__ = ["PromptSplit", "PromptTemplate", "expand_templates", "load_fillers", "load_templates"]

CONDITIONS = ("behavior", "control", "both")
TEMPLATES_FILE = "templates.jsonl"
FILLERS_FILE = "fillers.jsonl"

#: Fillers: ``{condition: {slot: [value, ...]}}`` with condition ``behavior``, ``control`` or
#: ``both`` (values usable in either set).
Fillers = Mapping[str, Mapping[str, Sequence[str]]]


@dataclass(frozen=True)
class PromptTemplate:
    """One template with ``{slot}`` fields.

    Attributes:
        id: a short unique name (used for ``holdout_by="template"``).
        template: the text, ``str.format`` syntax, e.g. ``"What happened{time}{place}?"``.
        condition: ``"both"``, ``"behavior"`` or ``"control"`` -- which sets it is expanded for.
    """

    id: str
    template: str
    condition: str = "both"

    def __post_init__(self) -> None:
        if self.condition not in CONDITIONS:
            raise ValueError(
                f"PromptTemplate {self.id!r}: condition {self.condition!r} not in {CONDITIONS}."
            )
        self.slots  # parse once so a malformed template fails where it is made

    @property
    def slots(self) -> tuple[str, ...]:
        """The slot names in order of first appearance.

        Raises:
            ValueError: a positional field (``{}`` / ``{0}``), a format spec or conversion
                (``{time:>5}``, ``{time!r}``), or unbalanced braces.
        """
        names: list[str] = []
        try:
            parsed = list(string.Formatter().parse(self.template))
        except ValueError as error:
            raise ValueError(f"PromptTemplate {self.id!r}: cannot parse {self.template!r}: {error}.") from None
        for _, field, spec, conversion in parsed:
            if field is None:
                continue
            if not field.isidentifier():
                raise ValueError(
                    f"PromptTemplate {self.id!r}: field {{{field}}} in {self.template!r} is not a slot "
                    "name; slots are named, e.g. {time} (use {{ and }} for literal braces)."
                )
            if spec or conversion:
                raise ValueError(
                    f"PromptTemplate {self.id!r}: slot {{{field}}} has a format spec or conversion; "
                    "use plain {name} slots."
                )
            if field not in names:
                names.append(field)
        return tuple(names)


@dataclass(frozen=True)
class PromptSplit:
    """Behaviour and control prompts, each split into train (attribution) and held-out (evaluation).

    The four tuples are pairwise disjoint. Attribute experts on ``*_train``; measure behaviour
    rates after masking on ``*_heldout`` so the experts are not chosen on the prompts they are
    judged on.
    """

    behavior_train: tuple[str, ...]
    behavior_heldout: tuple[str, ...]
    control_train: tuple[str, ...]
    control_heldout: tuple[str, ...]
    seed: int
    holdout: float
    holdout_by: str
    heldout_templates: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with ``kind``/``version``."""
        return {
            "kind": "labkit.PromptSplit",
            "version": 1,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PromptSplit":
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: not a dict of kind ``"labkit.PromptSplit"``, or of a newer version.
        """
        storage.check_kind(dict(data), "labkit.PromptSplit", 1, caller="PromptSplit.from_dict", source="the dict")
        values = {k: v for k, v in data.items() if k not in ("kind", "version")}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def __repr__(self) -> str:
        return (
            f"PromptSplit(behavior {len(self.behavior_train)} train / {len(self.behavior_heldout)} held out, "
            f"control {len(self.control_train)} / {len(self.control_heldout)}, seed={self.seed}, "
            f"holdout={self.holdout} by {self.holdout_by})"
        )


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg}).") from None
    return rows


def _file(path: str | os.PathLike, default_name: str) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / default_name
    if not path.is_file():
        raise FileNotFoundError(f"no {default_name} at {str(path)!r}.")
    return path


def load_templates(path: str | os.PathLike) -> list[PromptTemplate]:
    """Read templates from a JSONL file (or a directory holding ``templates.jsonl``).

    Each row: ``{"id": str, "template": str, "condition": "both" | "behavior" | "control"}``
    (``condition`` optional, default ``"both"``).

    Returns:
        The templates in file order.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a row lacks ``id``/``template``, an id repeats, or a template is malformed
            (the message names the file and line).
    """
    path = _file(path, TEMPLATES_FILE)
    templates, seen = [], set()
    for number, row in enumerate(_jsonl(path), start=1):
        if "id" not in row or "template" not in row:
            raise ValueError(f"{path} row {number}: needs 'id' and 'template', got keys {sorted(row)}.")
        if row["id"] in seen:
            raise ValueError(f"{path} row {number}: template id {row['id']!r} repeats.")
        seen.add(row["id"])
        templates.append(PromptTemplate(str(row["id"]), str(row["template"]), str(row.get("condition", "both"))))
    return templates


def load_fillers(path: str | os.PathLike) -> dict[str, dict[str, list[str]]]:
    """Read slot fillers from a JSONL file (or a directory holding ``fillers.jsonl``).

    Each row: ``{"slot": str, "value": str, "condition": "behavior" | "control" | "both"}``.

    Returns:
        ``{condition: {slot: [values in file order]}}``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a row lacks a key or has an unknown condition.
    """
    path = _file(path, FILLERS_FILE)
    fillers: dict[str, dict[str, list[str]]] = {}
    for number, row in enumerate(_jsonl(path), start=1):
        missing = {"slot", "value"} - set(row)
        if missing:
            raise ValueError(f"{path} row {number}: missing {sorted(missing)}, got keys {sorted(row)}.")
        condition = row.get("condition", "both")
        if condition not in CONDITIONS:
            raise ValueError(f"{path} row {number}: condition {condition!r} not in {CONDITIONS}.")
        fillers.setdefault(condition, {}).setdefault(str(row["slot"]), []).append(str(row["value"]))
    return fillers


def _as_templates(templates: Sequence[PromptTemplate | str]) -> list[PromptTemplate]:
    out = [t if isinstance(t, PromptTemplate) else PromptTemplate(str(t), str(t)) for t in templates]
    ids = [t.id for t in out]
    if len(set(ids)) != len(ids):
        raise ValueError(f"expand_templates: template ids repeat: {sorted({i for i in ids if ids.count(i) > 1})}.")
    return out


def _check_fillers(fillers: Any) -> None:
    """Refuse fillers not shaped ``{condition: {slot: [str, ...]}}``.

    A bare string is a sequence too: taken as a slot's values it would expand character by
    character, so it is refused here rather than silently split.
    """
    shape = "{condition: {slot: [value, ...]}}"
    if not isinstance(fillers, Mapping):
        raise TypeError(f"expand_templates: fillers is a {type(fillers).__name__}; expected a dict {shape}.")
    for condition, slots in fillers.items():
        if not isinstance(slots, Mapping):
            raise TypeError(
                f"expand_templates: fillers[{condition!r}] is a {type(slots).__name__}; expected a dict "
                f"{{slot: [value, ...]}} (fillers are {shape})."
            )
        for slot, values in slots.items():
            if not isinstance(values, (list, tuple)):
                example = f"[{values!r}]" if isinstance(values, str) else "[...]"
                raise TypeError(
                    f"expand_templates: fillers[{condition!r}][{slot!r}] is a {type(values).__name__} "
                    f"({values!r}); expected a list or tuple of strings. Wrap a single value in a list: {example}."
                )
            for value in values:
                if not isinstance(value, str):
                    raise TypeError(
                        f"expand_templates: fillers[{condition!r}][{slot!r}] holds {value!r} of type "
                        f"{type(value).__name__}; every filler value must be a string."
                    )


def _values_for(fillers: Fillers, condition: str, slot: str) -> list[str]:
    values = [*fillers.get(condition, {}).get(slot, ()), *fillers.get("both", {}).get(slot, ())]
    return list(dict.fromkeys(values))  # drop repeats, keep order


def _expand(template: PromptTemplate, fillers: Fillers, condition: str) -> list[str]:
    slots = template.slots
    choices = []
    for slot in slots:
        values = _values_for(fillers, condition, slot)
        if not values:
            known = sorted({s for c in (condition, "both") for s in fillers.get(c, {})})
            raise ValueError(
                f"expand_templates: template {template.id!r} ({template.template!r}) uses slot "
                f"{{{slot}}}, but no {condition} or 'both' fillers define it. Slots with "
                f"{condition} fillers: {known or '(none)'}. Add rows "
                f'{{"slot": "{slot}", "value": ..., "condition": "{condition}"}}.'
            )
        choices.append(values)
    return [template.template.format(**dict(zip(slots, combo))) for combo in itertools.product(*choices)]


def expand_templates(
    templates: Sequence[PromptTemplate | str],
    fillers: Fillers,
    *,
    seed: int,
    n: int | None = None,
    holdout: float = 0.2,
    holdout_by: str = "prompt",
) -> PromptSplit:
    """Fill every template with every combination of its slot values; split train / held out.

    Behaviour prompts take each slot's ``behavior`` (and ``both``) fillers, control prompts the
    ``control`` (and ``both``) ones (MoTE section 3: same templates, different fillers).
    Duplicates are removed; ``n`` then samples that many prompts per condition. With
    ``holdout_by="prompt"`` a ``holdout`` share of each condition's prompts is held out; with
    ``holdout_by="template"`` a ``holdout`` share of the *templates* (at least one when
    ``holdout > 0``) is held out, for measuring generalisation to unseen wordings.

    Everything is a deterministic function of ``seed`` and the input order: shuffles use
    ``random.Random`` seeded with strings like ``"3:behavior"`` (hashed with SHA-512 by
    Python, identical in every process).

    Args:
        templates: :class:`PromptTemplate` objects (or plain strings, used as their own id).
        fillers: ``{condition: {slot: [values]}}`` as returned by :func:`load_fillers`.
        seed: seeds the sampling and the split.
        n: prompts per condition before splitting (``None``: all combinations).
        holdout: share held out, in ``[0, 1)``.
        holdout_by: ``"prompt"`` or ``"template"``.

    Returns:
        A :class:`PromptSplit` whose four parts are disjoint.

    Raises:
        ValueError: a template uses a slot without fillers for a condition it is expanded for
            (the message names the slot and template), ``n`` exceeds the prompts available,
            a prompt appears in both conditions, or a bad ``holdout``/``holdout_by``.
        TypeError: ``fillers`` is not ``{condition: {slot: [str, ...]}}`` -- e.g. a bare string
            where a slot's list of values belongs (the message names the condition and slot).

    Example:
        >>> split = expand_templates(["What happened{time}?"],
        ...     {"behavior": {"time": [" in 1989"]}, "control": {"time": [" in 1815", " in 1969"]}},
        ...     seed=0, holdout=0.0)
        >>> split.behavior_train, split.control_train
        (('What happened in 1989?',), ('What happened in 1969?', 'What happened in 1815?'))
    """
    if not 0 <= holdout < 1:
        raise ValueError(f"expand_templates: holdout={holdout!r} must lie in [0, 1).")
    if holdout_by not in ("prompt", "template"):
        raise ValueError(f"expand_templates: holdout_by={holdout_by!r}; use 'prompt' or 'template'.")
    if n is not None and n < 1:
        raise ValueError(f"expand_templates: n={n!r} must be >= 1 or None.")
    _check_fillers(fillers)
    unknown = sorted(set(fillers) - set(CONDITIONS))
    if unknown:
        raise ValueError(
            f"expand_templates: filler conditions {unknown} unknown; fillers are "
            f"{{condition: {{slot: [values]}}}} with condition in {CONDITIONS}."
        )
    items = _as_templates(templates)
    if not items:
        raise ValueError("expand_templates: no templates given.")

    heldout_ids: tuple[str, ...] = ()
    if holdout_by == "template" and holdout > 0:
        if len(items) < 2:
            raise ValueError("expand_templates: holdout_by='template' needs at least 2 templates.")
        order = [t.id for t in items]
        random.Random(f"{seed}:templates").shuffle(order)
        count = min(max(1, round(holdout * len(items))), len(items) - 1)
        heldout_ids = tuple(sorted(order[:count]))

    parts: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
    for condition in ("behavior", "control"):
        tagged: dict[str, str] = {}  # prompt -> template id (first template that made it)
        for template in items:
            if template.condition not in (condition, "both"):
                continue
            for prompt in _expand(template, fillers, condition):
                tagged.setdefault(prompt, template.id)
        prompts = list(tagged)
        rng = random.Random(f"{seed}:{condition}")
        if n is not None:
            if n > len(prompts):
                raise ValueError(
                    f"expand_templates: n={n} {condition} prompts requested, only {len(prompts)} "
                    "distinct combinations exist; lower n or add fillers."
                )
            prompts = rng.sample(prompts, n)
        else:
            rng.shuffle(prompts)
        if holdout_by == "template":
            heldout = tuple(p for p in prompts if tagged[p] in heldout_ids)
            train = tuple(p for p in prompts if tagged[p] not in heldout_ids)
        else:
            count = round(holdout * len(prompts))
            heldout, train = tuple(prompts[:count]), tuple(prompts[count:])
        parts[condition] = (train, heldout)

    overlap = sorted(set(sum(parts["behavior"], ())) & set(sum(parts["control"], ())))
    if overlap:
        raise ValueError(
            f"expand_templates: {len(overlap)} prompts are both behaviour and control, e.g. "
            f"{overlap[0]!r}; give every template at least one slot whose behaviour and control "
            "fillers differ."
        )
    return PromptSplit(
        behavior_train=parts["behavior"][0],
        behavior_heldout=parts["behavior"][1],
        control_train=parts["control"][0],
        control_heldout=parts["control"][1],
        seed=seed,
        holdout=holdout,
        holdout_by=holdout_by,
        heldout_templates=heldout_ids,
    )
