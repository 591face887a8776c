"""Benchmark activation caching on SmolLM2 (CPU); prints ratios measured in one run.

1. memory held by the cache / bytes of the requested tensors   (goal <= 1.1)
2. batched caching throughput / batch-size-1 throughput          (higher is better)
3. caching one hook point / a plain forward of the same batches    (goal >= 0.95)

Timings: one warm-up each, then the median of ``--repeats`` interleaved runs (batch 16, batch 1,
batch 16, ...). ``--smoke``: a tiny random model, 4 prompts, one repetition.

Run: .venv/bin/python bench/bench_cache.py [--repeats 3] [--smoke]
"""

from __future__ import annotations

import argparse
import json

import harness  # noqa: F401  (sets the repo root on sys.path and the offline switches)

import psutil
import torch

import labkit
import labkit.backends
from labkit.cache import cache_activations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny model, one repetition (checks it runs)")
    args = parser.parse_args()
    smoke = args.smoke or harness.smoke_requested([])
    torch.manual_seed(0)
    model = harness.tiny_llama() if smoke else labkit.load_model("smollm2-135m-instruct")
    rows = [json.loads(line) for line in (harness.ROOT / "data/prompts/caching/facts.jsonl").read_text().splitlines()]
    prompts = [r["prompt"] for r in rows] * 2  # 32 prompts
    repeats = 1 if smoke else args.repeats
    if smoke:
        prompts = prompts[:4]
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)]
    process = psutil.Process()

    cache_activations(model, prompts[:4], hooks, batch_size=4, progress=False)  # warm-up
    rss_before = process.memory_info().rss
    cache = cache_activations(model, prompts, hooks, batch_size=16, progress=False)
    rss_after = process.memory_info().rss
    if cache.n_prompts != len(prompts):
        raise RuntimeError(f"cache holds {cache.n_prompts} prompts for {len(prompts)} prompts")
    requested = sum(cache[name].numel() * cache[name].element_size() for name in hooks)
    held = cache.nbytes()
    del cache

    def run(batch_size: int):
        def fn():
            result = cache_activations(model, prompts, hooks, batch_size=batch_size, progress=False)
            if result.n_prompts != len(prompts):
                raise RuntimeError(f"batch {batch_size}: {result.n_prompts} prompts for {len(prompts)} prompts")
        return fn

    backend = labkit.backends.backend_of(model)
    encoded = [backend.encode(p) for p in prompts]

    def plain_forward():
        """The twin's forward over the same left-padded batches of 16, nothing hooked or kept."""
        from labkit.tokens import left_pad

        with torch.inference_mode():
            for start in range(0, len(encoded), 16):
                ids, mask, positions = left_pad(encoded[start:start + 16], backend.tokenizer.pad_token_id)
                backend.twin(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=1)

    def one_hook():
        cache_activations(model, prompts, [hooks[len(hooks) // 2]], batch_size=16, progress=False)

    seconds = harness.interleaved_medians(
        {"batched": run(16), "single": run(1), "plain": plain_forward, "one_hook": one_hook}, repeats
    )
    batched_s, single_s = seconds["batched"], seconds["single"]
    print(f"prompts={len(prompts)} hook points={len(hooks)}{' (smoke run: numbers mean nothing)' if smoke else ''}")
    print(f"requested tensor bytes      {requested / 2**20:9.2f} MiB")
    print(f"cache storage held          {held / 2**20:9.2f} MiB   ratio held/requested = {held / requested:.3f} (goal <= 1.1)")
    print(f"process RSS growth          {(rss_after - rss_before) / 2**20:9.2f} MiB   ratio RSS/requested = {(rss_after - rss_before) / requested:.3f}")
    print(f"batch 16: {len(prompts) / batched_s:7.2f} prompts/s   batch 1: {len(prompts) / single_s:7.2f} prompts/s"
          f"   (median of {repeats})")
    print(f"ratio batched/batch-1 throughput = {single_s / batched_s:.2f}x")
    print(f"plain forward {len(prompts) / seconds['plain']:7.2f} prompts/s   caching one hook point "
          f"{len(prompts) / seconds['one_hook']:7.2f} prompts/s")
    print(f"ratio caching/plain forward = {seconds['plain'] / seconds['one_hook']:.3f}  (goal >= 0.95)")


if __name__ == "__main__":
    main()
