"""Read SAE features: per-token activations, top-activating contexts, features of a vector.

* :func:`feature_activations` — every feature's activation at every token of a prompt.
* :func:`feature_statistics` — one pass over an activation cache (streamed shard by shard):
  firing rate and maximum of every feature and its top-``n`` rows; :func:`top_contexts` turns a
  feature's rows into text windows with the activating token marked.
* :func:`vector_features` — the features whose decoder directions are closest (cosine) to a
  steering vector: "which features does this vector move?".
* :func:`prompt_difference_features` — the features whose activation differs most between two
  prompts.

The first token of each text (BOS, never trained on) is left out of every ranking.
"""

from __future__ import annotations

import html
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from safetensors import safe_open
from torch import Tensor

from labkit.cache import FORMAT_KIND, FORMAT_VERSION, ActivationCache
from labkit.models import encode_prompts, tokenizer_of
from labkit.sae.model import SparseAutoencoder
from labkit.steering import SteeringVector, residual_activations

__all__ = [
    "Context",
    "FeatureActivations",
    "FeatureMatches",
    "FeatureStatistics",
    "feature_activations",
    "feature_statistics",
    "prompt_difference_features",
    "top_contexts",
    "vector_features",
]


def _check_n(n, where: str, upper: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= upper:
        raise ValueError(f"{where}: n must be an int in 1..{upper}, got {n!r}.")
    return n


@dataclass(frozen=True, eq=False)
class FeatureActivations:
    """Feature activations of one prompt, token by token.

    Attributes:
        tokens: the token strings (BOS first where the model prepends it).
        token_ids: their ids.
        activations: ``Float[Tensor, "pos d_sae"]``; row 0 is the BOS token's (not meaningful).
    """

    tokens: list[str]
    token_ids: list[int]
    activations: Float[Tensor, "pos d_sae"]

    def top(self, n: int = 10) -> list[tuple[int, float]]:
        """The ``n`` features with the largest activation at any token past the first: ``[(feature, max)]``."""
        n = _check_n(n, "FeatureActivations.top", self.activations.shape[1])
        peak = self.activations[1:].max(dim=0).values if self.activations.shape[0] > 1 else self.activations[0] * 0
        values, features = peak.topk(n)
        return [(int(f), float(v)) for f, v in zip(features, values)]

    def of(self, feature: int) -> list[tuple[str, float]]:
        """One feature's activation at each token: ``[(token, value)]``."""
        return list(zip(self.tokens, self.activations[:, feature].tolist()))


def feature_activations(model, sae: SparseAutoencoder, prompt: str, *, prepend_bos: bool | None = None) -> FeatureActivations:
    """Every SAE feature's activation at every token of ``prompt``.

    Args:
        model: a labkit bridge.
        sae: an SAE of one of the model's hook points.
        prompt: the text (tokenised with the lab's BOS rule).
        prepend_bos: override the model's BOS rule.

    Returns:
        A :class:`FeatureActivations` (``activations`` float32, ``(pos, d_sae)``).

    Raises:
        ValueError: an SAE of another model or width, an empty prompt.
    """
    sae.check_compatible(model, where="feature_activations")
    (_text,), (ids,) = encode_prompts(model, [prompt], caller="feature_activations", prepend_bos=prepend_bos)
    (acts,) = residual_activations(model, [ids], sae.hook_name)
    tokenizer = tokenizer_of(model)
    return FeatureActivations([tokenizer.decode([i]) for i in ids], list(ids), sae.encode(acts.float()))


def _chunks(cache: ActivationCache, hook_name: str, rows: int) -> Iterator[tuple[int, Tensor]]:
    """``(first row, block)`` over the cache in row order, one shard (or ``rows`` rows) at a time."""
    if cache.directory is None:
        data = cache[hook_name]
        for start in range(0, data.shape[0], rows):
            yield start, data[start:start + rows]
        return
    from labkit import storage

    meta, _ = storage.load(cache.directory / "index", kind=FORMAT_KIND, version=FORMAT_VERSION,
                           caller="feature_statistics", writer="cache_activations(out_dir=...)")
    offset = 0
    for name in meta["shards"]:
        with safe_open(str(cache.directory / name), framework="pt") as handle:
            shard = handle.get_tensor(hook_name)
        for start in range(0, shard.shape[0], rows):
            yield offset + start, shard[start:start + rows]
        offset += shard.shape[0]


@dataclass(frozen=True, eq=False)
class FeatureStatistics:
    """Per-feature statistics over a cache (from :func:`feature_statistics`).

    Attributes:
        firing_rate: ``Float[Tensor, "d_sae"]`` fraction of tokens where the feature is active.
        max_activation: ``Float[Tensor, "d_sae"]``.
        top_values: ``Float[Tensor, "d_sae n"]`` the feature's largest activations, descending.
        top_rows: ``Int[Tensor, "d_sae n"]`` the cache rows they occur at (``-1`` = none).
        tokens: tokens measured.
    """

    firing_rate: Float[Tensor, " d_sae"]
    max_activation: Float[Tensor, " d_sae"]
    top_values: Float[Tensor, "d_sae n"]
    top_rows: Int[Tensor, "d_sae n"]
    tokens: int


@torch.no_grad()
def feature_statistics(sae: SparseAutoencoder, cache: ActivationCache, *, n: int = 10, chunk_rows: int = 4096) -> FeatureStatistics:
    """Firing rate, maximum and top-``n`` rows of every feature over an activation cache.

    Streams the cache (shard by shard when on disk), encodes ``chunk_rows`` rows at a time and
    keeps a running top-``n`` per feature; rows at each text's first position are left out.

    Args:
        sae: the SAE.
        cache: an :class:`~labkit.cache.ActivationCache` holding ``sae.hook_name``.
        n: contexts kept per feature.
        chunk_rows: rows encoded at once (memory: ``chunk_rows × d_sae`` floats).

    Returns:
        A :class:`FeatureStatistics`.

    Raises:
        ValueError: the cache lacks the SAE's hook point or was made on another model.
    """
    where = "feature_statistics"
    if sae.hook_name not in cache.hook_names:
        raise ValueError(f"{where}: the cache holds {list(cache.hook_names)}, not the SAE's hook point {sae.hook_name!r}.")
    if sae.model_name:
        from labkit.models import same_model

        if not same_model(sae.model_name, cache.model_name):
            raise ValueError(f"{where}: the cache was made on {cache.model_name!r}, the SAE on {sae.model_name!r}.")
    n = _check_n(n, where, 10_000)
    best_values = torch.full((sae.d_sae, n), -1.0)
    best_rows = torch.full((sae.d_sae, n), -1, dtype=torch.long)
    firing = torch.zeros(sae.d_sae, dtype=torch.long)
    peak = torch.zeros(sae.d_sae)
    tokens = 0
    for start, block in _chunks(cache, sae.hook_name, chunk_rows):
        keep = cache.position[start:start + block.shape[0]] != 0
        features = sae.encode(block[keep].float())  # (rows, d_sae)
        row_ids = torch.arange(start, start + block.shape[0])[keep]
        tokens += features.shape[0]
        firing += (features > 0).sum(dim=0)
        if features.shape[0] == 0:
            continue
        peak = torch.maximum(peak, features.max(dim=0).values)
        take = min(n, features.shape[0])
        values, index = features.T.topk(take, dim=1)  # (d_sae, take)
        merged_values = torch.cat([best_values, values], dim=1)
        merged_rows = torch.cat([best_rows, row_ids[index]], dim=1)
        order = merged_values.topk(n, dim=1).indices
        best_values, best_rows = merged_values.gather(1, order), merged_rows.gather(1, order)
    best_rows[best_values <= 0] = -1
    return FeatureStatistics(firing.double().div(max(tokens, 1)).float(), peak, best_values.clamp_min(0), best_rows, tokens)


@dataclass(frozen=True)
class Context:
    """One activating token in its text window.

    Attributes:
        value: the feature's activation at the token.
        before, token, after: the window's text, the activating token in the middle.
        prompt_index, position: where it is in the cache.
    """

    value: float
    before: str
    token: str
    after: str
    prompt_index: int
    position: int

    def html(self) -> str:
        """The window as HTML with the activating token highlighted."""
        esc = html.escape
        return (f"<span>{esc(self.before)}<b style='background:#fdd835'>{esc(self.token)}</b>{esc(self.after)}</span>"
                f" <small>({self.value:.1f})</small>")


def top_contexts(
    statistics: FeatureStatistics, cache: ActivationCache, tokenizer, feature: int, *, window: int = 8
) -> list[Context]:
    """The top-activating contexts of one feature: token windows from the cache, best first.

    Args:
        statistics: from :func:`feature_statistics` on this cache.
        cache: the cache (its ``token_ids`` / ``prompt_index`` / ``position`` give the text).
        tokenizer: decodes token ids (``labkit.models.tokenizer_of(model)``).
        feature: feature index.
        window: tokens shown on each side.

    Returns:
        Up to ``n`` :class:`Context` objects (fewer if the feature fired less often).

    Raises:
        ValueError: a feature out of range.
    """
    d_sae = statistics.top_rows.shape[0]
    if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < d_sae:
        raise ValueError(f"top_contexts: feature must be an int in 0..{d_sae - 1}, got {feature!r}.")
    out = []
    for value, row in zip(statistics.top_values[feature].tolist(), statistics.top_rows[feature].tolist()):
        if row < 0:
            continue
        prompt = int(cache.prompt_index[row])
        same = (cache.prompt_index == prompt).nonzero().squeeze(-1)
        ids = cache.token_ids[same][cache.position[same].argsort()].tolist()
        position = int(cache.position[row])
        low = max(0, position - window)
        out.append(Context(
            value=float(value), before=tokenizer.decode(ids[low:position]), token=tokenizer.decode([ids[position]]),
            after=tokenizer.decode(ids[position + 1:position + 1 + window]), prompt_index=prompt, position=position,
        ))
    return out


@dataclass(frozen=True)
class FeatureMatches:
    """Features ranked against a direction or a difference.

    Attributes:
        features: feature indices, best first.
        scores: their scores (cosine, or activation difference), same order.
        measure: what ``scores`` are.
    """

    features: list[int]
    scores: list[float]
    measure: str

    def __iter__(self):
        return iter(zip(self.features, self.scores))


def vector_features(sae: SparseAutoencoder, vector: SteeringVector | Tensor, *, n: int = 10, row: int | None = None) -> FeatureMatches:
    """The features whose decoder directions point most along a steering vector (cosine similarity).

    For an ActAdd vector (``(pos, d_model)``) the direction is the sum of its rows (what it adds
    over the front positions; with BOS the first row is zero), or row ``row``.

    Args:
        sae: the SAE.
        vector: a :class:`labkit.SteeringVector` (at the SAE's hook point) or a ``(d_model,)`` tensor.
        n: how many features.
        row: for an ActAdd vector, one row instead of the sum.

    Returns:
        :class:`FeatureMatches` with ``measure="cosine"``, highest cosine first.

    Raises:
        ValueError: a vector at another hook point or of another width, a zero vector, a bad ``n`` / ``row``.
    """
    where = "vector_features"
    n = _check_n(n, where, sae.d_sae)
    if isinstance(vector, SteeringVector):
        if vector.hook_name != sae.hook_name:
            raise ValueError(f"{where}: {vector!r} acts at {vector.hook_name!r}, the SAE reads {sae.hook_name!r}; compare at one hook point.")
        tensor = vector.activations.float()
    elif isinstance(vector, Tensor):
        tensor = vector.float()
    else:
        raise TypeError(f"{where}: vector must be a SteeringVector or a tensor, got {type(vector).__name__}.")
    if tensor.ndim == 2:
        if row is not None and not (isinstance(row, int) and 0 <= row < tensor.shape[0]):
            raise ValueError(f"{where}: row must be an int in 0..{tensor.shape[0] - 1}, got {row!r}.")
        tensor = tensor.sum(0) if row is None else tensor[row]
    if tensor.shape != (sae.d_model,):
        raise ValueError(f"{where}: the vector has shape {tuple(tensor.shape)}, the SAE reads d_model={sae.d_model}.")
    norm = tensor.norm()
    if not bool(norm > 0):
        raise ValueError(f"{where}: the vector is all zeros; it has no direction.")
    cosines = sae.decoder_directions() @ (tensor / norm)
    values, features = cosines.topk(n)
    return FeatureMatches([int(f) for f in features], [float(v) for v in values], "cosine")


def prompt_difference_features(
    model, sae: SparseAutoencoder, prompt_a: str, prompt_b: str, *, n: int = 10, token: str = "last"
) -> FeatureMatches:
    """The features more active on ``prompt_a`` than on ``prompt_b``.

    Args:
        model: a labkit bridge.
        sae: an SAE of the model.
        prompt_a, prompt_b: the two prompts.
        n: how many features.
        token: ``"last"`` (activations at each prompt's last token) or ``"mean"`` (mean over
            tokens past the first).

    Returns:
        :class:`FeatureMatches` with ``measure="activation difference"``, largest ``f(a) − f(b)`` first.

    Raises:
        ValueError: an unknown ``token``, a bad ``n``, what :func:`feature_activations` raises.
    """
    if token not in ("last", "mean"):
        raise ValueError(f"prompt_difference_features: token must be 'last' or 'mean', got {token!r}.")
    n = _check_n(n, "prompt_difference_features", sae.d_sae)

    def summary(prompt: str) -> Tensor:
        acts = feature_activations(model, sae, prompt).activations
        body = acts[1:] if acts.shape[0] > 1 else acts
        return body[-1] if token == "last" else body.mean(0)

    difference = summary(prompt_a) - summary(prompt_b)
    values, features = difference.topk(n)
    return FeatureMatches([int(f) for f in features], [float(v) for v in values], "activation difference")
