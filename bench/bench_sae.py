"""SAE speed: encoding a cached batch vs a plain matmul; feature steering's cost on generation.

Two goals from issue 25, each a ratio measured in one run. The functions run in interleaved
rounds (baseline, subject, baseline, ... after one warm-up each) so a change of machine load
hits both alike; each round gives one ratio, and the bench prints the median ratio with its
spread (lowest–highest round) and the load average before and after.

1. **Encoding**: ``sae.encode_sparse(x)`` (the TopK SAE's encoder: ``k`` values and indices per
   row) on ``--rows`` cached activations, vs the plain matmul ``x @ W_enc`` of the same shapes.
   Goal: throughput ratio matmul time / encode time >= 0.9. Printed beside it, the breakdown:
   the encoder's matmul-add alone (in blocks into one reused buffer, as ``encode_sparse`` runs
   it), ``torch.topk`` alone on the full pre-activations, the encoder as it was before
   (``pre_activations`` then ``torch.topk``), and the dense ``encode`` (what
   ``feature_activations`` and ``feature_statistics`` call).
2. **Feature steering**: ``labkit.generate`` at batch 1 with ``steering=feature_vector(sae, i, 8)``
   vs unsteered ``labkit.generate`` (48 new tokens, greedy). Goal: time ratio <= 1.05. The
   cost of a :class:`~labkit.sae.FeatureClamp` (which runs the encoder at every step) is printed
   beside it, informational.

The SAE is the shipped one (``data/saes/...``); ``--smoke``: a tiny random model and SAE, one
round (checks the bench runs; numbers mean nothing). About a minute on a quiet 2-core machine.
On a machine other jobs load, wall-clock ratios mostly measure the neighbours: ``--clock cpu
--threads 1`` times this process's own CPU seconds instead (the work, not the waiting);
``--parts encode`` or ``--parts generate`` runs one half.

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python bench/bench_sae.py [--smoke]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import harness  # sets the repo root on sys.path and the offline switches

import torch

import labkit
from labkit.cache import cache_activations
from labkit.sae import SHIPPED_SMOLLM2, FeatureClamp, SparseAutoencoder, feature_vector, load_sae
from labkit.sae.model import BLOCK_ELEMENTS

PROMPT = "I went up to my friend and said"
TEXTS = [
    "The committee met on Tuesday to discuss the budget for next year.",
    "She opened the window and the smell of rain filled the small kitchen.",
    "A process can change its working directory with the chdir system call.",
    "Add the flour slowly, stirring all the time, until the dough is smooth.",
] * 8


def tiny_sae(model) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(0)
    d = int(model.cfg.d_model)
    return SparseAutoencoder("blocks.1.hook_resid_pre", torch.randn(d, 1024, generator=g), torch.zeros(1024),
                             torch.randn(1024, d, generator=g), torch.zeros(d), k=8, model_name="tiny-llama")


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved_rounds(
    functions: dict[str, Callable[[], object]], rounds: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, list[float]]:
    """Seconds of every call, per function, over ``rounds`` interleaved rounds after one warm-up each."""
    for fn in functions.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, fn in functions.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return times


def ratio_line(label: str, numerator: list[float], denominator: list[float], goal: str) -> str:
    """Median and spread (lowest–highest) of the per-round ratios numerator / denominator."""
    ratios = [a / b for a, b in zip(numerator, denominator)]
    return (f"RATIO {label}: {statistics.median(ratios):.3f}  (rounds {min(ratios):.3f}-{max(ratios):.3f}, "
            f"n={len(ratios)})  {goal}")


def ms(seconds: list[float]) -> str:
    return f"{1e3 * statistics.median(seconds):.1f} ms"


def encoding_functions(sae: SparseAutoencoder, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The baseline, the subject and the breakdown of the encoder on ``x``."""
    W_enc = sae.W_enc.float().contiguous()
    bias = sae.b_enc.float() - sae.b_dec.float() @ W_enc
    pre = torch.addmm(bias, x, W_enc)
    rows = max(1, min(x.shape[0], BLOCK_ELEMENTS // sae.d_sae))

    def blocked_addmm() -> None:
        buffer = torch.empty(rows, sae.d_sae)
        for start in range(0, x.shape[0], rows):
            chunk = x[start:start + rows]
            torch.addmm(bias, chunk, W_enc, out=buffer[: chunk.shape[0]])

    return {
        "matmul": lambda: x @ W_enc,
        "encode_sparse": lambda: sae.encode_sparse(x),
        "blocked_addmm": blocked_addmm,
        "topk": lambda: pre.topk(sae.k, dim=-1, sorted=False),
        "before": lambda: sae.pre_activations(x).topk(sae.k, dim=-1, sorted=False),
        "encode_dense": lambda: sae.encode(x),
    }


def encoding(model, sae: SparseAutoencoder, n_rows: int, rounds: int, clock: Callable[[], float]) -> None:
    """Goal 1: encode_sparse vs the plain matmul of the same shapes, with the breakdown."""
    cache = cache_activations(model, TEXTS, [sae.hook_name], progress=False)
    rows = cache[sae.hook_name].float()
    x = rows[torch.arange(n_rows) % rows.shape[0]].contiguous()
    sae.encode_sparse(x[:1])  # folds the bias once, as every later call reuses it
    enc = interleaved_rounds(encoding_functions(sae, x), rounds, clock)
    print(f"encode {n_rows} cached rows: matmul x @ W_enc {ms(enc['matmul'])}, encode_sparse {ms(enc['encode_sparse'])}")
    print(f"  breakdown: matmul-add in blocks {ms(enc['blocked_addmm'])}, torch.topk on full pre-activations "
          f"{ms(enc['topk'])}, before (pre_activations + torch.topk) {ms(enc['before'])}, dense encode {ms(enc['encode_dense'])}")
    print(ratio_line("encode_sparse throughput / matmul", enc["matmul"], enc["encode_sparse"], "(goal >= 0.9)"))
    print(ratio_line("before-this-change encoder / matmul", enc["matmul"], enc["before"], "(informational)"))
    print(ratio_line("dense encode / matmul", enc["matmul"], enc["encode_dense"], "(informational)"))


def generation(model, sae: SparseAutoencoder, n: int, rounds: int, clock: Callable[[], float]) -> None:
    """Goal 2: generation at batch 1 steered by a feature vector vs unsteered (and clamped)."""
    feature = int(sae.decoder_directions().norm(dim=-1).argmax())
    steer = feature_vector(sae, feature, 8.0)
    clamp = FeatureClamp(sae, {feature: 8.0})

    def run(steering):
        def go() -> None:
            out = labkit.generate(model, PROMPT, steering=steering, max_new_tokens=n, min_new_tokens=n)
            if len(out.token_ids[0]) != n:
                raise RuntimeError(f"expected {n} new tokens, got {len(out.token_ids[0])}")
        return go

    gen = interleaved_rounds({"plain": run(None), "feature": run(steer), "clamp": run(clamp)}, rounds, clock)
    print(f"generate {n} tokens, batch 1: plain {ms(gen['plain'])}, feature vector {ms(gen['feature'])}, clamp {ms(gen['clamp'])}")
    print(ratio_line("feature-steered / plain generation time", gen["feature"], gen["plain"], "(goal <= 1.05)"))
    print(ratio_line("clamped / plain generation time", gen["clamp"], gen["plain"], "(informational: encoder every step)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=7, help="generation rounds (encoding: 3x as many)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time (the goal's measure); cpu: CPU seconds of this process, all threads "
                             "(on a machine loaded by others, with --threads 1, this measures the work itself)")
    parser.add_argument("--parts", default="encode,generate", help="comma-separated: encode, generate")
    parser.add_argument("--smoke", action="store_true", help="tiny model, one round (checks it runs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    smoke = args.smoke or harness.smoke_requested([])
    if smoke:
        args.rows, args.new_tokens, args.repeats = 256, 8, 1
        model = harness.tiny_llama()
        sae = tiny_sae(model)
    else:
        model = labkit.load_model("smollm2-135m-instruct")
        sae = load_sae(SHIPPED_SMOLLM2, model)
    load_before = os.getloadavg()[0]
    clock = CLOCKS[args.clock]
    parts = set(args.parts.split(","))
    print(f"SAE {sae!r}; {torch.get_num_threads()} threads; {args.clock} clock; load average {load_before:.2f}")
    if "encode" in parts:
        encoding(model, sae, args.rows, args.repeats * 3, clock)
    if "generate" in parts:
        generation(model, sae, args.new_tokens, args.repeats, clock)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
