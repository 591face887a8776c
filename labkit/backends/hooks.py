"""The one place labkit attaches hooks: TransformerLens hook names, on every path the model runs.

A TransformerLens 4.x bridge runs every one of its hook points (about 1,400 on a 30-layer model)
on every forward pass, used or not; on SmolLM2 that makes cached generation ~0.54x as fast as
plain Hugging Face. labkit keeps the TransformerLens *names* and their meaning, and resolves
each one to where it lands:

* a component's ``hook_in`` / ``hook_out`` (and aliases such as ``blocks.{L}.hook_resid_pre`` =
  ``blocks.{L}.hook_in``, ``hook_resid_post``, ``hook_attn_out``, ``hook_mlp_out``) that a
  probe pass at load time shows to equal the input / output of one Hugging Face module: on the
  plain twin (:attr:`labkit.models.LabModel.twin`) it becomes one ``torch`` hook on that module.
* every other hook point (per-head ``attn.hook_q`` / ``hook_k`` / ``hook_z``, which the bridge
  reshapes to ``[batch, pos, head, d_head]``; ``attn.hook_pattern``; ``ln1.hook_scale`` ...) is
  hooked on the bridge itself through TransformerLens's own ``HookPoint.add_hook``, so it has
  exactly the bridge's shape and values. Speed never changes a value
  (``tests/test_hook_conformance.py`` compares both paths name by name).

Two kinds of attachment:

* :func:`attach` — hooks for one labkit run (caching, capturing): they go on the twin when every
  name lands there, else on the bridge, and the module to run is yielded.
* :func:`intervene` — an open intervention (steering vector, expert mask): its hooks go on the
  twin *and* on the bridge, so that whatever the user runs inside the block — the bridge's
  forward, ``run_with_cache``, ``generate``, or any labkit function — sees it.

Every attachment is a context manager that registers inside ``try`` and removes its own handles
in ``finally``: no hook survives an exception or a ``KeyboardInterrupt`` (an interrupted cell).
The torch registration itself is :mod:`labkit.backends.registrar` (re-exported here).
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from labkit.backends.registrar import (
    HookFn,
    HookSite,
    count_hooks,
    module_hooks,
    register_at_site,
    register_module_hook,
)
from labkit.checks import layer_of

__all__ = [
    "HookPointNeverFiresError", "HookSite", "HookFn", "attach", "count_hooks", "hook_names", "intervene",
    "module_hooks", "probe", "register_at_site", "register_module_hook", "reprobe", "resolve_hook",
]


class HookPointNeverFiresError(ValueError):
    """A hook point exists in the bridge but does not fire under the model's configuration."""


#: Hook points that TransformerLens computes only when a config flag is on: suffix -> flag.
_GATED = {
    "hook_result": "use_attn_result",
    "hook_attn_in": "use_attn_in",
    "hook_q_input": "use_split_qkv_input",
    "hook_k_input": "use_split_qkv_input",
    "hook_v_input": "use_split_qkv_input",
    "hook_mlp_in": "use_hook_mlp_in",
    "hook_tokens": "use_hook_tokens",
}


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
    fired: set[int] = field(default_factory=set)
    twin_ok: set[int] = field(default_factory=set)
    probed: list[bool] = field(default_factory=lambda: [False])


def _index(model) -> _HookIndex:
    record = model
    if record.hook_index is None:
        bridge = record.bridge
        record.hook_index = _HookIndex(dict(bridge.hook_dict), _alias_table(bridge), _module_io_points(bridge), {})
    return record.hook_index


