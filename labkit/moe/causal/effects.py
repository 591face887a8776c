"""The causal effect of switching each expert off: exact ablation and a first-order estimate.

See :mod:`labkit.moe.causal` for the method; :func:`causal_attribution` returns a
:class:`CausalAttribution` (plain data, saved as JSON + safetensors).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from labkit import storage
from labkit.backends import backend_of
from labkit.hooks import register_module_hook
from labkit.interventions import merge_selections
from labkit.models import lab_model
from labkit.moe.causal.target import SCORES, Score, TargetRows, batch_logprobs, encode_targets, encoded_logprobs, per_prompt_score
from labkit.moe.families import MoELayer, Selection, family_of, find_routers, hf_of

__all__ = ["KIND", "METHODS", "VERSION", "CausalAttribution", "Method", "causal_attribution"]

KIND = "labkit.CausalAttribution"
VERSION = 1
Method = Literal["ablation", "first_order"]
METHODS = ("ablation", "first_order")


# --- the result ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CausalAttribution:
    """The causal effect of switching each expert off on a behaviour score.

    Attributes:
        effect: ``Float[Tensor, "layer expert"]``: ``score(no mask) - score(expert off)``, the
            score being the mean target probability, or the mean log-probability per target
            token (``score="logprob"``, nats); positive: the expert carries the behaviour. Rows
            follow ``layers`` (true layer numbers of the MoE layers).
        stderr: ``Float[Tensor, "layer expert"]``: standard error of ``effect`` over prompts.
        baseline: the unmasked score.
        layers: true layer index of each row.
        n_prompts: prompts the effect was measured on.
        method: ``"ablation"`` (exact) or ``"first_order"`` (attribution patching).
        target: the target continuation(s), for the record.
        model_name: the model it was measured on.
        score: ``"probability"`` or ``"logprob"``.
    """

    effect: Float[Tensor, "layer expert"]
    stderr: Float[Tensor, "layer expert"]
    baseline: float
    layers: tuple[int, ...]
    n_prompts: int
    method: str
    target: str
    model_name: str
    score: str = "probability"

    @property
    def n_experts(self) -> int:
        return int(self.effect.shape[1])

    def top(self, n: int) -> list[tuple[int, int]]:
        """The ``n`` experts with the largest effect, as ``[(layer, expert), ...]`` (true layers).

        Ties break by layer then expert, so the ranking is deterministic.

        Raises:
            ValueError: ``n`` outside ``0..layers * experts``.
        """
        total = self.effect.numel()
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= total:
            raise ValueError(f"CausalAttribution.top: n must be an int in 0..{total}, got {n!r}.")
        flat = self.effect.flatten().tolist()
        order = sorted(range(total), key=lambda i: (-flat[i], i))[:n]
        return [(self.layers[i // self.n_experts], i % self.n_experts) for i in order]

    def table(self):
        """A ``pandas.DataFrame``: one row per (layer, expert), sorted by effect."""
        import pandas as pd

        rows = [
            {"layer": layer, "expert": expert, "effect": float(self.effect[r, expert]), "stderr": float(self.stderr[r, expert])}
            for r, layer in enumerate(self.layers)
            for expert in range(self.n_experts)
        ]
        return pd.DataFrame(rows).sort_values(["effect", "layer", "expert"], ascending=[False, True, True]).reset_index(drop=True)

    def __repr__(self) -> str:
        return (
            f"CausalAttribution({self.method}, {self.score}, {len(self.layers)} layers x {self.n_experts} experts, "
            f"baseline {self.baseline:.4f} on {self.n_prompts} prompts, top {self.top(min(3, self.effect.numel()))})"
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``<stem>.json`` + ``<stem>.safetensors`` (:mod:`labkit.storage`); return the JSON path."""
        metadata = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("effect", "stderr")}
        metadata["layers"] = list(self.layers)
        return storage.save(path, kind=KIND, version=VERSION, metadata=metadata, tensors={"effect": self.effect, "stderr": self.stderr})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CausalAttribution":
        """Read what :meth:`save` wrote (the stem or either file).

        Raises:
            FileNotFoundError / ValueError: as :func:`labkit.storage.load`.
        """
        metadata, tensors = storage.load(path, kind=KIND, version=VERSION, caller="CausalAttribution.load", writer="CausalAttribution.save")
        names = [f.name for f in fields(cls) if f.name not in ("effect", "stderr", "score")]
        storage.require_keys(metadata, names, caller="CausalAttribution.load", source=repr(str(path)))
        values = {name: metadata[name] for name in names}
        values["score"] = metadata.get("score", "probability")
        values["layers"] = tuple(values["layers"])
        return cls(effect=tensors["effect"], stderr=tensors["stderr"], **values)


