"""Benchmark routing traces and expert masks (CPU); prints ratios measured in one run.

Model: the shipped organism ``data/models/moe-organism`` when it exists, else a random OLMoE of
the organism's shape (3 layers, hidden 128, 16 experts, top-1 — ``recipes.organism.organism_config``)
with the offline test tokenizer. Prompts: ``data/prompts/organism/attribution_behavior.jsonl``.

1. routing-trace capture throughput / plain forward throughput    (goal >= 0.85)
   (same batches, same forward arguments; the difference is the router hooks + bookkeeping)
2. batched capture throughput / batch-size-1 capture throughput   (goal >= 5x)
3. masked generation tokens/s / unmasked generation tokens/s       (goal >= 0.90)
   (greedy, KV cache, fixed length; the mask switches off 2 experts in every MoE layer)

Each figure is the median of ``--repeats`` interleaved runs after one warm-up each, timed in
process CPU seconds when ``--threads 1`` (robust to other jobs on a shared machine), else
wall-clock seconds. ``--smoke``: 8 prompts, 4 new tokens, one repetition (checks it runs).

Run: .venv/bin/python bench/bench_moe.py [--repeats 5] [--threads 1] [--prompts 64] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import time

import harness  # sets the repo root on sys.path and the offline switches

import torch

from labkit.models import left_pad
from labkit.moe import ExpertMask, masked, moe_layers, trace_routing
from labkit.moe.families import find_routers

ROOT = harness.ROOT


def load() -> tuple[torch.nn.Module, object, str]:
    """The organism as a plain HF model + tokenizer, or a random model of its shape."""
    organism = ROOT / "data/models/moe-organism"
    if (organism / "config.json").is_file():
        from labkit.models import hf_model_of, load_model, tokenizer_of

        bridge = load_model(str(organism))
        return hf_model_of(bridge), tokenizer_of(bridge), "moe-organism (shipped)"
    from recipes.organism import organism_config
    from tests.conftest import make_tokenizer

    tokenizer = make_tokenizer()
    tokenizer.padding_side = "left"
    config = organism_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 3:  # batched expert weights start uninitialised
                parameter.normal_(0, 0.05)
    return model, tokenizer, "random OLMoE of the organism's shape (no data/models/moe-organism)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (shared machines: 1)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--smoke", action="store_true", help="few prompts, one repetition (checks it runs)")
    args = parser.parse_args()
    if args.smoke or harness.smoke_requested([]):
        args.prompts, args.new_tokens, args.repeats, args.batch_size = 8, 4, 1, 4
    torch.set_num_threads(args.threads)

    model, tokenizer, label = load()
    rows = [json.loads(line) for line in (ROOT / "data/prompts/organism/attribution_behavior.jsonl").read_text().splitlines()]
    prompts = [row["prompt"] for row in rows[: args.prompts]]
    token_rows = [tokenizer(p)["input_ids"] for p in prompts]
    n_tokens = sum(map(len, token_rows))
    routers = find_routers(model)
    print(f"model: {label}; MoE layers {moe_layers(model)}, {routers[0].n_experts} experts, top-{routers[0].top_k}")
    print(f"{len(prompts)} prompts, {n_tokens} tokens, batch size {args.batch_size}, threads {args.threads}")

    order = sorted(range(len(token_rows)), key=lambda i: len(token_rows[i]))
    batches = [
        left_pad([token_rows[i] for i in order[s : s + args.batch_size]], tokenizer.pad_token_id, "cpu")
        for s in range(0, len(order), args.batch_size)
    ]

    def plain_forward():
        with torch.inference_mode():
            for input_ids, attention_mask, position_ids in batches:
                model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False, logits_to_keep=1)

    def capture(batch_size: int):
        def run():
            trace = trace_routing(model, token_rows, batch_size=batch_size, progress=False)
            if trace.n_prompts != len(token_rows) or trace.n_tokens != n_tokens:
                raise RuntimeError(f"trace of {trace.n_prompts} prompts / {trace.n_tokens} tokens, "
                                   f"expected {len(token_rows)} / {n_tokens}")
        return run

    def generation(mask: ExpertMask | None):
        input_ids, attention_mask, _ = left_pad(token_rows[:8], tokenizer.pad_token_id, "cpu")

        def run():
            with torch.inference_mode(), (masked(model, mask) if mask is not None else _null()):
                out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                     max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                     pad_token_id=tokenizer.pad_token_id)
            if out.shape[1] != input_ids.shape[1] + args.new_tokens:
                raise RuntimeError(f"generated {out.shape[1] - input_ids.shape[1]} tokens, expected {args.new_tokens}")
        return run

    mask = ExpertMask.off({layer: [0, 1] for layer in moe_layers(model)})
    # CPU time, not wall time, with one thread: on a shared machine the wall time of a
    # single-threaded run swings by 2x with the neighbours' load, the CPU time it used does not
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    seconds = harness.interleaved_medians(
        {
            "plain": plain_forward, "capture": capture(args.batch_size), "single": capture(1),
            "generation": generation(None), "masked": generation(mask),
        },
        args.repeats, clock=clock,
    )
    plain_s, capture_s, single_s = seconds["plain"], seconds["capture"], seconds["single"]
    gen_s, masked_s = seconds["generation"], seconds["masked"]

    gen_tokens = 8 * args.new_tokens
    print(f"plain forward            {n_tokens / plain_s:10.0f} tokens/s")
    print(f"trace capture (batched)  {n_tokens / capture_s:10.0f} tokens/s")
    print(f"trace capture (batch 1)  {n_tokens / single_s:10.0f} tokens/s")
    print(f"generation               {gen_tokens / gen_s:10.0f} tokens/s")
    print(f"masked generation        {gen_tokens / masked_s:10.0f} tokens/s")
    print(f"capture / plain forward      = {plain_s / capture_s:.2f}  (goal >= 0.85)")
    print(f"batched / batch-1 capture    = {single_s / capture_s:.2f}x (goal >= 5x)")
    print(f"masked / unmasked generation = {gen_s / masked_s:.2f}  (goal >= 0.90)")


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
