"""The steering panel: an ActAdd coefficient slider, the steered completion streamed beside the unsteered one.

See :mod:`labkit.widgets` for how the panels run (a :class:`~labkit.live.LatestOnly` worker) and
:mod:`labkit.widgets.defaults` for the labkit calls it makes.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import ipywidgets as widgets

from labkit.live import LatestOnly, TokenStreamer, diff_html, format_error
from labkit.widgets import defaults
from labkit.widgets.text_boxes import text_box

__all__ = ["SteeringPanel", "SteeringRequest", "panel_layers"]


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


def panel_layers(n_layers: int, layers: Iterable[int] | None, default_layer: int | None) -> tuple[list[int], int]:
    """The layers a steering panel offers and the one it starts on (default: about a fifth of the depth).

    Raises:
        ValueError: no layers, a layer outside ``0..n_layers-1``, or a ``default_layer`` not offered.
    """
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
    return layer_list, default_layer


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
        layer_list, default_layer = panel_layers(int(model.cfg.n_layers), layers, default_layer)
        low, high = coefficient_range
        if not low < high:
            raise ValueError(f"SteeringPanel: coefficient_range must be (min, max) with min < max, got {coefficient_range}.")

        self._generate = generate or defaults.generate_text
        self._make_vector = make_vector or defaults.actadd_vector
        self._with_coefficient = with_coefficient or defaults.with_coefficient
        self._loaded_vector = vector
        self._vectors: dict[tuple, Any] = {}
        self._baselines: dict[tuple, str] = {}
        self.steered_text = ""
        self.baseline_text = ""
        self.last_timing: dict[str, float | int | None] = {}
        self._requested_at = time.perf_counter()
        self.sweep_texts: dict[float, str] = {}

        start = SteeringRequest(
            prompt=default_prompt, layer=default_layer, hook_point=hook, coefficient=default_coefficient,
            plus=default_plus, minus=default_minus, use_loaded_vector=vector is not None,
            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
        )
        self._build_controls(start, layer_list, (low, high))
        self._build_outputs()
        self.widget = self._layout()
        self._render_outputs(streaming=False)

        self.runner = LatestOnly(on_error=self._show_error, debounce_s=debounce_s, name="labkit-steering")
        for control in (self.prompt, self.layer, self.coefficient, self.source, self.plus, self.minus,
                        self.max_new_tokens, self.temperature, self.seed):
            control.observe(self._on_change, names="value")
        if autorun:
            self.refresh()

    # -- construction -----------------------------------------------------------------------

    def _build_controls(self, start: SteeringRequest, layer_list: list[int], coefficient_range: tuple[float, float]) -> None:
        """The input widgets, set to ``start``; the source toggle is disabled without a loaded vector."""
        layout = widgets.Layout(width="auto")
        low, high = coefficient_range
        self.prompt = widgets.Textarea(value=start.prompt, description="prompt", rows=2, layout=widgets.Layout(width="98%"))
        self.layer = widgets.Dropdown(
            options=[(f"blocks.{layer}.{start.hook_point}", layer) for layer in layer_list],
            value=start.layer, description="hook",
        )
        self.hook_kind = start.hook_point
        self.coefficient = widgets.FloatSlider(
            value=start.coefficient, min=low, max=high, step=0.5, description="coefficient",
            continuous_update=False, readout_format=".1f", layout=widgets.Layout(width="60%"),
        )
        self.coefficient.add_class("labkit-coefficient")
        self.source = widgets.ToggleButtons(
            options=[("contrast prompts", "contrast"), ("loaded vector", "loaded")],
            value="loaded" if start.use_loaded_vector else "contrast", description="vector",
        )
        if not start.use_loaded_vector:
            self.source.disabled = True
        self.plus = widgets.Text(value=start.plus, description="plus", continuous_update=False, layout=layout)
        self.minus = widgets.Text(value=start.minus, description="minus", continuous_update=False, layout=layout)
        self.max_new_tokens = widgets.BoundedIntText(value=start.max_new_tokens, min=1, max=512, description="new tokens", layout=layout)
        self.temperature = widgets.BoundedFloatText(value=start.temperature, min=0.0, max=5.0, step=0.1, description="temperature", layout=layout)
        self.seed = widgets.IntText(value=start.seed, description="seed", layout=layout)

    def _build_outputs(self) -> None:
        """The output areas, each with the CSS class the browser test finds it by."""
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

    def _layout(self):
        """The root widget: controls on top, the two completions side by side, then status and errors."""
        widget = widgets.VBox(
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
        widget.add_class("labkit-steering-panel")
        for child in (self.baseline_output, self.steered_output):
            child.layout.width = "50%"
        return widget

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
        streamer = TokenStreamer(defaults.tokenizer(self.model), on_text, token=token)
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
        self.baseline_output.value = text_box("unsteered", self.baseline_text, "labkit-baseline")
        steered_body = None if streaming or not self.baseline_text else diff_html(self.baseline_text, self.steered_text)
        self.steered_output.value = text_box("steered", self.steered_text, "labkit-steered", steered_body)

    def _show_error(self, error: BaseException) -> None:
        self.status.value = ""
        self.error.value = format_error(error)


