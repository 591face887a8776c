"""Steering vectors: ActAdd as published, mean-difference (CAA), PCA and probe directions,
directional ablation, steered forward passes, one-batch sweeps.

Data flow: ``actadd(model, " wedding", " ", layer=6)`` or ``mean_difference(model, pos, neg,
layer=6)`` → a :class:`SteeringVector` (plain frozen data, saved as safetensors + JSON) →
``with steered(model, vector): ...`` (or ``labkit.generate(model, prompts, steering=vector)``).

How a vector is applied. :func:`steered` opens one intervention (:func:`labkit.hooks.intervene`):
one hook per vector at its TransformerLens hook point (``blocks.6.hook_resid_pre`` = input of
``model.layers.6``) on the plain twin *and* on the bridge, plus one observer that reads each
call's attention mask and cache length. So the bridge's ``forward``, ``run_with_cache`` and
``generate`` are steered inside the block as much as ``labkit.generate`` is. From the observer
the hook knows the absolute position of every token it sees, where each left-padded row's real
tokens start, and where the prompt ends (``labkit.generate`` declares it; otherwise a call
without a KV cache is all prompt and a call extending a cache is a decode step). So:

* ``positions="front"`` (ActAdd): the ``pos × d_model`` vector is added to the first ``pos``
  real tokens of each row's prompt. With the KV cache that happens on the prompt pass only (the
  cache then carries it); without the cache it is re-added on every full pass — same result.
* ``positions="all" | "prompt" | "generated"`` (a single ``d_model`` direction): added at
  every real token / prompt tokens only / generated tokens only, on every pass and decode step.

Vectors compose: several in one :func:`steered` call, nested contexts, same or different
layers — additions sum. ``operation="ablate"`` vectors project a direction out instead
(:func:`directional_ablation`). ``steered(model, rows=[...])`` gives each batch row its own
vectors (``labkit.generate(..., steering_per_row=...)``): a sweep of settings in one batch, each
row bit-for-bit the arithmetic of its solo run.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from labkit import storage
from labkit.hooks import attach, intervene, resolve_hook
from labkit.models import check_prompts, encode_prompts, lab_model, left_pad, model_name_of, same_model, tokenizer_of

__all__ = [
    "POSITIONS",
    "SteeringVector",
    "actadd",
    "directional_ablation",
    "logistic_regression",
    "mean_difference",
    "pca_direction",
    "probe_direction",
    "residual_activations",
    "steered",
]

Positions = Literal["front", "all", "prompt", "generated"]
POSITIONS: tuple[str, ...] = ("front", "all", "prompt", "generated")
Operation = Literal["add", "ablate"]
OPERATIONS: tuple[str, ...] = ("add", "ablate")
KIND = "labkit.SteeringVector"
VERSION = 1


# --------------------------------------------------------------------------------------------
# The data type
# --------------------------------------------------------------------------------------------


def _check_coefficient(coefficient: Any, where: str) -> float:
    if isinstance(coefficient, bool) or not isinstance(coefficient, numbers.Real):
        raise TypeError(
            f"{where}: coefficient must be a finite real number, got "
            f"{type(coefficient).__name__} {coefficient!r}."
        )
    if not math.isfinite(float(coefficient)):
        raise ValueError(
            f"{where}: coefficient must be finite, got {coefficient!r}. Use a finite number such "
            "as 4.0 (0 = no steering)."
        )
    return float(coefficient)


def _layer_of(hook_name: str) -> int | None:
    parts = hook_name.split(".")
    if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None


@dataclass(frozen=True, eq=False)
class SteeringVector:
    """A steering vector: what to add, where, and how strongly. Plain data; never mutated.

    The tensor added to the residual stream is ``coefficient * activations`` (see
    :attr:`steering_vector`); a coefficient sweep is ``vector.with_coefficient(c)``.

    Attributes:
        hook_name: TransformerLens hook point, e.g. ``"blocks.6.hook_resid_pre"``.
        activations: ``Float[Tensor, "pos d_model"]`` for ActAdd (added to the first ``pos``
            tokens of the prompt, ``positions="front"``) or ``Float[Tensor, "d_model"]`` for a
            single direction (``positions`` ``"all"``, ``"prompt"`` or ``"generated"``).
        coefficient: finite multiplier (0 = no effect).
        positions: ``"front"`` | ``"all"`` | ``"prompt"`` | ``"generated"``.
        model_name: the model the vector was made on (``""`` = unchecked); applying it to a
            model of another name or width raises.
        source: JSON-able provenance, e.g. ``{"method": "actadd", "plus": ..., "minus": ...}``.
        operation: ``"add"`` (default: ``x + coefficient * activations``) or ``"ablate"``
            (directional ablation, Arditi et al. 2024 §2.4: ``x - coefficient * (x·r̂) r̂`` with
            ``r̂ = activations / ‖activations‖``; coefficient 1 projects the direction out fully).
            :func:`directional_ablation` builds one per residual hook point of every layer.

    Raises:
        ValueError: activations of the wrong rank, empty, or holding NaN/inf; an unknown
            ``positions``; a ``pos × d_model`` vector with positions other than ``"front"`` (or
            the reverse); a non-finite coefficient; an unknown ``operation``, or ``"ablate"`` with
            a ``pos × d_model`` or all-zero tensor.
    """

    hook_name: str
    activations: Float[Tensor, "pos d_model"] | Float[Tensor, " d_model"]
    coefficient: float = 1.0
    positions: Positions = "all"
    model_name: str = ""
    source: Mapping[str, Any] = field(default_factory=dict)
    operation: Operation = "add"

    def __post_init__(self) -> None:
        if not isinstance(self.hook_name, str) or not self.hook_name:
            raise TypeError(
                f"SteeringVector: hook_name must be a TransformerLens hook name such as "
                f"'blocks.6.hook_resid_pre', got {self.hook_name!r}."
            )
        acts = self.activations
        if not isinstance(acts, Tensor):
            raise TypeError(
                f"SteeringVector: activations must be a torch.Tensor, got {type(acts).__name__}."
            )
        if acts.ndim not in (1, 2) or acts.numel() == 0 or not acts.is_floating_point():
            raise ValueError(
                f"SteeringVector: activations must be a non-empty float tensor of shape "
                f"(pos, d_model) or (d_model,), got dtype {acts.dtype} shape {tuple(acts.shape)}."
            )
        bad = (~torch.isfinite(acts)).sum().item()
        if bad:
            raise ValueError(
                f"SteeringVector: activations hold {bad} NaN/inf value(s) (shape "
                f"{tuple(acts.shape)}); every entry must be finite. Recompute the vector, e.g. "
                "check the prompts ran without overflow."
            )
        object.__setattr__(self, "coefficient", _check_coefficient(self.coefficient, "SteeringVector"))
        if self.positions not in POSITIONS:
            raise ValueError(
                f"SteeringVector: positions={self.positions!r} is not allowed; use one of "
                f"{', '.join(map(repr, POSITIONS))}."
            )
        if acts.ndim == 2 and self.positions != "front":
            raise ValueError(
                f"SteeringVector: a (pos, d_model) = {tuple(acts.shape)} vector is ActAdd-style and "
                f"is added to the front positions; positions must be 'front', got "
                f"{self.positions!r}. For a single direction pass a (d_model,) tensor."
            )
        if acts.ndim == 1 and self.positions == "front":
            raise ValueError(
                f"SteeringVector: positions='front' needs a (pos, d_model) tensor, got shape "
                f"{tuple(acts.shape)}; use positions 'all', 'prompt' or 'generated' for a direction."
            )
        if self.operation not in OPERATIONS:
            raise ValueError(
                f"SteeringVector: operation={self.operation!r} is not allowed; use 'add' (add "
                "coefficient * activations) or 'ablate' (project the direction out)."
            )
        if self.operation == "ablate" and acts.ndim != 1:
            raise ValueError(
                f"SteeringVector: operation='ablate' projects out one direction and needs a "
                f"(d_model,) tensor, got shape {tuple(acts.shape)}."
            )
        if self.operation == "ablate" and not bool(acts.abs().sum() > 0):
            raise ValueError("SteeringVector: operation='ablate' needs a non-zero direction, got all zeros.")
        object.__setattr__(self, "activations", acts.detach().clone())
        object.__setattr__(self, "source", dict(self.source))

    # -- derived -------------------------------------------------------------------------------

    @property
    def d_model(self) -> int:
        """Width of the residual stream the vector was made for."""
        return int(self.activations.shape[-1])

    @property
    def n_positions(self) -> int | None:
        """Number of front positions (ActAdd), or ``None`` for a direction."""
        return int(self.activations.shape[0]) if self.activations.ndim == 2 else None

    @property
    def layer(self) -> int | None:
        """Block index parsed from :attr:`hook_name` (``None`` for non-block hook points)."""
        return _layer_of(self.hook_name)

    @property
    def steering_vector(self) -> Float[Tensor, "..."]:
        """What is added: ``coefficient * activations``."""
        return self.coefficient * self.activations

    def with_coefficient(self, coefficient: float) -> "SteeringVector":
        """A copy with another coefficient (the original is unchanged)."""
        return replace(self, coefficient=coefficient)

    def with_positions(self, positions: Positions) -> "SteeringVector":
        """A copy applied at other positions (directions only: all / prompt / generated)."""
        return replace(self, positions=positions)

    # -- serialisation -------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """JSON-able description of everything but the tensor."""
        return {
            "kind": KIND,
            "version": VERSION,
            "hook_name": self.hook_name,
            "layer": self.layer,
            "coefficient": self.coefficient,
            "positions": self.positions,
            "model_name": self.model_name,
            "d_model": self.d_model,
            "shape": list(self.activations.shape),
            "source": self.source,
            "operation": self.operation,
        }

    def to_dict(self) -> dict[str, Any]:
        """:meth:`metadata` plus ``"activations"`` (the tensor)."""
        return {**self.metadata(), "activations": self.activations}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SteeringVector":
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: the dict is not a labkit steering vector, is of a newer version, or lacks
                a field (named).
        """
        storage.check_kind(data, KIND, VERSION, caller="SteeringVector.from_dict", source="the dict")
        storage.require_keys(
            data, ("hook_name", "activations", "coefficient", "positions"), caller="SteeringVector.from_dict", source="the dict"
        )
        return cls(
            hook_name=data["hook_name"],
            activations=torch.as_tensor(data["activations"]),
            coefficient=data["coefficient"],
            positions=data["positions"],
            model_name=data.get("model_name", ""),
            source=data.get("source", {}),
            operation=data.get("operation", "add"),
        )

    def save(self, path: str | Path) -> Path:
        """Write ``<stem>.json`` (metadata) and ``<stem>.safetensors`` (the tensor); no pickle.

        Args:
            path: the stem, or either file's path (``wedding_L6``, ``wedding_L6.json``, ...).

        Returns:
            The ``.json`` path (what :meth:`load` takes). Layout: :mod:`labkit.storage`.
        """
        return storage.save(
            path, kind=KIND, version=VERSION, metadata=self.metadata(), tensors={"activations": self.activations}
        )

    @classmethod
    def load(cls, path: str | Path) -> "SteeringVector":
        """Read a vector written by :meth:`save` (the stem or either file's path).

        Raises:
            FileNotFoundError: no saved vector there, or half of the pair is missing.
            ValueError: the files hold another kind of labkit object (named) or are damaged.
        """
        metadata, tensors = storage.load(
            path, kind=KIND, version=VERSION, caller="SteeringVector.load", writer="SteeringVector.save"
        )
        return cls.from_dict({**metadata, **tensors})

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.activations.shape))
        return (
            f"SteeringVector({self.hook_name!r}, [{shape}], coefficient={self.coefficient:g}, "
            f"positions={self.positions!r}, model={self.model_name!r}"
            + (f", operation={self.operation!r})" if self.operation != "add" else ")")
        )

    # -- checks against a model ----------------------------------------------------------------

    def check_compatible(self, model) -> None:
        """Raise unless this vector can be applied to ``model``.

        Raises:
            ValueError: another model name, another width, a layer out of range, or a hook
                point that does not map onto a module of the twin.
        """
        from labkit.engines import is_engine_model

        if is_engine_model(model):
            model.check_vector(self)
            return
        record = lab_model(model)
        if self.model_name and not same_model(self.model_name, record.name):
            raise ValueError(
                f"{self!r} was made for model {self.model_name!r} and refuses to apply to "
                f"{record.name!r}. Recompute it on this model, or, if the two really are the same "
                f"weights, relabel it: dataclasses.replace(vector, model_name={record.name!r})."
            )
        d_model = int(model.cfg.d_model)
        if self.d_model != d_model:
            raise ValueError(
                f"{self!r} has width d_model={self.d_model}, but model {record.name!r} has "
                f"d_model={d_model}; a vector only applies to a model of its own width."
            )
        _check_hook_point(model, self.hook_name, "SteeringVector")


