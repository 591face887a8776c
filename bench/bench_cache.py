"""Benchmark activation caching on SmolLM2 (CPU); prints ratios measured in one run.

1. memory held by the cache / bytes of the requested tensors   (goal <= 1.1)
2. batched caching throughput / batch-size-1 throughput          (higher is better)

Run: .venv/bin/python bench/bench_cache.py
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil
import torch

import labkit
from labkit.cache import cache_activations

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    torch.manual_seed(0)
    model = labkit.load_model("smollm2-135m-instruct")
    rows = [json.loads(line) for line in (ROOT / "data/prompts/caching/facts.jsonl").read_text().splitlines()]
    prompts = [r["prompt"] for r in rows] * 2  # 32 prompts
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)]
    process = psutil.Process()

    cache_activations(model, prompts[:4], hooks, batch_size=4, progress=False)  # warm-up
    rss_before = process.memory_info().rss
    start = time.perf_counter()
    cache = cache_activations(model, prompts, hooks, batch_size=16, progress=False)
    batched_s = time.perf_counter() - start
    rss_after = process.memory_info().rss
    requested = sum(cache[name].numel() * cache[name].element_size() for name in hooks)
    held = cache.nbytes()

    start = time.perf_counter()
    cache_activations(model, prompts, hooks, batch_size=1, progress=False)
    single_s = time.perf_counter() - start

    print(f"prompts={len(prompts)} hook points={len(hooks)} rows={len(cache)}")
    print(f"requested tensor bytes      {requested / 2**20:9.2f} MiB")
    print(f"cache storage held          {held / 2**20:9.2f} MiB   ratio held/requested = {held / requested:.3f} (goal <= 1.1)")
    print(f"process RSS growth          {(rss_after - rss_before) / 2**20:9.2f} MiB   ratio RSS/requested = {(rss_after - rss_before) / requested:.3f}")
    print(f"batch 16: {len(prompts) / batched_s:7.2f} prompts/s   batch 1: {len(prompts) / single_s:7.2f} prompts/s")
    print(f"ratio batched/batch-1 throughput = {single_s / batched_s:.2f}x")


if __name__ == "__main__":
    main()
