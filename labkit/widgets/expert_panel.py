"""The expert panel: click a layer x expert heatmap to switch MoE experts off or on; watch completion and rate.

See :mod:`labkit.widgets` for how the panels run (a :class:`~labkit.live.LatestOnly` worker) and
:mod:`labkit.widgets.defaults` for the labkit calls it makes.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from labkit.live import LatestOnly, MaskState, TokenStreamer, format_error, heatmap_cell
from labkit.storage import file_pair
from labkit.widgets import defaults
from labkit.widgets.text_boxes import format_rate, text_box

__all__ = ["ExpertPanel"]


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
        eval_prompts = list(eval_prompts)
        if not eval_prompts and prompt is None:
            raise ValueError("ExpertPanel: eval_prompts is empty; pass a few prompts (and/or prompt=...).")
        self.model = model
        self.attribution = attribution
        self.eval_prompts = eval_prompts
        self.detector = detector
        self.max_new_tokens = int(max_new_tokens)
        self._generate = generate or defaults.generate_text
        self._heatmap = heatmap or defaults.heatmap
        self._mask_factory = mask_factory or defaults.mask_from_state
        self._masked = masked or defaults.masked
        self._behavior_rate = behavior_rate or defaults.behavior_rate
        self._random_cells = random_cells or defaults.random_cells
        self._random_seed = int(random_seed)
        self._random_clicks = 0

        self.state = MaskState(tuple(int(layer) for layer in attribution.layers), int(attribution.n_experts))
        self.mask = self._mask_factory(self.state, model)
        self.masked_text = self.baseline_text = ""
        self.masked_rate = None
        self.baseline_rate = None
        self._baseline_for: str | None = None

        self._build_figure()
        self._build_controls(prompt if prompt is not None else eval_prompts[0], top_n)
        self._build_outputs()
        self.widget = self._layout()
        self.runner = LatestOnly(on_error=self._show_error, debounce_s=debounce_s, name="labkit-experts")
        self._show_state()
        if autorun:
            self.refresh()

    # -- construction -----------------------------------------------------------------------

    def _build_figure(self) -> None:
        """The clickable heatmap of the attribution with the current mask drawn over it."""
        import plotly.graph_objects as go

        self.figure = go.FigureWidget(self._heatmap(self.attribution, self.mask))
        self.figure.add_class("labkit-heatmap")
        self._connect_clicks()

    def _build_controls(self, prompt: str, top_n: int) -> None:
        """The prompt box, the N box and the mask buttons, wired to the panel's methods."""
        n_cells = len(self.state.layers) * self.state.n_experts
        self.prompt = widgets.Text(value=prompt, description="prompt",
                                   continuous_update=False, layout=widgets.Layout(width="98%"))
        self.top_n = widgets.BoundedIntText(value=min(top_n, n_cells), min=0, max=n_cells, description="N",
                                            layout=widgets.Layout(width="150px"))
        self.top_button = widgets.Button(description="top-N off", tooltip="switch off the N best-scoring experts")
        self.random_button = widgets.Button(description="random N off", tooltip="switch off N random experts (control)")
        self.clear_button = widgets.Button(description="clear mask")
        self.export_button = widgets.Button(description="export JSON", tooltip="write the mask to the path beside")
        self.export_path = widgets.Text(value="artifacts/expert_mask.json", description="path")
        self.top_button.on_click(lambda _button: self.switch_off_top(self.top_n.value))
        self.random_button.on_click(lambda _button: self.switch_off_random(self.top_n.value))
        self.clear_button.on_click(lambda _button: self.set_state(self.state.cleared()))
        self.export_button.on_click(lambda _button: self.export(self.export_path.value))
        self.prompt.observe(lambda _change: self.refresh(), names="value")

    def _build_outputs(self) -> None:
        """The mask label and JSON, the two completions, the rate line and the error area (with CSS classes)."""
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

    def _layout(self):
        """The root widget: heatmap, mask controls, the two completions, rate, export, errors."""
        widget = widgets.VBox(
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
        widget.add_class("labkit-expert-panel")
        for child in (self.baseline_output, self.masked_output):
            child.layout.width = "50%"
        return widget

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
        tokenizer = defaults.tokenizer(self.model)
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
        self.baseline_output.value = text_box("baseline", self.baseline_text, "labkit-expert-baseline")
        self.masked_output.value = text_box("masked", self.masked_text, "labkit-masked")

        self.rate.value = (
            f"behaviour rate on {len(self.eval_prompts)} prompts: baseline <b>{format_rate(self.baseline_rate)}</b>"
            f" → masked <b>{format_rate(self.masked_rate)}</b>"
        )

    def _show_error(self, error: BaseException) -> None:
        self.error.value = format_error(error)
