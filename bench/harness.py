"""How every bench runs: the smoke switch, a tiny model for smoke runs, and interleaved timing.

A bench measures a *subject* against a *baseline* in the same run. ``interleaved_medians`` warms
every function up once, then calls them in turn (baseline, subject, baseline, ...) so a change
of machine load hits both alike, and returns the median of each. A function signals a failed
run by raising; nothing is timed around an error.

Smoke mode (``--smoke`` on the command line or ``LABKIT_BENCH_SMOKE=1``) runs each bench on a
tiny random model with one repetition: seconds, so CI (``tests/test_bench.py``) catches a bench
that no longer runs. Its numbers mean nothing.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # labkit, recipes and tests.conftest from this checkout

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def smoke_requested(argv: list[str] | None = None) -> bool:
    """True for ``--smoke`` in ``argv`` (default ``sys.argv``) or ``LABKIT_BENCH_SMOKE=1``."""
    argv = sys.argv[1:] if argv is None else argv
    return "--smoke" in argv or os.environ.get("LABKIT_BENCH_SMOKE") == "1"


def tiny_llama(seed: int = 0):
    """A 3-layer random Llama bridge with the offline test tokenizer (the tests' fixture).

    Sets torch to one thread: on a model this small a thread pool only adds contention."""
    import torch

    from labkit.models import from_hf
    from tests.conftest import make_tokenizer, tiny_llama_hf

    torch.set_num_threads(1)
    tokenizer = make_tokenizer()
    return from_hf(tiny_llama_hf(tokenizer, seed=seed), tokenizer, name="tiny-llama")


def interleaved_medians(
    functions: Mapping[str, Callable[[], object]], repeats: int, *, clock: Callable[[], float] = time.perf_counter
) -> dict[str, float]:
    """Median seconds per function over ``repeats`` interleaved rounds, after one warm-up each.

    Raises:
        ValueError: ``repeats < 1``.
        Whatever a function raises (a failed run is never timed).
    """
    if repeats < 1:
        raise ValueError(f"interleaved_medians: repeats must be >= 1, got {repeats}.")
    for fn in functions.values():
        fn()  # warm-up: first-call allocations, lazy imports, caches
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}