def _check_layer(model, layer: Any, where: str) -> int:
    n_layers = int(model.cfg.n_layers)
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise TypeError(f"{where}: layer must be an int in 0..{n_layers - 1}, got {layer!r}.")
    if not 0 <= int(layer) < n_layers:
        raise ValueError(
            f"{where}: layer {layer} out of range; model has {n_layers} layers (0..{n_layers - 1})."
        )
    return int(layer)


def _check_hook_point(model, hook_name: str, where: str) -> None:
    from labkit.engines import is_engine_model

    if is_engine_model(model):
        model.hook_layer(hook_name, where)
        return
    layer = _layer_of(hook_name)
    if layer is not None:
        _check_layer(model, layer, f"{where} {hook_name!r}")
    site = resolve_hook(model, hook_name)
    if not site.on_twin:
        raise ValueError(
            f"{where}: hook point {hook_name!r} exists only inside the TransformerLens bridge; "
            "steering runs on the plain twin and supports hook points that are a module's "
            "input or output: blocks.{L}.hook_resid_pre / hook_resid_mid / hook_resid_post / "
            "hook_attn_out / hook_mlp_out, hook_embed."
        )


# --------------------------------------------------------------------------------------------
# Building vectors
# --------------------------------------------------------------------------------------------


def _check_prompts(prompts: Any, where: str) -> list[str]:
    return check_prompts(
        prompts, caller=where, hint=" ActAdd's neutral side is usually a space, ' '."
    )