# --- estimators ------------------------------------------------------------------------------------


def _layers_of(model, layers: Sequence[int] | None, caller: str) -> list[MoELayer]:
    routers = find_routers(model)
    if layers is None:
        return routers
    by_layer = {r.layer: r for r in routers}
    bad = [layer for layer in layers if layer not in by_layer]
    if bad:
        raise ValueError(f"{caller}: layers {bad} are not MoE layers of this model; MoE layers: {sorted(by_layer)}.")
    return [by_layer[layer] for layer in sorted(set(layers))]


def _stderr(per_prompt: Tensor) -> Tensor:
    n = per_prompt.shape[-1]
    return per_prompt.std(dim=-1, unbiased=True) / math.sqrt(n) if n > 1 else torch.zeros(per_prompt.shape[:-1])


def _ablation(model, batches: TargetRows, routers: list[MoELayer], progress: bool, score: str) -> tuple[Tensor, Tensor, float]:
    from labkit.moe.masking import ExpertMask, masked

    n_tokens = torch.tensor([len(t) for t in batches.target_rows], dtype=torch.float32)
    base = per_prompt_score(encoded_logprobs(model, batches), n_tokens, score)
    n_experts = routers[0].n_experts
    per_prompt = torch.zeros(len(routers), n_experts, len(batches))
    cells = [(r, e) for r in range(len(routers)) for e in range(n_experts)]
    for r, e in tqdm(cells, desc="causal ablation", unit="expert", disable=not progress):
        with masked(model, ExpertMask.off([(routers[r].layer, e)])):
            per_prompt[r, e] = base - per_prompt_score(encoded_logprobs(model, batches), n_tokens, score)
    return per_prompt.mean(-1), _stderr(per_prompt), float(base.mean())


def _blocks_of(model, routers: list[MoELayer]) -> list[torch.nn.Module]:
    """The MoE block of each router: the module that holds the router and an ``experts`` module."""
    parents = {}
    for module in hf_of(model).modules():
        if isinstance(getattr(module, "experts", None), torch.nn.Module):
            for child in module.children():
                parents[id(child)] = module
    missing = [r.layer for r in routers if id(r.router) not in parents]
    if missing:
        raise NotImplementedError(
            f"causal_attribution(method='first_order'): no 'experts' module beside the router in layers {missing}; "
            "use method='ablation'."
        )
    return [parents[id(r.router)] for r in routers]


@contextlib.contextmanager
def _capture(routers: list[MoELayer], blocks: list[torch.nn.Module], family_name: str) -> Iterator[list[dict[str, Any]]]:
    """Per MoE layer: the router's logits and the experts call (hidden, indices, weights), with a
    zero tensor added to the experts output so its gradient can be read."""
    records: list[dict[str, Any]] = [{} for _ in routers]
    handles = []

    def router_hook(record):
        def hook(_module, _inputs, output):
            record["router_logits"] = output[0].detach()

        return hook

    def experts_hook(record):
        def hook(module, args, kwargs, output):
            values = list(args) + list(kwargs.values())
            if len(values) != 3 or not isinstance(output, Tensor) or values[1].dtype not in (torch.int64, torch.int32):
                raise NotImplementedError(
                    f"causal_attribution(method='first_order'): the {family_name} experts module is not called as "
                    "experts(hidden_states, topk_indices, topk_weights); use method='ablation'."
                )
            record["hidden"], record["indices"], record["weights"] = (v.detach() for v in values)
            record["experts"] = module
            probe = torch.zeros_like(output, requires_grad=True)
            record["probe"] = probe
            return output + probe

        return hook

    try:
        for moe_layer, block, record in zip(routers, blocks, records):
            handles.append(register_module_hook(moe_layer.router, router_hook(record)))
            handles.append(register_module_hook(block.experts, experts_hook(record), with_kwargs=True))
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _first_order(model, batches: TargetRows, routers: list[MoELayer], progress: bool, score: str) -> tuple[Tensor, Tensor, float]:
    family = family_of(model)
    blocks = _blocks_of(model, routers)
    hf_model = hf_of(model)
    n_experts = routers[0].n_experts
    per_prompt = torch.zeros(len(routers), n_experts, len(batches))
    scores = []
    for start, prompt_rows, target_rows in tqdm(list(batches.chunks()), desc="causal first order", unit="batch", disable=not progress):
        with _capture(routers, blocks, family.name) as records, torch.enable_grad():
            n_tokens = torch.tensor([len(t) for t in target_rows], dtype=torch.float32, device=next(hf_model.parameters()).device)
            values = per_prompt_score(batch_logprobs(hf_model, prompt_rows, target_rows, batches.pad_id), n_tokens, score)
            values.sum().backward()  # rows do not interact, so each row's gradient is its own prompt's
        scores.append(values.detach().cpu())
        width = max(len(p) + len(t) for p, t in zip(prompt_rows, target_rows))
        for r, (moe_layer, record) in enumerate(zip(routers, records)):
            grad = record["probe"].grad.reshape(-1, record["probe"].shape[-1])
            row_of_token = torch.arange(grad.shape[0], device=grad.device) // width
            opened = backend_of(model).open_selections(moe_layer.layer)
            active = merge_selections(opened) if opened else None
            with torch.no_grad():
                base_indices, base_weights = family.route(moe_layer.router, record["router_logits"], active)
                base_out = record["experts"](record["hidden"], base_indices, base_weights)
                for e in range(n_experts):
                    selection = _with_off(active, e, n_experts, record["router_logits"].device)
                    indices, weights = family.route(moe_layer.router, record["router_logits"], selection)
                    changed = (indices != base_indices).any(-1) | (weights != base_weights).any(-1)
                    if not changed.any():
                        continue
                    new_out = record["experts"](record["hidden"][changed], indices[changed], weights[changed])
                    delta = new_out - base_out[changed]
                    contribution = (grad[changed].float() * delta.float()).sum(-1)
                    per_token = torch.zeros(len(prompt_rows), device=grad.device)
                    per_token.index_add_(0, row_of_token[changed], contribution)
                    per_prompt[r, e, start : start + len(prompt_rows)] = -per_token.cpu()
    return per_prompt.mean(-1), _stderr(per_prompt), float(torch.cat(scores).mean())


