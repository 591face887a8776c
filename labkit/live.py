"""The logic behind the live panels of :mod:`labkit.widgets`, with no widget in sight.

A panel is a thin shell: every decision it makes lives here, as small pieces that unit tests
drive directly (``tests/test_widgets.py``) without a kernel or a browser.

* :class:`LatestOnly` — one worker thread that runs only the newest request. A slider dragged
  across twenty values must not queue twenty generations: each new request cancels the one in
  flight (through its :class:`CancelToken`) and replaces any request still waiting, so exactly
  the latest one runs to completion. An exception in a request goes to an ``on_error`` callback
  (the panel shows it) instead of vanishing into a thread's traceback.
* :class:`TokenStreamer` — a transformers streamer (``put`` / ``end``, the protocol of
  ``generate(..., streamer=...)``) that decodes tokens as they arrive, hands the text so far to a
  callback, records the time of the first token, and aborts generation by raising
  :class:`GenerationCancelled` from ``put`` once its token is cancelled.
* :class:`MaskState` — which experts the user clicked: each (layer, expert) cell cycles
  normal → off → on → normal; "top-N off" and "random N off" set whole lists of cells. It is plain,
  frozen data; :meth:`MaskState.to_expert_mask` turns it into the package's ``ExpertMask``.
* :func:`word_diff` / :func:`diff_html` — what changed between the unsteered and the steered
  completion, word by word.
"""

from __future__ import annotations

import difflib
import html
import re
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers.generation.streamers import BaseStreamer

__all__ = [
    "CancelToken",
    "GenerationCancelled",
    "LatestOnly",
    "MaskState",
    "TokenStreamer",
    "diff_html",
    "format_error",
    "heatmap_cell",
    "word_diff",
]


# --- latest-only execution ----------------------------------------------------------------


class GenerationCancelled(Exception):
    """Raised inside a request (usually from a streamer's ``put``) once a newer request came."""


