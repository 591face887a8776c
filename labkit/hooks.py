"""The one place labkit attaches hooks: TransformerLens hook names, paid for only when used.

A TransformerLens 4.x bridge runs every one of its hook points (about 1,400 on a 30-layer model)
on every forward pass, used or not; on SmolLM2 that makes cached generation ~0.54x as fast as
plain Hugging Face. labkit keeps the TransformerLens *names* but resolves each one to where it
lands on the plain twin model (:func:`labkit.models.hf_model_of`):

* a component's ``hook_in`` / ``hook_out`` (and aliases such as ``blocks.{L}.hook_resid_pre`` =
  ``blocks.{L}.hook_in``, ``hook_resid_post``, ``hook_attn_out``, ``hook_mlp_out``) is the
  input / output of one Hugging Face module, so it becomes a plain ``torch`` pre-hook / forward
  hook on that module of the twin. Nothing else runs any hook code.
* any other hook point (``attn.hook_pattern``, ``ln1.hook_scale`` ...) exists only inside the
  bridge; :func:`attach` then hooks the bridge's own ``HookPoint`` modules and runs the bridge.

Every attachment is a context manager that registers inside ``try`` and removes its own handles
in ``finally``: no hook survives an exception or a ``KeyboardInterrupt`` (an interrupted cell).
"""

from __future__ import annotations

import contextlib
import difflib
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from labkit.models import lab_model

__all__ = ["HookSite", "HookFn", "attach", "count_hooks", "hook_names", "observe_inputs", "resolve_hook"]

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
            ``"model.layers.6"``; ``None`` when the hook point exists only inside the bridge.
        side: ``"input"`` or ``"output"`` of that module; ``None`` for bridge-only points.
        layer: the block index for ``blocks.{L}.…`` names, else ``None``.
    """

    name: str
    canonical: str
    module_path: str | None
    side: Literal["input", "output"] | None
    layer: int | None

    @property
    def fast(self) -> bool:
        """True when the hook runs on the plain twin (no bridge overhead)."""
        return self.module_path is not None


def _alias_table(bridge) -> dict[str, str]:
    """Map every alias name to the bridge hook point it stands for."""
    table: dict[str, str] = {}
    hook_dict = bridge.hook_dict  # a property that rebuilds the whole dict: read it once
    for alias, target in (getattr(bridge, "hook_aliases", None) or {}).items():
        targets = [target] if isinstance(target, str) else list(target)
        for candidate in targets:
            if candidate in hook_dict:
                table[alias] = candidate
                break
    for path, module in bridge.named_modules():
        aliases = getattr(module, "hook_aliases", None)
        if not path or not isinstance(aliases, dict):
            continue
        for alias, target in aliases.items():
            targets = [target] if isinstance(target, str) else list(target)
            for candidate in targets:
                full = f"{path}.{candidate}"
                if full in hook_dict:
                    table[f"{path}.{alias}"] = full
                    break
    return table


@dataclass(frozen=True)
class _HookIndex:
    """Everything name resolution needs, computed once per bridge (its structure is fixed)."""

    hook_dict: dict[str, torch.nn.Module]
    aliases: dict[str, str]
    io_points: dict[int, tuple[torch.nn.Module, str]]
    sites: dict[str, "HookSite"]


_INDEX: "weakref.WeakKeyDictionary[torch.nn.Module, _HookIndex]" = weakref.WeakKeyDictionary()


def _index(model) -> _HookIndex:
    index = _INDEX.get(model)
    if index is None:
        index = _HookIndex(dict(model.hook_dict), _alias_table(model), _module_io_points(model), {})
        _INDEX[model] = index
    return index


def hook_names(model) -> list[str]:
    """Every hook name the model accepts: bridge hook points plus TransformerLens aliases.

    Args:
        model: a bridge from :func:`labkit.load_model`.

    Returns:
        Sorted list of names, e.g. ``["blocks.0.hook_attn_out", "blocks.0.hook_in", ...]``.
    """
    index = _index(model)
    return sorted({*index.hook_dict, *index.aliases})


def _module_io_points(bridge) -> dict[int, tuple[torch.nn.Module, str]]:
    """``id(HookPoint) -> (component, "input" | "output")`` for every component's hook_in/out."""
    index: dict[int, tuple[torch.nn.Module, str]] = {}
    for module in bridge.modules():
        if getattr(module, "original_component", None) is None:
            continue
        for attribute, side in (("hook_in", "input"), ("hook_out", "output")):
            point = getattr(module, attribute, None)
            if isinstance(point, torch.nn.Module):
                index[id(point)] = (module, side)
    return index


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None