def _with_off(active: Selection | None, expert: int, n_experts: int, device) -> Selection:
    off = torch.zeros(n_experts, dtype=torch.bool, device=device)
    off[expert] = True
    if active is None:
        return Selection(off=off, on=torch.zeros_like(off))
    return Selection(off=active.off.to(device) | off, on=active.on.to(device), bias=active.bias)


def causal_attribution(
    model,
    prompts: Sequence[str],
    targets: str | Sequence[str],
    *,
    method: Method = "ablation",
    score: Score = "probability",
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    chat: bool = False,
    prepend_bos: bool | None = None,
    progress: bool = True,
) -> CausalAttribution:
    """The causal effect of switching each expert off on ``p(target | prompt)``.

    See the module docstring for the two methods. Any expert mask open around the call is part
    of the baseline, so effects inside ``with masked(model, m):`` are effects *given* ``m``.

    Args:
        model: a labkit bridge of a MoE model.
        prompts: behaviour prompts (e.g. the sensitive questions of a refusal organism).
        targets: the behaviour's continuation (``" I cannot"``), one string or one per prompt.
        method: ``"ablation"`` (exact; one masked pass per expert) or ``"first_order"``
            (attribution patching; one forward and backward pass per batch).
        score: the behaviour score averaged over prompts: ``"probability"`` (``p(target |
            prompt)``, in [0, 1]; right when the behaviour is near-deterministic, like a refusal)
            or ``"logprob"`` (mean log-probability per target token, nats; every prompt counts,
            right for open text, where a mean of probabilities is carried by the few most
            predictable prompts).
        layers: restrict to these MoE layers (true layer numbers); default all.
        batch_size, chat, prepend_bos: as for :func:`target_logprobs`.
        progress: show a progress bar.

    Returns:
        A :class:`CausalAttribution`; ``.top(n)`` plugs into ``ExpertMask.from_attribution`` and
        :func:`labkit.moe.compare_conditions`.

    Raises:
        ValueError: an unknown method, a layer that is not a MoE layer, bad prompts / targets.
        NotImplementedError: ``first_order`` on a family whose experts module is not called as
            ``experts(hidden, topk_indices, topk_weights)`` (use ``"ablation"``).
    """
    if method not in METHODS:
        raise ValueError(f"causal_attribution: unknown method {method!r}; allowed: {', '.join(METHODS)}.")
    if score not in SCORES:
        raise ValueError(f"causal_attribution: unknown score {score!r}; allowed: {', '.join(SCORES)}.")
    batches = encode_targets(model, prompts, targets, caller="causal_attribution", chat=chat, prepend_bos=prepend_bos, batch_size=batch_size)
    routers = _layers_of(model, layers, "causal_attribution")
    estimate = _ablation if method == "ablation" else _first_order
    effect, stderr, baseline = estimate(model, batches, routers, progress, score)
    target = targets if isinstance(targets, str) else f"{len(list(targets))} per-prompt targets"
    return CausalAttribution(
        effect=effect.float(),
        stderr=stderr.float(),
        baseline=baseline,
        layers=tuple(r.layer for r in routers),
        n_prompts=len(batches),
        method=method,
        score=score,
        target=target,
        model_name=lab_model(model).name,
    )
