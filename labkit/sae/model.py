"""The sparse autoencoder as plain data: weights, encoder rule, hook point, card.

A sparse autoencoder (SAE) reads the activation ``x`` at one hook point and writes it as a sparse,
non-negative combination of ``d_sae`` learned directions (Bricken et al. 2023, "Towards
Monosemanticity", §Sparse autoencoder; Gao et al. 2024, "Scaling and evaluating sparse
autoencoders", §2)::

    pre  = (x - b_dec) @ W_enc + b_enc          # (apply_b_dec_to_input, the usual choice)
    f    = σ(pre)                               # the feature activations, d_sae wide
    x̂    = f @ W_dec + b_dec                    # the reconstruction

with ``σ`` one of three encoder rules:

* ``"topk"`` (Gao et al. 2024 §2.3): keep the ``k`` largest of ``ReLU(pre)``, zero the rest;
* ``"jumprelu"`` (Rajamanoharan et al. 2024, "Jumping Ahead", eq. 2): ``pre · 1[pre > θ]`` with a
  per-feature threshold ``θ``;
* ``"relu"`` (Bricken et al. 2023): ``ReLU(pre)``.

:class:`SparseAutoencoder` holds the tensors and what they were made for (model, hook point); it
never changes after construction (a transform returns a new object). Saved in the labkit layout
(``<stem>.json`` + ``<stem>.safetensors``, :mod:`labkit.storage`); foreign layouts load through
:mod:`labkit.sae.formats`.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from labkit import storage

__all__ = ["ACTIVATIONS", "BLOCK_ELEMENTS", "SparseAutoencoder", "topk_of_rows"]

Activation = Literal["topk", "jumprelu", "relu"]
ACTIVATIONS: tuple[str, ...] = ("topk", "jumprelu", "relu")
KIND = "labkit.SparseAutoencoder"
VERSION = 1
_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")
BLOCK_ELEMENTS = 1 << 22
"""Pre-activations computed at once by the encoders (16 MiB in float32, 1024 rows of a 4096-wide
SAE): small enough to stay in the last-level cache while the activation rule reads them back, large
enough for an efficient matmul and few thread-pool rounds per call."""


@dataclass(frozen=True, eq=False)
class SparseAutoencoder:
    """A sparse autoencoder at one hook point. Plain data; never mutated.

    Attributes:
        hook_name: TransformerLens hook point it reads, e.g. ``"blocks.8.hook_resid_pre"``.
        W_enc: ``Float[Tensor, "d_model d_sae"]`` encoder weights.
        b_enc: ``Float[Tensor, "d_sae"]`` encoder bias.
        W_dec: ``Float[Tensor, "d_sae d_model"]`` decoder weights; row ``i`` is feature ``i``'s
            direction.
        b_dec: ``Float[Tensor, "d_model"]`` decoder bias (subtracted from the input first when
            ``apply_b_dec_to_input``).
        activation: ``"topk"`` | ``"jumprelu"`` | ``"relu"`` (see the module docstring).
        k: active features per token for ``"topk"`` (else ``None``).
        threshold: ``Float[Tensor, "d_sae"]`` JumpReLU thresholds (``"jumprelu"`` only).
        apply_b_dec_to_input: subtract ``b_dec`` from ``x`` before encoding.
        model_name: the model it was trained on (``""`` = unchecked).
        card: JSON-able description: training settings and measurements.

    Raises:
        ValueError: tensors of inconsistent shapes, non-float or non-finite tensors, an unknown
            ``activation``, ``k`` missing / out of ``1..d_sae`` for TopK, or thresholds missing
            for JumpReLU.
    """

    hook_name: str
    W_enc: Float[Tensor, "d_model d_sae"]
    b_enc: Float[Tensor, " d_sae"]
    W_dec: Float[Tensor, "d_sae d_model"]
    b_dec: Float[Tensor, " d_model"]
    activation: Activation = "topk"
    k: int | None = None
    threshold: Float[Tensor, " d_sae"] | None = None
    apply_b_dec_to_input: bool = True
    model_name: str = ""
    card: Mapping[str, Any] = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = "SparseAutoencoder"
        if not isinstance(self.hook_name, str) or not self.hook_name:
            raise TypeError(f"{where}: hook_name must be a hook point name such as 'blocks.8.hook_resid_pre', got {self.hook_name!r}.")
        for name in _TENSORS + (("threshold",) if self.threshold is not None else ()):
            value = getattr(self, name)
            if not isinstance(value, Tensor) or not value.is_floating_point():
                raise TypeError(f"{where}: {name} must be a float torch.Tensor, got {type(value).__name__} {getattr(value, 'dtype', '')}.")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{where}: {name} holds NaN/inf values; every weight must be finite.")
        if self.W_enc.ndim != 2:
            raise ValueError(f"{where}: W_enc must be (d_model, d_sae), got shape {tuple(self.W_enc.shape)}.")
        d_model, d_sae = self.W_enc.shape
        expected = {"b_enc": (d_sae,), "W_dec": (d_sae, d_model), "b_dec": (d_model,)}
        if self.threshold is not None:
            expected["threshold"] = (d_sae,)
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(
                    f"{where}: {name} has shape {tuple(getattr(self, name).shape)}, but W_enc is (d_model, d_sae) = "
                    f"({d_model}, {d_sae}), so {name} must be {shape}."
                )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"{where}: activation={self.activation!r} is not allowed; use one of {', '.join(map(repr, ACTIVATIONS))}.")
        if self.activation == "topk":
            if isinstance(self.k, bool) or not isinstance(self.k, numbers.Integral) or not 1 <= int(self.k) <= d_sae:
                raise ValueError(f"{where}: activation='topk' needs k, an int in 1..d_sae={d_sae}, got {self.k!r}.")
            object.__setattr__(self, "k", int(self.k))
        elif self.k is not None:
            raise ValueError(f"{where}: k={self.k!r} is only meaningful with activation='topk' (got {self.activation!r}).")
        if (self.activation == "jumprelu") != (self.threshold is not None):
            raise ValueError(
                f"{where}: JumpReLU needs its per-feature threshold tensor and other rules take none "
                f"(activation={self.activation!r}, threshold {'given' if self.threshold is not None else 'missing'})."
            )
        object.__setattr__(self, "card", dict(self.card))

    # -- shapes --------------------------------------------------------------------------------

    @property
    def d_model(self) -> int:
        """Width of the activation it reads."""
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        """Number of features (the dictionary size)."""
        return int(self.W_enc.shape[1])

    @property
    def layer(self) -> int | None:
        """Block index of :attr:`hook_name` (``None`` outside ``blocks.{L}``)."""
        parts = self.hook_name.split(".")
        return int(parts[1]) if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit() else None

    def decoder_directions(self) -> Float[Tensor, "d_sae d_model"]:
        """Unit-norm decoder rows (float32): feature ``i``'s direction in the residual stream."""
        rows = self.W_dec.float()
        return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def to(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> "SparseAutoencoder":
        """A copy with every tensor in ``dtype`` / on ``device`` (the original is unchanged)."""
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype)

        return replace(self, **{n: move(getattr(self, n)) for n in (*_TENSORS, "threshold")})

    # -- the encoder / decoder -----------------------------------------------------------------

    def _effective_bias(self, like: Tensor) -> Tensor:
        """``b_enc - b_dec @ W_enc`` (folds the input centring into one bias), cached per dtype/device."""
        key = (like.dtype, like.device)
        cached = self._cache.get(key)
        if cached is None:
            W_enc = self.W_enc.to(device=like.device, dtype=like.dtype)
            bias = self.b_enc.to(device=like.device, dtype=like.dtype)
            if self.apply_b_dec_to_input:
                bias = bias - self.b_dec.to(device=like.device, dtype=like.dtype) @ W_enc
            cached = (W_enc, bias)
            self._cache[key] = cached
        return cached

    def pre_activations(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_sae"]:
        """``(x - b_dec) @ W_enc + b_enc`` (one fused matmul-add), in ``x``'s dtype."""
        self._check_input(x)
        W_enc, bias = self._effective_bias(x)
        flat = x.reshape(-1, self.d_model)
        return torch.addmm(bias, flat, W_enc).reshape(*x.shape[:-1], self.d_sae)

    def encode_sparse(
        self, x: Float[Tensor, "... d_model"]
    ) -> tuple[Float[Tensor, "... k"], Int[Tensor, "... k"]]:
        """TopK encoding without the dense ``d_sae`` output: the ``k`` values and feature indices.

        The values are ``ReLU`` of the ``k`` largest pre-activations (Gao et al. 2024 §2.3;
        ``ReLU`` then top-k selects the same set). Unsorted. The pre-activations are computed a
        block of rows at a time into one reused buffer that stays in cache while the top-k reads
        it (see :func:`topk_of_rows`); values equal :meth:`pre_activations` followed by
        ``torch.topk``, except that where the ``k``-th and ``(k+1)``-th pre-activations tie, either
        index may be returned (as with ``torch.topk`` itself).

        Raises:
            ValueError: the SAE is not TopK (use :meth:`encode`), or ``x`` is not ``d_model`` wide.
        """
        if self.activation != "topk":
            raise ValueError(f"encode_sparse: only for activation='topk', this SAE is {self.activation!r}; use encode().")
        self._check_input(x)
        flat = x.reshape(-1, self.d_model)
        if self._needs_autograd(flat):
            values, indices = self.pre_activations(flat).topk(self.k, dim=-1, sorted=False)
            values = values.relu()
        else:
            values = flat.new_empty(flat.shape[0], self.k)
            indices = torch.empty(flat.shape[0], self.k, dtype=torch.long, device=flat.device)
            for start, pre in self._pre_activation_blocks(flat):
                stop = start + pre.shape[0]
                topk_of_rows(pre, self.k, out=(values[start:stop], indices[start:stop]))
            values.relu_()
        return values.reshape(*x.shape[:-1], self.k), indices.reshape(*x.shape[:-1], self.k)

    def encode(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_sae"]:
        """Feature activations ``f = σ(pre)`` (dense, ``d_sae`` wide), in ``x``'s dtype.

        Computed a block of rows at a time, each block written straight into the output and turned
        into features there while it is in cache (no second ``d_sae``-wide tensor); values equal
        the rule applied to :meth:`pre_activations` (TopK ties: see :meth:`encode_sparse`).

        Raises:
            ValueError: ``x`` is not ``d_model`` wide.
        """
        self._check_input(x)
        flat = x.reshape(-1, self.d_model)
        if self._needs_autograd(flat):
            return self._encode_reference(self.pre_activations(flat)).reshape(*x.shape[:-1], self.d_sae)
        out = flat.new_empty(flat.shape[0], self.d_sae)
        for _start, pre in self._pre_activation_blocks(flat, into=out):
            if self.activation == "topk":
                values, indices = topk_of_rows(pre, self.k)
                pre.zero_().scatter_(-1, indices, values.relu_())
            elif self.activation == "jumprelu":
                pre.mul_(pre > self.threshold.to(device=pre.device, dtype=pre.dtype))
            else:
                pre.relu_()
        return out.reshape(*x.shape[:-1], self.d_sae)

    def _encode_reference(self, pre: Tensor) -> Tensor:
        """The rules on whole tensors, differentiable (used when autograd needs the graph)."""
        if self.activation == "topk":
            values, indices = pre.topk(self.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter(-1, indices, values.relu())
        if self.activation == "jumprelu":
            return pre * (pre > self.threshold.to(device=pre.device, dtype=pre.dtype))
        return pre.relu()

    def _needs_autograd(self, x: Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or self.W_enc.requires_grad or self.b_enc.requires_grad)

    def _block_rows(self) -> int:
        """Rows per block: about :data:`BLOCK_ELEMENTS` pre-activations."""
        return max(1, BLOCK_ELEMENTS // self.d_sae)

    def _pre_activation_blocks(self, flat: Tensor, into: Tensor | None = None) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(first row, pre-activations of a block of rows)``, one addmm per block, written
        into that block's rows of ``into`` when given, else into one buffer reused for every block."""
        W_enc, bias = self._effective_bias(flat)
        rows = max(1, min(flat.shape[0], self._block_rows()))
        buffer = flat.new_empty(rows, self.d_sae) if into is None else None
        for start in range(0, flat.shape[0], rows):
            chunk = flat[start:start + rows]
            target = buffer[: chunk.shape[0]] if into is None else into[start:start + chunk.shape[0]]
            yield start, torch.addmm(bias, chunk, W_enc, out=target)

    def decode(self, features: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_model"]:
        """Reconstruction ``f @ W_dec + b_dec``, in ``features``' dtype."""
        W_dec = self.W_dec.to(device=features.device, dtype=features.dtype)
        return features @ W_dec + self.b_dec.to(device=features.device, dtype=features.dtype)

    def reconstruct(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """``decode(encode(x))``."""
        return self.decode(self.encode(x))

    def _check_input(self, x: Any) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 1 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"SparseAutoencoder({self.hook_name!r}): input must be a float tensor (..., d_model={self.d_model}), got "
                f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}."
            )

    # -- checks against a model ----------------------------------------------------------------

    def check_compatible(self, model, *, where: str = "SparseAutoencoder") -> None:
        """Raise unless the SAE reads a hook point this model has, at this model's width.

        Raises:
            ValueError: another model name, another ``d_model``, or a hook point the model lacks.
        """
        from labkit.models import model_name_of, same_model

        name = model_name_of(model)
        if self.model_name and not same_model(self.model_name, name):
            raise ValueError(
                f"{where}: {self!r} was trained on model {self.model_name!r} and refuses to run on {name!r}. "
                f"Use an SAE trained on this model, or, if the weights are the same, relabel it: "
                f"dataclasses.replace(sae, model_name={name!r})."
            )
        d_model = int(model.cfg.d_model)
        if self.d_model != d_model:
            raise ValueError(
                f"{where}: {self!r} reads d_model={self.d_model} activations, but model {name!r} has d_model={d_model}."
            )

    # -- serialisation -------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """JSON-able description of everything but the tensors."""
        return {
            "hook_name": self.hook_name,
            "model_name": self.model_name,
            "d_model": self.d_model,
            "d_sae": self.d_sae,
            "activation": self.activation,
            "k": self.k,
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "card": self.card,
        }

    def save(self, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
        """Write ``<stem>.json`` + ``<stem>.safetensors`` (labkit layout, no pickle).

        Args:
            path: the stem or either file's path.
            dtype: storage dtype (e.g. ``torch.bfloat16`` halves the file; recorded in the JSON).

        Returns:
            The ``.json`` path, what :meth:`load` takes.
        """
        tensors = {n: getattr(self, n) for n in _TENSORS}
        if self.threshold is not None:
            tensors["threshold"] = self.threshold
        if dtype is not None:
            tensors = {n: t.to(dtype) for n, t in tensors.items()}
        stored = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
        return storage.save(path, kind=KIND, version=VERSION, metadata={**self.metadata(), "storage_dtype": stored}, tensors=tensors)

    @classmethod
    def load(cls, path: str | Path, *, dtype: torch.dtype = torch.float32) -> "SparseAutoencoder":
        """Read an SAE written by :meth:`save`; tensors are cast to ``dtype`` (default float32).

        Raises:
            FileNotFoundError: no saved SAE there.
            ValueError: the files hold another kind of labkit object or lack a tensor.
        """
        metadata, tensors = storage.load(path, kind=KIND, version=VERSION, caller="SparseAutoencoder.load", writer="SparseAutoencoder.save")
        storage.require_keys(tensors, _TENSORS, caller="SparseAutoencoder.load", source=str(path))
        cast = {n: t.to(dtype) for n, t in tensors.items()}
        return cls(
            hook_name=metadata["hook_name"],
            activation=metadata["activation"],
            k=metadata.get("k"),
            apply_b_dec_to_input=bool(metadata.get("apply_b_dec_to_input", True)),
            model_name=metadata.get("model_name", ""),
            card=metadata.get("card", {}),
            threshold=cast.get("threshold"),
            **{n: cast[n] for n in _TENSORS},
        )

    def __repr__(self) -> str:
        rule = f"topk k={self.k}" if self.activation == "topk" else self.activation
        return f"SparseAutoencoder({self.hook_name!r}, d_model={self.d_model}, d_sae={self.d_sae}, {rule}, model={self.model_name!r})"


def topk_of_rows(
    pre: Float[Tensor, "rows d_sae"], k: int, *, out: tuple[Tensor, Tensor] | None = None
) -> tuple[Float[Tensor, "rows k"], Int[Tensor, "rows k"]]:
    """The ``k`` largest entries of each row and their indices (unsorted); may overwrite ``pre``.

    Same result as ``pre.topk(k, dim=-1, sorted=False)``, faster on CPU: the partial sort inside
    ``torch.topk`` spends a large part of its time (about 40 % for k = 32 of 4096) replacing heap
    entries as ever larger values stream past. A lower bound ``t`` on each row's ``k``-th largest
    value is cheap (the usual pruning bound of top-k selection: any ``k`` entries of a row are all
    ``>=`` their minimum): split the row into ``k`` groups; the ``k`` group maxima are ``k``
    entries ``>= min(maxima) = t``. Entries below
    ``t`` cannot be among the top ``k``, so they are raised in place to the float just below
    ``t`` (still below every entry ``>= t``) and the heap hardly changes after the first few
    candidates. Entries ``>= t`` keep their values, so the selected values and indices are
    those of ``pre`` (where the ``k``-th and ``(k+1)``-th values tie, either index may come
    back, as with ``torch.topk``). Rows holding NaN are left as they are.

    Only used where ``torch.topk`` partial-sorts (CPU, ``64·k <= d_sae``); elsewhere this is
    ``torch.topk``.

    Args:
        pre: ``Float[Tensor, "rows d_sae"]``; entries below the bound are overwritten.
        k: how many to keep, ``1..d_sae``.
        out: optional ``(values, indices)`` tensors of shape ``(rows, k)`` to write into.

    Returns:
        ``(values, indices)``, each ``(rows, k)``.
    """
    d_sae = pre.shape[-1]
    if pre.device.type == "cpu" and 64 * k <= d_sae and pre.shape[0] > 0:
        group = d_sae // k
        bound = pre[:, : k * group].reshape(pre.shape[0], k, group).amax(-1).amin(-1, keepdim=True)
        bound = torch.nextafter(bound, bound.new_full((), float("-inf"))).nan_to_num_(nan=float("-inf"))
        pre.clamp_(min=bound)
    if out is None:
        return pre.topk(k, dim=-1, sorted=False)
    return torch.topk(pre, k, dim=-1, sorted=False, out=out)
