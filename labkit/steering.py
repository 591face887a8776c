"""Steering vectors: ActAdd as published, mean-difference (CAA) vectors, steered forward passes.

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
layers — additions sum.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from labkit.hooks import attach, intervene, resolve_hook
from labkit.models import check_prompts, encode_prompts, lab_model, left_pad, same_model, tokenizer_of

__all__ = [
    "POSITIONS",
    "SteeringVector",
    "actadd",
    "mean_difference",
    "residual_activations",
    "steered",
]

Positions = Literal["front", "all", "prompt", "generated"]
POSITIONS: tuple[str, ...] = ("front", "all", "prompt", "generated")
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

    Raises:
        ValueError: activations of the wrong rank, empty, or holding NaN/inf; an unknown
            ``positions``; a ``pos × d_model`` vector with positions other than ``"front"`` (or
            the reverse); a non-finite coefficient.
    """

    hook_name: str
    activations: Float[Tensor, "pos d_model"] | Float[Tensor, " d_model"]
    coefficient: float = 1.0
    positions: Positions = "all"
    model_name: str = ""
    source: Mapping[str, Any] = field(default_factory=dict)

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
        }

    def to_dict(self) -> dict[str, Any]:
        """:meth:`metadata` plus ``"activations"`` (the tensor)."""
        return {**self.metadata(), "activations": self.activations}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SteeringVector":
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: the dict is not a labkit steering vector or has an unknown version.
        """
        if data.get("kind") != KIND or data.get("version") != VERSION:
            raise ValueError(
                f"Not a labkit steering vector (kind={data.get('kind')!r}, "
                f"version={data.get('version')!r}); expected kind={KIND!r}, version={VERSION}."
            )
        return cls(
            hook_name=data["hook_name"],
            activations=torch.as_tensor(data["activations"]),
            coefficient=data["coefficient"],
            positions=data["positions"],
            model_name=data.get("model_name", ""),
            source=data.get("source", {}),
        )

    @staticmethod
    def _paths(path: str | Path) -> tuple[Path, Path]:
        path = Path(path)
        if path.suffix in (".json", ".safetensors"):
            path = path.with_suffix("")
        return path.with_name(path.name + ".json"), path.with_name(path.name + ".safetensors")

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``<path>.safetensors`` (the tensor) and ``<path>.json`` (metadata). No pickle.

        Returns:
            ``(json_path, safetensors_path)``.
        """
        from safetensors.torch import save_file

        json_path, tensor_path = self._paths(path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        save_file(
            {"activations": self.activations.detach().cpu().contiguous()},
            str(tensor_path),
            metadata={"kind": KIND, "version": str(VERSION)},
        )
        json_path.write_text(json.dumps(self.metadata(), indent=2) + "\n")
        return json_path, tensor_path

    @classmethod
    def load(cls, path: str | Path) -> "SteeringVector":
        """Read a vector written by :meth:`save` (``path`` with or without a suffix)."""
        from safetensors.torch import load_file

        json_path, tensor_path = cls._paths(path)
        for p in (json_path, tensor_path):
            if not p.is_file():
                raise FileNotFoundError(
                    f"SteeringVector.load: {str(p)!r} does not exist; a saved vector is a pair "
                    f"{json_path.name} + {tensor_path.name}."
                )
        meta = json.loads(json_path.read_text())
        return cls.from_dict({**meta, "activations": load_file(str(tensor_path))["activations"]})

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.activations.shape))
        return (
            f"SteeringVector({self.hook_name!r}, [{shape}], coefficient={self.coefficient:g}, "
            f"positions={self.positions!r}, model={self.model_name!r})"
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
        model: a labkit bridge.
        token_ids: one list of token ids per sequence.
        hook_name: e.g. ``"blocks.6.hook_resid_pre"``.

    Returns:
        One ``(len(seq), d_model)`` float tensor per sequence (on the CPU).
    """
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
        model_name=lab_model(model).name,
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

    def side_mean(prompts: list[str]) -> Tensor:
        rows = []
        for start in range(0, len(prompts), batch_size):
            chunk = [_encode(model, p, where, prepend_bos) for p in prompts[start:start + batch_size]]
            for acts in residual_activations(model, chunk, hook_name):
                rows.append(acts[-1] if token == "last" else acts.mean(0))
        return torch.stack(rows).mean(0)

    return SteeringVector(
        hook_name=hook_name,
        activations=side_mean(positive) - side_mean(negative),
        coefficient=coefficient,
        positions=positions,
        model_name=lab_model(model).name,
        source={
            "method": "mean_difference",
            "token": token,
            "positive_prompts": positive,
            "negative_prompts": negative,
        },
    )


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
    """The hook function of one vector: adds it at the positions it applies to."""

    def __init__(self, vector: SteeringVector, state: _CallState) -> None:
        self.vector = vector
        self.state = state
        self._cast: Tensor | None = None

    def _tensor(self, like: Tensor) -> Tensor:
        if self._cast is None or self._cast.dtype != like.dtype or self._cast.device != like.device:
            self._cast = self.vector.steering_vector.to(device=like.device, dtype=like.dtype)
        return self._cast

    def __call__(self, activation: Tensor, _site) -> Tensor | None:
        state, positions = self.state, self.vector.positions
        if activation.ndim != 3 or state.mask is None:
            return None
        new = activation.shape[1]
        past, prompt = state.past, state.prompt
        if positions == "front" and past >= prompt:
            return None  # decode step with the KV cache: the cache already carries the vector
        if positions == "prompt" and past >= prompt:
            return None
        vec = self._tensor(activation)
        device = activation.device
        absolute = torch.arange(past, past + new, device=device)  # (new,)
        real = state.mask[:, past : past + new].to(device)  # (batch, new)
        if positions == "all":
            return activation + vec * real.unsqueeze(-1).to(activation.dtype)
        if positions in ("prompt", "generated"):
            in_prompt = absolute < prompt
            keep = real & (in_prompt if positions == "prompt" else ~in_prompt).unsqueeze(0)
            return activation + vec * keep.unsqueeze(-1).to(activation.dtype)
        # "front": row b gets vec[j] at absolute position front_start[b] + j, inside the prompt
        offset = absolute.unsqueeze(0) - state.front_start.to(device).unsqueeze(1)  # (batch, new)
        keep = real & (offset >= 0) & (offset < vec.shape[0]) & (absolute < prompt).unsqueeze(0)
        if not bool(keep.any()):
            return None
        rows = vec[offset.clamp(0, vec.shape[0] - 1)]  # (batch, new, d_model)
        return activation + rows * keep.unsqueeze(-1).to(activation.dtype)


def _flatten(vectors: Iterable[Any]) -> list[SteeringVector]:
    flat: list[SteeringVector] = []
    for item in vectors:
        if item is None:
            continue
        if isinstance(item, SteeringVector):
            flat.append(item)
        elif isinstance(item, (list, tuple)):
            flat.extend(_flatten(item))
        else:
            raise TypeError(
                f"steered: expected SteeringVector objects, got {type(item).__name__} {item!r}. "
                "Build vectors with labkit.actadd(...) or labkit.mean_difference(...)."
            )
    return flat


@contextlib.contextmanager
def steered(model, *vectors: SteeringVector) -> Iterator[torch.nn.Module]:
    """Apply steering vectors to every forward pass of the model inside the block.

    Every way of running the model sees the vectors: the bridge's ``model(tokens)``,
    ``run_with_cache`` and ``generate``, and every labkit function (``labkit.generate``,
    ``cache_activations``, ``perplexity``, ``trace_routing``, the widgets). Hooks go only on the
    hook points the vectors name (plus one observer that reads attention masks and cache
    lengths), so a steered pass costs what the additions cost.
    Vectors are checked against the model first (name, width, layer range). Contexts nest and
    compose with other labkit contexts (``ExitStack``); every hook is removed on exit, on an
    exception and on ``KeyboardInterrupt``.

    Args:
        model: a labkit bridge.
        *vectors: :class:`SteeringVector` objects (lists of them are flattened; ``None`` ignored).

    Yields:
        The plain twin (``torch.nn.Module``), for callers that want the fast path directly;
        the model itself is steered as well.

    Raises:
        ValueError: a vector made for another model or width, or at a layer out of range.

    Example:
        >>> with steered(model, actadd(model, "Love", "Hate", layer=6, coefficient=5)):  # doctest: +SKIP
        ...     labkit.generate(model, "I think dogs are").texts
    """
    from labkit.engines import is_engine_model

    if is_engine_model(model):
        with model.steered(*vectors) as handle:
            yield handle
        return
    flat = _flatten(vectors)
    for vector in flat:
        vector.check_compatible(model)
    record = lab_model(model)
    if not flat:
        yield record.twin
        return
    state = _CallState(record)
    hooks = [(vector.hook_name, _Adder(vector, state)) for vector in flat]
    with intervene(model, hooks, observe=state.observe, caller="steered"):
        yield record.twin
