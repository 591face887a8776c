"""The behaviour score of causal attribution: ``log p(target | prompt)`` under teacher forcing.

Prompts are tokenised with the lab's BOS rule, targets with no special tokens; the two token rows
are concatenated and run on the model's plain twin (so every open intervention applies). The
rows are encoded once (:func:`encode_targets`) and reused by every masked pass of
:mod:`labkit.moe.causal.effects` and :mod:`labkit.moe.causal.mask_search`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from labkit.models import encode_prompts, lab_model, left_pad
from labkit.moe.families import hf_of

__all__ = [
    "SCORES", "Score", "TargetRows", "batch_logprobs", "encode_targets", "encoded_logprobs", "per_prompt_score",
    "target_logprobs", "target_probability",
]


@dataclass(frozen=True)
class TargetRows:
    """Prompt and target token rows, encoded once with the lab's BOS rule."""

    prompt_rows: list[list[int]]
    target_rows: list[list[int]]
    pad_id: int
    batch_size: int

    def __len__(self) -> int:
        return len(self.prompt_rows)

    def chunks(self) -> Iterator[tuple[int, list[list[int]], list[list[int]]]]:
        """``(start, prompt_rows, target_rows)`` per batch of at most ``batch_size`` rows."""
        for start in range(0, len(self), self.batch_size):
            stop = start + self.batch_size
            yield start, self.prompt_rows[start:stop], self.target_rows[start:stop]


def encode_targets(model, prompts, targets, *, caller, chat, prepend_bos, batch_size) -> TargetRows:
    """Encode prompts (the lab's BOS rule, optional chat template) and targets (no special tokens) once.

    Args:
        targets: one string for every prompt, or one per prompt.
        caller: the public function's name, for messages.

    Raises:
        ValueError: a bad ``batch_size``, bad prompts, a target count that matches neither 1 nor
            the number of prompts, an empty target or one that tokenises to nothing.
    """
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
    return TargetRows(prompt_rows, target_rows, pad, batch_size)


def batch_logprobs(hf_model, prompt_rows, target_rows, pad_id) -> Float[Tensor, "batch"]:
    """``log p(target | prompt)`` per row, teacher-forced on ``hf_model`` (left-padded), differentiable; float32."""
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


def per_prompt_score(logprob: Tensor, n_tokens: Tensor, score: str) -> Tensor:
    """``p(target | prompt)``, or the mean log-probability per target token (nats)."""
    return logprob.exp() if score == "probability" else logprob / n_tokens


def encoded_logprobs(model, batches: TargetRows) -> Float[Tensor, "prompt"]:
    """``log p(target | prompt)`` per prompt of the encoded rows, batch by batch, without gradients (on CPU)."""
    hf_model = hf_of(model)
    with torch.no_grad():
        parts = [batch_logprobs(hf_model, p, t, batches.pad_id) for _, p, t in batches.chunks()]
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
    batches = encode_targets(model, prompts, targets, caller="target_logprobs", chat=chat, prepend_bos=prepend_bos, batch_size=batch_size)
    return encoded_logprobs(model, batches)


def target_probability(model, prompts, targets, **kwargs: Any) -> float:
    """The behaviour score: the mean over prompts of ``p(target | prompt)`` (in [0, 1]).

    Keyword arguments as for :func:`target_logprobs`.
    """
    return float(target_logprobs(model, prompts, targets, **kwargs).exp().mean())
