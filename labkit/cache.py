"""Activation caching over prompt datasets: batched, padding-aware, budgeted, streamable.

``cache_activations`` runs prompts through the model in left-padded batches (attention mask and
position ids set, so a batched run equals each prompt run alone), keeps only the requested hook
points at only the requested real-token positions, and either holds them in memory under a byte
budget or streams them to safetensors shards on disk that load back lazily. A streamed cache is a
directory: ``index.json`` + ``index.safetensors`` (the :mod:`labkit.storage` layout: kind, version,
hook names, prompts; row index tensors) and ``shard-00000.safetensors``, ... (the activations).

Storage layout (memory-exact, no padding): every kept (prompt, position) pair is one *row*;
``cache[name]`` is ``Float[Tensor, "row *shape"]`` with ``cache.prompt_index`` /
``cache.position`` / ``cache.token_ids`` telling which prompt, position and token each row is.
``cache.stack(name)`` gives ``Float[Tensor, "n_prompts *shape"]`` when one position per prompt
was kept (e.g. ``positions="last"``) and ``cache.padded(name)`` gives
``Float[Tensor, "n_prompts pos *shape"]`` (NaN where a prompt has no such position).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

import torch
from jaxtyping import Float, Int
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from labkit import storage
from labkit.backends import backend_of
from labkit.checks import check_names, check_out_dir, check_path, check_prompts, named_errors

__all__ = [
    "ActivationCache",
    "MemoryBudgetError",
    "Positions",
    "cache_activations",
    "estimate_cache_bytes",
    "tokenize_prompts",
]

#: Which real-token positions to keep: ``"all"``, ``"last"``, an int (negative counts from the
#: end, ``-1`` = last), a ``slice`` over real-token positions, or a list of ints.
Positions = Union[Literal["all", "last"], int, slice, Sequence[int]]

FORMAT_KIND = "labkit.ActivationCache"
FORMAT_VERSION = 1
DEFAULT_BUDGET_BYTES = 2 * 1024**3


class MemoryBudgetError(MemoryError):
    """The activations requested would exceed the memory budget."""


def _human(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n_bytes < 1024 or unit == "TiB":
            return f"{n_bytes:.1f} {unit}" if unit != "B" else f"{int(n_bytes)} B"
        n_bytes /= 1024
    raise AssertionError("unreachable")


def tokenize_prompts(
    model, prompts: Sequence[str], *, chat: bool = False, prepend_bos: bool | None = None
) -> list[list[int]]:
    """Tokenise prompts with the lab's one rule (the bridge's ``to_tokens``, BOS included).

    Args:
        model: a model handle from :func:`labkit.load_model` (bridge or engine).
        prompts: a string (one prompt) or a non-empty list of strings.
        chat: wrap each prompt as one user turn with the tokenizer's chat template
            (generation prompt added).
        prepend_bos: override the model's BOS rule (``None`` keeps it).

    Returns:
        One list of token ids per prompt.

    Raises:
        ValueError: empty list, a non-string item, an empty prompt, or a prompt longer than
            the model's context window.
    """
    backend = backend_of(model)
    _prompts, ids = backend.encode_prompts(prompts, caller="cache_activations", chat=chat, prepend_bos=prepend_bos)
    backend.check_context([len(row) for row in ids], caller="cache_activations")
    return ids


def select_positions(length: int, positions: Positions) -> list[int]:
    """Real-token positions (0-based within a prompt of ``length`` tokens) to keep.

    Raises:
        ValueError: an unknown selector or an int out of range for this prompt.
    """
    if positions == "all":
        return list(range(length))
    if positions == "last":
        return [length - 1]
    if isinstance(positions, slice):
        return list(range(length))[positions]
    if isinstance(positions, int) and not isinstance(positions, bool):
        chosen = [positions]
    elif isinstance(positions, Sequence) and not isinstance(positions, str):
        chosen = list(positions)
    else:
        raise ValueError(
            f"positions={positions!r} is not allowed; use 'all', 'last', an int, a slice or a "
            "list of ints."
        )
    out = []
    for p in chosen:
        if not isinstance(p, int) or not -length <= p < length:
            raise ValueError(
                f"position {p!r} is out of range for a prompt of {length} tokens "
                f"(allowed {-length}..{length - 1})."
            )
        out.append(p % length)
    return out


@dataclass(frozen=True)
class ActivationCache:
    """Cached activations of chosen hook points, one row per kept (prompt, position).

    Attributes:
        hook_names: the hook points cached, as the user named them.
        prompts: the prompt strings, in order.
        prompt_index: ``Int[Tensor, "row"]`` prompt of each row.
        position: ``Int[Tensor, "row"]`` real-token position of each row within its prompt.
        token_ids: ``Int[Tensor, "row"]`` token at that position.
        model_name: the model's name.
        directory: where shards live when streamed to disk, else ``None``.
    """

    hook_names: tuple[str, ...]
    prompts: tuple[str, ...]
    prompt_index: Int[Tensor, "row"]
    position: Int[Tensor, "row"]
    token_ids: Int[Tensor, "row"]
    model_name: str
    directory: Path | None = None
    _tensors: dict[str, Tensor] = field(default_factory=dict, repr=False)
    _shards: tuple[Path, ...] = field(default=(), repr=False)
    _shard_sha256: tuple[str, ...] | None = field(default=None, repr=False)

    @property
    def n_prompts(self) -> int:
        return len(self.prompts)

    def __len__(self) -> int:
        return int(self.prompt_index.numel())

    def __contains__(self, name: object) -> bool:
        return name in self.hook_names

    def __getitem__(self, name: str) -> Float[Tensor, "row *shape"]:
        """All rows of one hook point: ``Float[Tensor, "row *shape"]`` (loads shards lazily)."""
        if name not in self.hook_names:
            raise KeyError(f"{name!r} was not cached; cached hook points: {list(self.hook_names)}")
        if name not in self._tensors:
            self._check_shards()
            parts = []
            for shard in self._shards:
                with safe_open(str(shard), framework="pt") as f:
                    parts.append(f.get_tensor(name))
            self._tensors[name] = torch.cat(parts) if parts else torch.empty(0)
        return self._tensors[name]

    def _check_shards(self) -> None:
        """Refuse shards that are not the files the index was written with (SHA-256 in index.json;
        checked once, on first access). An index written before the hashes were recorded is trusted."""
        if self._shard_sha256 is None:
            return
        for shard, expected in zip(self._shards, self._shard_sha256):
            if storage.file_sha256(shard) != expected:
                raise ValueError(
                    f"ActivationCache: shard {str(shard)!r} is not the file this cache's index.json was written "
                    "with (its SHA-256 differs); the directory mixes files of different caches. Re-run "
                    "cache_activations into a new out_dir."
                )
        object.__setattr__(self, "_shard_sha256", None)  # verified: do not hash again

    def stack(self, name: str) -> Float[Tensor, "n_prompts *shape"]:
        """One row per prompt (requires exactly one kept position per prompt)."""
        counts = torch.bincount(self.prompt_index, minlength=self.n_prompts)
        if not bool((counts == 1).all()):
            raise ValueError(
                f"stack() needs one kept position per prompt; got between {int(counts.min())} and "
                f"{int(counts.max())}. Cache with positions='last' or use padded()."
            )
        order = torch.argsort(self.prompt_index)
        return self[name][order]

    def padded(self, name: str, fill: float = float("nan")) -> Float[Tensor, "n_prompts pos *shape"]:
        """Rows laid out as ``[n_prompts, max kept position + 1, *shape]``, ``fill`` elsewhere."""
        rows = self[name]
        width = int(self.position.max()) + 1 if len(self) else 0
        out = torch.full((self.n_prompts, width, *rows.shape[1:]), fill, dtype=rows.dtype)
        out[self.prompt_index, self.position] = rows
        return out

    def per_prompt(self, name: str) -> list[Float[Tensor, "pos *shape"]]:
        """One tensor per prompt with its kept positions in order."""
        rows = self[name]
        return [rows[self.prompt_index == i] for i in range(self.n_prompts)]

    def nbytes(self) -> int:
        """Bytes of activation storage held in memory now (shards on disk not counted)."""
        seen, total = set(), 0
        for tensor in self._tensors.values():
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    @classmethod
    def load(cls, directory: str | Path) -> "ActivationCache":
        """Open a cache streamed to disk; tensors load lazily on first access.

        Raises:
            FileNotFoundError / ValueError: no cache there, or a foreign format.
        """
        directory = check_path(directory, caller="ActivationCache.load", argument="directory")
        if not directory.is_dir():
            raise FileNotFoundError(
                f"ActivationCache.load: no directory at {str(directory)!r}; pass the out_dir given to cache_activations."
            )
        meta, index = storage.load(
            directory / "index",
            kind=FORMAT_KIND,
            version=FORMAT_VERSION,
            caller="ActivationCache.load",
            writer="cache_activations(out_dir=...)",
        )
        return cls(
            hook_names=tuple(meta["hook_names"]),
            prompts=tuple(meta["prompts"]),
            prompt_index=index["prompt_index"],
            position=index["position"],
            token_ids=index["token_ids"],
            model_name=meta["model_name"],
            directory=directory,
            _shards=tuple(directory / s for s in meta["shards"]),
            _shard_sha256=tuple(meta["shard_sha256"]) if "shard_sha256" in meta else None,
        )


def estimate_cache_bytes(
    model,
    prompts: Sequence[str],
    hook_names: Sequence[str],
    *,
    positions: Positions = "all",
    dtype: torch.dtype | None = None,
    chat: bool = False,
    prepend_bos: bool | None = None,
) -> int:
    """Bytes :func:`cache_activations` would hold for these arguments, before running them.

    Tokenises the prompts and learns each hook point's per-position width (HF path: one forward
    pass on the shortest prompt, the first time a hook point is asked for; the engine: from the
    config); nothing is cached.

    Args:
        model: a model handle from :func:`labkit.load_model` (bridge or engine).
        prompts: the prompt strings.
        hook_names: TransformerLens hook names.
        positions: real-token positions to keep (see :data:`Positions`).
        dtype: storage dtype (default the model's).
        chat: wrap prompts in the chat template.

    Returns:
        The number of bytes the activations would occupy (int).

    Raises:
        ValueError: as :func:`cache_activations` for bad prompts, names or positions.
    """
    backend = backend_of(model)
    backend.require("cache", "estimate_cache_bytes")
    token_rows = tokenize_prompts(model, prompts, chat=chat, prepend_bos=prepend_bos)
    widths = backend.activation_shapes(list(hook_names), min(token_rows, key=len))
    element = torch.empty((), dtype=dtype or backend.dtype).element_size()
    n_rows = sum(len(select_positions(len(r), positions)) for r in token_rows)
    return n_rows * element * sum(math.prod(w) for w in widths.values())


class _ShardWriter:
    """Holds a cache's rows in memory, or streams them to ``shard-NNNNN.safetensors`` files.

    On failure :meth:`remove_partial` removes only what it wrote: the directories it created, or,
    in the user's pre-existing empty directory, its shard and index files (the directory stays).
    """

    def __init__(self, hook_names: list[str], out_dir, shard_bytes: int) -> None:
        self.parts: dict[str, list[Tensor]] = {name: [] for name in hook_names}
        self.shards: list[str] = []
        self.hashes: list[str] = []
        self.pending = 0
        self.shard_bytes = shard_bytes
        self.directory = self.created = None
        if out_dir is not None:
            self.directory, existed = check_out_dir(out_dir, caller="cache_activations")
            # the outermost directory this call creates (None: the user's own empty directory)
            self.created = None if existed else next(
                p for p in (*reversed(self.directory.parents), self.directory) if not p.exists()
            )
            self.directory.mkdir(parents=True, exist_ok=True)

    def add(self, batch: dict[str, Tensor], dtype: torch.dtype, n_bytes: int) -> None:
        for name, part in self.parts.items():
            part.append(batch[name].to(device="cpu", dtype=dtype))
        self.pending += n_bytes
        if self.pending >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if self.directory is None or not self.pending:
            return
        shard_name = f"shard-{len(self.shards):05d}.safetensors"
        save_file({n: torch.cat(p) for n, p in self.parts.items()}, str(self.directory / shard_name))
        self.shards.append(shard_name)
        self.hashes.append(storage.file_sha256(self.directory / shard_name))
        for p in self.parts.values():
            p.clear()
        self.pending = 0

    def remove_partial(self) -> None:
        if self.directory is None:
            return
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)
            return
        for name in (*self.shards, f"shard-{len(self.shards):05d}.safetensors", "index.json", "index.safetensors"):
            (self.directory / name).unlink(missing_ok=True)

    def finish(self, index: dict[str, Tensor], meta: dict) -> ActivationCache:
        if self.directory is not None:
            storage.save(
                self.directory / "index", kind=FORMAT_KIND, version=FORMAT_VERSION,
                metadata={"shards": self.shards, "shard_sha256": self.hashes, **meta}, tensors=index,
            )
            return ActivationCache.load(self.directory)
        tensors = {name: torch.cat(p) for name, p in self.parts.items()}
        self.parts.clear()
        return ActivationCache(
            hook_names=tuple(meta["hook_names"]),
            prompts=tuple(meta["prompts"]),
            prompt_index=index["prompt_index"],
            position=index["position"],
            token_ids=index["token_ids"],
            model_name=meta["model_name"],
            _tensors=tensors,
        )


def _check_options(hook_names: list[str], batch_size, max_bytes, dtype) -> None:
    if not hook_names:
        raise ValueError("cache_activations: hook_names is empty; name at least one hook point, e.g. 'blocks.0.hook_resid_pre'.")
    if len(set(hook_names)) != len(hook_names):
        raise ValueError(f"cache_activations: hook_names has duplicates: {hook_names}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"cache_activations: batch_size must be a positive int, got {batch_size!r}.")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0):
        raise ValueError(f"cache_activations: max_bytes must be a positive int (bytes) or None (no budget), got {max_bytes!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(
            f"cache_activations: dtype must be a floating torch dtype (e.g. torch.float16) or None, got {dtype!r}; "
            "activations would be truncated otherwise."
        )


def _check_budget(n_hooks: int, n_prompts: int, row_bytes: int, n_rows: int, max_bytes, out_dir, shard_bytes: int) -> None:
    total_bytes = row_bytes * n_rows
    held_bytes = min(total_bytes, max(shard_bytes, row_bytes)) if out_dir is not None else total_bytes
    if max_bytes is not None and held_bytes > max_bytes:
        raise MemoryBudgetError(
            f"Caching {n_hooks} hook point(s) over {n_prompts} prompts would hold "
            f"{_human(held_bytes)} in memory; the budget is max_bytes={_human(max_bytes)}. Lower it "
            "with positions='last' (or a slice), fewer hook_names, dtype=torch.float16, or stream "
            "to disk with out_dir=...; or raise max_bytes."
        )


def cache_activations(
    model,
    prompts: Sequence[str] | Iterable[str],
    hook_names: Sequence[str],
    *,
    batch_size: int = 8,
    positions: Positions = "all",
    max_bytes: int | None = DEFAULT_BUDGET_BYTES,
    out_dir: str | Path | None = None,
    shard_bytes: int = 256 * 1024**2,
    dtype: torch.dtype | None = None,
    chat: bool = False,
    prepend_bos: bool | None = None,
    progress: bool = True,
) -> ActivationCache:
    """Cache activations at chosen hook points over a prompt dataset.

    Prompts run in left-padded batches with an attention mask and position ids that count real
    tokens only, so each prompt's activations equal those of the prompt run alone (a missing
    position-id fix is what flips GPT-2's predictions under padding). Hook points that are a
    module's input/output (``blocks.{L}.hook_resid_pre``, ``hook_resid_post``, ``hook_attn_out``,
    ``hook_mlp_out`` ...) run on the plain twin with one ``torch`` hook each; other per-position
    hook points (``attn.hook_q`` as ``[pos, head, d_head]``, ...) run on the bridge. Either way a
    cached tensor equals the bridge's ``run_with_cache`` value for that name, and any open
    intervention (``steered``, ``masked``) applies. ``blocks.{L}.mlp.hook_router_logits`` (labkit's
    name) caches a MoE layer's router logits, ``[pos, n_experts]``.

    On the vLLM engine (``load_model(..., engine="vllm")``) the same call caches
    ``blocks.{L}.hook_resid_pre`` / ``hook_resid_mid`` / ``hook_resid_post`` / ``hook_attn_out`` /
    ``hook_mlp_out`` and the router logits inside the workers (tensor-parallel shards are already
    reduced there); only the kept positions leave the workers (:mod:`labkit.engines.vllm_capture`),
    and each engine call sends ``batch_size`` prompts that vLLM schedules itself.

    Args:
        model: a model handle from :func:`labkit.load_model` (the bridge, or the vLLM engine).
        prompts: the prompt strings (a list or any iterable, e.g. a ``datasets`` column).
        hook_names: TransformerLens hook names, e.g. ``["blocks.6.hook_resid_pre"]``.
        batch_size: prompts per forward pass (>= 1).
        positions: real-token positions to keep per prompt (see :data:`Positions`).
        max_bytes: memory budget in bytes for activations held in RAM (the whole cache, or one
            shard when streaming); ``None`` disables the check.
        out_dir: stream to safetensors shards in this new directory (loaded back lazily by
            :meth:`ActivationCache.load`) instead of holding everything in memory.
        shard_bytes: target shard size in bytes when streaming.
        dtype: storage dtype (e.g. ``torch.float16`` halves memory); default the model's.
        chat: wrap prompts in the tokenizer's chat template.
        prepend_bos: override the model's BOS rule (``None`` keeps ``model.cfg.default_prepend_bos``,
            so positions line up with the bridge's ``run_with_cache`` of the same string).
        progress: show a tqdm progress bar.

    Returns:
        An :class:`ActivationCache`; ``cache[name]`` is ``Float[Tensor, "row *shape"]``.

    Raises:
        TypeError: ``prompts`` / ``hook_names`` that are ``None``, a number or hold non-strings;
            an ``out_dir`` that is not a path. (A bare string is one prompt.)
        ValueError: empty prompts, a prompt longer than the context window, an unknown hook name
            (with the closest real names), a bad ``positions`` (or one selecting no position) or
            ``batch_size``, or an ``out_dir`` that is a non-empty directory or an existing file.
            Every message starts with ``cache_activations:``.

    On an exception or ``KeyboardInterrupt`` while streaming, only what this call wrote is removed:
    the directories it created, or, in an existing empty ``out_dir``, its shard and index files.
        MemoryBudgetError: the estimated bytes exceed ``max_bytes``; the message says how to
            lower them.

    Example:
        >>> cache = cache_activations(model, ["Hello there"], ["blocks.3.hook_resid_pre"])  # doctest: +SKIP
        >>> cache["blocks.3.hook_resid_pre"].shape  # doctest: +SKIP
        torch.Size([2, 576])
    """
    backend = backend_of(model)
    prompts = check_prompts(prompts, caller="cache_activations")
    hook_names = check_names(hook_names, caller="cache_activations", argument="hook_names")
    _check_options(hook_names, batch_size, max_bytes, dtype)
    backend.require("cache", "cache_activations")
    with named_errors("cache_activations"):
        for name in hook_names:
            backend.check_cache_point(name, "cache_activations")  # unknown names fail here, before any work
        token_rows = tokenize_prompts(model, prompts, chat=chat, prepend_bos=prepend_bos)
        kept = [select_positions(len(r), positions) for r in token_rows]
    for i, keep in enumerate(kept):
        if not keep:
            raise ValueError(
                f"cache_activations: positions={positions!r} selects no position of prompt {i} "
                f"({len(token_rows[i])} tokens); choose at least one."
            )
    store_dtype = dtype or backend.dtype
    widths = backend.activation_shapes(hook_names, min(token_rows, key=len))
    row_bytes = torch.empty((), dtype=store_dtype).element_size() * sum(math.prod(w) for w in widths.values())
    _check_budget(len(hook_names), len(prompts), row_bytes, sum(map(len, kept)), max_bytes, out_dir, shard_bytes)
    writer = _ShardWriter(hook_names, out_dir, shard_bytes)
    try:
        for start in tqdm(range(0, len(token_rows), batch_size), desc="caching activations", unit="batch", disable=not progress):
            rows, keep = token_rows[start : start + batch_size], kept[start : start + batch_size]
            writer.add(backend.capture(rows, keep, hook_names), store_dtype, row_bytes * sum(map(len, keep)))
        writer.flush()
    except BaseException:
        writer.remove_partial()
        raise
    index = {
        "prompt_index": torch.cat([torch.full((len(k),), i, dtype=torch.long) for i, k in enumerate(kept)]),
        "position": torch.cat([torch.tensor(k, dtype=torch.long) for k in kept]),
        "token_ids": torch.cat([torch.tensor([row[p] for p in k], dtype=torch.long) for row, k in zip(token_rows, kept)]),
    }
    return writer.finish(index, dict(model_name=backend.name, hook_names=hook_names, prompts=prompts))
