"""Live panels for JupyterLab: slide a control, watch the model change.

Two panels, each a thin ipywidgets shell over labkit functions and the tested logic in
:mod:`labkit.live`:

* :class:`SteeringPanel` — a prompt, a hook point, a coefficient slider, the contrast prompts of
  an ActAdd vector (or a loaded :class:`~labkit.steering.SteeringVector`) and the generation
  settings. Any change regenerates: the steered completion streams in token by token beside the
  unsteered one, with the words that differ highlighted.
* :class:`ExpertPanel` — for MoE models: a plotly ``FigureWidget`` heatmap (layer × expert) of an
  :class:`~labkit.moe.ExpertAttribution`; a click on a cell cycles that expert normal → off →
  on; "top-N off" and "random N off" set whole masks. The masked completion streams beside the
  baseline, the behaviour rate on a small evaluation set updates, and the mask exports as JSON.

Both run model work on a :class:`~labkit.live.LatestOnly` worker: a burst of slider moves cancels
stale generations and only the newest request runs to completion; an exception shows in the
panel's error area. Each takes its model and data as arguments, and every labkit call it makes
can be replaced by a keyword argument (a callable), which is how the unit tests drive them.

Users import from here (``labkit`` itself does not import ipywidgets)::

    from labkit.widgets import SteeringPanel
    panel = SteeringPanel(model, layers=range(4, 12))
    panel            # displays in JupyterLab; panel.coefficient.value = 8 drives it from code
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from labkit.backends import backend_of
from labkit.live import LatestOnly, MaskState, TokenStreamer, diff_html, format_error, heatmap_cell
from labkit.storage import file_pair

__all__ = ["ExpertPanel", "SteeringPanel", "SteeringRequest"]

_TEXT_STYLE = (
    "white-space:pre-wrap;font-family:var(--jp-code-font-family,monospace);"
    "border:1px solid var(--jp-border-color1,#ccc);padding:6px;min-height:5em;"
)


def _text_box(title: str, text: str, css_class: str, body_html: str | None = None) -> str:
    body = html.escape(text) if body_html is None else body_html
    return (
        f'<div class="{css_class}-box"><b>{html.escape(title)}</b>'
        f'<div class="{css_class}-text" style="{_TEXT_STYLE}">{body}</div></div>'
    )


# --- default labkit calls (each replaceable by a keyword argument of the panels) ------------


def _labkit_generate(model, prompt: str, *, steering=None, streamer=None, **settings) -> str:
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


def _labkit_actadd(model, plus: str, minus: str, layer: int, hook_point: str):
    from labkit.steering import actadd

    return actadd(model, plus, minus, layer, 1.0, hook_point=hook_point)


def _labkit_with_coefficient(vector, coefficient: float):
    return vector.with_coefficient(coefficient)


def _tokenizer(model):
    from labkit.models import tokenizer_of

    return tokenizer_of(model)


# --- steering panel ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SteeringRequest:
    """A snapshot of the steering panel's controls: everything one regeneration depends on."""

    prompt: str
    layer: int
    hook_point: str
    coefficient: float
    plus: str
    minus: str
    use_loaded_vector: bool
    max_new_tokens: int
    temperature: float
    seed: int

    @property
    def baseline_key(self) -> tuple:
        """What the unsteered completion depends on (it is cached under this key)."""
        return (self.prompt, self.max_new_tokens, self.temperature, self.seed)

    @property
    def vector_key(self) -> tuple:
        """What the unit steering vector depends on (cached under this key)."""
        return ("loaded",) if self.use_loaded_vector else (self.plus, self.minus, self.layer, self.hook_point)

    @property
    def hook(self) -> str:
        """The TransformerLens hook name, e.g. ``"blocks.6.hook_resid_pre"``."""
        return f"blocks.{self.layer}.{self.hook_point}"

    def settings(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "seed": self.seed}


