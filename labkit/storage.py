"""One home for saving and loading labkit results: ``<stem>.json`` + ``<stem>.safetensors``.

Every labkit object that is saved -- :class:`~labkit.steering.SteeringVector`,
:class:`~labkit.moe.masking.ExpertMask`, :class:`~labkit.moe.trace.RoutingTrace`,
:class:`~labkit.moe.attribution.ExpertAttribution` and the index of a streamed
:class:`~labkit.cache.ActivationCache` -- is written the same way:

- ``<stem>.json``: ``kind`` (e.g. ``"labkit.RoutingTrace"``), ``version``, every non-tensor field,
  and ``"tensors"``: the names of the tensors in the safetensors file. People read and diff this
  file; it is the source of truth for the metadata.
- ``<stem>.safetensors``: the tensors (no pickle anywhere), with ``kind`` and ``version`` in the
  safetensors header so a lone tensor file still says what it is.
- The halves are bound: the JSON's ``"tensor_file"`` records the tensor file's SHA-256 and each
  tensor's shape and dtype; ``load`` refuses a tensor file that does not match (another save's
  ``.safetensors`` beside this ``.json``). A JSON written before the binding (no
  ``"tensor_file"``) still loads, with a ``UserWarning``. Objects without tensors (an
  :class:`ExpertMask`) have no ``.safetensors`` file.

``save``/``load`` accept the stem or either file's path (``x``, ``x.json``, ``x.safetensors``).
Files written by labkit before this layout -- a trace or attribution as one ``x.safetensors`` with
its metadata in the header (and a ``x.safetensors.json`` copy) -- still load.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = ["check_binding", "check_kind", "file_pair", "file_sha256", "load", "require_keys", "save"]

#: The JSON key binding ``<stem>.json`` to its ``<stem>.safetensors`` (hash, shapes, dtypes).
BINDING_KEY = "tensor_file"

#: safetensors' dtype names -> torch's (what the binding records).
_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}

#: The loader for each kind labkit writes, named in "wrong kind" errors.
LOADERS = {
    "labkit.RoutingTrace": "RoutingTrace.load",
    "labkit.ExpertAttribution": "ExpertAttribution.load",
    "labkit.ExpertMask": "ExpertMask.load",
    "labkit.SteeringVector": "SteeringVector.load",
    "labkit.ActivationCache": "ActivationCache.load (pass the cache directory)",
    "labkit.PromptSplit": "PromptSplit.from_dict",
}

_SUFFIXES = (".json", ".safetensors")


def file_pair(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(<stem>.json, <stem>.safetensors)`` for a stem or either file's path."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in _SUFFIXES else path
    return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".safetensors")


def save(
    path: str | os.PathLike,
    *,
    kind: str,
    version: int,
    metadata: Mapping[str, Any],
    tensors: Mapping[str, Tensor] | None = None,
) -> Path:
    """Write ``metadata`` (JSON-able) and ``tensors`` in the labkit layout; return the JSON path.

    Tensors are detached, moved to the CPU and copied (safetensors refuses shared memory).
    Missing parent directories are created.
    """
    from safetensors.torch import save_file

    json_path, tensor_path = file_pair(path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu().clone().contiguous() for name, t in (tensors or {}).items()}
    document = {"kind": kind, "version": version, **metadata}
    if tensors:
        document["tensors"] = sorted(tensors)
        save_file(tensors, str(tensor_path), metadata={"kind": kind, "version": str(version)})
        document[BINDING_KEY] = _binding(tensor_path, tensors)
    elif tensor_path.is_file():  # a stale tensor file from an earlier save of the same stem
        tensor_path.unlink()
    json_path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return json_path


def load(
    path: str | os.PathLike, *, kind: str, version: int, caller: str, writer: str
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(metadata, tensors)`` of a labkit file pair, its ``kind`` and ``version`` checked.

    ``metadata`` still holds ``kind``, ``version`` and ``tensors``; callers drop what they do not
    store.

    Raises:
        FileNotFoundError: neither file of the pair exists, or the JSON names tensors and the
            ``.safetensors`` file is missing.
        ValueError: the JSON file is not JSON / not an object / of another kind or a newer
            version; the tensor file is not safetensors, belongs to another kind, lacks a
            tensor the JSON names, or is not the file the JSON was saved with (its shapes,
            dtypes or SHA-256 differ from the JSON's ``"tensor_file"`` binding).

    Warns:
        UserWarning: a JSON saved before the binding existed (no ``"tensor_file"``): it still
            loads, but nothing proves the tensor file belongs to it.
    """
    from labkit.checks import check_path

    given = check_path(path, caller=caller)
    json_path, tensor_path = file_pair(given)
    if not json_path.is_file():
        legacy = _legacy_single_file(given, tensor_path)
        if legacy is not None:
            return _read_legacy(legacy, kind, version, caller=caller, writer=writer)
        what = "a directory" if given.is_dir() else "no file"
        raise FileNotFoundError(
            f"{caller}: {what} at {str(given)!r}; expected {json_path.name} (and, with tensors, "
            f"{tensor_path.name}) written by {writer}."
        )
    metadata = _read_json(json_path, kind, version, caller=caller, writer=writer)
    binding = metadata.pop(BINDING_KEY, None)
    if "tensors" not in metadata:
        legacy = json_path.with_suffix("")  # a pre-layout sidecar ``x.safetensors.json``
        if legacy.suffix == ".safetensors" and legacy.is_file():
            return _read_legacy(legacy, kind, version, caller=caller, writer=writer)
    names = metadata.get("tensors", [])
    if not names:
        return metadata, {}
    if not tensor_path.is_file():
        raise FileNotFoundError(
            f"{caller}: {str(json_path)!r} names tensors {names[:6]} but {str(tensor_path)!r} is missing; "
            "keep the .json and .safetensors files of a save together."
        )
    header, tensors = _read_safetensors(tensor_path, kind, caller=caller, writer=writer)
    if binding is None:
        warnings.warn(
            f"{caller}: {str(json_path)!r} was written before labkit bound the .json and .safetensors halves "
            f"of a save together (no {BINDING_KEY!r}), so nothing proves {tensor_path.name} belongs to it; "
            "save it again with this labkit to bind them.",
            UserWarning,
            stacklevel=3,
        )
    if header.get("kind", kind) != kind:
        raise ValueError(
            f"{caller}: {str(tensor_path)!r} holds a {header['kind']!r} but {str(json_path)!r} is a {kind!r}; "
            "the two files are from different saves."
        )
    missing = [name for name in names if name not in tensors]
    if missing:
        raise ValueError(f"{caller}: {str(tensor_path)!r} lacks tensors {missing} named by {str(json_path)!r}.")
    if binding is not None:
        check_binding(binding, tensor_path, json_path, caller=caller)
    return metadata, tensors


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_binding(binding: Any, tensor_path: Path, json_path: Path, *, caller: str) -> None:
    """Refuse a tensor file that is not the one ``json_path`` was saved with.

    ``binding`` is the JSON's ``"tensor_file"`` entry: the tensor file's SHA-256 and each tensor's
    shape and dtype at save time. Shapes and dtypes are compared first (the message says which
    tensor differs), then the hash (any other change of bytes).

    Raises:
        ValueError: a malformed binding, or a tensor file whose shapes, dtypes or bytes differ.
    """
    if not isinstance(binding, dict) or not {"sha256", "shapes", "dtypes"} <= set(binding):
        raise ValueError(
            f"{caller}: {str(json_path)!r} has a malformed {BINDING_KEY!r} entry ({binding!r:.120}); expected "
            "sha256, shapes and dtypes of the tensor file."
        )
    from safetensors import safe_open

    try:
        with safe_open(str(tensor_path), framework="pt") as handle:
            found = {name: handle.get_slice(name) for name in handle.keys()}
            shapes = {name: list(piece.get_shape()) for name, piece in found.items()}
            dtypes = {name: _DTYPE_NAMES.get(piece.get_dtype(), piece.get_dtype()) for name, piece in found.items()}
    except Exception as error:  # foreign bytes: SafetensorError / OSError
        raise ValueError(f"{caller}: {str(tensor_path)!r} is not a safetensors file ({type(error).__name__}: {error}).") from None
    for name, shape in binding["shapes"].items():
        if name in shapes and (shapes[name] != list(shape) or dtypes[name] != binding["dtypes"].get(name)):
            raise ValueError(
                f"{caller}: {str(tensor_path)!r} does not belong to {str(json_path)!r}: tensor {name!r} is "
                f"{dtypes[name]} {shapes[name]} there, but the JSON was saved with {binding['dtypes'].get(name)} "
                f"{list(shape)}. The two files are from different saves; keep each .json with its own .safetensors."
            )
    digest = file_sha256(tensor_path)
    if digest != binding["sha256"]:
        raise ValueError(
            f"{caller}: {str(tensor_path)!r} does not belong to {str(json_path)!r}: its SHA-256 is "
            f"{digest[:16]}..., the JSON was saved with {str(binding['sha256'])[:16]}... The two files are from "
            "different saves (or the tensor file was changed); keep each .json with its own .safetensors."
        )


