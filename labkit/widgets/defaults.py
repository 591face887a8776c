"""The labkit calls the panels make by default; each is replaceable by a keyword argument of its panel.

:class:`~labkit.widgets.SteeringPanel` takes ``generate``, ``make_vector`` and ``with_coefficient``;
:class:`~labkit.widgets.ExpertPanel` takes ``generate``, ``heatmap``, ``mask_factory``, ``masked``,
``behavior_rate`` and ``random_cells``. Each default here imports the labkit function it calls
when it runs, so the panels import without loading a model stack (the unit tests pass fakes).
The panels look up :func:`tokenizer` through this module, so a test may replace it here.
"""

from __future__ import annotations

import contextlib

from labkit.backends import backend_of
from labkit.live import MaskState

__all__ = [
    "actadd_vector", "behavior_rate", "generate_text", "heatmap", "mask_from_state", "masked", "random_cells", "tokenizer",
    "with_coefficient",
]


def generate_text(model, prompt: str, *, steering=None, streamer=None, **settings) -> str:
    """The first completion of :func:`labkit.generation.generate` for one prompt, streamed into ``streamer``."""
    from labkit.generation import generate

    if streamer is not None and not backend_of(model).supports("stream"):
        # An engine (vLLM) returns whole completions: replay the tokens into the streamer, so the
        # panel shows the same text and counts the same tokens (the first token arrives with the
        # last; the status line's "first token" is then the whole generation's time).
        out = generate(model, [prompt], steering=steering, **settings)
        streamer.put(out.prompt_token_ids[0])
        for token_id in out.token_ids[0]:
            streamer.put([token_id])
        streamer.end()
        return out.texts[0]
    return generate(model, [prompt], steering=steering, streamer=streamer, **settings).texts[0]


def actadd_vector(model, plus: str, minus: str, layer: int, hook_point: str):
    """The ActAdd vector of ``plus`` minus ``minus`` at ``blocks.{layer}.{hook_point}``, coefficient 1."""
    from labkit.steering import actadd

    return actadd(model, plus, minus, layer, 1.0, hook_point=hook_point)


def with_coefficient(vector, coefficient: float):
    """The vector rescaled to ``coefficient``."""
    return vector.with_coefficient(coefficient)


def tokenizer(model):
    """The model's tokenizer (for streaming token ids as text)."""
    from labkit.models import tokenizer_of

    return tokenizer_of(model)


def heatmap(attribution, mask):
    """:func:`labkit.viz.expert_heatmap` of the attribution with the mask drawn over it."""
    from labkit.viz import expert_heatmap

    return expert_heatmap(attribution, mask=mask)


def mask_from_state(state: MaskState, model):
    """The :class:`~labkit.moe.ExpertMask` of a panel's cell states, fitted to the model."""
    from labkit.moe.masking import ExpertEdit, ExpertMask

    edits = tuple(ExpertEdit(layer, expert, mode) for (layer, expert), mode in state.cells)
    return ExpertMask(edits).for_model(model)


def masked(model, mask):
    """:func:`labkit.moe.masked` (a context manager)."""
    from labkit.moe import masked as open_mask

    return open_mask(model, mask)


def random_cells(model, n: int, seed: int) -> list[tuple[int, int]]:
    """``n`` random ``(layer, expert)`` cells of the model (:meth:`ExpertMask.random`)."""
    from labkit.moe import ExpertMask

    return ExpertMask.random(model, n, seed).experts("off")


def behavior_rate(model, prompts, detector, *, mask, max_new_tokens: int):
    """Greedy completions of ``prompts`` (under ``mask`` unless ``None``) → ``behavior_rate``."""
    from labkit.evals import behavior_rate as rate_of
    from labkit.generation import generate

    with contextlib.ExitStack() as stack:
        if mask is not None:
            stack.enter_context(masked(model, mask))
        texts = generate(model, list(prompts), max_new_tokens=max_new_tokens).texts
    return rate_of(texts, detector)
