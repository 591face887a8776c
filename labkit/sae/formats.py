"""Bring your own SAE: read sae-lens and eai-sparsify folders without importing either library.

* **sae-lens** (``SAE.save_model``; 6.x shown, 3.x–5.x accepted): ``cfg.json`` with ``d_in``,
  ``d_sae``, ``architecture`` (``"standard"`` = ReLU, ``"jumprelu"``, ``"topk"``),
  ``apply_b_dec_to_input``, ``normalize_activations`` and the model / hook point — under ``"meta"``
  (6.x), ``"metadata"``, or top-level (older) — plus ``sae_weights.safetensors`` with ``W_enc``
  ``(d_in, d_sae)``, ``W_dec`` ``(d_sae, d_in)``, ``b_enc``, ``b_dec`` and, for JumpReLU,
  ``threshold`` (or the training-time ``log_threshold``). TopK SAEs saved with
  ``rescale_acts_by_decoder_norm`` are folded to unit-norm decoder rows (same outputs).
* **eai-sparsify** (``SparseCoder.save_to_disk``): one folder per hook point, named after the Hugging
  Face module it read (``layers.8`` = the output of decoder layer 8), with ``cfg.json``
  (``d_in``, ``num_latents`` or ``expansion_factor``, ``k``, ``activation``, ``transcode``,
  ``skip_connection``) and ``sae.safetensors`` (``encoder.weight`` ``(num_latents, d_in)``,
  ``encoder.bias``, ``W_dec`` ``(num_latents, d_in)``, ``b_dec``). Its encoder is
  ``ReLU((x − b_dec) Wᵀ + b)`` then top-k: labkit's TopK rule exactly.

Both refuse what labkit cannot run the same way (an activation-normalising or ``hook_z`` sae-lens
SAE, a sparsify transcoder or skip connection, GroupMax), and :func:`load_sae` refuses an SAE that
does not fit the model: another model name, width, or hook point.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from labkit.sae.model import SparseAutoencoder

__all__ = ["load_sae", "read_sae_lens", "read_sparsify", "sparsify_hook_name"]


def _read_cfg(folder: Path, caller: str) -> dict[str, Any]:
    path = folder / "cfg.json"
    if not path.is_file():
        raise FileNotFoundError(f"{caller}: no cfg.json in {str(folder)!r}; point at the SAE's folder.")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{caller}: {str(path)!r} is not valid JSON ({error.msg}).") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{caller}: {str(path)!r} holds a {type(cfg).__name__}, expected a JSON object.")
    return cfg


def _tensors(path: Path, names: tuple[str, ...], caller: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{caller}: no {path.name} in {str(path.parent)!r}.")
    tensors = {k: v.float() for k, v in load_file(str(path)).items()}
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"{caller}: {str(path)!r} lacks tensor(s) {missing}; it holds {sorted(tensors)}.")
    return tensors


def read_sae_lens(folder: str | Path) -> SparseAutoencoder:
    """Read an SAE saved by sae-lens (``cfg.json`` + ``sae_weights.safetensors``).

    Args:
        folder: the SAE's folder.

    Returns:
        A :class:`SparseAutoencoder` (float32) with the cfg's hook point and model name.

    Raises:
        FileNotFoundError: a file of the pair is missing.
        ValueError: an architecture labkit does not run (gated, …), input normalisation other
            than ``"none"``, ``hook_z`` reshaping, shapes that disagree with ``d_in`` / ``d_sae``,
            no hook point recorded.
    """
    where = "read_sae_lens"
    folder = Path(folder)
    cfg = _read_cfg(folder, where)
    meta = {**cfg, **(cfg.get("metadata") or {}), **(cfg.get("meta") or {})}
    architecture = cfg.get("architecture", "standard")
    rules = {"standard": "relu", "relu": "relu", "jumprelu": "jumprelu", "topk": "topk"}
    if architecture not in rules:
        raise ValueError(
            f"{where}: architecture {architecture!r} in {str(folder)!r} is not supported; labkit runs "
            f"{sorted(rules)} (sae-lens 'batchtopk' SAEs save as 'jumprelu' for inference)."
        )
    normalize = cfg.get("normalize_activations", "none") or "none"
    if normalize != "none":
        raise ValueError(
            f"{where}: normalize_activations={normalize!r} rescales inputs with a factor the folder does not "
            "hold; fold it into the weights first (sae-lens: sae.fold_activation_norm_scaling_factor)."
        )
    if (cfg.get("reshape_activations") or "none") != "none":
        raise ValueError(f"{where}: reshape_activations={cfg['reshape_activations']!r} (hook_z SAEs) is not supported.")
    hook_name = meta.get("hook_name") or meta.get("hook_point")
    if not hook_name:
        raise ValueError(f"{where}: {str(folder / 'cfg.json')!r} names no hook point (hook_name).")
    names = ("W_enc", "W_dec", "b_enc", "b_dec")
    tensors = _tensors(folder / "sae_weights.safetensors", names, where)
    d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
    if tuple(tensors["W_enc"].shape) != (d_in, d_sae):
        raise ValueError(
            f"{where}: W_enc has shape {tuple(tensors['W_enc'].shape)} but cfg.json says d_in={d_in}, d_sae={d_sae}."
        )
    threshold = None
    if rules[architecture] == "jumprelu":
        if "threshold" in tensors:
            threshold = tensors["threshold"]
        elif "log_threshold" in tensors:
            threshold = tensors["log_threshold"].exp()
        else:
            raise ValueError(f"{where}: a JumpReLU SAE needs 'threshold' (or 'log_threshold'); {sorted(tensors)} found.")
    W_enc, b_enc, W_dec = tensors["W_enc"], tensors["b_enc"], tensors["W_dec"]
    if architecture == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        norms = W_dec.norm(dim=-1)
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms.unsqueeze(-1)
    return SparseAutoencoder(
        hook_name=str(hook_name), W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=tensors["b_dec"],
        activation=rules[architecture], k=int(cfg["k"]) if architecture == "topk" else None, threshold=threshold,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)), model_name=str(meta.get("model_name") or ""),
        card={"format": "sae-lens", "source": str(folder), "architecture": architecture},
    )


def sparsify_hook_name(folder_name: str) -> str:
    """The TransformerLens hook point of an eai-sparsify folder name.

    ``layers.{L}`` (a decoder layer's output) is ``blocks.{L}.hook_resid_post``;
    ``layers.{L}.mlp`` is ``blocks.{L}.hook_mlp_out`` and ``layers.{L}.self_attn``
    ``blocks.{L}.hook_attn_out``; names already in TransformerLens form pass through.

    Raises:
        ValueError: a folder name that names none of these.
    """
    if folder_name.startswith("blocks.") or folder_name.startswith("hook_"):
        return folder_name
    match = re.fullmatch(r"(?:model\.)?(?:layers|h)\.(\d+)(?:\.(mlp|self_attn))?", folder_name)
    if match is None:
        raise ValueError(
            f"sparsify_hook_name: cannot tell the hook point of folder {folder_name!r}; eai-sparsify names folders "
            "after the module read (layers.8, layers.8.mlp); pass hook_name= explicitly."
        )
    layer, part = int(match.group(1)), match.group(2)
    suffix = {None: "hook_resid_post", "mlp": "hook_mlp_out", "self_attn": "hook_attn_out"}[part]
    return f"blocks.{layer}.{suffix}"


def read_sparsify(folder: str | Path, *, hook_name: str | None = None, model_name: str = "") -> SparseAutoencoder:
    """Read an SAE saved by eai-sparsify (``cfg.json`` + ``sae.safetensors``, one folder per hook point).

    Args:
        folder: the hook point's folder (e.g. ``.../layers.8``).
        hook_name: the TransformerLens hook point; default from the folder name
            (:func:`sparsify_hook_name`).
        model_name: the model it was trained on (sparsify does not record it; ``""`` = unchecked).

    Returns:
        A TopK :class:`SparseAutoencoder` (float32).

    Raises:
        FileNotFoundError: a file of the pair is missing.
        ValueError: a transcoder, a skip connection, a GroupMax activation, shapes that disagree
            with the cfg, or a folder name that names no hook point.
    """
    where = "read_sparsify"
    folder = Path(folder)
    cfg = _read_cfg(folder, where)
    for flag, what in (("transcode", "a transcoder"), ("skip_connection", "a skip connection")):
        if cfg.get(flag):
            raise ValueError(f"{where}: {str(folder)!r} is {what}; labkit reads autoencoders of one hook point only.")
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{where}: activation={cfg['activation']!r} is not supported; labkit runs TopK sparsify SAEs.")
    tensors = _tensors(folder / "sae.safetensors", ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), where)
    d_in = int(cfg["d_in"])
    width = int(cfg.get("num_latents") or 0) or d_in * int(cfg.get("expansion_factor", 32))
    if tuple(tensors["encoder.weight"].shape) != (width, d_in):
        raise ValueError(
            f"{where}: encoder.weight has shape {tuple(tensors['encoder.weight'].shape)} but cfg.json says "
            f"num_latents={width}, d_in={d_in}."
        )
    return SparseAutoencoder(
        hook_name=hook_name or sparsify_hook_name(folder.name), W_enc=tensors["encoder.weight"].T.contiguous(),
        b_enc=tensors["encoder.bias"], W_dec=tensors["W_dec"], b_dec=tensors["b_dec"], activation="topk",
        k=int(cfg.get("k", 32)), model_name=model_name, card={"format": "eai-sparsify", "source": str(folder)},
    )


def _shipped(path: Path) -> Path | None:
    """``data/saes/<name>/sae`` for a bare name that is no file here, else ``None``."""
    if len(path.parts) != 1 or path.exists() or path.with_name(path.name + ".json").exists():
        return None
    from labkit.datasets import data_dir

    folder = data_dir(required=False)
    candidate = None if folder is None else folder / "saes" / path.name / "sae"
    return candidate if candidate is not None and candidate.with_suffix(".json").exists() else None


def load_sae(
    path: str | Path,
    model=None,
    *,
    hook_name: str | None = None,
    d_sae: int | None = None,
    model_name: str = "",
) -> SparseAutoencoder:
    """Load an SAE in any layout labkit reads, checked against the model and what you expect.

    The layout is told by the files: ``<stem>.json`` + ``<stem>.safetensors`` (labkit,
    :meth:`SparseAutoencoder.save`), ``cfg.json`` + ``sae_weights.safetensors`` (sae-lens),
    ``cfg.json`` + ``sae.safetensors`` (eai-sparsify).

    Args:
        path: a labkit stem / file, a sae-lens / sparsify folder, or the name of an SAE shipped in
            ``data/saes/`` (e.g. ``labkit.sae.SHIPPED_SMOLLM2``).
        model: a labkit bridge to check against (name, ``d_model``, hook point exists); ``None``
            skips that check.
        hook_name: the hook point you expect (for sparsify: the one to use when the folder name
            does not tell).
        d_sae: the width you expect.
        model_name: for sparsify folders (which do not record it), the model it was trained on.

    Returns:
        A float32 :class:`SparseAutoencoder`.

    Raises:
        FileNotFoundError: nothing labkit reads at ``path``.
        ValueError: a mismatched model, width, ``d_model`` or hook point, with both values named;
            what the format readers raise.

    Example:
        >>> sae = load_sae("data/saes/smollm2-135m-instruct-blocks.8.hook_resid_pre/sae", model)  # doctest: +SKIP
    """
    path = Path(path)
    shipped = _shipped(path)
    if shipped is not None:
        path = shipped
    if path.is_dir() and (path / "sae_weights.safetensors").exists():
        sae = read_sae_lens(path)
    elif path.is_dir() and (path / "sae.safetensors").exists() and (path / "cfg.json").exists():
        sae = read_sparsify(path, hook_name=hook_name, model_name=model_name)
    elif path.with_suffix(".json").exists() or path.with_name(path.name + ".json").exists() or path.suffix == ".json":
        sae = SparseAutoencoder.load(path)
    elif path.is_dir() and (path / "sae.json").exists():
        sae = SparseAutoencoder.load(path / "sae")
    else:
        raise FileNotFoundError(
            f"load_sae: nothing at {str(path)!r} in a layout labkit reads: a labkit <stem>.json/.safetensors pair, "
            "a sae-lens folder (cfg.json + sae_weights.safetensors) or an eai-sparsify folder (cfg.json + sae.safetensors)."
        )
    if hook_name is not None and sae.hook_name != hook_name:
        raise ValueError(f"load_sae: {sae!r} reads hook point {sae.hook_name!r}, not the expected {hook_name!r}.")
    if d_sae is not None and sae.d_sae != d_sae:
        raise ValueError(f"load_sae: {sae!r} has width d_sae={sae.d_sae}, not the expected {d_sae}.")
    if model is not None:
        sae.check_compatible(model, where="load_sae")
        from labkit.hooks import hook_names

        if sae.hook_name not in hook_names(model):
            raise ValueError(
                f"load_sae: {sae!r} reads hook point {sae.hook_name!r}, which model {model.cfg.n_layers}-layer "
                f"{getattr(model.cfg, 'model_name', '')!r} does not have (see labkit.hooks.hook_names(model))."
            )
    return sae