def _encode(model, text: str, where: str, prepend_bos: bool | None) -> list[int]:
    (_text,), (ids,) = encode_prompts(model, [text], caller=where, prepend_bos=prepend_bos)
    return ids


@torch.no_grad()
def residual_activations(
    model, token_ids: Sequence[Sequence[int]], hook_name: str
) -> list[Float[Tensor, "pos d_model"]]:
    """Activations at one hook point for each token sequence (left-padded batch, pads dropped).

    Args:
        model: a labkit bridge, or a vLLM handle (``load_model(..., engine="vllm")``; residual
            hook points only, recorded inside the workers).
        token_ids: one list of token ids per sequence.
        hook_name: e.g. ``"blocks.6.hook_resid_pre"``.

    Returns:
        One ``(len(seq), d_model)`` float tensor per sequence (on the CPU).
    """
    from labkit.engines import is_engine_model

    if is_engine_model(model):  # recorded inside the vLLM workers
        return model.residual_activations(token_ids, hook_name)
    tokenizer = tokenizer_of(model)
    device = next(lab_model(model).twin.parameters()).device
    input_ids, mask, position_ids = left_pad(token_ids, tokenizer.pad_token_id, device)
    width = input_ids.shape[1]
    captured: list[Tensor] = []

    def capture(activation: Tensor, _site) -> None:
        captured.append(activation.detach())

    with attach(model, {hook_name: capture}) as runner:
        runner(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    acts = captured[0].float().cpu()
    return [acts[row, width - len(ids):] for row, ids in enumerate(token_ids)]


def actadd(
    model,
    plus: str,
    minus: str,
    layer: int,
    coefficient: float = 1.0,
    *,
    hook_point: str = "hook_resid_pre",
    prepend_bos: bool | None = None,
) -> SteeringVector:
    """ActAdd steering vector, exactly as published (Turner et al. 2023, §2, Algorithm 1).

    The recipe of "Activation Addition: Steering Language Models Without Optimization": run
    the two prompts of a contrast pair (``plus``, e.g. ``" wedding"``; ``minus``, e.g. ``" "``),
    take the residual-stream activations at the injection layer, and form
    ``coefficient * (act(plus) - act(minus))``, one row per token position. When the prompts
    tokenize to different lengths the shorter one is right-padded with space tokens first (the
    paper's whitespace padding), then both are run. When applied, the ``pos × d_model`` vector
    is added to the first ``pos`` token positions of the user's prompt (front positions); if the
    prompt is shorter, only its positions receive the overlapping rows.

    Args:
        model: a labkit bridge (``labkit.load_model``).
        plus: the prompt whose direction to add.
        minus: the prompt to subtract (``" "`` for a topic vector).
        layer: injection block, ``0 .. n_layers-1``.
        coefficient: finite multiplier, the paper's ``c``.
        hook_point: residual hook inside the block (default ``"hook_resid_pre"``, the paper's
            choice: the stream entering block ``layer``).
        prepend_bos: override the model's BOS rule (``None`` keeps it). With BOS (the paper's
            TransformerLens setup) both prompts start with the same token, so row 0 of the
            difference is exactly zero and the signal lands on the first real tokens.

    Returns:
        A :class:`SteeringVector` with ``activations`` of shape ``(pos, d_model)``,
        ``positions="front"``, ``source`` recording the prompts and their token ids.

    Raises:
        ValueError: an empty prompt, a layer out of range, a non-finite coefficient.

    Example:
        >>> vec = actadd(model, " wedding", " ", layer=6, coefficient=4.0)  # doctest: +SKIP
        >>> labkit.generate(model, "I went up to my friend and said", steering=vec).texts  # doctest: +SKIP
    """
    where = "actadd"
    (plus,) = _check_prompts([plus], f"{where} plus")
    (minus,) = _check_prompts([minus], f"{where} minus")
    coefficient = _check_coefficient(coefficient, where)
    layer = _check_layer(model, layer, where)
    hook_name = f"blocks.{layer}.{hook_point}"
    _check_hook_point(model, hook_name, where)
    tokenizer = tokenizer_of(model)
    plus_ids = _encode(model, plus, where, prepend_bos)
    minus_ids = _encode(model, minus, where, prepend_bos)
    space = tokenizer(" ", add_special_tokens=False).input_ids
    if not space:
        raise ValueError(f"{where}: this tokenizer encodes ' ' to no token; cannot pad with spaces.")
    space_id = space[-1]
    width = max(len(plus_ids), len(minus_ids))
    plus_ids = plus_ids + [space_id] * (width - len(plus_ids))
    minus_ids = minus_ids + [space_id] * (width - len(minus_ids))
    act_plus, act_minus = residual_activations(model, [plus_ids, minus_ids], hook_name)
    return SteeringVector(
        hook_name=hook_name,
        activations=act_plus - act_minus,
        coefficient=coefficient,
        positions="front",
        model_name=model_name_of(model),
        source={
            "method": "actadd",
            "plus": plus,
            "minus": minus,
            "plus_token_ids": plus_ids,
            "minus_token_ids": minus_ids,
            "padding": "right-padded with space token %d" % space_id,
        },
    )


def mean_difference(
    model,
    positive_prompts: Sequence[str],
    negative_prompts: Sequence[str],
    layer: int,
    coefficient: float = 1.0,
    *,
    positions: Positions = "all",
    token: Literal["last", "mean"] = "last",
    hook_point: str = "hook_resid_pre",
    batch_size: int = 16,
    prepend_bos: bool | None = None,
) -> SteeringVector:
    """Mean-difference steering direction over many contrast pairs (the "CAA" variant).

    Contrastive Activation Addition (Rimsky et al. 2023) averages the activation difference of
    many contrast pairs instead of using one pair as ActAdd does: the direction is
    ``mean_i act(positive_i) - mean_j act(negative_j)`` (equal to the mean of the per-pair
    differences when the prompts are paired), read at each prompt's last token (CAA's choice)
    or averaged over its tokens. It is one ``d_model`` vector, added at every position or at the
    positions chosen.

    Args:
        model: a labkit bridge.
        positive_prompts, negative_prompts: the two sides (any counts ≥ 1).
        layer: block index, ``0 .. n_layers-1``.
        coefficient: finite multiplier.
        positions: ``"all"`` (default), ``"prompt"`` (prompt tokens only) or ``"generated"``.
        token: ``"last"`` (activation at each prompt's final token) or ``"mean"`` (mean over
            its tokens).
        hook_point: residual hook inside the block (default ``"hook_resid_pre"``).
        batch_size: prompts per forward pass.
        prepend_bos: override the model's BOS rule (``None`` keeps it).

    Returns:
        A :class:`SteeringVector` with ``activations`` of shape ``(d_model,)``.

    Raises:
        ValueError: no prompts or an empty prompt, a layer out of range, a non-finite
            coefficient, ``positions="front"`` or an unknown ``token``.

    Example:
        >>> vec = mean_difference(model, ["I love it"], ["I hate it"], layer=6)  # doctest: +SKIP
    """
    where = "mean_difference"
    positive, negative, coefficient, hook_name = _contrast_setup(
        model, positive_prompts, negative_prompts, layer, coefficient, positions, token, batch_size, hook_point, where
    )
    acts_positive = _prompt_activations(model, positive, hook_name, token, batch_size, prepend_bos, where)
    acts_negative = _prompt_activations(model, negative, hook_name, token, batch_size, prepend_bos, where)
    return SteeringVector(
        hook_name=hook_name,
        activations=acts_positive.mean(0) - acts_negative.mean(0),
        coefficient=coefficient,
        positions=positions,
        model_name=model_name_of(model),
        source={
            "method": "mean_difference",
            "token": token,
            "positive_prompts": positive,
            "negative_prompts": negative,
        },
    )


def _contrast_setup(model, positive_prompts, negative_prompts, layer, coefficient, positions, token, batch_size,
                    hook_point, where):
    """Validate the arguments every contrast-pair method shares; returns prompts, c, hook name."""
    positive = _check_prompts(positive_prompts, f"{where} positive_prompts")
    negative = _check_prompts(negative_prompts, f"{where} negative_prompts")
    coefficient = _check_coefficient(coefficient, where)
    layer = _check_layer(model, layer, where)
    if positions not in ("all", "prompt", "generated"):
        raise ValueError(
            f"{where}: positions={positions!r} is not allowed; a direction applies at 'all', "
            "'prompt' or 'generated' positions (use actadd for front positions)."
        )
    if token not in ("last", "mean"):
        raise ValueError(f"{where}: token={token!r} is not allowed; use 'last' or 'mean'.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{where}: batch_size must be a positive int, got {batch_size!r}.")
    hook_name = f"blocks.{layer}.{hook_point}"
    _check_hook_point(model, hook_name, where)
    return positive, negative, coefficient, hook_name


def _prompt_activations(model, prompts, hook_name, token, batch_size, prepend_bos, where) -> Tensor:
    """``(n_prompts, d_model)``: each prompt's activation at its last token, or its token mean."""
    rows = []
    for start in range(0, len(prompts), batch_size):
        chunk = [_encode(model, p, where, prepend_bos) for p in prompts[start:start + batch_size]]
        for acts in residual_activations(model, chunk, hook_name):
            rows.append(acts[-1] if token == "last" else acts.mean(0))
    return torch.stack(rows)


def _paired(positive: list[str], negative: list[str], where: str) -> None:
    if len(positive) != len(negative):
        raise ValueError(
            f"{where}: needs paired prompts (positive i belongs with negative i), got "
            f"{len(positive)} positive and {len(negative)} negative prompts; give equal counts."
        )


def _scaled_to_separation(unit: Tensor, acts_positive: Tensor, acts_negative: Tensor) -> Tensor:
    """``unit`` oriented and scaled so that coefficient 1 moves the negative mean onto the positive
    mean along it: ``((mean_pos - mean_neg)·û) û`` with the sign making that projection positive."""
    unit = unit / unit.norm()
    separation = float((acts_positive.mean(0) - acts_negative.mean(0)) @ unit)
    if separation < 0:
        unit, separation = -unit, -separation
    return unit * separation


def pca_direction(
    model,
    positive_prompts: Sequence[str],
    negative_prompts: Sequence[str],
    layer: int,
    coefficient: float = 1.0,
    *,
    positions: Positions = "all",
    token: Literal["last", "mean"] = "last",
    hook_point: str = "hook_resid_pre",
    batch_size: int = 16,
    prepend_bos: bool | None = None,
) -> SteeringVector:
    """Steering direction = first principal component of the paired activation differences.

    Representation Engineering (Zou et al. 2023, §3.1 "LAT", PCA on differences of stimulus
    pairs) and repeng's ``pca_diff``: form ``d_i = act(positive_i) - act(negative_i)`` for each
    pair and take the top principal direction. RepE randomises the order within each pair so
    the differences have zero mean; here that is exact: the direction is the top right singular
    vector of the difference matrix, which is the first principal component of the symmetric set
    ``{d_i, -d_i}`` (mean zero). The sign is chosen so positives project above negatives, and
    the length is the projected separation ``(mean_pos - mean_neg)·û`` — so coefficient 1 is
    the shift along ``û`` that the data itself shows, comparable across methods.

    Args:
        model: a labkit bridge.
        positive_prompts, negative_prompts: the pairs (equal counts ≥ 1; pair i = the i-th of each).
        layer: block index, ``0 .. n_layers-1``.
        coefficient: finite multiplier.
        positions: ``"all"`` (default), ``"prompt"`` or ``"generated"``.
        token: ``"last"`` (each prompt's final token) or ``"mean"`` (mean over its tokens).
        hook_point: residual hook inside the block (default ``"hook_resid_pre"``).
        batch_size: prompts per forward pass.
        prepend_bos: override the model's BOS rule (``None`` keeps it).

    Returns:
        A :class:`SteeringVector` with ``activations`` of shape ``(d_model,)``;
        ``source["explained_variance_ratio"]`` is the top component's share of ``Σ‖d_i‖²``.

    Raises:
        ValueError: unequal counts, no prompts or an empty prompt, a layer out of range, a
            non-finite coefficient, ``positions="front"`` or an unknown ``token``.

    Example:
        >>> vec = pca_direction(model, ["I love it"], ["I hate it"], layer=6)  # doctest: +SKIP
    """
    where = "pca_direction"
    positive, negative, coefficient, hook_name = _contrast_setup(
        model, positive_prompts, negative_prompts, layer, coefficient, positions, token, batch_size, hook_point, where
    )
    _paired(positive, negative, where)
    acts_positive = _prompt_activations(model, positive, hook_name, token, batch_size, prepend_bos, where)
    acts_negative = _prompt_activations(model, negative, hook_name, token, batch_size, prepend_bos, where)
    differences = (acts_positive - acts_negative).double()  # (pair, d_model)
    _u, singular, vh = torch.linalg.svd(differences, full_matrices=False)
    explained = float(singular[0] ** 2 / (singular**2).sum())
    return SteeringVector(
        hook_name=hook_name,
        activations=_scaled_to_separation(vh[0], acts_positive.double(), acts_negative.double()).float(),
        coefficient=coefficient,
        positions=positions,
        model_name=model_name_of(model),
        source={
            "method": "pca",
            "token": token,
            "positive_prompts": positive,
            "negative_prompts": negative,
            "explained_variance_ratio": explained,
        },
    )


def logistic_regression(
    features: Float[Tensor, "sample d_model"], labels: Float[Tensor, " sample"], *, inverse_regularization: float = 1.0,
    max_iter: int = 500,
) -> tuple[Float[Tensor, " d_model"], float]:
    """L2-regularised logistic regression, fitted exactly (L-BFGS on the convex objective).

    Minimises ``C · Σ_i log(1 + exp(-y_i (w·x_i + b))) + ½‖w‖²`` with ``y_i ∈ {-1, +1}`` and an
    unpenalised intercept ``b`` — the objective of scikit-learn's ``LogisticRegression`` (default
    ``C = 1``), in float64. Features are centred on their mean first (``b`` absorbs it).

    Args:
        features: one row per sample.
        labels: 1 for positives, 0 for negatives.
        inverse_regularization: ``C > 0``.
        max_iter: L-BFGS iterations.

    Returns:
        ``(w, b)``: the weight vector (float64) and intercept, on the centred features.

    Raises:
        ValueError: fewer than one sample per class, mismatched lengths, or ``C <= 0``.
    """
    x = features.double()
    y = labels.double() * 2 - 1
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(
            f"logistic_regression: features must be (sample, d_model) and labels (sample,), got "
            f"{tuple(features.shape)} and {tuple(labels.shape)}."
        )
    if not (bool((y > 0).any()) and bool((y < 0).any())):
        raise ValueError("logistic_regression: needs at least one sample of each class (labels 0 and 1).")
    if not inverse_regularization > 0:
        raise ValueError(f"logistic_regression: inverse_regularization must be > 0, got {inverse_regularization!r}.")
    x = x - x.mean(0)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14,
        history_size=50, line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = inverse_regularization * torch.nn.functional.softplus(-y * (x @ w + b)).sum() + 0.5 * (w @ w)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return w.detach(), float(b.detach())


def probe_direction(
    model,
    positive_prompts: Sequence[str],
    negative_prompts: Sequence[str],
    layer: int,
    coefficient: float = 1.0,
    *,
    positions: Positions = "all",
    token: Literal["last", "mean"] = "last",
    hook_point: str = "hook_resid_pre",
    batch_size: int = 16,
    prepend_bos: bool | None = None,
    inverse_regularization: float = 1.0,
) -> SteeringVector:
    """Steering direction = the weight vector of a logistic-regression probe (positive vs negative).

    The probe-weight direction that Inference-Time Intervention (Li et al. 2023) compares
    with the mass-mean shift (our :func:`mean_difference`): fit ``P(positive | x) = σ(w·x + b)`` on the activations of both sides
    (:func:`logistic_regression`, L2, ``C = inverse_regularization``) and steer along ``ŵ``.
    Oriented and scaled as :func:`pca_direction`: length ``(mean_pos - mean_neg)·ŵ``.

    Args:
        model: a labkit bridge.
        positive_prompts, negative_prompts: the two classes (any counts ≥ 1).
        layer, coefficient, positions, token, hook_point, batch_size, prepend_bos: as in
            :func:`mean_difference`.
        inverse_regularization: the probe's ``C`` (larger = weaker L2 penalty).

    Returns:
        A :class:`SteeringVector` with ``activations`` of shape ``(d_model,)``;
        ``source["train_accuracy"]`` is the probe's accuracy on its training prompts.

    Raises:
        ValueError: no prompts or an empty prompt, a layer out of range, a non-finite
            coefficient, ``positions="front"``, an unknown ``token``, ``C <= 0``.

    Example:
        >>> vec = probe_direction(model, ["I love it", "Great"], ["I hate it", "Awful"], layer=6)  # doctest: +SKIP
    """
    where = "probe_direction"
    positive, negative, coefficient, hook_name = _contrast_setup(
        model, positive_prompts, negative_prompts, layer, coefficient, positions, token, batch_size, hook_point, where
    )
    acts_positive = _prompt_activations(model, positive, hook_name, token, batch_size, prepend_bos, where)
    acts_negative = _prompt_activations(model, negative, hook_name, token, batch_size, prepend_bos, where)
    features = torch.cat([acts_positive, acts_negative])
    labels = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))])
    weights, intercept = logistic_regression(features, labels, inverse_regularization=inverse_regularization)
    scores = (features.double() - features.double().mean(0)) @ weights + intercept
    accuracy = float(((scores > 0).double() == labels.double()).double().mean())
    return SteeringVector(
        hook_name=hook_name,
        activations=_scaled_to_separation(weights, acts_positive.double(), acts_negative.double()).float(),
        coefficient=coefficient,
        positions=positions,
        model_name=model_name_of(model),
        source={
            "method": "probe",
            "token": token,
            "positive_prompts": positive,
            "negative_prompts": negative,
            "inverse_regularization": float(inverse_regularization),
            "train_accuracy": accuracy,
        },
    )


