"""Every benchmark runs: each bench script in smoke mode (tiny model, one repetition) as a subprocess.

Smoke runs check that a bench still imports and completes, not its numbers; a broken import or
a failed timed run (benches raise on errors instead of timing them) turns this red.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHES = sorted(p.name for p in (REPO / "bench").glob("*.py") if p.name != "harness.py")


def test_every_bench_is_covered_and_in_make_bench():
    assert BENCHES == ["bench_cache.py", "bench_moe.py", "bench_sae.py", "bench_steering.py", "bench_sweep.py", "bench_vllm.py", "bench_widgets.py", "organism_lab_table.py"]
    makefile = (REPO / "Makefile").read_text()
    bench_target = makefile.split("\nbench:", 1)[1].split("\n\n", 1)[0]
    for name in BENCHES:
        assert f"bench/{name}" in bench_target, f"{name} is not run by make bench"


@pytest.mark.parametrize("script", BENCHES)
def test_bench_runs_in_smoke_mode(script):
    env = {**os.environ, "LABKIT_BENCH_SMOKE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # the bench must find labkit and recipes by itself (repo root)
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "--smoke"],
        cwd=REPO / "bench", env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert result.stdout.strip(), f"{script} printed nothing"
