"""labkit.live (the panels' logic) and labkit.widgets (the panels), without a browser.

The panels are driven the way a user drives them — by setting control values and by the exact
message plotly's frontend sends on a click — with fake model calls where the model does not
matter and a tiny random Llama where it does.
"""

from __future__ import annotations

import html
import json
import threading
import time
from types import SimpleNamespace

import pytest
import torch

import labkit

from labkit.live import (
    CancelToken,
    GenerationCancelled,
    LatestOnly,
    MaskState,
    TokenStreamer,
    diff_html,
    format_error,
    heatmap_cell,
    word_diff,
)

# --- LatestOnly ---------------------------------------------------------------------------


def test_latest_only_runs_only_the_newest_request_to_completion():
    started, finished = [], []
    gate = threading.Event()

    def job(token: CancelToken, value: int) -> None:
        started.append(value)
        gate.wait(5)  # the first job blocks until the burst is submitted
        for _ in range(50):
            token.raise_if_cancelled()
            time.sleep(0.001)
        finished.append(value)

    runner = LatestOnly()
    sequences = [runner.submit(job, value) for value in range(20)]
    gate.set()
    assert runner.wait(10)
    runner.close()
    assert finished == [19]
    assert runner.completed == [sequences[-1]]
    assert len(started) <= 2  # the one cancelled mid-run and the latest; never a queue of 20
    assert sorted(runner.cancelled + runner.completed) == sequences


def test_latest_only_reports_errors_and_keeps_working():
    errors = []
    runner = LatestOnly(on_error=errors.append)

    def fail(_token):
        raise ValueError("bad coefficient")

    runner.submit(fail)
    assert runner.wait(5)
    assert isinstance(errors[0], ValueError) and isinstance(runner.last_error, ValueError)
    results = []
    runner.submit(lambda _token: results.append("ok"))
    assert runner.wait(5)
    runner.close()
    assert results == ["ok"] and runner.last_error is None


def test_latest_only_debounce_coalesces_a_burst():
    ran = []
    runner = LatestOnly(debounce_s=0.05)
    for value in range(5):
        runner.submit(lambda _token, v: ran.append(v), value)
    assert runner.wait(5)
    runner.close()
    assert ran == [4]
    with pytest.raises(RuntimeError, match="closed"):
        runner.submit(lambda _token: None)
    with pytest.raises(ValueError, match="debounce_s"):
        LatestOnly(debounce_s=-1)


def test_format_error_escapes_and_names_the_exception():
    try:
        raise KeyError("<layer>")
    except KeyError as error:
        shown = format_error(error)
    assert "KeyError" in shown and "&lt;layer&gt;" in shown and "<layer>" not in shown


# --- TokenStreamer ------------------------------------------------------------------------


class _Tokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


def test_token_streamer_skips_prompt_decodes_and_times():
    seen = []
    streamer = TokenStreamer(_Tokenizer(), seen.append)
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt
    assert seen == [] and streamer.first_token_at is None
    streamer.put(torch.tensor([7]))
    streamer.put(torch.tensor([8]))
    streamer.end()
    assert seen == ["<7>", "<7><8>"] and streamer.ids == [7, 8]
    assert streamer.time_to_first_token is not None and streamer.ended_at is not None
    with pytest.raises(ValueError, match="one sequence"):
        streamer.put(torch.tensor([1, 2]))


def test_token_streamer_cancels_generation(tiny_llama):
    from labkit.generation import generate

    token = CancelToken()
    count = []

    def on_text(_text):
        count.append(1)
        if len(count) == 3:
            token.cancel()

    streamer = TokenStreamer(tiny_llama.tokenizer, on_text, token=token)
    with pytest.raises(GenerationCancelled):
        generate(tiny_llama, ["the cat sat"], max_new_tokens=20, streamer=streamer)
    assert len(streamer.ids) == 3


# --- MaskState ------------------------------------------------------------------------------


