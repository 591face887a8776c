"""The field's standard measurements of an SAE on held-out text.

* **Fraction of variance explained** ``1 - Σ‖x - x̂‖² / Σ‖x - x̄‖²`` over held-out tokens (``x̄``
  the mean activation): 1 − the "FVU" of Gao et al. 2024 (§2.1), as eai-sparsify computes it.
* **L0**: mean number of active (non-zero) features per token.
* **Dead / dense features**: the fraction of features that never activate on the held-out tokens,
  and that activate on more than ``dense_threshold`` of them (Anthropic's "Towards
  Monosemanticity" reports features denser than 1 in 10 tokens as "dense").
* **Cross-entropy loss recovered** (Bricken et al. 2023, §Appendix "SAE evaluation"; the sae-lens
  ``ce_loss_score``): the next-token loss with the reconstruction spliced into the forward pass
  at the hook point, placed between the clean loss (1) and the loss with the activation
  zero-ablated (0): ``(CE_zero − CE_spliced) / (CE_zero − CE_clean)``.

The first token of each text (the BOS token SmolLM2 gets, an attention sink whose residual norm
is tens of times the others) is neither measured nor replaced, the same rule the training
stream uses (``skip_positions={0}``); losses are over every next-token prediction of the text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from labkit.cache import tokenize_prompts
from labkit.hooks import attach
from labkit.models import lab_model, left_pad
from labkit.sae.model import SparseAutoencoder

__all__ = ["SaeMeasurements", "measure_sae"]


@dataclass(frozen=True)
class SaeMeasurements:
    """What :func:`measure_sae` measured (plain data; ``to_dict`` for a JSON card).

    Attributes:
        tokens: held-out tokens measured (first token of each text excluded).
        fraction_variance_explained: ``1 − FVU``.
        l0: mean active features per token.
        dead_fraction, dense_fraction: feature fractions (see the module docstring).
        dense_threshold: the firing rate above which a feature counts as dense.
        ce_clean, ce_spliced, ce_zero_ablated: mean next-token cross-entropy (nats).
        ce_loss_recovered: ``(ce_zero − ce_spliced) / (ce_zero − ce_clean)``.
    """

    tokens: int
    fraction_variance_explained: float
    l0: float
    dead_fraction: float
    dense_fraction: float
    dense_threshold: float
    ce_clean: float
    ce_spliced: float
    ce_zero_ablated: float
    ce_loss_recovered: float

    def to_dict(self) -> dict[str, float]:
        """Every field, floats rounded to 6 digits (the card's ``measurements``)."""
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def _next_token_loss(logits: Tensor, input_ids: Tensor, mask: Tensor) -> tuple[float, int]:
    """Summed cross-entropy of every next-token prediction between real tokens, and its count."""
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = input_ids[:, 1:]
    valid = (mask[:, :-1] & mask[:, 1:]).bool()
    losses = -log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return float(losses[valid].sum()), int(valid.sum())


@torch.no_grad()
def measure_sae(
    model,
    sae: SparseAutoencoder,
    prompts: Sequence[str],
    *,
    batch_size: int = 16,
    dense_threshold: float = 0.1,
) -> SaeMeasurements:
    """Measure an SAE on held-out texts: variance explained, L0, dead/dense, CE loss recovered.

    Three forward passes per batch on labkit's fast path (:func:`labkit.hooks.attach`): clean
    (recording ``x``), with ``x`` replaced by ``sae.reconstruct(x)``, and with ``x`` replaced by
    zeros — at every real token but each text's first (see the module docstring).

    Args:
        model: a labkit bridge (``labkit.load_model``).
        sae: an SAE for one of this model's hook points.
        prompts: held-out texts (not used in training).
        batch_size: texts per forward pass.
        dense_threshold: firing rate above which a feature counts as dense (0 < t < 1).

    Returns:
        A :class:`SaeMeasurements`.

    Raises:
        ValueError: an SAE made for another model or width, an unknown hook point, empty prompts,
            a bad ``batch_size`` or ``dense_threshold``.
    """
    sae.check_compatible(model, where="measure_sae")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"measure_sae: batch_size must be a positive int, got {batch_size!r}.")
    if not 0 < dense_threshold < 1:
        raise ValueError(f"measure_sae: dense_threshold must be in (0, 1), got {dense_threshold!r}.")
    rows = tokenize_prompts(model, list(prompts))
    pad_id = lab_model(model).tokenizer.pad_token_id
    firing = torch.zeros(sae.d_sae, dtype=torch.long)
    sums = {"error": 0.0, "active": 0.0, "tokens": 0}
    moments = [torch.zeros(sae.d_model, dtype=torch.float64), 0.0]  # Σx, Σ‖x‖²
    losses = {"clean": [0.0, 0], "spliced": [0.0, 0], "zero": [0.0, 0]}
    for start in range(0, len(rows), batch_size):
        input_ids, mask, position_ids = left_pad(rows[start:start + batch_size], pad_id)
        first = mask.int().argmax(dim=1)
        edit = mask.bool().clone()
        edit[torch.arange(len(first)), first] = False  # each text's first token stays as it is
        seen: dict[str, Tensor] = {}

        def record(activation: Tensor, _site) -> None:
            seen["x"] = activation.detach()

        def splice(activation: Tensor, _site) -> Tensor:
            recon = sae.reconstruct(activation.float()).to(activation.dtype)
            return torch.where(edit.unsqueeze(-1), recon, activation)

        def zero(activation: Tensor, _site) -> Tensor:
            return torch.where(edit.unsqueeze(-1), torch.zeros_like(activation), activation)

        for key, fn in (("clean", record), ("spliced", splice), ("zero", zero)):
            with attach(model, {sae.hook_name: fn}) as runner:
                logits = runner(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
            total, count = _next_token_loss(logits, input_ids, mask)
            losses[key][0] += total
            losses[key][1] += count
        x = seen["x"][edit].float()
        features = sae.encode(x)
        sums["error"] += float((sae.decode(features) - x).double().pow(2).sum())
        active = features != 0
        sums["active"] += float(active.sum())
        sums["tokens"] += int(x.shape[0])
        firing += active.sum(dim=0)
        moments[0] += x.double().sum(dim=0)
        moments[1] += float(x.double().pow(2).sum())
    n = sums["tokens"]
    if n == 0:
        raise ValueError("measure_sae: the prompts hold no token past the first; give longer held-out texts.")
    total_variance = moments[1] - float((moments[0] ** 2).sum()) / n
    ce = {k: v[0] / max(v[1], 1) for k, v in losses.items()}
    gap = ce["zero"] - ce["clean"]
    rate = firing.double() / n
    return SaeMeasurements(
        tokens=n,
        fraction_variance_explained=1.0 - sums["error"] / total_variance,
        l0=sums["active"] / n,
        dead_fraction=float((firing == 0).double().mean()),
        dense_fraction=float((rate > dense_threshold).double().mean()),
        dense_threshold=float(dense_threshold),
        ce_clean=ce["clean"],
        ce_spliced=ce["spliced"],
        ce_zero_ablated=ce["zero"],
        ce_loss_recovered=(ce["zero"] - ce["spliced"]) / gap if gap > 0 else math.nan,
    )
