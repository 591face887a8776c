"""The vector builders, one signature family: ActAdd as published, mean difference (CAA), PCA of
paired differences, a logistic-probe direction, and directional ablation.

Each returns a :class:`~labkit.steering.vector.SteeringVector` recording its method and inputs
(``source``); each runs on any backend that reads the residual stream (``capture_resid``).

The three contrast-pair methods are one pipeline, :func:`contrast_vector`: check the prompts,
read activations as a :class:`~labkit.steering.contrast.ContrastReading` says, hand them to an
aggregator (:mod:`labkit.steering.aggregators`: a plain function with one signature, as in
steering-vectors), wrap the direction in a vector. :func:`mean_difference`,
:func:`pca_direction` and :func:`probe_direction` are that pipeline with their aggregator; each
takes the reading options as keywords or as one ``reading=ContrastReading(...)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from jaxtyping import Float
from torch import Tensor

from labkit.checks import check_coefficient, check_prompt
from labkit.models import model_name_of, tokenizer_of
from labkit.steering.aggregators import Aggregator, logistic_aggregator, logistic_regression, mean_aggregator, pca_aggregator
from labkit.steering.contrast import (
    SPACE_HINT,
    ContrastReading,
    check_model_hook_point,
    check_model_layer,
    check_paired,
    contrast_setup,
    encode_one,
    prompt_activations,
    residual_activations,
)
from labkit.steering.vector import Positions, SteeringVector

__all__ = [
    "actadd", "contrast_vector", "directional_ablation", "logistic_regression", "mean_difference", "pca_direction",
    "probe_direction",
]


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
        ValueError: an empty prompt, a prompt longer than the model's context window, a layer
            out of range, a non-finite coefficient.
        TypeError: ``plus`` or ``minus`` is not a string.

    Example:
        >>> vec = actadd(model, " wedding", " ", layer=6, coefficient=4.0)  # doctest: +SKIP
        >>> labkit.generate(model, "I went up to my friend and said", steering=vec).texts  # doctest: +SKIP
    """
    where = "actadd"
    plus = check_prompt(plus, caller=where, argument="plus", hint=SPACE_HINT)
    minus = check_prompt(minus, caller=where, argument="minus", hint=SPACE_HINT)
    coefficient = check_coefficient(coefficient, where)
    layer = check_model_layer(model, layer, where)
    hook_name = f"blocks.{layer}.{hook_point}"
    check_model_hook_point(model, hook_name, where)
    tokenizer = tokenizer_of(model)
    plus_ids = encode_one(model, plus, where, prepend_bos, "plus")
    minus_ids = encode_one(model, minus, where, prepend_bos, "minus")
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
    reading: ContrastReading | None = None,
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
        reading: the options above as one :class:`~labkit.steering.contrast.ContrastReading`
            (e.g. shared by several builders); then leave those keywords at their defaults.

    Returns:
        A :class:`SteeringVector` with ``activations`` of shape ``(d_model,)``.

    Raises:
        ValueError: no prompts or an empty prompt, a layer out of range, a non-finite
            coefficient, ``positions="front"`` or an unknown ``token``.

    Example:
        >>> vec = mean_difference(model, ["I love it"], ["I hate it"], layer=6)  # doctest: +SKIP
    """
    return _contrast_vector(
        model, positive_prompts, negative_prompts, layer, coefficient, mean_aggregator(), where="mean_difference",
        reading=reading, positions=positions, token=token, hook_point=hook_point, batch_size=batch_size,
        prepend_bos=prepend_bos,
    )


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
    reading: ContrastReading | None = None,
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
        reading: the options above as one :class:`~labkit.steering.contrast.ContrastReading`
            (e.g. shared by several builders); then leave those keywords at their defaults.

    Returns:
        A :class:`SteeringVector` with ``activations`` of shape ``(d_model,)``;
        ``source["explained_variance_ratio"]`` is the top component's share of ``Σ‖d_i‖²``.

    Raises:
        ValueError: unequal counts, no prompts or an empty prompt, a layer out of range, a
            non-finite coefficient, ``positions="front"`` or an unknown ``token``.

    Example:
        >>> vec = pca_direction(model, ["I love it"], ["I hate it"], layer=6)  # doctest: +SKIP
    """
    return _contrast_vector(
        model, positive_prompts, negative_prompts, layer, coefficient, pca_aggregator(), where="pca_direction",
        paired=True, reading=reading, positions=positions, token=token, hook_point=hook_point, batch_size=batch_size,
        prepend_bos=prepend_bos,
    )


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
    reading: ContrastReading | None = None,
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
        reading: positions, token, hook_point, batch_size and prepend_bos as one
            :class:`~labkit.steering.contrast.ContrastReading` (e.g. shared by several builders);
            then leave those keywords at their defaults.

    Returns:
        A :class:`SteeringVector` with ``activations`` of shape ``(d_model,)``;
        ``source["train_accuracy"]`` is the probe's accuracy on its training prompts.

    Raises:
        ValueError: no prompts or an empty prompt, a layer out of range, a non-finite
            coefficient, ``positions="front"``, an unknown ``token``, ``C <= 0``.

    Example:
        >>> vec = probe_direction(model, ["I love it", "Great"], ["I hate it", "Awful"], layer=6)  # doctest: +SKIP
    """
    return _contrast_vector(
        model, positive_prompts, negative_prompts, layer, coefficient, logistic_aggregator(inverse_regularization),
        where="probe_direction", reading=reading, positions=positions, token=token, hook_point=hook_point,
        batch_size=batch_size, prepend_bos=prepend_bos,
    )


def contrast_vector(
    model,
    positive_prompts: Sequence[str],
    negative_prompts: Sequence[str],
    layer: int,
    coefficient: float = 1.0,
    *,
    aggregator: Aggregator,
    reading: ContrastReading | None = None,
    paired: bool = False,
) -> SteeringVector:
    """A steering direction from contrast prompts and any aggregator: the pipeline of every contrast method.

    Reads each prompt's activation at ``blocks.{layer}.{reading.hook_point}`` (its last token or
    its token mean, ``reading.token``), calls ``aggregator(acts_positive, acts_negative)``
    (:mod:`labkit.steering.aggregators`; e.g. ``mean_aggregator()`` gives
    :func:`mean_difference`'s vector) and wraps the returned direction in a vector applied at
    ``reading.positions``.

    Args:
        model: a labkit bridge, or any backend that reads the residual stream.
        positive_prompts, negative_prompts: the two sides (any counts ≥ 1; equal with ``paired``).
        layer: block index, ``0 .. n_layers-1``.
        coefficient: finite multiplier.
        aggregator: ``aggregate(acts_positive, acts_negative) -> Direction``.
        reading: where and how to read (default ``ContrastReading()``).
        paired: the aggregator pairs positive ``i`` with negative ``i`` (counts must match).

    Returns:
        A :class:`SteeringVector` with ``activations`` of shape ``(d_model,)``; ``source``
        holds the aggregator's ``method`` and diagnostics, ``token`` and the prompts.

    Raises:
        ValueError: no prompts or an empty prompt, unequal counts with ``paired``, a layer out
            of range, a non-finite coefficient.
        TypeError: ``reading`` is not a :class:`ContrastReading`.

    Example:
        >>> from labkit.steering.aggregators import mean_aggregator  # doctest: +SKIP
        >>> vec = contrast_vector(model, ["I love it"], ["I hate it"], 6, aggregator=mean_aggregator())  # doctest: +SKIP
    """
    return _contrast_vector(
        model, positive_prompts, negative_prompts, layer, coefficient, aggregator, where="contrast_vector",
        paired=paired, reading=ContrastReading() if reading is None else reading, **_DEFAULT_KEYWORDS,
    )


#: The reading keywords of the contrast builders at their defaults (what ``reading=`` stands in for).
_DEFAULT_KEYWORDS: dict[str, Any] = {
    "positions": "all", "token": "last", "hook_point": "hook_resid_pre", "batch_size": 16, "prepend_bos": None,
}


def _contrast_vector(
    model, positive_prompts, negative_prompts, layer, coefficient, aggregator: Aggregator, *, where: str,
    paired: bool = False, reading: ContrastReading | None, **keywords: Any,
) -> SteeringVector:
    """:func:`contrast_vector` for a named builder: its name in messages, its reading as keywords or ``reading``."""
    positive, negative, coefficient, hook_name, reading = contrast_setup(
        model, positive_prompts, negative_prompts, layer, coefficient, where, reading, **keywords
    )
    if paired:
        check_paired(positive, negative, where)
    read = (reading.token, reading.batch_size, reading.prepend_bos, where)
    acts_positive = prompt_activations(model, positive, hook_name, *read)
    acts_negative = prompt_activations(model, negative, hook_name, *read)
    direction = aggregator(acts_positive, acts_negative)
    extra = {key: value for key, value in direction.source.items() if key != "method"}
    return SteeringVector(
        hook_name=hook_name,
        activations=direction.activations,
        coefficient=coefficient,
        positions=reading.positions,
        model_name=model_name_of(model),
        source={
            "method": direction.source.get("method", "custom"),
            "token": reading.token,
            "positive_prompts": positive,
            "negative_prompts": negative,
            **extra,
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
    coefficient = check_coefficient(coefficient, where)
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


