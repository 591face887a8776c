"""Benchmark the steering panel's live loop on SmolLM2 (CPU); prints ratios measured in one run.

Latency from a coefficient-slider change (``panel.coefficient.value = c``, exactly what the
browser's slider triggers in the kernel) to

1. the first streamed token   (goal <= 0.3 s)
2. the full 32-token completion

against the same prompt generated with plain Hugging Face ``generate`` on the twin model (no
steering, no panel) as the baseline, measured in this run. After one warm-up of each, the two
are interleaved (plain, slider move, plain, ...) and each figure is the median of ``--repeats``
(alternating coefficients, so every move regenerates). A slider move that does not finish, or
that ends in the panel's error area, stops the bench with an error: its timing is never used.
``--smoke``: a tiny random model, 8 tokens, one repetition (checks the bench runs).

Run: .venv/bin/python bench/bench_widgets.py [--repeats 5] [--threads N] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import harness  # sets the repo root on sys.path and the offline switches

import torch

import labkit
from labkit.live import TokenStreamer
from labkit.models import hf_model_of, tokenizer_of
from labkit.widgets import SteeringPanel

PROMPT = "I hate you because"
TIMEOUT_S = 600


def plain_hf(model, new_tokens: int) -> tuple[float, float]:
    """(time to first token, time to all tokens) of one plain greedy HF generate."""
    twin, tokenizer = hf_model_of(model), tokenizer_of(model)
    encoded = tokenizer([PROMPT], return_tensors="pt")
    streamer = TokenStreamer(tokenizer)
    with torch.no_grad():
        out = twin.generate(**encoded, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            streamer=streamer, pad_token_id=tokenizer.pad_token_id)
    if out.shape[1] - encoded.input_ids.shape[1] != new_tokens or streamer.time_to_first_token is None:
        raise RuntimeError(f"plain generate produced {out.shape[1] - encoded.input_ids.shape[1]} of {new_tokens} tokens")
    return streamer.time_to_first_token, time.perf_counter() - streamer.started


def settle(panel: SteeringPanel, what: str) -> dict:
    """Wait for the panel's regeneration; raise unless it finished without error."""
    if not panel.wait(TIMEOUT_S):
        raise TimeoutError(f"{what}: the panel's generation did not finish in {TIMEOUT_S} s")
    if panel.error.value:
        raise RuntimeError(f"{what}: the panel shows an error: {panel.error.value}")
    timing = dict(panel.last_timing)
    if timing.get("first_token_s") is None or not timing.get("tokens"):
        raise RuntimeError(f"{what}: the panel recorded no timing ({timing})")
    return timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, one repetition (checks it runs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    smoke = args.smoke or harness.smoke_requested([])
    new_tokens, repeats = (8, 1) if smoke else (32, args.repeats)
    model = harness.tiny_llama() if smoke else labkit.load_model("smollm2-135m-instruct")

    panel = SteeringPanel(model, default_prompt=PROMPT, default_coefficient=4.0, max_new_tokens=new_tokens)
    try:
        settle(panel, "first generation")  # also the panel's warm-up
        plain_hf(model, new_tokens)  # warm-up
        hf_firsts, hf_totals, firsts, totals, tokens = [], [], [], [], []
        for i in range(repeats):  # interleaved, so load changes hit both alike
            first, total = plain_hf(model, new_tokens)
            hf_firsts.append(first)
            hf_totals.append(total)
            panel.last_timing = {}  # a move that does not regenerate cannot pass off the last timing
            panel.coefficient.value = 6.0 if i % 2 == 0 else 5.0  # baseline and vector are cached
            timing = settle(panel, f"slider move {i + 1}")
            firsts.append(timing["first_token_s"])
            totals.append(timing["total_s"])
            tokens.append(timing["tokens"])
    finally:
        panel.close()
    hf_first, hf_total = statistics.median(hf_firsts), statistics.median(hf_totals)
    panel_first, panel_total = statistics.median(firsts), statistics.median(totals)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    label = "tiny-llama (smoke run: numbers mean nothing)" if smoke else "SmolLM2-135M"
    print(f"{label}, {new_tokens} new tokens, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, load average {load:.1f}, median of {repeats}")
    print(f"plain HF generate      first token {hf_first:6.3f} s   {new_tokens} tokens {hf_total:6.3f} s")
    print(f"panel, slider change → first token {panel_first:6.3f} s   {min(tokens)} tokens {panel_total:6.3f} s")
    print(f"ratio panel / plain HF first token {panel_first / hf_first:6.2f}x   full   {panel_total / hf_total:6.2f}x")
    verdict = "meets" if panel_first <= 0.3 else "misses"
    print(f"goal: slider → first token <= 0.3 s: {verdict} ({panel_first:.3f} s)")


if __name__ == "__main__":
    main()