def test_mask_state_cycles_normal_off_on_normal():
    state = MaskState(layers=(1, 2), n_experts=4)
    assert state.state(2, 3) == "normal"
    state = state.cycle(2, 3)
    assert state.off == [(2, 3)] and state.grid() == [[0, 0, 0, 0], [0, 0, 0, 1]]
    state = state.cycle(2, 3)
    assert state.on == [(2, 3)] and state.off == [] and state.grid()[1][3] == 2
    assert state.cycle(2, 3).cells == ()
    assert "1 on" in state.label() and "L2E3" in state.label()


def test_mask_state_transforms_return_new_objects_and_validate():
    state = MaskState(layers=(0, 1), n_experts=4).with_states([(0, 1), (1, 2)], "off")
    assert state.off == [(0, 1), (1, 2)]
    assert state.cleared().cells == () and state.off == [(0, 1), (1, 2)]
    with pytest.raises(ValueError, match=r"expert 4 out of range.*0\.\.3"):
        state.cycle(0, 4)
    with pytest.raises(ValueError, match="layer 5 is not shown"):
        state.cycle(5, 0)
    with pytest.raises(ValueError, match="allowed"):
        MaskState((0,), 2, (((0, 1), "normal"),))


def test_mask_state_to_expert_mask_uses_the_factory():
    state = MaskState((0, 1), 4).cycle(0, 1).cycle(1, 0).cycle(1, 0)
    assert state.to_expert_mask(lambda **cells: cells) == {"off": [(0, 1)], "on": [(1, 0)]}


def test_heatmap_cell_reads_indices_and_labels():
    assert heatmap_cell(None, None, 3, 1) == (1, 3)
    assert heatmap_cell(["E0", "E1"], ["L4", "L5"], "E1", "L5") == (1, 1)
    assert heatmap_cell([0, 1, 2], [4, 5], 2.0, 5) == (1, 2)
    with pytest.raises(ValueError, match="not among"):
        heatmap_cell(None, ["L4"], 0, "L9")


# --- diff -----------------------------------------------------------------------------------


def test_word_diff_rejoins_both_texts():
    before, after = "I hate you because you are mean", "I love you because you are  kind!"
    pieces = word_diff(before, after)
    assert "".join(t for op, t in pieces if op != "removed") == after
    assert "".join(t for op, t in pieces if op != "added") == before
    assert ("removed", "hate") in pieces and ("added", "love") in pieces


def test_diff_html_marks_added_words_and_escapes():
    shown = diff_html("a <b> c", "a <b> d")
    assert shown == 'a &lt;b&gt; <mark class="labkit-added">d</mark>'
    assert diff_html("same", "same") == "same"


# --- SteeringPanel ----------------------------------------------------------------------------


class _FakeVector(SimpleNamespace):
    def with_coefficient(self, coefficient):
        return _FakeVector(**{**vars(self), "coefficient": coefficient})


def _fake_generate(delay: float = 0.0, fail_at: float | None = None):
    """A generate() that streams words describing the steering it got."""
    calls = []

    def generate(model, prompt, *, steering, streamer, max_new_tokens, temperature, seed):
        calls.append(steering)
        if steering is not None and steering.coefficient == fail_at:
            raise RuntimeError("generation exploded")
        words = ["plain"] if steering is None else [f"c={steering.coefficient:g}", steering.plus]
        streamer.put(torch.tensor([[0]]))
        ids = []
        for _ in range(max_new_tokens):
            for word in words:
                time.sleep(delay)
                ids.append(word)
                streamer.put(torch.tensor([len(ids)]))
        streamer.end()
        return " ".join(ids)

    return generate, calls


@pytest.fixture()
def fake_tokenizer(monkeypatch):
    import labkit.widgets.defaults

    monkeypatch.setattr(labkit.widgets.defaults, "tokenizer", lambda model: _Tokenizer())


def _steering_panel(generate, **kwargs):
    from labkit.widgets import SteeringPanel

    vectors = []

    def make_vector(model, plus, minus, layer, hook_point):
        vectors.append((plus, minus, layer, hook_point))
        return _FakeVector(plus=plus, coefficient=1.0)

    model = SimpleNamespace(cfg=SimpleNamespace(n_layers=6))
    panel = SteeringPanel(model, generate=generate, make_vector=make_vector, max_new_tokens=3, **kwargs)
    return panel, vectors


