"""Causal expert attribution: what happens to a behaviour when one expert is switched off.

Frequency attribution (:mod:`labkit.moe.attribution`, MoTE's fTRI) asks which experts the router
*chooses* more on behaviour prompts; it cannot tell a redundant expert from a necessary one. This
module asks the interventional question directly. The behaviour is measured as the probability
of a target continuation under teacher forcing -- ``p(" I cannot" | prompt)`` for a refusal,
a language's own text for a language -- averaged over prompts (:func:`target_probability`); the
**causal effect** of ``(layer, expert)`` is

    effect = score(no mask) - score(that expert off)

where "off" is labkit's :func:`~labkit.moe.masking.masked` semantics: the next-best expert takes
the slot, weights as the family's own router computes them. A positive effect means the expert
carries the behaviour.

Two estimators, one result type (:class:`CausalAttribution`):

- ``method="ablation"``: exact, one masked pass over the prompts per expert
  (``n_layers * n_experts`` passes; right for small models and for checking the estimate).
- ``method="first_order"``: attribution patching (Nanda 2023; Syed, Rager & Conmy 2023,
  "Attribution Patching Outperforms Automated Circuit Discovery") applied to the mask itself.
  One forward and one backward pass give the gradient ``g_t`` of the score with respect to each
  MoE layer's routed-expert output at every token ``t``; switching expert ``e`` off changes that
  output by ``Δh_t(e) = experts(x_t, route_off_e) - experts(x_t, route)``, computed exactly
  (the family's routing with ``e`` excluded, the experts module re-run on the tokens whose
  selection changes). The estimate is ``effect ≈ -Σ_t g_t · Δh_t(e)``: first order in the
  change of the layer's output, exact in the routing. Experts of different layers are
  estimated from the same unmasked pass.

:func:`minimal_mask` searches the smallest set of experts whose removal cuts the behaviour by a
chosen fraction (greedy on exact masked scores, re-scored after every pick) and
:func:`validate_mask` checks a mask on held-out prompts against random masks of the same size and
layer profile.
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
from labkit.models import encode_prompts, lab_model, left_pad
from labkit.moe.families import MoELayer, Selection, family_of, find_routers, hf_of

__all__ = [
    "CausalAttribution",
    "MaskSearch",
    "MaskValidation",
    "causal_attribution",
    "minimal_mask",
    "target_logprobs",
    "target_probability",
    "validate_mask",
]

KIND = "labkit.CausalAttribution"
VERSION = 1
Method = Literal["ablation", "first_order"]
METHODS = ("ablation", "first_order")


# --- the behaviour score -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Batches:
    """Prompt and target token rows, encoded once with the lab's BOS rule."""

    prompt_rows: list[list[int]]
    target_rows: list[list[int]]
    pad_id: int
    batch_size: int

    def __len__(self) -> int:
        return len(self.prompt_rows)

    def chunks(self) -> Iterator[tuple[int, list[list[int]], list[list[int]]]]:
        for start in range(0, len(self), self.batch_size):
            stop = start + self.batch_size
            yield start, self.prompt_rows[start:stop], self.target_rows[start:stop]