def directional_ablation(
    model,
    direction: SteeringVector | Float[Tensor, " d_model"],
    *,
    coefficient: float = 1.0,
    hook_points: Sequence[str] = ("hook_resid_pre", "hook_resid_mid"),
    positions: Positions = "all",
) -> list[SteeringVector]:
    """Vectors that project one direction out of the residual stream at every layer.

    Directional ablation of Arditi et al. 2024 ("Refusal in language models is mediated by a
    single direction", §2.4): ``x ← x - r̂ r̂ᵀ x`` for the unit direction ``r̂``, applied at every
    layer and token position to the residual stream entering each block and after its
    attention (``hook_resid_pre`` and ``hook_resid_mid`` — the paper's ``x^(l)`` and
    ``x̃^(l)``), so no component can write the direction back for the next to read.
    ``coefficient`` scales the removal (1 = the paper's full projection; 0 = nothing).
    Apply with ``steered(model, *vectors)`` or ``labkit.generate(..., steering=vectors)``.

    Args:
        model: a labkit bridge.
        direction: a direction :class:`SteeringVector` (e.g. from :func:`mean_difference`; its
            hook point and coefficient are ignored) or a ``(d_model,)`` tensor.
        coefficient: finite removal scale.
        hook_points: residual hook points inside each block to ablate at.
        positions: ``"all"`` (default), ``"prompt"`` or ``"generated"``.

    Returns:
        ``n_layers × len(hook_points)`` :class:`SteeringVector` objects with
        ``operation="ablate"``, layer by layer.

    Raises:
        ValueError: a zero or non-finite direction, a width other than the model's, a
            ``(pos, d_model)`` ActAdd vector, ``positions="front"``.

    Example:
        >>> refusal = mean_difference(model, harmful, harmless, layer=12)  # doctest: +SKIP
        >>> labkit.generate(model, prompts, steering=directional_ablation(model, refusal))  # doctest: +SKIP
    """
    where = "directional_ablation"
    coefficient = _check_coefficient(coefficient, where)
    if isinstance(direction, SteeringVector):
        if direction.n_positions is not None:
            raise ValueError(
                f"{where}: needs a single (d_model,) direction, got the ActAdd vector {direction!r}; "
                "build a direction with mean_difference / pca_direction / probe_direction."
            )
        source = {"method": "directional_ablation", "direction_source": direction.source}
        tensor = direction.activations
    elif isinstance(direction, Tensor):
        source, tensor = {"method": "directional_ablation"}, direction
    else:
        raise TypeError(f"{where}: direction must be a SteeringVector or a (d_model,) tensor, got {type(direction).__name__}.")
    if tensor.ndim != 1 or tensor.shape[0] != int(model.cfg.d_model):
        raise ValueError(
            f"{where}: direction must have shape ({int(model.cfg.d_model)},) for this model, got {tuple(tensor.shape)}."
        )
    if positions == "front":
        raise ValueError(f"{where}: positions='front' is not allowed; use 'all', 'prompt' or 'generated'.")
    return [
        SteeringVector(
            hook_name=f"blocks.{layer}.{hook_point}",
            activations=tensor.float(),
            coefficient=coefficient,
            positions=positions,
            model_name=model_name_of(model),
            source=source,
            operation="ablate",
        )
        for layer in range(int(model.cfg.n_layers))
        for hook_point in hook_points
    ]