class SteeringPanel:
    """ActAdd steering with a live slider: steered completion streamed beside the unsteered one.

    ActAdd (Turner et al., 2023, *Steering Language Models With Activation Engineering*, §2):
    the steering vector is the difference of the residual stream at ``hook`` between a ``plus``
    and a ``minus`` prompt, added with a ``coefficient`` at every position during generation.
    The panel computes the unit vector once per (plus, minus, hook) and rescales it, so a slider
    move costs one generation; the unsteered completion is cached per prompt and settings.

    Args:
        model: a bridge from :func:`labkit.load_model`.
        layers: layer indices offered by the hook selector (default: every layer).
        hook: the hook kind per layer, ``"hook_resid_pre"`` → ``blocks.{L}.hook_resid_pre``.
        default_layer: layer selected at start (default: about a fifth of the depth, where
            ActAdd steers best on small models).
        default_prompt / default_plus / default_minus / default_coefficient: start values.
        coefficient_range: ``(min, max)`` of the slider.
        vector: a loaded steering vector; offered as the "loaded vector" source and then used
            instead of the contrast prompts (its own hook point applies).
        max_new_tokens / temperature / seed: generation settings (temperature 0 is greedy).
        autorun: generate once at construction (the panel is live at once).
        debounce_s: wait this long for a newer change before generating (0: cancellation only).
        generate: ``generate(model, prompt, *, steering, streamer, max_new_tokens, temperature,
            seed) -> str`` (``steering`` a vector or ``None``); default: the first text of
            :func:`labkit.generation.generate`.
        make_vector: ``make_vector(model, plus, minus, layer, hook_point) -> vector`` at
            coefficient 1; default :func:`labkit.steering.actadd`.
        with_coefficient: ``with_coefficient(vector, c) -> vector``; default
            ``vector.with_coefficient(c)``.

    Attributes:
        coefficient, layer, prompt, plus, minus, source, max_new_tokens, temperature, seed: the
            control widgets (set ``.value`` to drive the panel from code).
        steered_text, baseline_text: the latest completions.
        last_timing: ``{"first_token_s", "total_s", "tokens"}`` of the latest steered
            generation, measured from the control change.
        widget: the root widget (the panel also displays itself).

    Example:
        >>> panel = SteeringPanel(model, layers=range(2, 10))  # doctest: +SKIP
        >>> panel.coefficient.value = 8; panel.wait(); panel.steered_text  # doctest: +SKIP
    """

    def __init__(
        self,
        model,
        *,
        layers: Iterable[int] | None = None,
        hook: str = "hook_resid_pre",
        default_layer: int | None = None,
        default_prompt: str = "I hate you because",
        default_plus: str = " Love",
        default_minus: str = " Hate",
        default_coefficient: float = 5.0,
        coefficient_range: tuple[float, float] = (-20.0, 20.0),
        vector=None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        seed: int = 0,
        autorun: bool = True,
        debounce_s: float = 0.0,
        generate: Callable[..., str] | None = None,
        make_vector: Callable[..., Any] | None = None,
        with_coefficient: Callable[[Any, float], Any] | None = None,
    ) -> None:
        self.model = model
        n_layers = int(model.cfg.n_layers)
        layer_list = list(range(n_layers)) if layers is None else [int(layer) for layer in layers]
        bad = [layer for layer in layer_list if not 0 <= layer < n_layers]
        if not layer_list or bad:
            raise ValueError(
                f"SteeringPanel: layers {bad or layer_list} out of range; the model has {n_layers} "
                f"layers (0..{n_layers - 1}). Pass e.g. layers=range(2, {n_layers})."
            )
        if default_layer is None:
            default_layer = min(layer_list, key=lambda layer: abs(layer - n_layers // 5))
        if default_layer not in layer_list:
            raise ValueError(f"SteeringPanel: default_layer {default_layer} is not in layers {layer_list}.")
        low, high = coefficient_range
        if not low < high:
            raise ValueError(f"SteeringPanel: coefficient_range must be (min, max) with min < max, got {coefficient_range}.")

        self._generate = generate or _labkit_generate
        self._make_vector = make_vector or _labkit_actadd
        self._with_coefficient = with_coefficient or _labkit_with_coefficient
        self._loaded_vector = vector
        self._vectors: dict[tuple, Any] = {}
        self._baselines: dict[tuple, str] = {}
        self.steered_text = ""
        self.baseline_text = ""
        self.last_timing: dict[str, float | int | None] = {}
        self._requested_at = time.perf_counter()

        layout = widgets.Layout(width="auto")
        self.prompt = widgets.Textarea(value=default_prompt, description="prompt", rows=2, layout=widgets.Layout(width="98%"))
        self.layer = widgets.Dropdown(
            options=[(f"blocks.{layer}.{hook}", layer) for layer in layer_list],
            value=default_layer, description="hook",
        )
        self.hook_kind = hook
        self.coefficient = widgets.FloatSlider(
            value=default_coefficient, min=low, max=high, step=0.5, description="coefficient",
            continuous_update=False, readout_format=".1f", layout=widgets.Layout(width="60%"),
        )
        self.coefficient.add_class("labkit-coefficient")
        self.source = widgets.ToggleButtons(
            options=[("contrast prompts", "contrast"), ("loaded vector", "loaded")],
            value="loaded" if vector is not None else "contrast", description="vector",
        )
        if vector is None:
            self.source.disabled = True
        self.plus = widgets.Text(value=default_plus, description="plus", continuous_update=False, layout=layout)
        self.minus = widgets.Text(value=default_minus, description="minus", continuous_update=False, layout=layout)
        self.max_new_tokens = widgets.BoundedIntText(value=max_new_tokens, min=1, max=512, description="new tokens", layout=layout)
        self.temperature = widgets.BoundedFloatText(value=temperature, min=0.0, max=5.0, step=0.1, description="temperature", layout=layout)
        self.seed = widgets.IntText(value=seed, description="seed", layout=layout)
        self.steered_output = widgets.HTML()
        self.steered_output.add_class("labkit-steered")
        self.baseline_output = widgets.HTML()
        self.baseline_output.add_class("labkit-baseline")
        self.status = widgets.HTML()
        self.status.add_class("labkit-status")
        self.error = widgets.HTML()
        self.error.add_class("labkit-error-area")
        self.sweep_output = widgets.HTML()
        self.sweep_output.add_class("labkit-sweep")
        self.sweep_texts: dict[float, str] = {}

        self.widget = widgets.VBox(
            [
                self.prompt,
                widgets.HBox([self.layer, self.coefficient]),
                widgets.HBox([self.source, self.plus, self.minus]),
                widgets.HBox([self.max_new_tokens, self.temperature, self.seed]),
                widgets.HBox(
                    [self.baseline_output, self.steered_output],
                    layout=widgets.Layout(grid_gap="12px"),
                ),
                self.status,
                self.error,
                self.sweep_output,
            ]
        )
        self.widget.add_class("labkit-steering-panel")
        for child in (self.baseline_output, self.steered_output):
            child.layout.width = "50%"
        self._render_outputs(streaming=False)

        self.runner = LatestOnly(on_error=self._show_error, debounce_s=debounce_s, name="labkit-steering")
        for control in (self.prompt, self.layer, self.coefficient, self.source, self.plus, self.minus,
                        self.max_new_tokens, self.temperature, self.seed):
            control.observe(self._on_change, names="value")
        if autorun:
            self.refresh()

    # -- driving ----------------------------------------------------------------------------

    def request(self) -> SteeringRequest:
        """The current control values as a :class:`SteeringRequest`."""
        return SteeringRequest(
            prompt=self.prompt.value,
            layer=int(self.layer.value),
            hook_point=self.hook_kind,
            coefficient=float(self.coefficient.value),
            plus=self.plus.value,
            minus=self.minus.value,
            use_loaded_vector=self.source.value == "loaded",
            max_new_tokens=int(self.max_new_tokens.value),
            temperature=float(self.temperature.value),
            seed=int(self.seed.value),
        )

    def refresh(self) -> int:
        """Regenerate for the current controls (what any control change does); returns the request number."""
        self._requested_at = time.perf_counter()
        return self.runner.submit(self._run, self.request(), self._requested_at)

    def wait(self, timeout: float | None = 120.0) -> bool:
        """Block until the latest request finished; False on timeout."""
        return self.runner.wait(timeout)

    def close(self) -> None:
        """Stop the worker and close the widgets."""
        self.runner.close()
        self.widget.close()

    def _on_change(self, _change) -> None:
        self.refresh()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    # -- work (on the worker thread) --------------------------------------------------------

    def _steering_vector(self, request: SteeringRequest):
        if request.use_loaded_vector:
            unit = self._loaded_vector
        else:
            unit = self._vectors.get(request.vector_key)
            if unit is None:
                unit = self._make_vector(self.model, request.plus, request.minus, request.layer, request.hook_point)
                self._vectors[request.vector_key] = unit
        return self._with_coefficient(unit, request.coefficient)

    def _stream(self, token, request: SteeringRequest, steering, on_text):
        streamer = TokenStreamer(_tokenizer(self.model), on_text, token=token)
        text = self._generate(self.model, request.prompt, steering=steering, streamer=streamer, **request.settings())
        return text, streamer

    def _run(self, token, request: SteeringRequest, requested_at: float) -> None:
        self.error.value = ""
        self.status.value = "<i>generating…</i>"
        vector = self._steering_vector(request)
        token.raise_if_cancelled()

        def show_steered(text: str) -> None:
            self.steered_text = text
            self._render_outputs(streaming=True)

        self.steered_text = ""
        text, streamer = self._stream(token, request, vector, show_steered)
        done = time.perf_counter()
        self.steered_text = text
        self.last_timing = {
            "first_token_s": None if streamer.first_token_at is None else streamer.first_token_at - requested_at,
            "total_s": done - requested_at,
            "tokens": len(streamer.ids),
        }
        baseline = self._baselines.get(request.baseline_key)
        if baseline is None:
            self.baseline_text = ""

            def show_baseline(text: str) -> None:
                self.baseline_text = text
                self._render_outputs(streaming=True)

            baseline, _ = self._stream(token, request, None, show_baseline)
            self._baselines[request.baseline_key] = baseline
        self.baseline_text = baseline
        self._render_outputs(streaming=False)
        timing = self.last_timing
        first = "—" if timing["first_token_s"] is None else f"{timing['first_token_s']:.2f} s"
        self.status.value = (
            f"<small>{html.escape(request.hook)} · coefficient {request.coefficient:+.1f} · first token "
            f"{first} · {timing['tokens']} tokens in {timing['total_s']:.2f} s</small>"
        )

    def sweep(self, coefficients: Iterable[float]) -> dict[float, str]:
        """Complete the panel's prompt at several coefficients in one batched generation.

        The panel's current vector (contrast prompts or loaded vector), prompt and generation
        settings, one batch row per coefficient (``labkit.generate(..., steering_per_row=...)``;
        with greedy decoding each row equals the slider's run at that coefficient). Shown as a
        table under the panel and returned. Runs on the calling thread (no streaming).

        Args:
            coefficients: the coefficients to compare (0 = unsteered).

        Returns:
            ``{coefficient: completion}`` in the order given.

        Raises:
            ValueError: no coefficients, or a non-finite one.
        """
        from labkit.generation import generate

        values = [float(c) for c in coefficients]
        if not values or not all(math.isfinite(c) for c in values):
            raise ValueError(f"SteeringPanel.sweep: need finite coefficients, got {values!r}.")
        request = self.request()
        unit = self._steering_vector(replace(request, coefficient=1.0))
        rows = [None if c == 0 else self._with_coefficient(unit, c) for c in values]
        out = generate(self.model, [request.prompt] * len(values), steering_per_row=rows, **request.settings())
        self.sweep_texts = dict(zip(values, out.texts))
        body = "".join(
            f"<tr><td style='padding-right:8px'><b>{c:+g}</b></td><td>{html.escape(text)}</td></tr>"
            for c, text in self.sweep_texts.items()
        )
        self.sweep_output.value = f"<table class='labkit-sweep-table'>{body}</table>"
        return self.sweep_texts

    def _render_outputs(self, *, streaming: bool) -> None:
        self.baseline_output.value = _text_box("unsteered", self.baseline_text, "labkit-baseline")
        steered_body = None if streaming or not self.baseline_text else diff_html(self.baseline_text, self.steered_text)
        self.steered_output.value = _text_box("steered", self.steered_text, "labkit-steered", steered_body)

    def _show_error(self, error: BaseException) -> None:
        self.status.value = ""
        self.error.value = format_error(error)


# --- expert panel -----------------------------------------------------------------------------


def _labkit_heatmap(attribution, mask):
    from labkit.viz import expert_heatmap

    return expert_heatmap(attribution, mask=mask)


def _labkit_mask_factory(state: MaskState, model):
    from labkit.moe.masking import ExpertEdit, ExpertMask

    edits = tuple(ExpertEdit(layer, expert, mode) for (layer, expert), mode in state.cells)
    return ExpertMask(edits).for_model(model)


def _labkit_masked(model, mask):
    from labkit.moe import masked

    return masked(model, mask)


def _labkit_random_cells(model, n: int, seed: int) -> list[tuple[int, int]]:
    from labkit.moe import ExpertMask

    return ExpertMask.random(model, n, seed).experts("off")


def _labkit_behavior_rate(model, prompts, detector, *, mask, max_new_tokens: int):
    """Greedy completions of ``prompts`` (under ``mask`` unless ``None``) → ``behavior_rate``."""
    import contextlib

    from labkit.evals import behavior_rate
    from labkit.generation import generate

    with contextlib.ExitStack() as stack:
        if mask is not None:
            stack.enter_context(_labkit_masked(model, mask))
        texts = generate(model, list(prompts), max_new_tokens=max_new_tokens).texts
    return behavior_rate(texts, detector)


def _format_rate(rate) -> str:
    """A float or a :class:`labkit.evals.Rate` as ``"93% [85–97%]"``; ``"…"`` while pending."""
    if rate is None:
        return "…"
    if hasattr(rate, "rate"):
        return f"{rate.rate:.0%} [{rate.ci_low:.0%}–{rate.ci_high:.0%}]"
    return f"{float(rate):.0%}"


class ExpertPanel:
    """Switch MoE experts off or on by clicking a heatmap; watch completion and behaviour rate.

    The heatmap shows an expert attribution (e.g. fTRI, *Mixture of Tunable Experts*, 2025, §3:
    how much more often an expert fires on behaviour prompts than on control prompts). A click on
    a cell cycles that expert normal → off → on (:class:`~labkit.live.MaskState`); "top-N off"
    switches off the ``N`` best-scoring experts (``attribution.top(N)``) and "random N off" the
    same number of random ones — the control every masking result needs. Each change
    regenerates the masked completion (streamed) beside the cached baseline and re-measures the
    behaviour rate on ``eval_prompts``.

    Args:
        model: a MoE bridge from :func:`labkit.load_model`.
        attribution: an :class:`~labkit.moe.ExpertAttribution` (``score`` is ``[layer, expert]``,
            ``layers`` the model's layer numbers).
        eval_prompts: a small evaluation set (a few dozen prompts keeps the rate live).
        detector: decides whether a completion shows the behaviour (e.g.
            :class:`~labkit.evals.RefusalDetector`).
        prompt: the prompt whose completion is shown (default: the first eval prompt).
        top_n: start value of the top-N control. random_seed: seed of the random-N control.
        max_new_tokens: tokens per completion (greedy).
        autorun: compute the baseline and the (empty-mask) state at construction.
        generate, heatmap, mask_factory, masked, behavior_rate, random_cells: the labkit calls,
            replaceable: ``heatmap(attribution, mask) -> plotly Figure`` (default
            :func:`labkit.viz.expert_heatmap`); ``mask_factory(state, model) -> ExpertMask``;
            ``masked(model, mask)`` a context manager (:func:`labkit.moe.masked`);
            ``behavior_rate(model, prompts, detector, *, mask, max_new_tokens) -> Rate | float``
            (default: greedy completions scored by :func:`labkit.evals.behavior_rate`);
            ``random_cells(model, n, seed) -> [(layer, expert)]`` (default
            ``ExpertMask.random(model, n, seed)``).

    Attributes:
        state: the current :class:`~labkit.live.MaskState`. mask: the current ``ExpertMask``.
        figure: the ``plotly.graph_objects.FigureWidget``.
        top_n, random_n, prompt: control widgets. mask_label, mask_json: the mask as text/JSON.
        masked_text, baseline_text, masked_rate, baseline_rate: the latest results.
    """

    def __init__(
        self,
        model,
        attribution,
        *,
        eval_prompts: Sequence[str],
        detector,
        prompt: str | None = None,
        top_n: int = 3,
        random_seed: int = 0,
        max_new_tokens: int = 12,
        autorun: bool = True,
        debounce_s: float = 0.0,
        generate: Callable[..., str] | None = None,
        heatmap: Callable[..., Any] | None = None,
        mask_factory: Callable[[MaskState, Any], Any] | None = None,
        masked: Callable[..., Any] | None = None,
        behavior_rate: Callable[..., Any] | None = None,
        random_cells: Callable[[Any, int, int], list[tuple[int, int]]] | None = None,
    ) -> None:
        import plotly.graph_objects as go

        eval_prompts = list(eval_prompts)
        if not eval_prompts and prompt is None:
            raise ValueError("ExpertPanel: eval_prompts is empty; pass a few prompts (and/or prompt=...).")
        self.model = model
        self.attribution = attribution
        self.eval_prompts = eval_prompts
        self.detector = detector
        self.max_new_tokens = int(max_new_tokens)
        self._generate = generate or _labkit_generate
        self._heatmap = heatmap or _labkit_heatmap
        self._mask_factory = mask_factory or _labkit_mask_factory
        self._masked = masked or _labkit_masked
        self._behavior_rate = behavior_rate or _labkit_behavior_rate
        self._random_cells = random_cells or _labkit_random_cells
        self._random_seed = int(random_seed)
        self._random_clicks = 0

        self.state = MaskState(tuple(int(layer) for layer in attribution.layers), int(attribution.n_experts))
        self.mask = self._mask_factory(self.state, model)
        self.masked_text = self.baseline_text = ""
        self.masked_rate = None
        self.baseline_rate = None
        self._baseline_for: str | None = None

        n_cells = len(self.state.layers) * self.state.n_experts
        self.figure = go.FigureWidget(self._heatmap(attribution, self.mask))
        self.figure.add_class("labkit-heatmap")
        self._connect_clicks()
        self.prompt = widgets.Text(value=prompt if prompt is not None else eval_prompts[0], description="prompt",
                                   continuous_update=False, layout=widgets.Layout(width="98%"))
        self.top_n = widgets.BoundedIntText(value=min(top_n, n_cells), min=0, max=n_cells, description="N",
                                            layout=widgets.Layout(width="150px"))
        self.top_button = widgets.Button(description="top-N off", tooltip="switch off the N best-scoring experts")
        self.random_button = widgets.Button(description="random N off", tooltip="switch off N random experts (control)")
        self.clear_button = widgets.Button(description="clear mask")
        self.export_button = widgets.Button(description="export JSON", tooltip="write the mask to the path beside")
        self.export_path = widgets.Text(value="artifacts/expert_mask.json", description="path")
        self.mask_label = widgets.HTML()
        self.mask_label.add_class("labkit-mask-label")
        self.mask_json = widgets.Textarea(rows=4, layout=widgets.Layout(width="98%"))
        self.mask_json.add_class("labkit-mask-json")
        self.masked_output = widgets.HTML()
        self.masked_output.add_class("labkit-masked")
        self.baseline_output = widgets.HTML()
        self.baseline_output.add_class("labkit-expert-baseline")
        self.rate = widgets.HTML()
        self.rate.add_class("labkit-rate")
        self.error = widgets.HTML()
        self.error.add_class("labkit-error-area")

        self.top_button.on_click(lambda _button: self.switch_off_top(self.top_n.value))
        self.random_button.on_click(lambda _button: self.switch_off_random(self.top_n.value))
        self.clear_button.on_click(lambda _button: self.set_state(self.state.cleared()))
        self.export_button.on_click(lambda _button: self.export(self.export_path.value))
        self.prompt.observe(lambda _change: self.refresh(), names="value")

        self.widget = widgets.VBox(
            [
                self.figure,
                widgets.HBox([self.top_n, self.top_button, self.random_button, self.clear_button]),
                self.mask_label,
                self.prompt,
                widgets.HBox([self.baseline_output, self.masked_output]),
                self.rate,
                widgets.HBox([self.export_button, self.export_path]),
                self.mask_json,
                self.error,
            ]
        )
        self.widget.add_class("labkit-expert-panel")
        for child in (self.baseline_output, self.masked_output):
            child.layout.width = "50%"
        self.runner = LatestOnly(on_error=self._show_error, debounce_s=debounce_s, name="labkit-experts")
        self._show_state()
        if autorun:
            self.refresh()

    # -- driving ----------------------------------------------------------------------------

    def click(self, layer: int, expert: int) -> MaskState:
        """Cycle one expert normal → off → on → normal, as a click on its cell does."""
        return self.set_state(self.state.cycle(layer, expert))

    def switch_off_top(self, n: int) -> MaskState:
        """Switch off the ``n`` best-scoring experts (all others normal)."""
        return self.set_state(self.state.cleared().with_states(self.attribution.top(int(n)), "off"))

    def switch_off_random(self, n: int) -> MaskState:
        """Switch off ``n`` experts drawn at random (a new draw per click; seeded)."""
        self._random_clicks += 1
        cells = self._random_cells(self.model, int(n), self._random_seed + self._random_clicks)
        return self.set_state(self.state.cleared().with_states(cells, "off"))

    def set_state(self, state: MaskState) -> MaskState:
        """Show a new mask state and regenerate under it."""
        self.state = state
        self.mask = self._mask_factory(state, self.model)
        self._show_state()
        self.refresh()
        return state

    def export(self, path: str | Path) -> Path:
        """Write the current mask's ``to_dict()`` JSON to ``<stem>.json`` (what :meth:`ExpertMask.save`
        writes, so :meth:`ExpertMask.load` reads it back); return the path written."""
        path = file_pair(path)[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.mask_json.value + "\n")
        self.mask_label.value = self.mask_label.value + f" <small>(saved to {html.escape(str(path))})</small>"
        return path

    def refresh(self) -> int:
        """Regenerate the masked completion and rate for the current state."""
        return self.runner.submit(self._run, self.mask, self.prompt.value)

    def wait(self, timeout: float | None = 120.0) -> bool:
        return self.runner.wait(timeout)

    def close(self) -> None:
        self.runner.close()
        self.widget.close()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    # -- display ----------------------------------------------------------------------------

    def _connect_clicks(self) -> None:
        for trace in self.figure.data:
            trace.on_click(self._on_click)

    def _on_click(self, trace, points, _state) -> None:
        if not points.xs:
            return  # plotly dispatches every click to every trace; only the clicked one has points
        try:
            # Marker traces drawn over the heatmap (significance, mask) share its axes: read the
            # clicked cell off the heatmap trace's own x / y, whichever trace took the click.
            grid = next((t for t in self.figure.data if t.type == "heatmap"), trace)
            row, expert = heatmap_cell(grid.x, grid.y, points.xs[0], points.ys[0])
            self.click(self.state.layers[row], expert)
        except Exception as error:  # noqa: BLE001 - a click handler's error would only reach the log
            self._show_error(error)

    def _show_state(self) -> None:
        self.mask_label.value = f"<b>{html.escape(self.state.label())}</b>"
        self.mask_json.value = json.dumps(self.mask.to_dict(), indent=1, sort_keys=True)
        new = self._heatmap(self.attribution, self.mask)
        with self.figure.batch_update():
            if len(new.data) == len(self.figure.data):
                for old_trace, new_trace in zip(self.figure.data, new.data):
                    old_trace.update(new_trace.to_plotly_json(), overwrite=True)
            else:
                self.figure.data = []
                self.figure.add_traces(list(new.data))
                self._connect_clicks()

    # -- work (on the worker thread) --------------------------------------------------------

    def _run(self, token, mask, prompt: str) -> None:
        self.error.value = ""
        tokenizer = _tokenizer(self.model)
        settings = {"max_new_tokens": self.max_new_tokens, "temperature": 0.0, "seed": 0}
        if self._baseline_for != prompt:
            streamer = TokenStreamer(tokenizer, self._live("baseline"), token=token)
            self.baseline_text = self._generate(self.model, prompt, steering=None, streamer=streamer, **settings)
            self._baseline_for = prompt
        if self.baseline_rate is None and self.eval_prompts:
            self.baseline_rate = self._behavior_rate(self.model, self.eval_prompts, self.detector, mask=None,
                                                     max_new_tokens=self.max_new_tokens)
        token.raise_if_cancelled()
        self.masked_text, self.masked_rate = "", None
        self._render()
        with self._masked(self.model, mask):
            streamer = TokenStreamer(tokenizer, self._live("masked"), token=token)
            self.masked_text = self._generate(self.model, prompt, steering=None, streamer=streamer, **settings)
            token.raise_if_cancelled()
        if self.eval_prompts:
            self.masked_rate = self._behavior_rate(self.model, self.eval_prompts, self.detector, mask=mask,
                                                   max_new_tokens=self.max_new_tokens)
        token.raise_if_cancelled()
        self._render()

    def _live(self, which: str) -> Callable[[str], None]:
        def show(text: str) -> None:
            setattr(self, f"{which}_text", text)
            self._render()

        return show

    def _render(self) -> None:
        self.baseline_output.value = _text_box("baseline", self.baseline_text, "labkit-expert-baseline")
        self.masked_output.value = _text_box("masked", self.masked_text, "labkit-masked")

        self.rate.value = (
            f"behaviour rate on {len(self.eval_prompts)} prompts: baseline <b>{_format_rate(self.baseline_rate)}</b>"
            f" → masked <b>{_format_rate(self.masked_rate)}</b>"
        )

    def _show_error(self, error: BaseException) -> None:
        self.error.value = format_error(error)
