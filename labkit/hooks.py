"""labkit's hooks by TransformerLens hook name, on any model handle that runs in this process.

The registrar itself lives with the Hugging Face backend (:mod:`labkit.backends.registrar`, where
every hook labkit attaches is registered); these are its public entry points, taking the model a
user holds: :func:`attach` for one run, :func:`intervene` for an open intervention,
:func:`resolve_hook` / :func:`hook_names` to look names up, :func:`count_hooks` to check that
nothing is left attached. On another backend they raise :class:`labkit.backends.NotOnBackendError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal

import torch

from labkit.backends import backend_of
from labkit.backends import hooks as _registrar
from labkit.backends.hooks import (  # noqa: F401  (re-exported)
    HookFn,
    HookPointNeverFiresError,
    HookSite,
    HookSpec,
    count_hooks,
    module_hooks,
    register_module_hook,
)

__all__ = [
    "HookPointNeverFiresError", "HookSite", "HookFn", "attach", "count_hooks", "hook_names", "intervene",
    "module_hooks", "probe", "register_module_hook", "reprobe", "resolve_hook",
]


def _record(model, caller: str):
    backend = backend_of(model)
    backend.require("forward", caller)
    return backend


def resolve_hook(model, name: str) -> HookSite:
    """Resolve a TransformerLens hook name to its :class:`HookSite` (see :func:`labkit.backends.hooks.resolve_hook`).

    Raises:
        ValueError: an unknown name (the message lists the closest real names).
        HookPointNeverFiresError: a hook point that never fires under the model's configuration.
        TypeError: a model that does not run in this process.
    """
    return _registrar.resolve_hook(_record(model, "resolve_hook"), name)


def hook_names(model) -> list[str]:
    """Every hook name the model accepts: bridge hook points plus TransformerLens aliases."""
    return _registrar.hook_names(_record(model, "hook_names"))


def probe(model) -> None:
    """Run the firing probe now (``labkit.load_model`` does, once per model)."""
    _registrar.probe(_record(model, "probe"))


def reprobe(model) -> None:
    """Forget which hook points fire (call after changing a ``model.cfg`` flag such as ``use_attn_result``)."""
    _registrar.reprobe(_record(model, "reprobe"))


@contextlib.contextmanager
def attach(model, hooks: HookSpec, *, target: Literal["auto", "bridge"] = "auto") -> Iterator[torch.nn.Module]:
    """Attach hook functions for one run by TransformerLens name; yield the module to run
    (see :func:`labkit.backends.hooks.attach`)."""
    with _registrar.attach(_record(model, "attach"), hooks, target=target) as runner:
        yield runner


@contextlib.contextmanager
def intervene(
    model, hooks: HookSpec = (), *, observe: Callable[[tuple, dict], None] | None = None, caller: str = "intervene"
) -> Iterator[None]:
    """Open an intervention every way of running the model sees (see :func:`labkit.backends.hooks.intervene`)."""
    with _registrar.intervene(_record(model, caller), hooks, observe=observe, caller=caller):
        yield
