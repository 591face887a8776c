"""Benchmark the vLLM engine path against the Hugging Face path, each timed with nothing else alive.

Model: the shipped organism ``data/models/moe-organism`` (OLMoE, 5.2M parameters). Prompts: the
first ``--prompts`` of ``data/prompts/organism/attribution_behavior.jsonl``. Every generation
batch runs greedy with exactly ``--new-tokens`` new tokens per prompt (``min_new_tokens`` = max),
so both paths generate the same number of tokens.

Honest timing: vLLM's CPU workers keep the cores busy while an engine is up (a Hugging Face
baseline timed beside a live engine ran at ~55% of its speed alone), so each path runs in its
own process, one after the other — the HF path with no engine alive, then the engine at TP=1,
then at TP=2 — and this parent only compares what they print. Token ids (and trace indices) of
every batch must be equal across the three before any ratio is printed.

Batches (medians of ``--repeats`` runs after one warm-up each, wall-clock):

1. steered: a mean-difference direction at layer 1, all positions — tokens/s
2. masked: the two designated experts off — tokens/s
3. traced: ``trace_routing`` of every prompt (prefill only) — prompt tokens/s
4. cached: ``cache_activations`` of every layer's ``hook_resid_post`` and ``hook_mlp_out``, all
   positions (prefill only; on the engine read inside the workers) — prompt tokens/s

Ratios: vLLM TP=1 / HF and TP=2 / TP=1 per batch. Other processes on a shared machine slow every
phase; the bench prints the 1-minute load average before and after each phase so a reader can
tell a quiet run from a loaded one. On 2 CPU cores a 5M-parameter model is far too small for
vLLM's scheduler to pay off; the figure that counts is the ratio on a GPU with a large model.
``--smoke``: 8 prompts, 4 tokens, one repetition, no TP.

Run: VLLM_CPU_KVCACHE_SPACE=1 .venv-engine/bin/python bench/bench_vllm.py [--prompts 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import harness  # sets the repo root on sys.path and the offline switches


def batches(model, prompts, new_tokens):
    """``{"steered", "masked", "traced", "cached"}`` -> ``(function, tokens it processes)`` on ``model``."""
    import labkit
    from labkit.datasets import read_prompts
    from labkit.moe import ExpertMask, masked, trace_routing

    direction = labkit.mean_difference(
        model, read_prompts("attribution_behavior", 8), read_prompts("attribution_control", 8), layer=1, coefficient=2.0
    )
    mask = ExpertMask.off([(1, 13), (2, 5)], model=model)
    options = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    trace_options = {} if getattr(model, "labkit_engine", None) else {"progress": False}

    def steered():
        return labkit.generate(model, prompts, steering=direction, **options).token_ids

    def masked_batch():
        with masked(model, mask):
            return labkit.generate(model, prompts, **options).token_ids

    def traced():
        return trace_routing(model, prompts, **trace_options).topk_indices.tolist()

    def cached():
        """Every layer's hook_resid_post and hook_mlp_out, all positions (prefill only)."""
        from labkit.cache import cache_activations

        names = [f"blocks.{layer}.{point}" for layer in range(model.cfg.n_layers) for point in ("hook_resid_post", "hook_mlp_out")]
        cache = cache_activations(model, prompts, names, batch_size=len(prompts), progress=False)
        return cache.token_ids.tolist()  # the same token ids on every path; values are checked by tests/test_vllm.py

    from labkit.models import encode_prompts

    prompt_tokens = sum(len(row) for row in encode_prompts(model, prompts, caller="bench_vllm")[1])
    generated = len(prompts) * new_tokens
    return {
        "steered": (steered, generated), "masked": (masked_batch, generated), "traced": (traced, prompt_tokens),
        "cached": (cached, prompt_tokens),
    }


def phase(name: str, args) -> dict:
    """Run one path in this process: token ids and medians per batch."""
    import labkit
    from labkit.datasets import read_prompts

    prompts = read_prompts("attribution_behavior", args.prompts)
    if name == "hf":
        model = labkit.load_model("moe-organism")
    else:
        model = labkit.load_model("moe-organism", engine="vllm", tensor_parallel_size=int(name.removeprefix("tp")))
    try:
        runs = batches(model, prompts, args.new_tokens)
        outputs = {batch: fn() for batch, (fn, _) in runs.items()}
        medians = harness.interleaved_medians({batch: fn for batch, (fn, _) in runs.items()}, args.repeats)
        return {
            "outputs": outputs,
            "tok_s": {batch: runs[batch][1] / medians[batch] for batch in runs},
            "tokens": {batch: runs[batch][1] for batch in runs},
        }
    finally:
        if name != "hf":
            model.close()


def load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-tp", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--phase", choices=["hf", "tp1", "tp2"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if harness.smoke_requested():
        args.prompts, args.new_tokens, args.repeats, args.no_tp = 8, 4, 1, True
    try:
        import vllm
    except Exception as error:
        print(f"bench_vllm: skipped, vLLM is not importable ({type(error).__name__}); run make install-engine.")
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.phase:
        print("PHASE " + json.dumps(phase(args.phase, args)), flush=True)
        return
    phases = ["hf", "tp1"] + ([] if args.no_tp or (os.cpu_count() or 1) < 2 else ["tp2"])
    results, loads = {}, {}
    forwarded = ["--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    for name in phases:
        before, start = load(), time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--phase", name, *forwarded], capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("PHASE ")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"bench_vllm: phase {name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        results[name] = json.loads(lines[-1][len("PHASE "):])
        loads[name] = (before, load(), time.perf_counter() - start)
    for name in phases[1:]:
        for batch, output in results["hf"]["outputs"].items():
            if results[name]["outputs"][batch] != output:
                raise RuntimeError(f"bench_vllm: the {batch} batch differs between HF and vLLM {name.upper()}")
    print(f"bench_vllm: organism, {args.prompts} prompts x {args.new_tokens} new tokens, greedy float32, "
          f"{os.cpu_count()} CPU cores, vLLM {vllm.__version__}; each path in its own process, one at a time")
    for name, (before, after, seconds) in loads.items():
        print(f"  phase {name:3s}: 1-min load average {before:.2f} -> {after:.2f}, {seconds:.0f} s (with load/boot)")
    figures: dict[str, dict[str, float]] = {}
    for batch in results["hf"]["tok_s"]:
        row = {f"{name}_tok_s": results[name]["tok_s"][batch] for name in phases}
        row["tp1_over_hf"] = row["tp1_tok_s"] / row["hf_tok_s"]
        line = f"  {batch:8s} HF {row['hf_tok_s']:8.1f} tok/s   vLLM TP=1 {row['tp1_tok_s']:8.1f} tok/s   vLLM/HF {row['tp1_over_hf']:.2f}x"
        if "tp2_tok_s" in row:
            row["tp2_over_tp1"] = row["tp2_tok_s"] / row["tp1_tok_s"]
            line += f"   TP=2 {row['tp2_tok_s']:8.1f} tok/s   TP2/TP1 {row['tp2_over_tp1']:.2f}x"
        figures[batch] = row
        print(line)
    print("RESULT " + json.dumps(figures))


if __name__ == "__main__":
    main()
