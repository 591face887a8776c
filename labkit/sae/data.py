"""Training batches streamed from an on-disk activation cache, one shard in memory at a time.

A cache written by ``labkit.cache.cache_activations(..., out_dir=...)`` is a directory of
safetensors shards (layout: :mod:`labkit.cache`). Training an SAE reads it in random order
without loading the whole cache: shards are visited in a seeded random order, rows inside a
shard are shuffled, and batches are cut from that stream (a batch can straddle two shards).
Positions can be left out by index (``skip_positions={0}`` drops the first token of every prompt,
the BOS / attention-sink token whose norm is tens of times the others').
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors import safe_open
from torch import Tensor

from labkit.cache import FORMAT_KIND, FORMAT_VERSION, ActivationCache

__all__ = ["activation_batches", "count_rows"]


def _shard_paths(cache: ActivationCache) -> list[Path]:
    if cache.directory is None:
        raise ValueError(
            "activation_batches: the cache is held in memory; stream it to disk with "
            "cache_activations(..., out_dir=...) (or index it directly: cache[hook_name])."
        )
    from labkit import storage

    meta, _ = storage.load(
        cache.directory / "index", kind=FORMAT_KIND, version=FORMAT_VERSION,
        caller="activation_batches", writer="cache_activations(out_dir=...)",
    )
    return [cache.directory / name for name in meta["shards"]]


def count_rows(cache: ActivationCache, skip_positions: frozenset[int] | set[int] = frozenset()) -> int:
    """Rows :func:`activation_batches` yields per epoch (positions in ``skip_positions`` left out)."""
    keep = torch.ones(len(cache), dtype=torch.bool)
    for position in skip_positions:
        keep &= cache.position != position
    return int(keep.sum())


def activation_batches(
    cache: ActivationCache,
    hook_name: str,
    batch_size: int,
    *,
    seed: int = 0,
    epochs: int = 1,
    skip_positions: frozenset[int] | set[int] = frozenset(),
    dtype: torch.dtype = torch.float32,
) -> Iterator[Float[Tensor, "batch d_model"]]:
    """Shuffled batches of one hook point's rows, streamed shard by shard from disk.

    Args:
        cache: a streamed :class:`labkit.cache.ActivationCache` (``cache.directory`` set).
        hook_name: one of ``cache.hook_names``.
        batch_size: rows per batch (the last batch of the last epoch may be shorter).
        seed: seeds the shard order and the row shuffles.
        epochs: passes over the cache.
        skip_positions: real-token positions to leave out (``{0}``: the first token of each prompt).
        dtype: dtype of the yielded batches.

    Yields:
        ``Float[Tensor, "batch d_model"]`` batches.

    Raises:
        ValueError: the cache is in memory, the hook point was not cached, or ``batch_size`` /
            ``epochs`` is not a positive int.
    """
    if hook_name not in cache.hook_names:
        raise ValueError(f"activation_batches: {hook_name!r} was not cached; the cache holds {list(cache.hook_names)}.")
    for name, value in (("batch_size", batch_size), ("epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"activation_batches: {name} must be a positive int, got {value!r}.")
    shards = _shard_paths(cache)
    generator = torch.Generator().manual_seed(seed)
    starts, offset = [], 0
    for path in shards:
        with safe_open(str(path), framework="pt") as handle:
            starts.append(offset)
            offset += int(handle.get_slice(hook_name).get_shape()[0])
    keep_all = torch.ones(len(cache), dtype=torch.bool)
    for position in skip_positions:
        keep_all &= cache.position != position
    pending: list[Tensor] = []
    pending_rows = 0
    for _epoch in range(epochs):
        for shard_index in torch.randperm(len(shards), generator=generator).tolist():
            with safe_open(str(shards[shard_index]), framework="pt") as handle:
                rows = handle.get_tensor(hook_name)
            start = starts[shard_index]
            rows = rows[keep_all[start:start + rows.shape[0]]]
            rows = rows[torch.randperm(rows.shape[0], generator=generator)].to(dtype)
            block = torch.cat([*pending, rows]) if pending else rows
            cut = 0
            while block.shape[0] - cut >= batch_size:
                yield block[cut:cut + batch_size]
                cut += batch_size
            rest = block[cut:]
            pending, pending_rows = ([rest.clone()] if rest.shape[0] else []), int(rest.shape[0])
    if pending_rows:
        yield torch.cat(pending)
