"""SAE speed: encoding a cached batch vs a plain matmul; feature steering's cost on generation.

Two ratios, each measured in one run with interleaved timings (median of ``--repeats``):

1. **Encoding**: ``sae.encode_sparse(x)`` (the TopK SAE's encoder: one fused matmul-add, then the
   top-k values and indices) on a batch of ``--rows`` cached activations, vs the plain matmul
   ``x @ W_enc`` of the same shapes. Goal: throughput ratio encode/matmul >= 0.9.
2. **Feature steering**: ``labkit.generate`` at batch 1 with ``steering=feature_vector(sae, i, 8)``
   vs unsteered ``labkit.generate`` (48 new tokens, greedy). Goal: time ratio <= 1.05. The
   cost of a :class:`~labkit.sae.FeatureClamp` (which runs the encoder at every step) is printed
   beside it, informational.

The SAE is the shipped one (``data/saes/...``); ``--smoke``: a tiny random model and SAE, one
repetition (checks the bench runs; numbers mean nothing).

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python bench/bench_sae.py [--smoke]
"""

from __future__ import annotations

import argparse

import harness  # sets the repo root on sys.path and the offline switches

import torch

import labkit
from labkit.cache import cache_activations
from labkit.sae import SHIPPED_SMOLLM2, FeatureClamp, SparseAutoencoder, feature_vector, load_sae

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
    return SparseAutoencoder("blocks.1.hook_resid_pre", torch.randn(d, 256, generator=g), torch.zeros(256),
                             torch.randn(256, d, generator=g), torch.zeros(d), k=8, model_name="tiny-llama")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, one repetition (checks it runs)")
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

    # 1. encoding a cached batch vs the plain matmul of the same shapes
    cache = cache_activations(model, TEXTS, [sae.hook_name], progress=False)
    rows = cache[sae.hook_name].float()
    x = rows[torch.arange(args.rows) % rows.shape[0]].contiguous()
    W_enc = sae.W_enc.float().contiguous()
    sae.encode_sparse(x[:1])  # folds the bias once, as every later call reuses it

    def matmul() -> None:
        x @ W_enc

    def encode() -> None:
        sae.encode_sparse(x)

    enc = harness.interleaved_medians({"matmul": matmul, "encode": encode}, args.repeats * 3)

    # 2. feature steering on generation, batch 1
    n = args.new_tokens
    feature = int(sae.decoder_directions().norm(dim=-1).argmax())
    steer = feature_vector(sae, feature, 8.0)
    clamp = FeatureClamp(sae, {feature: 8.0})

    def run(steering):
        def go() -> None:
            out = labkit.generate(model, PROMPT, steering=steering, max_new_tokens=n, min_new_tokens=n)
            if len(out.token_ids[0]) != n:
                raise RuntimeError(f"expected {n} new tokens, got {len(out.token_ids[0])}")
        return go

    gen = harness.interleaved_medians({"plain": run(None), "feature": run(steer), "clamp": run(clamp)}, args.repeats)
    print(f"SAE {sae!r}; {torch.get_num_threads()} threads; median of interleaved runs")
    print(f"encode {args.rows} cached rows: matmul {1e3 * enc['matmul']:.2f} ms, encode_sparse {1e3 * enc['encode']:.2f} ms")
    print(f"ratio encode/matmul throughput: {enc['matmul'] / enc['encode']:.3f}  (goal >= 0.9)")
    print(f"generate {n} tokens, batch 1: plain {enc_ms(gen['plain'])}, feature vector {enc_ms(gen['feature'])}, "
          f"clamp {enc_ms(gen['clamp'])}")
    print(f"ratio feature-steered/plain time: {gen['feature'] / gen['plain']:.3f}  (goal <= 1.05)")
    print(f"ratio clamped/plain time: {gen['clamp'] / gen['plain']:.3f}  (informational: the encoder runs every step)")


def enc_ms(seconds: float) -> str:
    return f"{1e3 * seconds:.0f} ms"


if __name__ == "__main__":
    main()
