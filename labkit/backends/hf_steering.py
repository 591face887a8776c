"""Steering vectors on the Hugging Face backends: the hook function and its per-call state.

One :class:`_Adder` per vector (or per ``k``-th vector of each batch row, for one-batch sweeps)
is attached at the vector's hook point by :func:`labkit.hooks.intervene`; one observer per
forward call (:class:`CallState`) reads the attention mask and KV-cache length, so the adder knows
each token's absolute position, where each left-padded row's real tokens start, and where the
prompt ends. Which tokens get the vector is :func:`labkit.interventions.steering_positions` — the
rule the vLLM worker applies too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from labkit.interventions import steering_positions

__all__ = ["CallState", "Adder", "call_mask", "row_hooks"]


def call_mask(args: tuple, kwargs: dict) -> tuple[Tensor, int, int]:
    """``(attention mask [batch, past + new], past, new)`` of one top-level forward call.

    The mask is the call's own 2-D attention mask, or all ones (with ``past`` read from the KV
    cache) when the call passes none: what every in-forward intervention's observer needs to know
    which tokens are real and where they sit.
    """
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
    return mask, past, new


class CallState:
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
        mask, past, new = call_mask(args, kwargs)
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


class Adder:
    """The hook function of one vector per batch row: applies each row's vector where it applies.

    ``broadcast=True``: ``vectors`` holds one vector, applied to every row (:func:`steered`).
    ``broadcast=False``: one entry per batch row (``None`` = nothing for that row), the
    one-batch sweep (``steered(model, rows=...)``). Both run the same arithmetic on per-row
    tensors (a broadcast vector is an expanded view), so a row of a batched sweep gets exactly
    the floating-point values its solo run gets: ``x + v * keep`` (rows without a vector add an
    exact zero) and ``x - ((c · (x·r̂)) · r̂) · keep`` for ablation.
    """

    def __init__(self, vectors: Sequence[Any], state: CallState, *, broadcast: bool) -> None:
        self.vectors = list(vectors)
        self.state = state
        self.broadcast = broadcast
        self._cache: dict[tuple, Any] = {}

    def _rows(self, batch: int) -> list[Any]:
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
        absolute = torch.arange(past, past + new, device=device).unsqueeze(0)  # (1, new)
        real = state.mask[:, past : past + new].to(device)  # (batch, new)
        out, changed = activation, False
        for key in keys:
            positions, operation = key
            if positions in ("front", "prompt") and past >= prompt:
                continue  # decode step with the KV cache: the cache already carries the prompt's steering
            table = self._tables(batch, activation, key)
            if table is None:
                continue
            if positions == "front":  # row b gets vec[j] at absolute position front_start[b] + j
                value, lengths = table
                keep, offset = steering_positions(
                    "front", absolute, prompt,
                    front_start=state.front_start.to(device).unsqueeze(1), front_length=lengths.unsqueeze(1),
                )
                keep = real & keep  # (batch, new)
                if not bool(keep.any()):
                    continue
                index = offset.clamp(0, value.shape[1] - 1)
                added = value[torch.arange(batch, device=device).unsqueeze(1), index]  # (batch, new, d_model)
                out = out + added * keep.unsqueeze(-1).to(activation.dtype)
                changed = True
                continue
            keep = real & steering_positions(positions, absolute, prompt)[0]
            weight = keep.unsqueeze(-1).to(activation.dtype)  # (batch, new, 1)
            if operation == "ablate":
                unit, scale = table  # (batch, 1, d_model), (batch, 1, 1)
                projection = (out * unit).sum(dim=-1, keepdim=True)  # (batch, new, 1)
                out = out - ((scale * projection) * unit) * weight
            else:
                out = out + table * weight
            changed = True
        return out if changed else None


def row_hooks(rows: Sequence[Sequence[Any]], state: CallState) -> list[tuple[str, Adder]]:
    """One adder per (hook point, k-th vector of a row at that hook point), in row order.

    Row ``b`` of the batch gets its ``k``-th vector at a hook point from the ``k``-th adder of
    that hook point, so the additions at one hook point happen in the order the row lists them —
    the order its solo run applies them in (bit-identical results)."""
    per_row = [list(entry) for entry in rows]
    groups: dict[tuple[str, int], list[Any]] = {}
    for row, vectors in enumerate(per_row):
        seen: dict[str, int] = {}
        for vector in vectors:
            k = seen.get(vector.hook_name, 0)
            seen[vector.hook_name] = k + 1
            groups.setdefault((vector.hook_name, k), [None] * len(per_row))[row] = vector
    return [(hook_name, Adder(group, state, broadcast=False)) for (hook_name, _k), group in groups.items()]
