"""Benchmark the steering panel's live loop on SmolLM2 (CPU); prints ratios measured in one run.

Latency from a coefficient-slider change (``panel.coefficient.value = c``, exactly what the
browser's slider triggers in the kernel) to

1. the first streamed token   (goal <= 0.3 s)
2. the full 32-token completion

against the same prompt generated with plain Hugging Face ``generate`` on the twin model (no
steering, no panel) as the baseline, measured in this run. Each figure is the median of
``--repeats`` slider moves (alternating coefficients, so every move regenerates).

Run: .venv/bin/python bench/bench_widgets.py [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

import labkit
from labkit.live import TokenStreamer
from labkit.models import hf_model_of, tokenizer_of
from labkit.widgets import SteeringPanel

PROMPT = "I hate you because"
NEW_TOKENS = 32


def plain_hf(model, repeats: int) -> tuple[float, float]:
    """Median (time to first token, time to 32 tokens) of plain greedy HF generate."""
    twin, tokenizer = hf_model_of(model), tokenizer_of(model)
    encoded = tokenizer([PROMPT], return_tensors="pt")
    firsts, totals = [], []
    for _ in range(repeats):
        streamer = TokenStreamer(tokenizer)
        with torch.no_grad():
            twin.generate(**encoded, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                          streamer=streamer, pad_token_id=tokenizer.pad_token_id)
        totals.append(time.perf_counter() - streamer.started)
        firsts.append(streamer.time_to_first_token)
    return statistics.median(firsts), statistics.median(totals)


def panel_loop(model, repeats: int) -> tuple[float, float, int]:
    """Median (slider → first token, slider → full completion) and the token count."""
    panel = SteeringPanel(model, default_prompt=PROMPT, default_coefficient=4.0, max_new_tokens=NEW_TOKENS)
    if not panel.wait(600):
        raise TimeoutError("the panel's first generation did not finish in 600 s")
    if panel.error.value:
        raise RuntimeError(f"panel error: {panel.error.value}")
    firsts, totals, tokens = [], [], []
    for i in range(repeats):
        panel.coefficient.value = 6.0 if i % 2 == 0 else 5.0  # baseline and vector are cached
        panel.wait(600)
        timing = panel.last_timing
        firsts.append(timing["first_token_s"])
        totals.append(timing["total_s"])
        tokens.append(timing["tokens"])
    panel.close()
    return statistics.median(firsts), statistics.median(totals), min(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = labkit.load_model("smollm2-135m-instruct")
    plain_hf(model, 1)  # warm-up
    hf_first, hf_total = plain_hf(model, args.repeats)
    panel_first, panel_total, tokens = panel_loop(model, args.repeats)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"SmolLM2-135M, {NEW_TOKENS} new tokens, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, load average {load:.1f}, median of {args.repeats}")
    print(f"plain HF generate      first token {hf_first:6.3f} s   {NEW_TOKENS} tokens {hf_total:6.3f} s")
    print(f"panel, slider change → first token {panel_first:6.3f} s   {tokens} tokens {panel_total:6.3f} s")
    print(f"ratio panel / plain HF first token {panel_first / hf_first:6.2f}x   full   {panel_total / hf_total:6.2f}x")
    verdict = "meets" if panel_first <= 0.3 else "misses"
    print(f"goal: slider → first token <= 0.3 s: {verdict} ({panel_first:.3f} s)")


if __name__ == "__main__":
    main()
