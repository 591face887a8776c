"""Prompt preparation, once for every backend: the BOS rule, tokenisation, padding, EOS, trimming.

Every backend (the TransformerLens bridge, a plain Hugging Face model, the vLLM engine) turns a
prompt into token ids with :func:`encode_prompt`, decides whether a BOS token starts a prompt with
:func:`default_prepend_bos`, pads batches with :func:`left_pad`, ends completions at the ids of
:func:`eos_token_ids` and cuts them with :func:`trim_completion`. So a prompt means the same
tokens, and a completion ends at the same token, on every backend.

Reads of TransformerLens internals (its per-architecture BOS default and its tokenizer probe)
live here and nowhere else.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from labkit.checks import check_prompts

__all__ = [
    "LABKIT_SETTINGS",
    "default_prepend_bos",
    "encode_prompt",
    "encode_with",
    "eos_token_ids",
    "lab_tokenizer",
    "left_pad",
    "tokenizer_bos_eos",
    "trim_completion",
]

#: A checkpoint directory's labkit settings file (``{"prepend_bos": false}`` for the organisms).
LABKIT_SETTINGS = "labkit.json"


def default_prepend_bos(source: str | os.PathLike | None, hf_config: Any) -> bool:
    """The BOS rule of a model when the caller gives none: one answer for every backend.

    The checkpoint's ``labkit.json`` ``"prepend_bos"`` wins (the shipped organisms were trained
    without BOS); otherwise TransformerLens's default for the architecture
    (``cfg.default_prepend_bos`` of its adapter: ``True`` for most, ``False`` for Qwen2, ERNIE-4.5,
    GLM-4.5, MiniMax-M2, ...), computed from the config alone (no weights). A directory without
    the key therefore tokenises the same on the Hugging Face path and on the engine.

    Args:
        source: the checkpoint directory (or a hub id / ``None``: no settings file).
        hf_config: the model's ``transformers`` config.

    Returns:
        Whether a BOS token starts every plain prompt.
    """
    if source is not None:
        settings = Path(source) / LABKIT_SETTINGS
        if settings.is_file():
            value = json.loads(settings.read_text()).get("prepend_bos")
            if value is not None:
                return bool(value)
    return _transformer_lens_prepend_bos(hf_config)


def _transformer_lens_prepend_bos(hf_config: Any) -> bool:
    from transformer_lens.factories import architecture_adapter_factory
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_config_from_hf
    from transformer_lens.model_bridge.sources._hf_format import determine_architecture_from_hf_config

    try:
        architecture = determine_architecture_from_hf_config(hf_config)
        bridge_config = build_bridge_config_from_hf(hf_config, architecture, "labkit", torch.float32)
        adapter = architecture_adapter_factory.ArchitectureAdapterFactory.select_architecture_adapter(bridge_config)
    except Exception:  # an architecture TransformerLens does not adapt: its dataclass default
        return True
    return bool(getattr(adapter.cfg, "default_prepend_bos", True))


def tokenizer_bos_eos(tokenizer: Any) -> tuple[bool, bool]:
    """``(prepends_bos, appends_eos)``: what the tokenizer does by itself (TransformerLens's probe)."""
    from transformer_lens.model_bridge.sources._bridge_builder import detect_tokenizer_bos_eos

    prepends, appends = detect_tokenizer_bos_eos(tokenizer)
    return bool(prepends), bool(appends)


def lab_tokenizer(tokenizer: Any) -> Any:
    """labkit's copy of a tokenizer: left padding, pad token set (to EOS when it has none).

    The caller's object is never mutated.
    """
    own = copy.deepcopy(tokenizer)
    own.padding_side = "left"
    if own.pad_token is None:
        own.pad_token = own.eos_token
    return own


def encode_prompt(
    tokenizer,
    prompt: str,
    *,
    chat: bool = False,
    prepend_bos: bool = False,
    tokenizer_prepends_bos: bool = False,
    tokenizer_appends_eos: bool = False,
) -> list[int]:
    """Token ids of one prompt: the one tokenisation rule of the whole lab.

    It is the TransformerLens bridge's ``to_tokens`` rule (``cfg.default_prepend_bos``):
    with ``prepend_bos`` a BOS token starts the prompt (prepended as text when the tokenizer
    does not add one itself, so the ids equal ``bridge.to_tokens(prompt)``); without it a BOS
    the tokenizer adds is removed; an EOS the tokenizer appends is stripped. Caching,
    generation, steering vectors, perplexity and routing traces all call it (through the
    backend's ``encode``), so a prompt means the same tokens everywhere. The ActAdd paper's
    setup (TransformerLens, BOS prepended) follows from it: the BOS row of a contrast pair's
    difference is zero.

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompt: the text.
        chat: wrap it as one user turn with the tokenizer's chat template (generation prompt
            added; the template supplies the special tokens, so no BOS is added or removed).
        prepend_bos: start the prompt with the BOS token.
        tokenizer_prepends_bos / tokenizer_appends_eos: what the tokenizer does by itself
            (:func:`tokenizer_bos_eos`).

    Returns:
        The token ids (possibly empty; callers decide whether that is an error).

    Raises:
        ValueError: ``chat=True`` and the tokenizer has no chat template.
    """
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "chat=True but this tokenizer has no chat template; pass chat=False (plain prompts) "
                "or set tokenizer.chat_template."
            )
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    text = prompt
    if prepend_bos and not tokenizer_prepends_bos and bos is not None:
        if len(tokenizer(bos, add_special_tokens=False)["input_ids"]) == 1:
            text = bos + prompt
    ids = list(tokenizer(text)["input_ids"])
    eos_id = tokenizer.eos_token_id
    if tokenizer_appends_eos and eos_id is not None:
        while len(ids) > 1 and ids[-1] == eos_id:
            ids.pop()
    if not prepend_bos and tokenizer_prepends_bos and ids and bos_id is not None and ids[0] == bos_id:
        ids = ids[1:]
    return ids