def test_steering_panel_regenerates_on_slider_and_caches(fake_tokenizer):
    generate, calls = _fake_generate()
    panel, vectors = _steering_panel(generate, layers=range(1, 5))
    assert panel.wait(10)
    assert panel.steered_text.startswith("c=5") and panel.baseline_text.startswith("plain")
    assert panel.layer.value == 1  # closest to n_layers // 5 among the offered layers
    assert "labkit-added" in panel.steered_output.value  # diff highlighting after the run
    panel.coefficient.value = 8.0
    assert panel.wait(10)
    assert panel.steered_text.startswith("c=8")
    assert len(vectors) == 1  # the unit vector is reused across coefficients
    assert sum(steering is None for steering in calls) == 1  # the baseline is cached
    assert panel.last_timing["tokens"] == 6 and panel.last_timing["first_token_s"] <= panel.last_timing["total_s"]
    panel.plus.value = " Joy"
    assert panel.wait(10)
    assert len(vectors) == 2 and "Joy" in panel.steered_text
    assert panel.request().hook == "blocks.1.hook_resid_pre"
    panel.close()


def test_steering_panel_slider_burst_runs_latest_only(fake_tokenizer):
    generate, calls = _fake_generate(delay=0.01)
    panel, _ = _steering_panel(generate, autorun=False)
    for value in range(1, 16):
        panel.coefficient.value = float(value)
    assert panel.wait(20)
    assert panel.steered_text.startswith("c=15")
    assert panel.runner.completed == [panel.runner.completed[-1]]  # exactly one ran to the end
    assert len([c for c in calls if c is not None]) <= 3
    panel.close()


def test_steering_panel_shows_errors_in_the_panel(fake_tokenizer):
    generate, _ = _fake_generate(fail_at=-3.0)
    panel, _ = _steering_panel(generate)
    assert panel.wait(10) and panel.error.value == ""
    panel.coefficient.value = -3.0
    assert panel.wait(10)
    assert "RuntimeError" in panel.error.value and "generation exploded" in panel.error.value
    panel.coefficient.value = 2.0
    assert panel.wait(10)
    assert panel.error.value == "" and panel.steered_text.startswith("c=2")
    panel.close()


def test_steering_panel_validates_layers():
    from labkit.widgets import SteeringPanel

    model = SimpleNamespace(cfg=SimpleNamespace(n_layers=4))
    with pytest.raises(ValueError, match=r"4 layers \(0\.\.3\)"):
        SteeringPanel(model, layers=[2, 9], autorun=False)


def test_steering_panel_on_a_real_model_changes_text(tiny_llama):
    from labkit.widgets import SteeringPanel

    panel = SteeringPanel(tiny_llama, default_prompt="the cat sat", default_plus=" love", default_minus=" hate",
                          default_coefficient=0.0, max_new_tokens=6)
    assert panel.wait(60), panel.error.value
    assert panel.error.value == ""
    assert panel.steered_text == panel.baseline_text  # coefficient 0 changes nothing
    panel.coefficient.value = 20.0
    assert panel.wait(60) and panel.error.value == ""
    assert panel.steered_text != panel.baseline_text
    assert panel.last_timing["tokens"] >= 1
    panel.close()


# --- ExpertPanel ------------------------------------------------------------------------------


class _FakeAttribution(SimpleNamespace):
    def top(self, n):
        order = sorted(((-self.score[r][e], r, e) for r in range(len(self.layers)) for e in range(self.n_experts)))
        return [(self.layers[r], e) for _, r, e in order[:n]]


class _FakeMask(SimpleNamespace):
    def to_dict(self):
        return {"kind": "fake", "off": [list(c) for c in self.off], "on": [list(c) for c in self.on]}