# --------------------------------------------------------------------------------------------
# Applying vectors
# --------------------------------------------------------------------------------------------

class _CallState:
    """Per forward call (twin or bridge): real-token mask, cache length, prompt length.

    The prompt length is the one ``labkit.generate`` declares (:meth:`LabModel.generating`);
    otherwise a call without a KV cache is all prompt, and a call that extends a KV cache
    (a decode step of ``bridge.generate`` or Hugging Face ``generate``) is generated tokens
    after the prompt of the last cache-less call.
    """

    def __init__(self, record) -> None:
        self.record = record
        self.mask: Tensor | None = None  # (batch, past + new), 1 = real token
        self.past = 0
        self.prompt = 0
        self.last_prompt = 0
        self.front_start: Tensor | None = None  # (batch,) first real token of each row

    def observe(self, args: tuple, kwargs: dict) -> None:
        inputs = kwargs.get("input_ids", args[0] if args else None)
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        batch, new = int(inputs.shape[0]), int(inputs.shape[1])
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if isinstance(mask, Tensor) and mask.ndim == 2:
            past = int(mask.shape[1]) - new
        else:
            cache = kwargs.get("past_key_values")
            past = int(cache.get_seq_length()) if cache is not None else 0
            mask = torch.ones(batch, past + new, dtype=torch.long, device=inputs.device)
        total = past + new
        declared = self.record.prompt_length
        if declared is not None:
            prompt = declared
        elif past == 0:
            prompt = self.last_prompt = total
        else:
            prompt = self.last_prompt
        self.mask, self.past, self.prompt = mask.bool(), past, min(prompt, total)
        self.front_start = self.mask[:, : self.prompt].int().argmax(dim=1)


