"""Benchmark the vLLM engine path against the Hugging Face path; prints ratios from one run.

Model: the shipped organism ``data/models/moe-organism`` (OLMoE, 5.2M parameters). Prompts: the
first ``--prompts`` of ``data/prompts/organism/attribution_behavior.jsonl``. Every batch runs
greedy with exactly ``--new-tokens`` new tokens per prompt (``min_new_tokens`` = max), so both
paths generate the same number of tokens; their token ids are checked equal before timing.

1. steered batch (a mean-difference direction at layer 1, all positions): vLLM tokens/s / HF tokens/s
2. masked batch (the two designated experts off): vLLM tokens/s / HF tokens/s
3. vLLM TP=2 / TP=1 tokens/s on both batches (skipped with ``--no-tp`` or on fewer than 2 cores)

Medians of ``--repeats`` interleaved runs after one warm-up each, wall-clock. On 2 CPU cores a
5M-parameter model is far too small for vLLM's scheduler to pay off; the figure that counts is
the ratio on a GPU with a large model. ``--smoke``: 8 prompts, 4 tokens, one repetition, no TP.

Run: VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python bench/bench_vllm.py [--prompts 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os

import harness  # sets the repo root on sys.path and the offline switches


def batches(model, hf, prompts, new_tokens):
    """``{"steered": fn, "masked": fn}`` generating on ``model`` (vectors/masks built on ``hf``)."""
    import labkit
    from labkit.datasets import read_prompts
    from labkit.moe import ExpertMask, masked

    direction = labkit.mean_difference(
        hf, read_prompts("attribution_behavior", 8), read_prompts("attribution_control", 8), layer=1, coefficient=2.0
    )
    mask = ExpertMask.off([(1, 13), (2, 5)], model=hf)
    options = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}

    def steered():
        return labkit.generate(model, prompts, steering=direction, **options)

    def masked_batch():
        with masked(model, mask):
            return labkit.generate(model, prompts, **options)

    return {"steered": steered, "masked": masked_batch}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-tp", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    smoke = harness.smoke_requested()
    if smoke:
        args.prompts, args.new_tokens, args.repeats, args.no_tp = 8, 4, 1, True
    try:
        import vllm  # noqa: F401
    except Exception as error:
        print(f"bench_vllm: skipped, vLLM is not importable ({type(error).__name__}); run make install-engine.")
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import labkit
    from labkit.datasets import read_prompts

    prompts = read_prompts("attribution_behavior", args.prompts)
    hf = labkit.load_model("moe-organism")
    hf_runs = batches(hf, hf, prompts, args.new_tokens)
    results: dict[str, dict[str, float]] = {}
    tokens = len(prompts) * args.new_tokens
    sizes = [1] if args.no_tp or (os.cpu_count() or 1) < 2 else [1, 2]
    for size in sizes:
        with contextlib.closing(labkit.load_model("moe-organism", engine="vllm", tensor_parallel_size=size)) as engine:
            runs = batches(engine, hf, prompts, args.new_tokens)
            for name in runs:
                a, b = hf_runs[name](), runs[name]()
                if a.token_ids != b.token_ids:
                    raise RuntimeError(f"bench_vllm: {name} batch differs between HF and vLLM TP={size}")
                if size == 1:
                    medians = harness.interleaved_medians({"hf": hf_runs[name], "vllm": runs[name]}, args.repeats)
                    results.setdefault(name, {})["hf_tok_s"] = tokens / medians["hf"]
                    results[name]["vllm_tp1_tok_s"] = tokens / medians["vllm"]
                else:
                    medians = harness.interleaved_medians({"vllm": runs[name]}, args.repeats)
                    results[name]["vllm_tp2_tok_s"] = tokens / medians["vllm"]
    print(f"bench_vllm: organism, {len(prompts)} prompts x {args.new_tokens} new tokens, greedy float32, "
          f"{os.cpu_count()} CPU cores, vLLM {__import__('vllm').__version__}")
    for name, figures in results.items():
        line = f"  {name:8s} HF {figures['hf_tok_s']:8.1f} tok/s   vLLM TP=1 {figures['vllm_tp1_tok_s']:8.1f} tok/s   " \
               f"vLLM/HF {figures['vllm_tp1_tok_s'] / figures['hf_tok_s']:.2f}x"
        if "vllm_tp2_tok_s" in figures:
            line += f"   TP=2 {figures['vllm_tp2_tok_s']:8.1f} tok/s   TP2/TP1 {figures['vllm_tp2_tok_s'] / figures['vllm_tp1_tok_s']:.2f}x"
        print(line)
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