def _expert_panel(**kwargs):
    import plotly.graph_objects as go

    from labkit.widgets import ExpertPanel

    attribution = _FakeAttribution(layers=(0, 2), n_experts=3, score=[[0.1, 0.9, 0.2], [0.5, 0.0, 0.7]],
                                   model_name="fake")
    masks_applied = []

    class masked:
        def __init__(self, model, mask):
            self.mask = mask

        def __enter__(self):
            masks_applied.append(self.mask)

        def __exit__(self, *exc):
            return False

    def generate(model, prompt, *, steering, streamer, **settings):
        streamer.put(torch.tensor([[0]]))
        off = masks_applied[-1].off if masks_applied and threading.current_thread().name == "labkit-experts" else []
        text = f"{prompt}:{len(off)}"
        streamer.put(torch.tensor([1]))
        return text

    def rate(model, prompts, detector, *, mask, max_new_tokens):
        return 1.0 if mask is None else 1.0 - 0.25 * len(mask.off)

    def heatmap(attribution, mask):
        grid = MaskState(attribution.layers, attribution.n_experts, tuple(
            [(tuple(c), "off") for c in mask.off] + [(tuple(c), "on") for c in mask.on])).grid()
        return go.Figure([go.Heatmap(z=attribution.score), go.Heatmap(z=grid, opacity=0.3)])

    panel = ExpertPanel(
        None, attribution, eval_prompts=["p1", "p2"], detector=None, generate=generate, heatmap=heatmap,
        mask_factory=lambda state, model: _FakeMask(off=state.off, on=state.on), masked=masked,
        behavior_rate=rate, random_cells=lambda model, n, seed: [(0, (seed + i) % 3) for i in range(n)], **kwargs,
    )
    return panel, masks_applied


def _click(figure, trace_index: int, x, y) -> None:
    """Deliver the message plotly.js sends for a click on one point."""
    figure._handler_js2py_pointsCallback({"new": {
        "event_type": "plotly_click",
        "points": {"xs": [x], "ys": [y], "point_indexes": [[y, x]], "trace_indexes": [trace_index]},
        "device_state": None, "selector": None,
    }})


def test_expert_panel_click_cycles_and_regenerates(fake_tokenizer):
    panel, masks = _expert_panel()
    assert panel.wait(10), panel.error.value
    assert panel.baseline_rate == 1.0 and panel.masked_rate == 1.0 and panel.masked_text == "p1:0"
    _click(panel.figure, 0, 2, 1)  # row 1 = model layer 2, expert 2
    assert panel.wait(10)
    assert panel.state.off == [(2, 2)] and panel.masked_rate == 0.75 and panel.masked_text == "p1:1"
    assert json.loads(panel.mask_json.value)["off"] == [[2, 2]]
    assert "L2E2" in panel.mask_label.value
    assert list(panel.figure.data[1].z[1]) == [0, 0, 1]  # the heatmap overlay shows the mask
    _click(panel.figure, 1, 2, 1)  # clicking the overlay trace works the same
    assert panel.state.on == [(2, 2)]
    _click(panel.figure, 0, 2, 1)
    assert panel.state.cells == ()
    assert panel.wait(10) and panel.error.value == ""
    panel.close()


def test_expert_panel_top_random_clear_and_export(fake_tokenizer, tmp_path):
    panel, _ = _expert_panel(autorun=False)
    panel.top_n.value = 2
    panel.top_button.click()
    assert panel.state.off == [(0, 1), (2, 2)]
    panel.random_button.click()
    first_random = panel.state.off
    assert len(first_random) == 2 and all(layer == 0 for layer, _ in first_random)
    panel.random_button.click()
    assert len(panel.state.off) == 2 and panel.state.off != first_random  # a new draw per click
    panel.clear_button.click()
    assert panel.state.cells == ()
    panel.click(0, 0)
    path = panel.export(tmp_path / "mask.json")
    assert json.loads(path.read_text())["off"] == [[0, 0]]
    assert panel.wait(10)
    panel.close()


def test_expert_panel_shows_click_errors(fake_tokenizer):
    panel, _ = _expert_panel(autorun=False)
    _click(panel.figure, 0, 7, 0)  # expert 7 does not exist
    assert "out of range" in panel.error.value
    panel.close()


