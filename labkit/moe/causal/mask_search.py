"""Minimal expert masks: the smallest set whose removal cuts a behaviour, validated against random masks.

:func:`minimal_mask` searches greedily on exact masked scores (re-scored after every pick);
:func:`validate_mask` scores a mask on held-out prompts beside layer-matched random masks
(MoTE, 2025, §4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from labkit.moe.causal.effects import causal_attribution
from labkit.moe.causal.target import encode_targets, encoded_logprobs
from labkit.moe.families import find_routers

__all__ = ["MaskSearch", "MaskValidation", "minimal_mask", "validate_mask"]


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
    batches = encode_targets(model, prompts, targets, caller="minimal_mask", chat=chat, prepend_bos=prepend_bos, batch_size=batch_size)
    if ranking is None:
        ranking = causal_attribution(model, prompts, targets, batch_size=batch_size, chat=chat, prepend_bos=prepend_bos, progress=progress)
    routers = find_routers(model)
    cap = routers[0].n_experts - routers[0].top_k  # most experts one layer can lose
    candidates = list(ranking.top(min(pool, len(routers) * routers[0].n_experts)))
    baseline = float(encoded_logprobs(model, batches).exp().mean())
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
                score = float(encoded_logprobs(model, batches).exp().mean())
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
    from labkit.moe.expert_mask import model_meta

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
    batches = encode_targets(model, prompts, targets, caller="validate_mask", chat=chat, prepend_bos=prepend_bos, batch_size=batch_size)

    def score() -> float:
        return float(encoded_logprobs(model, batches).exp().mean())

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
