"""Run one tiny family checkpoint on vLLM at a tensor-parallel size; print the outputs as JSON.

``tests/test_vllm_families.py`` runs this in a subprocess (tensor parallelism spawns worker
processes, so the launching script needs the ``if __name__ == "__main__":`` guard) and compares
the result with the Hugging Face path on the same checkpoint. Usage::

    python tests/vllm_tp_family_run.py <checkpoint dir> <tensor_parallel_size> <mask json> [mla]
"""

from __future__ import annotations

import json
import os
import sys

PROMPTS = ["the cat sat on a mat", "what happened in the city during war and peace", "one two three four five"]
N = 8


def run(model, mask_pairs: list[list[int]], model_name: str) -> dict:
    """Plain, steered, masked (off) greedy token ids and the routing trace, on any handle."""
    import torch

    import labkit
    from labkit.moe import ExpertMask, masked, trace_routing
    from labkit.steering import SteeringVector

    torch.manual_seed(0)
    direction = torch.randn(model.cfg.d_model)
    vector = SteeringVector("blocks.1.hook_resid_pre", 8.0 * direction / direction.norm(), coefficient=1.0,
                            positions="all", model_name=model_name)
    out = {
        "plain": labkit.generate(model, PROMPTS, max_new_tokens=N).token_ids,
        "steered": labkit.generate(model, PROMPTS, steering=vector, max_new_tokens=N).token_ids,
    }
    options = {"include_router_logits": True, **({} if getattr(model, "labkit_engine", None) else {"progress": False})}
    mask = ExpertMask.off([tuple(p) for p in mask_pairs], model=model)
    with masked(model, mask):
        out["masked_off"] = labkit.generate(model, PROMPTS, max_new_tokens=N).token_ids
        trace = trace_routing(model, PROMPTS, **options)
        out["masked_trace"] = {name: getattr(trace, name).tolist() for name in ("topk_indices", "topk_weights", "router_logits")}
    trace = trace_routing(model, PROMPTS, **options)
    out["layers"] = list(trace.layers)
    out["topk_indices"] = trace.topk_indices.tolist()
    out["topk_weights"] = trace.topk_weights.tolist()
    out["router_logits"] = trace.router_logits.tolist()
    out["cache"] = cached(model, out["layers"])
    return out


def cache_names(moe_layers: list[int]) -> list[str]:
    """The hook points cached at every TP size: the first MoE layer's stream and outputs, every router's logits."""
    layer = moe_layers[0]
    points = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
    return [f"blocks.{layer}.{p}" for p in points] + [f"blocks.{m}.mlp.hook_router_logits" for m in moe_layers]


def cached(model, moe_layers: list[int]) -> dict:
    """``cache_activations`` (all positions) as nested lists."""
    from labkit.cache import cache_activations

    names = cache_names(moe_layers)
    cache = cache_activations(model, PROMPTS, names, progress=False)
    return {name: cache[name].float().tolist() for name in names}


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import labkit

    path, size, mask_json = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    extra = {"enable_chunked_prefill": False, "enable_prefix_caching": False} if sys.argv[4:] == ["mla"] else {}
    engine = labkit.load_model(path, engine="vllm", tensor_parallel_size=size, **extra)
    try:
        print("RESULT " + json.dumps(run(engine, json.loads(mask_json), engine.name)), flush=True)
    finally:
        engine.close()
