"""The registrar: every torch hook labkit attaches in this process is registered here.

:func:`register_module_hook` is the one call of ``register_forward_hook`` /
``register_forward_pre_hook`` in labkit (``tests/test_architecture.py`` holds it; the vLLM
worker's install, which runs in the engine's process, is the other). On top of it:
:func:`register_at_site` hooks the input or output of one module as a :class:`HookSite` says,
:func:`module_hooks` hooks ``(module, fn)`` pairs for a ``with`` block, and :func:`count_hooks`
counts what is attached, for before/after checks. Name resolution (TransformerLens hook name ->
:class:`HookSite`) and the attach / intervene context managers are in
:mod:`labkit.backends.hooks`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["HookFn", "HookSite", "count_hooks", "module_hooks", "register_at_site", "register_module_hook"]

#: A hook function: receives the activation at the hook point (``Float[Tensor, "batch pos ..."]``)
#: and its :class:`HookSite`; returns a replacement tensor or ``None`` to leave it unchanged.
HookFn = Callable[[Tensor, "HookSite"], "Tensor | None"]


@dataclass(frozen=True)
class HookSite:
    """Where a TransformerLens hook name lands.

    Attributes:
        name: the name as the user gave it, e.g. ``"blocks.6.hook_resid_pre"``.
        canonical: the bridge's own hook point name after alias resolution, e.g.
            ``"blocks.6.hook_in"``.
        module_path: path of the plain Hugging Face module whose input/output this is, e.g.
            ``"model.layers.6"``; ``None`` when the hook point is served by the bridge only
            (it exists only inside the bridge, or the bridge converts its value).
        side: ``"input"`` or ``"output"`` of that module; ``None`` for bridge-only points.
        layer: the block index for ``blocks.{L}.…`` names, else ``None``.
    """

    name: str
    canonical: str
    module_path: str | None
    side: Literal["input", "output"] | None
    layer: int | None

    @property
    def on_twin(self) -> bool:
        """True when the hook point is a twin module's input/output with the bridge's meaning."""
        return self.module_path is not None


def _replace_first(value, new: Tensor):
    if isinstance(value, Tensor):
        return new
    if isinstance(value, tuple):
        return (new, *value[1:])
    if isinstance(value, list):
        return [new, *value[1:]]
    raise TypeError(f"cannot replace activation inside a {type(value).__name__}")


def _first_tensor(value) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    raise TypeError(f"hooked module produced {type(value).__name__}, expected a tensor or tuple")


def register_at_site(module: torch.nn.Module, site: HookSite, fn: HookFn):
    """Hook the input (a forward pre-hook) or output (a forward hook) of ``module``, as ``site.side`` says.

    ``fn(activation, site)`` sees the module's first positional input (or its ``hidden_states``
    keyword) / its first output tensor, and may return a replacement of the same shape, or
    ``None`` to leave it. Returns the handle; the caller removes it in ``finally``.
    """
    if site.side == "input":

        def pre_hook(_module, args, kwargs):
            if args:
                new = fn(args[0], site)
                return None if new is None else ((new, *args[1:]), kwargs)
            key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
            new = fn(kwargs[key], site)
            return None if new is None else (args, {**kwargs, key: new})

        return register_module_hook(module, pre_hook, kind="pre", with_kwargs=True)

    def forward_hook(_module, _inputs, output):
        new = fn(_first_tensor(output), site)
        return None if new is None else _replace_first(output, new)

    return register_module_hook(module, forward_hook)


def count_hooks(*modules: torch.nn.Module) -> int:
    """Number of forward / pre-forward / backward hooks on the modules and all their submodules.

    Each distinct submodule is counted once, so ``count_hooks(bridge, bridge.original_model,
    bridge.labkit.twin)`` counts every hook anywhere a labkit model can run. Use it as a
    before/after comparison: a TransformerLens bridge keeps hooks of its own (added on its first
    forward pass, which ``load_model`` runs), so only the plain twin is expected to have none at
    rest.
    """
    seen: set[int] = set()
    total = 0
    for module in modules:
        for sub in module.modules():
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            total += len(sub._forward_hooks) + len(sub._forward_pre_hooks)
            total += len(sub._backward_hooks) + len(getattr(sub, "_backward_pre_hooks", {}))
    return total


def register_module_hook(
    module: torch.nn.Module,
    fn: Callable[..., Any],
    *,
    kind: Literal["forward", "pre"] = "forward",
    prepend: bool = False,
    with_kwargs: bool = False,
):
    """Register one plain ``torch`` hook on a module: every hook labkit attaches goes through here.

    The caller owns the returned handle and removes it in a ``finally`` (or uses
    :func:`module_hooks`). ``kind="pre"`` is a forward pre-hook.

    Raises:
        ValueError: an unknown ``kind``.
    """
    if kind == "forward":
        return module.register_forward_hook(fn, prepend=prepend, with_kwargs=with_kwargs)
    if kind == "pre":
        return module.register_forward_pre_hook(fn, prepend=prepend, with_kwargs=with_kwargs)
    raise ValueError(f"register_module_hook: kind must be 'forward' or 'pre', got {kind!r}.")


@contextlib.contextmanager
def module_hooks(hooks: Sequence[tuple[torch.nn.Module, Callable[..., Any]]], **options: Any) -> Iterator[None]:
    """Hook ``(module, fn)`` pairs for the block (options as :func:`register_module_hook`).

    Every handle is removed in ``finally``: none survives an exception or a ``KeyboardInterrupt``.
    """
    handles = []
    try:
        for module, fn in hooks:
            handles.append(register_module_hook(module, fn, **options))
        yield
    finally:
        for handle in reversed(handles):
            handle.remove()