def encode_with(
    encode: Callable[..., list[int]], prompts: Any, *, caller: str, chat: bool = False, prepend_bos: bool | None = None, hint: str = ""
) -> tuple[list[str], list[list[int]]]:
    """Validate prompts and tokenise each with ``encode(prompt, chat=, prepend_bos=)``.

    Returns:
        ``(prompts, token rows)``.

    Raises:
        ValueError: no prompts, an empty prompt, one that tokenises to no tokens, or
            ``chat=True`` without a chat template.
        TypeError: a prompt that is not a string.
    """
    prompts = check_prompts(prompts, caller=caller, hint=hint)
    rows = []
    for i, prompt in enumerate(prompts):
        try:
            ids = encode(prompt, chat=chat, prepend_bos=prepend_bos)
        except ValueError as error:
            raise ValueError(f"{caller}: {error}") from None
        if not ids:
            raise ValueError(f"{caller}: prompt {i} ({prompt!r}) tokenises to no tokens.")
        rows.append(ids)
    return prompts, rows


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: str | torch.device | None = None
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Left-pad token rows into one batch: ``(input_ids, attention_mask, position_ids)``.

    Position ids count real tokens only (0 at each row's first real token), which is what makes
    a padded batch compute what each row computes alone; the one batching rule of caching,
    generation, steering, evaluation and routing traces.

    Args:
        rows: one sequence of token ids per prompt (at least one row).
        pad_id: the token id written into padding positions (masked out).
        device: where the tensors go (default CPU).
    """
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            input_ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
            attention_mask[i, width - len(row) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), attention_mask.to(device), position_ids.to(device)


def eos_token_ids(generation_config: Any = None, tokenizer: Any = None) -> set[int]:
    """The ids that end a completion, on every backend: the generation config's EOS, else the tokenizer's.

    ``generation_config`` is the model's ``transformers.GenerationConfig`` (from
    ``generation_config.json``, else derived from the model config, as ``transformers`` does).
    """
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}


def trim_completion(ids: list[int], eos: set[int], pad: int | None) -> list[int]:
    """New ids up to and including the first end-of-sequence token; padding after a stop removed."""
    for i, token in enumerate(ids):
        if token in eos:
            return ids[: i + 1]
    while ids and pad is not None and ids[-1] == pad:
        ids = ids[:-1]
    return ids
