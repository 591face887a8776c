"""Run the organism on vLLM at a given tensor-parallel size and print the outputs as JSON.

``tests/test_vllm.py`` runs this in a subprocess (tensor parallelism spawns worker processes, so
the launching script needs the ``if __name__ == "__main__":`` guard) and compares the result
with the TP=1 engine of the test module. Usage::

    python tests/vllm_tp_run.py <tensor_parallel_size>   # prints one JSON line, prefixed "RESULT "
"""

from __future__ import annotations

import json
import os
import sys

CASES_MASK = [(1, 13), (2, 5)]


def cases(model, hf_names_model=None):
    """Steering and masks used for the TP comparison (built on the engine itself)."""
    import torch

    from labkit.steering import SteeringVector

    torch.manual_seed(0)
    direction = SteeringVector(
        "blocks.1.hook_resid_pre", torch.randn(model.cfg.d_model), coefficient=3.0, positions="all", model_name=model.name
    )
    front = SteeringVector(
        "blocks.2.hook_resid_pre", torch.randn(4, model.cfg.d_model), coefficient=3.0, positions="front", model_name=model.name
    )
    return direction, front


def run(model, prompts: list[str], max_new_tokens: int = 10) -> dict:
    import labkit
    from labkit.moe import ExpertMask, masked, trace_routing

    direction, front = cases(model)
    out = {
        "plain": labkit.generate(model, prompts, max_new_tokens=max_new_tokens).token_ids,
        "steered": labkit.generate(
            model, prompts, steering_per_prompt=[direction, None, front, direction.with_positions("generated")][: len(prompts)],
            max_new_tokens=max_new_tokens,
        ).token_ids,
    }
    with masked(model, ExpertMask.off(CASES_MASK, model=model)):
        out["masked_off"] = labkit.generate(model, prompts, max_new_tokens=max_new_tokens).token_ids
    with masked(model, ExpertMask.on(CASES_MASK, model=model)):
        out["masked_on"] = labkit.generate(model, prompts, max_new_tokens=max_new_tokens).token_ids
    out["trace"] = trace_routing(model, prompts).topk_indices.tolist()
    out["cache"] = cached(model, prompts)
    return out


#: Hook points cached at TP=1 and TP=2 (compared with a tolerance, not for equality: ``cache``).
CACHE_NAMES = [f"blocks.1.{p}" for p in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")] + [
    "blocks.2.mlp.hook_router_logits"
]


def cached(model, prompts: list[str]) -> dict:
    """``cache_activations`` of :data:`CACHE_NAMES` (all positions) as nested lists, under one steering vector."""
    import labkit
    from labkit.cache import cache_activations

    direction, _front = cases(model)
    with labkit.steered(model, direction):
        cache = cache_activations(model, prompts, CACHE_NAMES, progress=False)
    return {name: cache[name].float().tolist() for name in CACHE_NAMES}


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import labkit
    from labkit.datasets import read_prompts

    size = int(sys.argv[1])
    prompts = read_prompts("eval_sensitive", 2) + read_prompts("eval_neutral", 2)
    model = labkit.load_model("moe-organism", engine="vllm", tensor_parallel_size=size, max_num_batched_tokens=16)
    try:
        print("RESULT " + json.dumps(run(model, prompts)), flush=True)
    finally:
        model.close()


if __name__ == "__main__":
    main()