class _Adder:
    """The hook function of one vector per batch row: applies each row's vector where it applies.

    ``broadcast=True``: ``vectors`` holds one vector, applied to every row (:func:`steered`).
    ``broadcast=False``: one entry per batch row (``None`` = nothing for that row), the
    one-batch sweep (``steered(model, rows=...)``). Both run the same arithmetic on per-row
    tensors (a broadcast vector is an expanded view), so a row of a batched sweep gets exactly
    the floating-point values its solo run gets: ``x + v * keep`` (rows without a vector add an
    exact zero) and ``x - ((c · (x·r̂)) · r̂) · keep`` for ablation.
    """

    def __init__(self, vectors: Sequence[SteeringVector | None], state: _CallState, *, broadcast: bool) -> None:
        self.vectors = list(vectors)
        self.state = state
        self.broadcast = broadcast
        self._cache: dict[tuple, Any] = {}

    def _rows(self, batch: int) -> list[SteeringVector | None]:
        if self.broadcast:
            return self.vectors * batch
        if len(self.vectors) != batch:
            raise ValueError(
                f"steered(rows=...): {len(self.vectors)} row settings were given, but the model ran "
                f"a batch of {batch} rows; give exactly one entry (a vector, a list, or None) per "
                "batch row, in the order of the batch."
            )
        return self.vectors

    def _tables(self, batch: int, like: Tensor, key: tuple) -> Any:
        """Per-row tensors of the rows whose vector has ``key = (positions, operation)``."""
        cache_key = (key, batch, like.dtype, like.device)
        if cache_key in self._cache:
            return self._cache[cache_key]
        rows = self._rows(batch)
        chosen = [v if v is not None and (v.positions, v.operation) == key else None for v in rows]
        if not any(v is not None for v in chosen):
            self._cache[cache_key] = None
            return None
        d_model = like.shape[-1]
        positions, operation = key

        def cast(t: Tensor) -> Tensor:
            return t.to(device=like.device, dtype=like.dtype)

        if self.broadcast:
            (vector,) = self.vectors
            if operation == "ablate":
                unit = cast(vector.activations / vector.activations.norm())
                scale = cast(torch.tensor(vector.coefficient))
                table = (unit.expand(batch, 1, d_model), scale.expand(batch, 1, 1))
            elif positions == "front":
                value = cast(vector.steering_vector)
                lengths = torch.full((batch,), value.shape[0], device=like.device)
                table = (value.expand(batch, *value.shape), lengths)
            else:
                table = cast(vector.steering_vector).expand(batch, 1, d_model)
        elif operation == "ablate":
            unit = torch.zeros(batch, 1, d_model)
            scale = torch.zeros(batch, 1, 1)
            for row, vector in enumerate(chosen):
                if vector is not None:
                    unit[row, 0] = vector.activations / vector.activations.norm()
                    scale[row] = vector.coefficient
            table = (cast(unit), cast(scale))
        elif positions == "front":
            width = max(v.n_positions for v in chosen if v is not None)
            value = torch.zeros(batch, width, d_model)
            lengths = torch.zeros(batch, dtype=torch.long)
            for row, vector in enumerate(chosen):
                if vector is not None:
                    value[row, : vector.n_positions] = vector.steering_vector
                    lengths[row] = vector.n_positions
            table = (cast(value), lengths.to(like.device))
        else:
            value = torch.zeros(batch, 1, d_model)
            for row, vector in enumerate(chosen):
                if vector is not None:
                    value[row, 0] = vector.steering_vector
            table = cast(value)
        self._cache[cache_key] = table
        return table

    def __call__(self, activation: Tensor, _site) -> Tensor | None:
        state = self.state
        if activation.ndim != 3 or state.mask is None:
            return None
        batch, new = int(activation.shape[0]), int(activation.shape[1])
        rows = self._rows(batch)
        keys = sorted({(v.positions, v.operation) for v in rows if v is not None})
        past, prompt = state.past, state.prompt
        device = activation.device
        absolute = torch.arange(past, past + new, device=device)  # (new,)
        real = state.mask[:, past : past + new].to(device)  # (batch, new)
        in_prompt = (absolute < prompt).unsqueeze(0)  # (1, new)
        out, changed = activation, False
        for key in keys:
            positions, operation = key
            if positions in ("front", "prompt") and past >= prompt:
                continue  # decode step with the KV cache: the cache already carries the prompt's steering
            table = self._tables(batch, activation, key)
            if table is None:
                continue
            if positions == "all":
                keep = real
            elif positions == "prompt":
                keep = real & in_prompt
            elif positions == "generated":
                keep = real & ~in_prompt
            else:  # "front": row b gets vec[j] at absolute position front_start[b] + j, inside the prompt
                value, lengths = table
                offset = absolute.unsqueeze(0) - state.front_start.to(device).unsqueeze(1)  # (batch, new)
                keep = real & (offset >= 0) & (offset < lengths.unsqueeze(1)) & in_prompt
                if not bool(keep.any()):
                    continue
                index = offset.clamp(0, value.shape[1] - 1)
                added = value[torch.arange(batch, device=device).unsqueeze(1), index]  # (batch, new, d_model)
                out = out + added * keep.unsqueeze(-1).to(activation.dtype)
                changed = True
                continue
            weight = keep.unsqueeze(-1).to(activation.dtype)  # (batch, new, 1)
            if operation == "ablate":
                unit, scale = table  # (batch, 1, d_model), (batch, 1, 1)
                projection = (out * unit).sum(dim=-1, keepdim=True)  # (batch, new, 1)
                out = out - ((scale * projection) * unit) * weight
            else:
                out = out + table * weight
            changed = True
        return out if changed else None


