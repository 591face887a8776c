"""Steered generation speed vs plain Hugging Face ``generate`` on the same SmolLM2 weights.

Prints steered tokens/s, plain tokens/s and their ratio, measured in one run: 48 new tokens,
greedy, batch 1, one warm-up each, then the median of ``--repeats`` interleaved timings.
Steered = ``labkit.generate`` with an ActAdd vector (front positions, prompt pass) plus a
mean-difference direction (every decode step), i.e. both kinds of hook in use. Goal: ≥ 0.95.
``--smoke``: a tiny random model, 8 tokens, one repetition (checks the bench runs).

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python bench/bench_steering.py [--smoke]
"""

from __future__ import annotations

import argparse

import harness  # sets the repo root on sys.path and the offline switches

import torch

import labkit
from labkit.models import hf_model_of, tokenizer_of

PROMPT = "I went up to my friend and said"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, one repetition (checks it runs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    smoke = args.smoke or harness.smoke_requested([])
    if smoke:
        args.model, args.new_tokens, args.repeats = "tiny-llama (smoke run: numbers mean nothing)", 8, 1

    model = harness.tiny_llama() if smoke else labkit.load_model(args.model)
    twin, tokenizer = hf_model_of(model), tokenizer_of(model)
    n_layers = model.cfg.n_layers
    vectors = [
        labkit.actadd(model, " wedding", " ", layer=min(6, n_layers - 1), coefficient=4.0),
        labkit.mean_difference(model, ["I love this"], ["I hate this"], layer=min(8, n_layers - 1), coefficient=0.5),
    ]
    n = args.new_tokens
    inputs = tokenizer([PROMPT], return_tensors="pt").to(twin.device)

    def plain() -> int:
        with torch.no_grad():
            out = twin.generate(
                **inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        return out.shape[1] - inputs.input_ids.shape[1]

    def steered() -> int:
        out = labkit.generate(model, PROMPT, steering=vectors, max_new_tokens=n, min_new_tokens=n)
        return len(out.token_ids[0])

    def checked(fn):
        def run() -> None:
            produced = fn()
            if produced != n:
                raise RuntimeError(f"{fn.__name__}: expected {n} new tokens, got {produced}")
        return run

    # one warm-up each, then interleaved (plain, steered, plain, ...) so load changes hit both alike
    seconds = harness.interleaved_medians({"plain": checked(plain), "steered": checked(steered)}, args.repeats)
    plain_rate, steered_rate = n / seconds["plain"], n / seconds["steered"]
    print(f"model {args.model}, {n} new tokens, greedy, batch 1, median of {args.repeats}, "
          f"{torch.get_num_threads()} threads")
    print(f"plain HF generate : {plain_rate:7.1f} tokens/s")
    print(f"labkit steered    : {steered_rate:7.1f} tokens/s  (ActAdd front + per-token direction)")
    print(f"ratio steered/plain: {steered_rate / plain_rate:.3f}  (goal >= 0.95)")


if __name__ == "__main__":
    main()