def _encode(model, prompts, targets, *, caller, chat, prepend_bos, batch_size) -> _Batches:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{caller}: batch_size must be an int ≥ 1, got {batch_size!r}.")
    prompts, prompt_rows = encode_prompts(model, prompts, caller=caller, chat=chat, prepend_bos=prepend_bos)
    if isinstance(targets, str):
        targets = [targets] * len(prompts)
    targets = list(targets)
    if len(targets) != len(prompts):
        raise ValueError(
            f"{caller}: got {len(targets)} targets for {len(prompts)} prompts; pass one target string "
            "(used for every prompt) or one per prompt."
        )
    tokenizer = lab_model(model).tokenizer
    target_rows = []
    for i, target in enumerate(targets):
        if not isinstance(target, str) or not target:
            raise ValueError(f"{caller}: target {i} is {target!r}; targets must be non-empty strings.")
        ids = tokenizer.encode(target, add_special_tokens=False)
        if not ids:
            raise ValueError(f"{caller}: target {i} ({target!r}) tokenises to no tokens.")
        target_rows.append(list(ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return _Batches(prompt_rows, target_rows, pad, batch_size)


def _batch_logprobs(hf_model, prompt_rows, target_rows, pad_id) -> Tensor:
    """``log p(target | prompt)`` per row, teacher-forced, differentiable; ``[batch]`` float32."""
    rows = [p + t for p, t in zip(prompt_rows, target_rows)]
    device = next(hf_model.parameters()).device
    input_ids, attention_mask, position_ids = left_pad(rows, pad_id, device)
    logits = hf_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    width = input_ids.shape[1]
    out = []
    for b, target in enumerate(target_rows):
        positions = torch.arange(width - len(target), width, device=device)
        # the logit at position i - 1 predicts the token at position i
        picked = logprobs[b, positions - 1].gather(-1, input_ids[b, positions].unsqueeze(-1)).squeeze(-1)
        out.append(picked.sum())
    return torch.stack(out)


Score = Literal["probability", "logprob"]
SCORES = ("probability", "logprob")


def _per_prompt_score(logprob: Tensor, n_tokens: Tensor, score: str) -> Tensor:
    """``p(target | prompt)``, or the mean log-probability per target token (nats)."""
    return logprob.exp() if score == "probability" else logprob / n_tokens


def _logprobs(model, batches: _Batches) -> Tensor:
    hf_model = hf_of(model)
    with torch.no_grad():
        parts = [_batch_logprobs(hf_model, p, t, batches.pad_id) for _, p, t in batches.chunks()]
    return torch.cat(parts).cpu()


def target_logprobs(
    model,
    prompts: Sequence[str],
    targets: str | Sequence[str],
    *,
    batch_size: int = 16,
    chat: bool = False,
    prepend_bos: bool | None = None,
) -> Float[Tensor, "prompt"]:
    """``log p(target | prompt)`` (natural log, summed over the target's tokens) per prompt.

    Teacher-forced on the model's plain twin, so every open intervention (expert masks,
    steering) applies. The prompt is tokenised with the lab's BOS rule, the target with no
    special tokens, and the two token rows are concatenated.

    Args:
        model: a labkit bridge.
        prompts: the prompts.
        targets: one continuation for every prompt, or one per prompt (e.g. ``" I cannot"``).
        batch_size: rows per forward pass.
        chat: wrap prompts in the chat template.
        prepend_bos: override the model's BOS rule.

    Raises:
        ValueError: empty prompts / targets, a target count that matches neither 1 nor the
            number of prompts, a target that tokenises to nothing, or a bad ``batch_size``.
    """
    batches = _encode(model, prompts, targets, caller="target_logprobs", chat=chat, prepend_bos=prepend_bos, batch_size=batch_size)
    return _logprobs(model, batches)


def target_probability(model, prompts, targets, **kwargs: Any) -> float:
    """The behaviour score: the mean over prompts of ``p(target | prompt)`` (in [0, 1]).

    Keyword arguments as for :func:`target_logprobs`.
    """
    return float(target_logprobs(model, prompts, targets, **kwargs).exp().mean())


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


def _ablation(model, batches: _Batches, routers: list[MoELayer], progress: bool, score: str) -> tuple[Tensor, Tensor, float]:
    from labkit.moe.masking import ExpertMask, masked

    n_tokens = torch.tensor([len(t) for t in batches.target_rows], dtype=torch.float32)
    base = _per_prompt_score(_logprobs(model, batches), n_tokens, score)
    n_experts = routers[0].n_experts
    per_prompt = torch.zeros(len(routers), n_experts, len(batches))
    cells = [(r, e) for r in range(len(routers)) for e in range(n_experts)]
    for r, e in tqdm(cells, desc="causal ablation", unit="expert", disable=not progress):
        with masked(model, ExpertMask.off([(routers[r].layer, e)])):
            per_prompt[r, e] = base - _per_prompt_score(_logprobs(model, batches), n_tokens, score)
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


def _first_order(model, batches: _Batches, routers: list[MoELayer], progress: bool, score: str) -> tuple[Tensor, Tensor, float]:
    family = family_of(model)
    blocks = _blocks_of(model, routers)
    hf_model = hf_of(model)
    n_experts = routers[0].n_experts
    per_prompt = torch.zeros(len(routers), n_experts, len(batches))
    scores = []
    for start, prompt_rows, target_rows in tqdm(list(batches.chunks()), desc="causal first order", unit="batch", disable=not progress):
        with _capture(routers, blocks, family.name) as records, torch.enable_grad():
            n_tokens = torch.tensor([len(t) for t in target_rows], dtype=torch.float32, device=next(hf_model.parameters()).device)
            values = _per_prompt_score(_batch_logprobs(hf_model, prompt_rows, target_rows, batches.pad_id), n_tokens, score)
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
    batches = _encode(model, prompts, targets, caller="causal_attribution", chat=chat, prepend_bos=prepend_bos, batch_size=batch_size)
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


# --- minimal masks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskSearch:
    """The result of :func:`minimal_mask`.

    Attributes:
        mask: the experts switched off (an :class:`~labkit.moe.masking.ExpertMask`).
        experts: the picks in order.
        scores: the behaviour score before any pick, then after each pick (``len(experts) + 1``).
        target: the score the search had to reach (``(1 - fraction) * scores[0]``).
        reached: whether it did within ``max_experts``.
    """

    mask: Any
    experts: tuple[tuple[int, int], ...]
    scores: tuple[float, ...]
    target: float
    reached: bool

    def __repr__(self) -> str:
        path = " -> ".join(f"{s:.3f}" for s in self.scores)
        return f"MaskSearch({len(self.experts)} experts {list(self.experts)}, score {path}, target {self.target:.3f}, reached={self.reached})"


def minimal_mask(
    model,
    prompts: Sequence[str],
    targets: str | Sequence[str],
    *,
    fraction: float = 0.5,
    ranking: Any = None,
    pool: int = 16,
    max_experts: int = 10,
    batch_size: int = 16,
    chat: bool = False,
    prepend_bos: bool | None = None,
    progress: bool = True,
) -> MaskSearch:
    """The smallest expert set (greedy) whose removal cuts the behaviour score by ``fraction``.

    Candidates are the ``pool`` best experts of ``ranking`` (default: exact
    :func:`causal_attribution` on the same prompts). Each step scores every remaining candidate
    exactly, with the experts already picked switched off, and keeps the one that lowers the
    score most -- re-scoring after each pick is what finds a second expert that matters only once
    a redundant first one is gone. The search stops when the score is at most ``(1 - fraction)``
    of the unmasked score, or after ``max_experts`` picks. Validate the result on held-out
    prompts with :func:`validate_mask`.

    Args:
        model: a labkit bridge of a MoE model.
        prompts, targets: the training prompts and the behaviour's continuation.
        fraction: the share of the baseline score to remove, in (0, 1].
        ranking: any object with ``.top(n) -> [(layer, expert), ...]`` (a
            :class:`CausalAttribution`, an :class:`~labkit.moe.attribution.ExpertAttribution`).
        pool: how many of the ranking's experts are candidates.
        max_experts: the largest mask tried.

    Raises:
        ValueError: ``fraction`` outside (0, 1], ``pool`` or ``max_experts`` < 1.
    """
    from labkit.moe.masking import ExpertMask, masked

    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"minimal_mask: fraction must be in (0, 1], got {fraction!r}.")
    for name, value in (("pool", pool), ("max_experts", max_experts)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"minimal_mask: {name} must be an int ≥ 1, got {value!r}.")
    batches = _encode(model, prompts, targets, caller="minimal_mask", chat=chat, prepend_bos=prepend_bos, batch_size=batch_size)
    if ranking is None:
        ranking = causal_attribution(model, prompts, targets, batch_size=batch_size, chat=chat, prepend_bos=prepend_bos, progress=progress)
    routers = find_routers(model)
    cap = routers[0].n_experts - routers[0].top_k  # most experts one layer can lose
    candidates = list(ranking.top(min(pool, len(routers) * routers[0].n_experts)))
    baseline = float(_logprobs(model, batches).exp().mean())
    target = (1 - fraction) * baseline
    picked: list[tuple[int, int]] = []
    scores = [baseline]
    bar = tqdm(total=max_experts, desc="minimal mask", unit="expert", disable=not progress)
    while scores[-1] > target and len(picked) < max_experts:
        best = None
        for candidate in candidates:
            if candidate in picked or sum(1 for l, _ in picked if l == candidate[0]) >= cap:
                continue
            with masked(model, ExpertMask.off([*picked, candidate])):
                score = float(_logprobs(model, batches).exp().mean())
            if best is None or score < best[1]:
                best = (candidate, score)
        if best is None:
            break
        picked.append(best[0])
        scores.append(best[1])
        bar.update(1)
    bar.close()
    return MaskSearch(
        mask=ExpertMask.off(picked, model=model) if picked else ExpertMask((), **_meta(model)),
        experts=tuple(picked),
        scores=tuple(scores),
        target=target,
        reached=scores[-1] <= target,
    )


def _meta(model) -> dict[str, Any]:
    from labkit.moe.masking import model_meta

    return model_meta(model)


@dataclass(frozen=True)
class MaskValidation:
    """A mask's behaviour score on held-out prompts beside random masks of the same profile.

    Attributes:
        baseline: the unmasked score.
        masked: the score with the mask.
        random: the score under each random mask (same number of experts per layer, disjoint
            from the mask).
        random_masks: those masks.
    """

    baseline: float
    masked: float
    random: tuple[float, ...]
    random_masks: tuple[Any, ...]

    @property
    def cut(self) -> float:
        """The share of the baseline score the mask removes."""
        return 1 - self.masked / self.baseline if self.baseline > 0 else float("nan")

    @property
    def random_cut(self) -> tuple[float, ...]:
        return tuple(1 - r / self.baseline if self.baseline > 0 else float("nan") for r in self.random)

    def __repr__(self) -> str:
        rnd = ", ".join(f"{c:.2f}" for c in self.random_cut)
        return f"MaskValidation(baseline {self.baseline:.4f}, masked {self.masked:.4f} (cut {self.cut:.2f}), random cuts [{rnd}])"


def validate_mask(
    model,
    mask,
    prompts: Sequence[str],
    targets: str | Sequence[str],
    *,
    n_random: int = 5,
    seed: int = 0,
    batch_size: int = 16,
    chat: bool = False,
    prepend_bos: bool | None = None,
) -> MaskValidation:
    """Score ``mask`` on (held-out) prompts against ``n_random`` layer-matched random masks.

    MoTE (§4) compares the attributed experts with random ones; the random masks here switch off
    as many experts in each layer as ``mask`` does, none of them in ``mask`` (seeds ``seed``,
    ``seed + 1``, ...).

    Raises:
        ValueError: bad prompts / targets, an empty mask, or ``n_random`` < 0.
    """
    from labkit.moe.masking import ExpertMask, masked

    if len(mask) == 0:
        raise ValueError("validate_mask: the mask is empty; nothing to validate.")
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 0:
        raise ValueError(f"validate_mask: n_random must be an int ≥ 0, got {n_random!r}.")
    batches = _encode(model, prompts, targets, caller="validate_mask", chat=chat, prepend_bos=prepend_bos, batch_size=batch_size)

    def score() -> float:
        return float(_logprobs(model, batches).exp().mean())

    baseline = score()
    with masked(model, mask):
        with_mask = score()
    randoms, scores = [], []
    for i in range(n_random):
        random_mask = ExpertMask.random(model, seed=seed + i, match_layers_of=mask)
        with masked(model, random_mask):
            scores.append(score())
        randoms.append(random_mask)
    return MaskValidation(baseline, with_mask, tuple(scores), tuple(randoms))