def _flatten(vectors: Iterable[Any], where: str = "steered", *, interventions: bool = False) -> list[Any]:
    """Vectors from nested lists (``None`` dropped). Objects marked ``labkit_intervention`` (e.g.
    :class:`labkit.sae.FeatureClamp`, which runs inside the forward pass) are kept only where
    ``interventions`` is true (``steered`` on the HF path); elsewhere they are refused with their
    own ``refusal(where)`` message (the engine, per-row sweeps)."""
    flat: list[Any] = []
    for item in vectors:
        if item is None:
            continue
        if isinstance(item, SteeringVector):
            flat.append(item)
        elif isinstance(item, (list, tuple)):
            flat.extend(_flatten(item, where, interventions=interventions))
        elif getattr(item, "labkit_intervention", False):
            if not interventions:
                raise ValueError(item.refusal(where))
            flat.append(item)
        else:
            raise TypeError(
                f"{where}: expected SteeringVector objects, got {type(item).__name__} {item!r}. "
                "Build vectors with labkit.actadd(...) or labkit.mean_difference(...)."
            )
    return flat


def _row_hooks(rows: Sequence[Any], state: _CallState) -> list[tuple[str, _Adder]]:
    """One adder per (hook point, k-th vector of a row at that hook point), in row order.

    Row ``b`` of the batch gets its ``k``-th vector at a hook point from the ``k``-th adder of
    that hook point, so the additions at one hook point happen in the order the row lists them —
    the order its solo run applies them in (bit-identical results)."""
    if isinstance(rows, (str, bytes, SteeringVector)) or not isinstance(rows, Sequence):
        raise TypeError(
            f"steered: rows must be a list with one entry per batch row (a SteeringVector, a list "
            f"of them, or None), got {type(rows).__name__}."
        )
    per_row = [_flatten([entry], "steered(rows=...)") for entry in rows]
    groups: dict[tuple[str, int], list[SteeringVector | None]] = {}
    for row, vectors in enumerate(per_row):
        seen: dict[str, int] = {}
        for vector in vectors:
            k = seen.get(vector.hook_name, 0)
            seen[vector.hook_name] = k + 1
            groups.setdefault((vector.hook_name, k), [None] * len(per_row))[row] = vector
    return [(hook_name, _Adder(group, state, broadcast=False)) for (hook_name, _k), group in groups.items()]