def check_kind(data: Any, kind: str, version: int, *, caller: str, source: str) -> None:
    """Refuse ``data`` unless it is a dict with ``kind == kind`` and a ``version`` ≤ ``version``.

    A missing ``version`` is read as the current one; ``source`` names where ``data`` came
    from (a file path or "the dict") for the message.

    Raises:
        ValueError: not a dict, no or another ``kind``, or a bad / newer ``version``.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{caller}: {source} holds a {type(data).__name__}, expected a dict with kind {kind!r}.")
    found = data.get("kind")
    if found != kind:
        if found is None:
            what = f"has no 'kind' key (keys: {sorted(map(str, data))[:12]})"
        else:
            what = f"is of kind {found!r}"
        hint = f" Load it with {LOADERS[found]}." if found in LOADERS else ""
        raise ValueError(f"{caller}: {source} {what}; expected kind {kind!r}.{hint}")
    found_version = data.get("version", version)
    if isinstance(found_version, bool) or not isinstance(found_version, int) or found_version < 1:
        raise ValueError(f"{caller}: {source} has version {found_version!r}; expected an int from 1 to {version}.")
    if found_version > version:
        raise ValueError(
            f"{caller}: {source} is {kind} version {found_version}, newer than this labkit reads "
            f"({version}); upgrade labkit."
        )


def require_keys(data: Mapping[str, Any], keys: Sequence[str], *, caller: str, source: str) -> None:
    """Raise ``ValueError`` naming every key of ``keys`` missing from ``data``."""
    missing = [key for key in keys if key not in data]
    if missing:
        raise ValueError(
            f"{caller}: {source} lacks {', '.join(map(repr, missing))} (has {sorted(map(str, data))}); "
            "was it written by this labkit's to_dict / save?"
        )


# --- internals --------------------------------------------------------------------------------


def _binding(tensor_path: Path, tensors: Mapping[str, Tensor]) -> dict[str, Any]:
    return {
        "sha256": file_sha256(tensor_path),
        "shapes": {name: list(t.shape) for name, t in sorted(tensors.items())},
        "dtypes": {name: str(t.dtype).removeprefix("torch.") for name, t in sorted(tensors.items())},
    }


def _read_json(path: Path, kind: str, version: int, *, caller: str, writer: str) -> dict[str, Any]:
    source = repr(str(path))
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{caller}: {source} is binary, not JSON; expected a {kind} file written by {writer}.") from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{caller}: {source} is not valid JSON ({error.msg}, line {error.lineno}); expected a {kind} "
            f"file written by {writer}."
        ) from None
    check_kind(data, kind, version, caller=caller, source=source)
    return data


def _read_safetensors(path: Path, kind: str, *, caller: str, writer: str) -> tuple[dict[str, str], dict[str, Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors raises SafetensorError / OSError for foreign bytes
        raise ValueError(
            f"{caller}: {str(path)!r} is not a safetensors file ({type(error).__name__}: {error}); expected "
            f"the tensors of a {kind} written by {writer}."
        ) from None
    return header, tensors


def _legacy_single_file(given: Path, tensor_path: Path) -> Path | None:
    """The pre-layout file (one ``.safetensors`` with labkit metadata in its header), if any."""
    for candidate in (given, tensor_path):
        if candidate.suffix == ".safetensors" and candidate.is_file():
            return candidate
    return None


def _read_legacy(path: Path, kind: str, version: int, *, caller: str, writer: str):
    header, tensors = _read_safetensors(path, kind, caller=caller, writer=writer)
    raw = header.get("labkit")
    if raw is None:
        raise ValueError(
            f"{caller}: {str(path)!r} has no labkit metadata and no {file_pair(path)[0].name} beside it "
            f"(tensors: {sorted(tensors)[:8]}); it was not written by {writer}. Expected kind {kind!r}."
        )
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"{caller}: {str(path)!r} has unreadable labkit metadata ({error.msg}).") from None
    check_kind(metadata, kind, version, caller=caller, source=repr(str(path)))
    return metadata, tensors