def test_expert_panel_on_a_tiny_olmoe_with_labkit_defaults(tiny_tokenizer):
    """The default labkit calls (ExpertMask, masked, random, behaviour rate) on a real MoE."""
    import contextlib

    import plotly.graph_objects as go

    import labkit
    from labkit.evals import RefusalDetector
    from labkit.models import from_hf
    from labkit.moe import ExpertMask, masked, trace_routing
    from labkit.moe.attribution import attribute_experts
    from labkit.widgets import ExpertPanel
    from tests.moe_fixtures import tiny_moe_hf

    model = from_hf(tiny_moe_hf("olmoe", tiny_tokenizer), tiny_tokenizer, name="tiny-olmoe")
    behaviour = trace_routing(model, ["love and hate", "war and peace"], progress=False)
    control = trace_routing(model, ["one two three", "the cat sat"], progress=False)
    attribution = attribute_experts(behaviour, control, n_bootstrap=10, n_splits=5)

    def heatmap(attribution, mask):  # labkit.viz.expert_heatmap in the notebook
        return go.Figure(go.Heatmap(z=attribution.score.tolist()))

    eval_prompts = ["the dog ran", "what happened", "love and the war", "one two"]
    detector = RefusalDetector(phrases=("the",), anywhere=True)
    panel = ExpertPanel(model, attribution, eval_prompts=eval_prompts, detector=detector, heatmap=heatmap,
                        max_new_tokens=4)

    def direct(mask):
        """(text on the panel's prompt, behaviour rate on eval_prompts) straight from labkit."""
        with contextlib.ExitStack() as stack:
            if mask is not None:
                stack.enter_context(masked(model, mask))
            text = labkit.generate(model, panel.prompt.value, max_new_tokens=4, seed=0).texts[0]
            texts = labkit.generate(model, eval_prompts, max_new_tokens=4, seed=0).texts
        return text, sum(map(detector, texts)) / len(texts)

    def rate(value):
        return getattr(value, "rate", value)

    assert panel.wait(60), panel.error.value
    assert panel.error.value == ""
    baseline_text, baseline_rate = direct(None)
    assert (panel.baseline_text, rate(panel.baseline_rate)) == (baseline_text, baseline_rate)
    _click(panel.figure, 0, 3, 1)
    assert panel.wait(60) and panel.error.value == ""
    assert panel.mask.experts("off") == [(attribution.layers[1], 3)]
    assert json.loads(panel.mask_json.value)["edits"] == [{"layer": attribution.layers[1], "expert": 3, "mode": "off"}]
    assert (panel.masked_text, rate(panel.masked_rate)) == direct(ExpertMask.off([(attribution.layers[1], 3)]))
    panel.top_n.value = 3
    panel.top_button.click()
    assert panel.wait(60) and panel.error.value == ""
    top = ExpertMask.off(attribution.top(3))
    assert sorted(panel.mask.experts("off")) == sorted(top.experts("off"))
    assert (panel.masked_text, rate(panel.masked_rate)) == direct(top)
    tokens = model.to_tokens(panel.prompt.value)
    with torch.no_grad():
        plain_logits = model(tokens)
        with masked(model, top):
            masked_logits = model(tokens)
    assert not torch.allclose(plain_logits, masked_logits)  # the mask bites (the 4 greedy tokens may not move)
    assert (panel.baseline_text, rate(panel.baseline_rate)) == (baseline_text, baseline_rate)
    panel.random_button.click()
    assert panel.wait(60) and panel.error.value == ""
    assert len(panel.mask.experts("off")) == panel.top_n.value
    assert (panel.masked_text, rate(panel.masked_rate)) == direct(ExpertMask.off(panel.mask.experts("off")))
    panel.close()


def test_steering_panel_sweep_is_one_batch_equal_to_solo_runs(tiny_llama):
    from labkit.widgets import SteeringPanel

    panel = SteeringPanel(tiny_llama, default_prompt="the cat sat", default_plus=" wedding", default_minus=" ",
                          default_layer=1, max_new_tokens=6, autorun=False)
    coefficients = [0.0, 4.0, -4.0, 12.0]
    texts = panel.sweep(coefficients)
    assert list(texts) == coefficients
    unit = labkit.actadd(tiny_llama, " wedding", " ", layer=1)
    for c, text in texts.items():
        solo = labkit.generate(tiny_llama, "the cat sat", steering=None if c == 0 else unit.with_coefficient(c),
                               max_new_tokens=6)
        assert text == solo.texts[0]
        assert html.escape(text) in panel.sweep_output.value
    with pytest.raises(ValueError, match="need finite coefficients"):
        panel.sweep([float("nan")])
    panel.close()
