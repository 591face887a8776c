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
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from labkit import storage

__all__ = ["ACTIVATIONS", "SparseAutoencoder"]

Activation = Literal["topk", "jumprelu", "relu"]
ACTIVATIONS: tuple[str, ...] = ("topk", "jumprelu", "relu")
KIND = "labkit.SparseAutoencoder"
VERSION = 1
_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")


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
        ``ReLU`` then top-k selects the same set). Unsorted.

        Raises:
            ValueError: the SAE is not TopK (use :meth:`encode`), or ``x`` is not ``d_model`` wide.
        """
        if self.activation != "topk":
            raise ValueError(f"encode_sparse: only for activation='topk', this SAE is {self.activation!r}; use encode().")
        values, indices = self.pre_activations(x).topk(self.k, dim=-1, sorted=False)
        return values.relu_(), indices

    def encode(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_sae"]:
        """Feature activations ``f = σ(pre)`` (dense, ``d_sae`` wide), in ``x``'s dtype.

        Raises:
            ValueError: ``x`` is not ``d_model`` wide.
        """
        pre = self.pre_activations(x)
        if self.activation == "topk":
            values, indices = pre.topk(self.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, indices, values.relu_())
        if self.activation == "jumprelu":
            threshold = self.threshold.to(device=pre.device, dtype=pre.dtype)
            return pre * (pre > threshold)
        return pre.relu()

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