@contextlib.contextmanager
def steered(model, *vectors: SteeringVector, rows: Sequence[Any] | None = None) -> Iterator[torch.nn.Module]:
    """Apply steering vectors to every forward pass of the model inside the block.

    Every way of running the model sees the vectors: the bridge's ``model(tokens)``,
    ``run_with_cache`` and ``generate``, and every labkit function (``labkit.generate``,
    ``cache_activations``, ``perplexity``, ``trace_routing``, the widgets). Hooks go only on the
    hook points the vectors name (plus one observer that reads attention masks and cache
    lengths), so a steered pass costs what the additions cost.
    Vectors are checked against the model first (name, width, layer range). Contexts nest and
    compose with other labkit contexts (``ExitStack``); every hook is removed on exit, on an
    exception and on ``KeyboardInterrupt``.

    ``rows`` makes a one-batch sweep: entry ``b`` (a vector, a list of vectors, or ``None``) is
    applied to batch row ``b`` only, so different vectors and coefficients share one batched
    forward pass or ``generate`` call; each row gets exactly what its solo run would get
    (``vectors`` apply to every row, before the row's own). Every forward pass inside the block
    must then have ``len(rows)`` rows.

    Args:
        model: a labkit bridge.
        *vectors: :class:`SteeringVector` objects for every row (lists are flattened; ``None``
            ignored), and interventions such as :class:`labkit.sae.FeatureClamp` (HF path only).
        rows: optional, one entry per batch row.

    Yields:
        The plain twin (``torch.nn.Module``), for callers that want the fast path directly;
        the model itself is steered as well.

    Raises:
        ValueError: a vector made for another model or width, or at a layer out of range; with
            ``rows``, a forward pass whose batch size is not ``len(rows)``.
        TypeError: an entry that is not a vector, a list of vectors or ``None``.

    Example:
        >>> with steered(model, actadd(model, "Love", "Hate", layer=6, coefficient=5)):  # doctest: +SKIP
        ...     labkit.generate(model, "I think dogs are").texts
    """
    from labkit.engines import is_engine_model

    if is_engine_model(model):
        if rows is not None:
            raise ValueError(
                "steered(rows=...): the vLLM engine schedules its own batches, so batch rows are not "
                "prompts there; pass one entry per prompt to labkit.generate(..., steering_per_row=...)."
            )
        with model.steered(*vectors) as handle:
            yield handle
        return
    everything = _flatten(vectors, interventions=True)
    flat = [item for item in everything if isinstance(item, SteeringVector)]
    others = [item for item in everything if not isinstance(item, SteeringVector)]
    state = _CallState(lab_model(model))
    row_hooks = _row_hooks(rows, state) if rows is not None else []
    for vector in everything + [v for _name, adder in row_hooks for v in adder.vectors if v is not None]:
        vector.check_compatible(model)
    record = lab_model(model)
    hooks = [(vector.hook_name, _Adder([vector], state, broadcast=True)) for vector in flat] + row_hooks
    with contextlib.ExitStack() as stack:
        if hooks:
            stack.enter_context(intervene(model, hooks, observe=state.observe, caller="steered"))
        for other in others:  # e.g. a FeatureClamp: after the vectors of this call, in the given order
            stack.enter_context(other.applied(model))
        yield record.twin