class CancelToken:
    """A flag a running request polls; set when a newer request supersedes it."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        """Raise :class:`GenerationCancelled` when cancelled; call it between steps of a job."""
        if self._event.is_set():
            raise GenerationCancelled()


@dataclass
class _Request:
    sequence: int
    function: Callable[..., Any]
    args: tuple
    kwargs: dict
    token: CancelToken = field(default_factory=CancelToken)


class LatestOnly:
    """Run submitted jobs on one worker thread, only ever the newest to completion.

    ``submit(fn, *args)`` calls ``fn(token, *args)`` on the worker, where ``token`` is a
    :class:`CancelToken`. A new submission cancels the running job's token and replaces a job
    that has not started yet, so under a burst of submissions at most two jobs ever touch the
    model: the one being cancelled and the latest. A job that notices cancellation raises
    :class:`GenerationCancelled` (e.g. via :meth:`CancelToken.raise_if_cancelled` or a
    :class:`TokenStreamer`); that is silent. Any other exception is passed to ``on_error``.

    Args:
        on_error: called on the worker thread with the exception of a failed job (never with a
            cancellation). Default: keep it in :attr:`last_error` only.
        debounce_s: wait this long after a submission for a newer one before starting the job
            (0 starts at once; cancellation alone already bounds the work).
        name: name of the worker thread (shows in ``threading.enumerate()``).

    Example:
        >>> runner = LatestOnly()
        >>> results = []
        >>> for value in range(5):
        ...     _ = runner.submit(lambda token, v: results.append(v), value)
        >>> runner.wait(timeout=5)
        True
        >>> results[-1]
        4
        >>> runner.close()
    """

    def __init__(
        self,
        *,
        on_error: Callable[[BaseException], None] | None = None,
        debounce_s: float = 0.0,
        name: str = "labkit-latest-only",
    ) -> None:
        if debounce_s < 0:
            raise ValueError(f"LatestOnly: debounce_s must be >= 0 seconds, got {debounce_s}.")
        self.on_error = on_error
        self.debounce_s = float(debounce_s)
        self.name = name
        self._condition = threading.Condition()
        self._pending: _Request | None = None
        self._running: _Request | None = None
        self._sequence = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        #: sequence numbers of jobs that ran to completion, in order
        self.completed: list[int] = []
        #: sequence numbers of jobs cancelled while running, or replaced before they started
        self.cancelled: list[int] = []
        #: the exception of the last failed job (``None`` after a job succeeds)
        self.last_error: BaseException | None = None

    def submit(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
        """Queue ``function(token, *args, **kwargs)`` as the newest request; return its number."""
        with self._condition:
            if self._closed:
                raise RuntimeError("LatestOnly.submit: the runner is closed; create a new one.")
            self._sequence += 1
            if self._pending is not None:
                self.cancelled.append(self._pending.sequence)
            self._pending = _Request(self._sequence, function, args, kwargs)
            if self._running is not None:
                self._running.token.cancel()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            self._condition.notify_all()
            return self._sequence

    @property
    def busy(self) -> bool:
        """True while a job runs or waits to run."""
        with self._condition:
            return self._pending is not None or self._running is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no job runs or waits; return False if ``timeout`` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            while self._pending is not None or self._running is not None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._condition.wait(remaining)
            return True

    def close(self) -> None:
        """Cancel the running job, drop the waiting one, and let the worker thread end."""
        with self._condition:
            self._closed = True
            if self._pending is not None:
                self.cancelled.append(self._pending.sequence)
                self._pending = None
            if self._running is not None:
                self._running.token.cancel()
            self._condition.notify_all()

    def _next_request(self) -> _Request | None:
        with self._condition:
            while self._pending is None and not self._closed:
                self._condition.wait()
            if self._closed:
                return None
            if self.debounce_s:
                # Restart the quiet period after every newer submission.
                while True:
                    seen = self._pending.sequence
                    self._condition.wait(self.debounce_s)
                    if self._closed:
                        return None
                    if self._pending.sequence == seen:
                        break
            request, self._pending = self._pending, None
            self._running = request
            return request

    def _loop(self) -> None:
        while True:
            request = self._next_request()
            if request is None:
                return
            outcome = "completed"
            try:
                request.token.raise_if_cancelled()
                request.function(request.token, *request.args, **request.kwargs)
            except GenerationCancelled:
                outcome = "cancelled"
            except BaseException as error:  # noqa: BLE001 - shown to the user, never lost
                outcome = "failed"
                self.last_error = error
                if self.on_error is not None:
                    try:
                        self.on_error(error)
                    except Exception:  # noqa: BLE001 - a broken error display must not kill the worker
                        traceback.print_exc()
            with self._condition:
                if outcome == "completed":
                    self.completed.append(request.sequence)
                    self.last_error = None
                elif outcome == "cancelled":
                    self.cancelled.append(request.sequence)
                self._running = None
                self._condition.notify_all()


def format_error(error: BaseException) -> str:
    """An exception as the HTML a panel shows: type, message and the innermost frames."""
    frames = traceback.format_exception(type(error), error, error.__traceback__)
    detail = "".join(frames[-4:])
    return (
        '<div class="labkit-error" style="color:#b00020;white-space:pre-wrap;font-family:monospace">'
        f"<b>{html.escape(type(error).__name__)}</b>: {html.escape(str(error))}"
        f"<details><summary>traceback</summary>{html.escape(detail)}</details></div>"
    )


# --- streaming --------------------------------------------------------------------------------


class TokenStreamer(BaseStreamer):
    """A ``generate(..., streamer=...)`` streamer that decodes as tokens arrive and can cancel.

    transformers calls ``put`` first with the prompt ids (skipped here, like
    ``TextStreamer(skip_prompt=True)``), then once per generated token, then ``end``. Each new
    token re-decodes the completion so far (cheap for the few dozen tokens a panel shows, and it
    never splits a multi-byte character) and calls ``on_text(text)``.

    Args:
        tokenizer: decodes token ids (``skip_special_tokens=True``).
        on_text: called with the whole completion text after every token.
        token: when cancelled, the next ``put`` raises :class:`GenerationCancelled`, which
            unwinds ``generate`` and frees the worker for the newer request.
        skip_prompt: the first ``put`` holds the prompt; ignore it.

    Attributes:
        started: ``time.perf_counter()`` when the streamer was made.
        first_token_at: ``perf_counter()`` at the first generated token, or ``None``.
        ids: generated token ids so far.
        text: decoded completion so far.
    """

    def __init__(
        self,
        tokenizer: Any,
        on_text: Callable[[str], None] | None = None,
        *,
        token: CancelToken | None = None,
        skip_prompt: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.token = token
        self.skip_prompt = skip_prompt
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.ended_at: float | None = None
        self.ids: list[int] = []
        self.text = ""
        self._prompt_seen = not skip_prompt

    def put(self, value) -> None:
        if self.token is not None:
            self.token.raise_if_cancelled()
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        flat = value.reshape(-1).tolist() if hasattr(value, "reshape") else list(value)
        if len(flat) != 1:
            raise ValueError(
                f"TokenStreamer streams one sequence; got {len(flat)} token ids in one step. "
                "Generate one prompt at a time when streaming."
            )
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.ids.extend(int(i) for i in flat)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.on_text is not None:
            self.on_text(self.text)

    def end(self) -> None:
        self.ended_at = time.perf_counter()

    @property
    def time_to_first_token(self) -> float | None:
        """Seconds from construction to the first generated token."""
        return None if self.first_token_at is None else self.first_token_at - self.started


# --- expert mask state --------------------------------------------------------------------

ExpertState = Literal["normal", "off", "on"]
#: the order a click walks through
CYCLE: tuple[ExpertState, ...] = ("normal", "off", "on")
_STATE_CODE = {"normal": 0, "off": 1, "on": 2}


@dataclass(frozen=True)
class MaskState:
    """Which experts are switched off or forced on, by (layer, expert); everything else normal.

    Rows are the layers shown in the heatmap (``layers[row]`` is the model's layer index); all
    methods take and return *model* layer indices. Transforms return a new state.

    Attributes:
        layers: model layer index of each heatmap row.
        n_experts: experts per layer.
        cells: ``((layer, expert), "off" | "on")`` pairs, sorted; normal cells are absent.

    Example:
        >>> state = MaskState(layers=(0, 1), n_experts=4)
        >>> state.cycle(1, 2).cycle(1, 2).cells
        (((1, 2), 'on'),)
    """

    layers: tuple[int, ...]
    n_experts: int
    cells: tuple[tuple[tuple[int, int], ExpertState], ...] = ()

    def __post_init__(self) -> None:
        if self.n_experts < 1:
            raise ValueError(f"MaskState: n_experts must be >= 1, got {self.n_experts}.")
        for (layer, expert), state in self.cells:
            self._check(layer, expert)
            if state not in ("off", "on"):
                raise ValueError(
                    f"MaskState: cell ({layer}, {expert}) has state {state!r}; allowed: 'off', 'on' "
                    "(normal cells are simply left out)."
                )

    def _check(self, layer: int, expert: int) -> None:
        if layer not in self.layers:
            raise ValueError(
                f"MaskState: layer {layer} is not shown; shown layers are {list(self.layers)}."
            )
        if not 0 <= expert < self.n_experts:
            raise ValueError(
                f"MaskState: layer {layer} expert {expert} out of range; the model has "
                f"{self.n_experts} experts per layer (0..{self.n_experts - 1})."
            )

    def _with(self, mapping: Mapping[tuple[int, int], ExpertState]) -> "MaskState":
        cells = tuple(sorted((cell, state) for cell, state in mapping.items() if state != "normal"))
        return MaskState(self.layers, self.n_experts, cells)

    def state(self, layer: int, expert: int) -> ExpertState:
        """The state of one expert."""
        self._check(layer, expert)
        return dict(self.cells).get((layer, expert), "normal")

    def cycle(self, layer: int, expert: int) -> "MaskState":
        """Advance one expert normal → off → on → normal (what a click on its cell does)."""
        current = self.state(layer, expert)
        following = CYCLE[(CYCLE.index(current) + 1) % len(CYCLE)]
        return self._with({**dict(self.cells), (layer, expert): following})

    def with_states(self, cells: Iterable[tuple[int, int]], state: ExpertState) -> "MaskState":
        """Set every listed (layer, expert) to ``state``, keeping the others."""
        if state not in CYCLE:
            raise ValueError(f"MaskState: state must be one of {CYCLE}, got {state!r}.")
        mapping = dict(self.cells)
        for layer, expert in cells:
            self._check(int(layer), int(expert))
            mapping[(int(layer), int(expert))] = state
        return self._with(mapping)

    def cleared(self) -> "MaskState":
        """Every expert back to normal."""
        return MaskState(self.layers, self.n_experts)

    @property
    def off(self) -> list[tuple[int, int]]:
        return [cell for cell, state in self.cells if state == "off"]

    @property
    def on(self) -> list[tuple[int, int]]:
        return [cell for cell, state in self.cells if state == "on"]

    def grid(self) -> list[list[int]]:
        """``[row][expert]`` codes (0 normal, 1 off, 2 on) in heatmap row order."""
        rows = [[0] * self.n_experts for _ in self.layers]
        for (layer, expert), state in self.cells:
            rows[self.layers.index(layer)][expert] = _STATE_CODE[state]
        return rows

    def label(self) -> str:
        """A one-line summary, e.g. ``"mask: 2 off, 1 on — off L0E3, L1E5; on L2E1"``."""
        if not self.cells:
            return "mask: none (all experts normal)"
        off = ", ".join(f"L{layer}E{expert}" for layer, expert in self.off) or "—"
        on = ", ".join(f"L{layer}E{expert}" for layer, expert in self.on) or "—"
        return f"mask: {len(self.off)} off, {len(self.on)} on — off {off}; on {on}"

    def to_expert_mask(self, factory: Callable[..., Any]) -> Any:
        """Build the package's mask object: ``factory(off=[(layer, expert)...], on=[...])``."""
        return factory(off=self.off, on=self.on)


def heatmap_cell(x_values: Sequence | None, y_values: Sequence | None, x, y) -> tuple[int, int]:
    """The ``(row, column)`` of a clicked heatmap point from the clicked ``x`` / ``y``.

    A heatmap without explicit ``x`` / ``y`` reports indices; one with labels (``"E3"``, ``"L1"``)
    reports the label, which is looked up.

    Raises:
        ValueError: the clicked value is not on the axis.
    """

    def index(values, value, axis):
        if values is None or len(values) == 0:
            return int(round(float(value)))
        values = list(values)
        if value in values:
            return values.index(value)
        for i, candidate in enumerate(values):
            try:
                if float(candidate) == float(value):
                    return i
            except (TypeError, ValueError):
                continue
        raise ValueError(f"heatmap_cell: clicked {axis}={value!r} is not among the axis values {values[:8]}...")

    return index(y_values, y, "y"), index(x_values, x, "x")


# --- text diff ----------------------------------------------------------------------------

_WORDS = re.compile(r"\s+|[^\s]+")


def word_diff(before: str, after: str) -> list[tuple[Literal["same", "added", "removed"], str]]:
    """Word-level diff of two texts; whitespace runs are kept so the pieces rejoin exactly.

    Returns:
        ``[(op, text), ...]`` with ``op`` in ``"same"``, ``"added"`` (only in ``after``),
        ``"removed"`` (only in ``before``). Joining the ``same`` + ``added`` pieces gives
        ``after``; ``same`` + ``removed`` gives ``before``.

    Example:
        >>> word_diff("I love it", "I hate it")
        [('same', 'I '), ('removed', 'love'), ('added', 'hate'), ('same', ' it')]
    """
    a, b = _WORDS.findall(before), _WORDS.findall(after)
    pieces: list[tuple[Literal["same", "added", "removed"], str]] = []

    def emit(op, words: Sequence[str]) -> None:
        if not words:
            return
        text = "".join(words)
        if pieces and pieces[-1][0] == op:
            pieces[-1] = (op, pieces[-1][1] + text)
        else:
            pieces.append((op, text))

    matcher = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            emit("same", a[i1:i2])
        else:
            emit("removed", a[i1:i2])
            emit("added", b[j1:j2])
    return pieces


def diff_html(before: str, after: str) -> str:
    """``after`` as HTML with the words that differ from ``before`` highlighted (escaped)."""
    parts = []
    for op, text in word_diff(before, after):
        if op == "same":
            parts.append(html.escape(text))
        elif op == "added":
            parts.append(f'<mark class="labkit-added">{html.escape(text)}</mark>')
    return "".join(parts)
