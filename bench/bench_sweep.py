"""One-batch steering sweep vs the same sweep one setting at a time (same model, same run).

A sweep of K = 8 ActAdd coefficients over 8 prompts: the subject is one batched
``labkit.generate`` call with a different coefficient per row (``steering_per_row``, 64 rows);
the baseline runs the 8 settings one after another (``steering=vector.with_coefficient(c)``,
8 rows each). Greedy, 24 new tokens; the batched rows are checked to equal the sequential ones
before anything is timed. Prints both times and the speed-up ratio sequential/batched, measured
in one run (median of ``--repeats`` interleaved timings after one warm-up each).
``--smoke``: a tiny random model, 4 tokens, one repetition (checks the bench runs).

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python bench/bench_sweep.py [--smoke]
"""

from __future__ import annotations

import argparse

import harness  # sets the repo root on sys.path and the offline switches

import torch

import labkit
from labkit import evals

COEFFICIENTS = [0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, one repetition (checks it runs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    smoke = args.smoke or harness.smoke_requested([])
    if smoke:
        args.model, args.new_tokens, args.repeats = "tiny-llama (smoke run: numbers mean nothing)", 4, 1

    model = harness.tiny_llama() if smoke else labkit.load_model(args.model)
    prompts = list(evals.load_steering_data().neutral_prompts[:8])
    vector = labkit.actadd(model, " wedding", " ", layer=min(6, model.cfg.n_layers - 1))
    settings = [vector.with_coefficient(c) for c in COEFFICIENTS]
    n = args.new_tokens
    options = dict(max_new_tokens=n, min_new_tokens=n)

    def batched():
        rows = [s for s in settings for _ in prompts]
        return labkit.generate(model, prompts * len(settings), steering_per_row=rows, **options).token_ids

    def sequential():
        ids = []
        for setting in settings:
            ids += labkit.generate(model, prompts, steering=setting, **options).token_ids
        return ids

    one, many = batched(), sequential()
    same = sum(a == b for a, b in zip(one, many))
    if same != len(many):
        raise RuntimeError(f"batched sweep: {len(many) - same} of {len(many)} rows differ from the sequential sweep")
    seconds = harness.interleaved_medians({"sequential": sequential, "batched": batched}, args.repeats)
    print(f"model {args.model}: K={len(settings)} coefficients x {len(prompts)} prompts, {n} new tokens, greedy, "
          f"median of {args.repeats}, {torch.get_num_threads()} threads; rows equal: {same}/{len(many)}")
    print(f"one setting at a time : {seconds['sequential']:7.2f} s  ({len(settings)} calls of {len(prompts)} rows)")
    print(f"one batch             : {seconds['batched']:7.2f} s  (1 call of {len(settings) * len(prompts)} rows)")
    print(f"ratio sequential/batched: {seconds['sequential'] / seconds['batched']:.2f}x")


if __name__ == "__main__":
    main()