def _same_value(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    # Same meaning, up to float rounding: the bridge reimplements attention with another op
    # order, which moves float32 values by ~1e-7 of the tensor's scale; a different meaning
    # (pre- vs post-norm, a reshape, another module) moves them by order one.
    if b.numel() == 0:
        return True
    tolerance = 1e-4 if a.dtype in (torch.float32, torch.float64) else 2e-2
    scale = float(b.float().abs().max())
    return bool((a.float() - b.float()).abs().max() <= tolerance * scale + 1e-6)


def _probe_firing(model, index: _HookIndex) -> set[int]:
    """Probe the bridge once: which hook points fire, and which the twin reproduces exactly.

    One short forward pass of the bridge records every hook point's value; one pass of the
    plain twin records the input/output of every module a hook point stands for. A hook point
    runs on the twin (:attr:`HookSite.on_twin`) only if the twin gave the same shape and values
    there — so the fast path never changes a value, whatever an architecture's adapter does
    (some reshape a module's input, e.g. DeepSeek's ``kv_b_proj``). Run once per model by
    ``load_model`` (configuration flags that gate hook points are read then); after changing a
    ``model.cfg`` flag call ``labkit.hooks.reprobe(model)``.

    Returns:
        ``id`` of every hook point that fired.
    """
    if index.probed[0]:
        return index.fired
    record = model
    fired: set[int] = set()
    seen: dict[int, Tensor] = {}
    twin_seen: dict[int, Tensor] = {}
    handles = []

    identity: set[int] = set()

    def on_point(module, _inputs, output):
        fired.add(id(module))
        if isinstance(output, Tensor):
            raw = output.detach().clone()
            conversion = getattr(module, "hook_conversion", None)
            # the value a TransformerLens hook sees there (its conversion applied)
            value = conversion.convert(raw) if conversion is not None else raw
            seen[id(module)] = value
            if conversion is None or (isinstance(value, Tensor) and _same_value(value, raw)):
                identity.add(id(module))

    try:
        for point in index.hook_dict.values():
            handles.append(register_module_hook(point, on_point))
        twin = record.twin
        tokens = torch.tensor([[0, 1, 2]], device=next(twin.parameters()).device)
        with torch.inference_mode():
            record.bridge(tokens)
        for key, (component, side) in index.io_points.items():
            path = record.module_paths.get(id(component.original_component))
            if path is None or key not in seen:
                continue
            site = HookSite("probe", "probe", path, side, None)

            def grab(activation, _site, key=key):
                twin_seen.setdefault(key, activation.detach().clone())

            handles.append(register_at_site(twin.get_submodule(path), site, grab))
        with torch.inference_mode():
            twin(input_ids=tokens, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    index.fired.clear()
    index.fired.update(fired)
    index.twin_ok.clear()
    # on the twin only where the twin's tensor is what a TransformerLens hook sees there, and
    # the bridge's conversion is the identity (so a write needs no reversion either)
    index.twin_ok.update(
        k for k, v in twin_seen.items() if k in identity and isinstance(seen[k], Tensor) and _same_value(v, seen[k])
    )
    index.sites.clear()
    index.probed[0] = True
    return index.fired


def probe(model) -> None:
    """Run the firing probe now (``labkit.load_model`` does, once per model)."""
    _probe_firing(model, _index(model))


def reprobe(model) -> None:
    """Forget which hook points fire (call after changing a ``model.cfg`` flag such as
    ``use_attn_result``), so the next resolution probes the bridge again."""
    index = _index(model)
    index.probed[0] = False
    index.sites.clear()


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


def resolve_hook(model, name: str) -> HookSite:
    """Resolve a TransformerLens hook name to its :class:`HookSite`.

    Args:
        model: a bridge from :func:`labkit.load_model`.
        name: e.g. ``"blocks.6.hook_resid_pre"`` or ``"blocks.0.attn.hook_pattern"``.

    Returns:
        The site; ``site.on_twin`` tells whether it runs on the plain twin.

    Raises:
        ValueError: the name is not a hook point of this model; the message lists the closest
            real names.
        HookPointNeverFiresError: the hook point exists but does not fire under the model's
            configuration (e.g. ``attn.hook_result`` needs ``cfg.use_attn_result``); the message
            names the flag.
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
        n_layers = getattr(model.bridge.cfg, "n_layers", "?")
        raise ValueError(
            f"Unknown hook point {name!r} for this model ({n_layers} layers, {len(names)} hook "
            f"names). Closest real names: {close or names[:5]}. List them all with "
            "labkit.hooks.hook_names(model)."
        )
    if id(point) not in _probe_firing(model, index):
        suffix = canonical.rsplit(".", 1)[-1]
        flag = _GATED.get(suffix) or _GATED.get(name.rsplit(".", 1)[-1])
        how = (
            f"It is computed only when model.cfg.{flag} is True: set model.cfg.{flag} = True "
            "(TransformerLens's switch), then call labkit.hooks.reprobe(model)."
            if flag
            else "No configuration flag labkit knows turns it on; check the TransformerLens adapter of this architecture."
        )
        raise HookPointNeverFiresError(
            f"Hook point {name!r} exists in the bridge but never fires under this model's configuration, "
            f"so nothing would be cached or changed there. {how}"
        )
    module_path, side = None, None
    owner = index.io_points.get(id(point))
    if owner is not None and id(point) in index.twin_ok:
        component, side = owner
        module_path = model.module_paths.get(id(component.original_component))
        if module_path is None:
            side = None
    site = HookSite(name, canonical, module_path, side, layer_of(name))
    index.sites[name] = site
    return site




HookSpec = Mapping[str, HookFn] | Sequence[tuple[str, HookFn]]


class _BridgeHandle:
    """Removes one hook added with TransformerLens's ``HookPoint.add_hook``."""

    def __init__(self, point, lens_handle) -> None:
        self.point, self.lens_handle = point, lens_handle

    def remove(self) -> None:
        self.lens_handle.hook.remove()
        if self.lens_handle in self.point.fwd_hooks:
            self.point.fwd_hooks.remove(self.lens_handle)


def _register_on_bridge(model, site: HookSite, fn: HookFn) -> _BridgeHandle:
    """Hook the bridge's own hook point through TransformerLens (its conversions applied).

    Permanent in TransformerLens's sense, so ``run_with_cache`` / ``reset_hooks`` inside an
    intervention keep it; labkit removes it itself.
    """
    point = _index(model).hook_dict[site.canonical]
    bridge_site = HookSite(site.name, site.canonical, None, None, site.layer)

    def lens_hook(activation, hook=None):
        return fn(activation, bridge_site)

    return _BridgeHandle(point, point.add_hook(lens_hook, dir="fwd", is_permanent=True))


def _sites(model, hooks: HookSpec) -> list[tuple[HookSite, HookFn]]:
    items = list(hooks.items()) if isinstance(hooks, Mapping) else list(hooks)
    return [(resolve_hook(model, name), fn) for name, fn in items]


@contextlib.contextmanager
def attach(model, hooks: HookSpec, *, target: Literal["auto", "bridge"] = "auto") -> Iterator[torch.nn.Module]:
    """Attach hook functions for one labkit run, by TransformerLens name; yield the module to run.

    With ``target="auto"``, if every name lands on the twin (:attr:`HookSite.on_twin`) the hooks
    go on the plain twin and the twin is yielded (nothing else runs); otherwise every hook goes
    on the bridge's hook points (through TransformerLens, so per-head reshapes apply) and the
    bridge is yielded. Several functions may share a name; they run in the given order, after
    the hooks of any open intervention (:func:`intervene`), so they see its effect.

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
        HookPointNeverFiresError: a hook point that never fires under the model's config.
    """
    if target not in ("auto", "bridge"):
        raise ValueError(f"target must be 'auto' or 'bridge', got {target!r}")
    sites = _sites(model, hooks)
    use_twin = target == "auto" and all(site.on_twin for site, _ in sites)
    record = model
    runner = record.twin if use_twin else record.bridge
    handles = []
    try:
        for site, fn in sites:
            if use_twin:
                handles.append(register_at_site(runner.get_submodule(site.module_path), site, fn))
            else:
                handles.append(_register_on_bridge(model, site, fn))
        yield runner
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def intervene(
    model,
    hooks: HookSpec = (),
    *,
    observe: Callable[[tuple, dict], None] | None = None,
    caller: str = "intervene",
) -> Iterator[None]:
    """Open an intervention that every way of running the model sees, until the block ends.

    Each hook function is attached twice: on the plain twin (which ``labkit.generate``,
    ``cache_activations``, ``trace_routing`` … run) and on the bridge (its ``forward``,
    ``run_with_cache``, ``generate``). The bridge's hook point is hooked through TransformerLens
    itself, so a ``run_with_cache`` inside the block caches the intervened value, as
    TransformerLens's own ``model.hooks(...)`` would.

    Args:
        model: a labkit bridge.
        hooks: ``{name: fn}`` / ``[(name, fn)]`` by TransformerLens hook name; each name must
            land on the twin (a module input/output), since labkit's own runs use the twin.
        observe: ``fn(args, kwargs)`` called with the inputs of every top-level forward call
            (twin and bridge side alike), before any hook of that call runs.
        caller: the public function's name, for messages.

    Raises:
        ValueError: a hook name that does not land on the twin (the message says which do).
    """
    sites = _sites(model, hooks)
    for site, _fn in sites:
        if not site.on_twin:
            raise ValueError(
                f"{caller}: hook point {site.name!r} is served by the bridge only (it is not a module's "
                "input/output with the same meaning); interventions must also run on labkit's fast path. "
                "Use blocks.{L}.hook_resid_pre / hook_resid_mid / hook_resid_post / hook_attn_out / "
                "hook_mlp_out or hook_embed."
            )
    record = model
    twin = record.twin
    handles = []
    try:
        if observe is not None:
            for top in (twin, record.bridge.original_model):
                handles.append(
                    register_module_hook(top, lambda _m, args, kwargs: observe(args, kwargs), kind="pre", with_kwargs=True)
                )
        for site, fn in sites:
            handles.append(register_at_site(twin.get_submodule(site.module_path), site, fn))
            handles.append(_register_on_bridge(model, site, fn))
        yield
    finally:
        for handle in reversed(handles):
            handle.remove()