def resolve_hook(model, name: str) -> HookSite:
    """Resolve a TransformerLens hook name to its :class:`HookSite`.

    Args:
        model: a bridge from :func:`labkit.load_model`.
        name: e.g. ``"blocks.6.hook_resid_pre"`` or ``"blocks.0.attn.hook_pattern"``.

    Returns:
        The site; ``site.fast`` tells whether it runs on the plain twin.

    Raises:
        ValueError: the name is not a hook point of this model; the message lists the closest
            real names.
    """
    if not isinstance(name, str):
        raise TypeError(f"hook name must be a str, got {type(name).__name__}: {name!r}")
    index = _index(model)
    if name in index.sites:
        return index.sites[name]
    canonical = index.aliases.get(name, name)
    point = index.hook_dict.get(canonical)
    if point is None:
        names = hook_names(model)
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
        n_layers = getattr(model.cfg, "n_layers", "?")
        raise ValueError(
            f"Unknown hook point {name!r} for this model ({n_layers} layers, {len(names)} hook "
            f"names). Closest real names: {close or names[:5]}. List them all with "
            "labkit.hooks.hook_names(model)."
        )
    module_path, side = None, None
    owner = index.io_points.get(id(point))
    if owner is not None:
        component, side = owner
        module_path = lab_model(model).module_paths.get(id(component.original_component))
        if module_path is None:
            side = None
    site = HookSite(name, canonical, module_path, side, _layer_of(name))
    index.sites[name] = site
    return site


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


def _register(module: torch.nn.Module, site: HookSite, fn: HookFn):
    if site.side == "input":

        def pre_hook(_module, args, kwargs):
            if args:
                new = fn(args[0], site)
                return None if new is None else ((new, *args[1:]), kwargs)
            key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
            new = fn(kwargs[key], site)
            return None if new is None else (args, {**kwargs, key: new})

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def forward_hook(_module, _inputs, output):
        new = fn(_first_tensor(output), site)
        return None if new is None else _replace_first(output, new)

    return module.register_forward_hook(forward_hook)


HookSpec = Mapping[str, HookFn] | Sequence[tuple[str, HookFn]]


@contextlib.contextmanager
def attach(model, hooks: HookSpec, *, target: Literal["auto", "bridge"] = "auto") -> Iterator[torch.nn.Module]:
    """Attach hook functions by TransformerLens name; yield the module to run.

    With ``target="auto"``, if every name resolves to a module input/output the hooks go on the
    plain twin and the twin is yielded (fast: nothing else runs); otherwise every hook goes on
    the bridge's ``HookPoint`` modules and the bridge is yielded. Several functions may share a
    name; they run in the given order.

    Args:
        model: a bridge from :func:`labkit.load_model`.
        hooks: ``{name: fn}`` or ``[(name, fn), ...]``; ``fn(activation, site)`` returns a
            replacement tensor or ``None``.
        target: ``"auto"`` or ``"bridge"`` (force the bridge, e.g. to compare paths).

    Yields:
        The ``torch.nn.Module`` to call: the twin (``input_ids=..., attention_mask=...``,
        returns a ``CausalLMOutput``) or the bridge.

    Raises:
        ValueError: an unknown hook name (with the closest real names) or an unknown target.
    """
    if target not in ("auto", "bridge"):
        raise ValueError(f"target must be 'auto' or 'bridge', got {target!r}")
    items = list(hooks.items()) if isinstance(hooks, Mapping) else list(hooks)
    sites = [(resolve_hook(model, name), fn) for name, fn in items]
    use_twin = target == "auto" and all(site.fast for site, _ in sites)
    runner = lab_model(model).hf_model if use_twin else model
    handles = []
    try:
        for site, fn in sites:
            if use_twin:
                handles.append(_register(runner.get_submodule(site.module_path), site, fn))
            else:
                point = _index(model).hook_dict[site.canonical]
                bridge_site = HookSite(site.name, site.canonical, None, "output", site.layer)
                handles.append(_register(point, bridge_site, fn))
        yield runner
    finally:
        for handle in handles:
            handle.remove()


def count_hooks(module: torch.nn.Module) -> int:
    """Number of forward / pre-forward / backward hooks on a module and all its submodules.

    Use it as a before/after comparison: a TransformerLens bridge keeps hooks of its own (its
    capture machinery adds some on the first forward pass), so only the plain twin
    (:func:`labkit.models.hf_model_of`) is expected to have none at rest.
    """
    total = 0
    for sub in module.modules():
        total += len(sub._forward_hooks) + len(sub._forward_pre_hooks)
        total += len(sub._backward_hooks) + len(getattr(sub, "_backward_pre_hooks", {}))
    return total


@contextlib.contextmanager
def observe_inputs(
    module: torch.nn.Module, fn: Callable[[tuple, dict], None]
) -> Iterator[torch.nn.Module]:
    """Call ``fn(args, kwargs)`` with the inputs of every forward call of ``module``.

    For interventions that need to know *what* is being run, not just the activation at one
    hook point: steering reads the attention mask and the cache length of each call of the twin
    (prompt pass vs decode step, where each row's real tokens start) from here. ``fn`` observes
    only; its return value is ignored. Registered inside ``try``, removed in ``finally``.

    Args:
        module: usually the twin, :func:`labkit.models.hf_model_of`.
        fn: ``fn(args, kwargs)``, the positional and keyword arguments of the call.

    Yields:
        ``module``.
    """
    handle = None
    try:
        handle = module.register_forward_pre_hook(
            lambda _module, args, kwargs: fn(args, kwargs), with_kwargs=True
        )
        yield module
    finally:
        if handle is not None:
            handle.remove()
