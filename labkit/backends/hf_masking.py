"""Expert masks on the Hugging Face backends: one forward hook per masked router module.

Each router module that some open mask touches holds one :class:`RouterMasks` record: the
selections of every open mask on it (merged with :func:`labkit.interventions.merge_selections`,
the merge the vLLM driver uses too) and the single hook that recomputes the router's choice with
the family's exact math under the merged selection. The hook is registered in front of any other
hook on the router (so a routing trace taken inside the block records the masked choice) through
:func:`labkit.hooks.register_module_hook`, and removed when the last mask on it closes — also on
an exception or a ``KeyboardInterrupt``.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from labkit.backends.registrar import register_module_hook
from labkit.interventions import Selection, merge_selections
from labkit.moe.routers import MoELayer, RouterFamily

__all__ = ["RouterMasks", "active_selection", "open_masks"]


@dataclass
class RouterMasks:
    """The active masks of one router module and the single hook that applies them."""

    family: RouterFamily
    moe_layer: MoELayer
    selections: list[Selection] = field(default_factory=list)
    merged: Selection | None = None
    handle: Any = None


_ACTIVE: "weakref.WeakKeyDictionary[torch.nn.Module, RouterMasks]" = weakref.WeakKeyDictionary()


def active_selection(router: torch.nn.Module) -> Selection | None:
    """The merged selection of every mask open on ``router`` now, or ``None`` when unmasked."""
    state = _ACTIVE.get(router)
    return None if state is None else state.merged


def open_selections(router: torch.nn.Module) -> list[Selection]:
    """The selections of the masks open on ``router`` now (outermost first)."""
    state = _ACTIVE.get(router)
    return [] if state is None else list(state.selections)


def _make_hook(state: RouterMasks):
    def hook(module, args, kwargs, output):
        family = state.family
        router_logits = family.read(output, module)[0]
        topk_indices, topk_weights = family.route(module, router_logits, state.merged, args, kwargs)
        return family.write(output, module, topk_indices, topk_weights)

    return hook


@contextlib.contextmanager
def open_masks(plan: Sequence[tuple[MoELayer, Selection, Sequence[torch.nn.Module]]], family: RouterFamily) -> Iterator[None]:
    """Apply ``(moe_layer, selection, router modules)`` entries until the block ends.

    ``router modules`` are the modules to hook for that layer (the twin's router and, for a
    labkit bridge, the original router the bridge calls). Selections were checked by the caller.
    """
    entered: list[tuple[torch.nn.Module, Selection]] = []
    try:
        for moe_layer, selection, routers in plan:
            for router in routers:
                state = _ACTIVE.get(router)
                if state is None:
                    state = _ACTIVE[router] = RouterMasks(family, moe_layer)
                state.selections.append(selection)
                entered.append((router, selection))
                state.merged = merge_selections(state.selections)
                if state.handle is None:
                    state.handle = register_module_hook(router, _make_hook(state), prepend=True, with_kwargs=True)
        yield
    finally:
        for router, selection in reversed(entered):
            state = _ACTIVE.get(router)
            if state is None:
                continue
            state.selections = [s for s in state.selections if s is not selection]
            if state.selections:
                state.merged = merge_selections(state.selections)
            else:
                if state.handle is not None:
                    state.handle.remove()
                del _ACTIVE[router]
