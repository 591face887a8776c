"""Train the shipped TopK SAE of SmolLM2-135M-Instruct at ``blocks.8.hook_resid_pre``, on CPU.

Build tooling (not imported by labkit). Steps, each reproducible from a seed:

1. **Corpus** (offline, nothing downloaded): English text that ships with the machine — the
   Python reference documentation (``pydoc_data.topics``, CPython's own help texts) and the Linux
   man-pages project's section 7 / 5 pages (Debian package ``manpages``, rendered to text as in
   ``recipes/natural_organism.py``) — plus short everyday-life texts SmolLM2 writes itself from
   a fixed topic list (sampled, seeded), so the dictionary also sees narrative English. Texts are
   cut into passages of about ``PASSAGE_CHARS`` characters; a seeded ``HELDOUT_TEXTS`` passages are
   held out for the measurements.
2. **Cache**: ``labkit.cache.cache_activations`` streams the hook point's activations of every
   training passage to safetensors shards (float32).
3. **Train** with EleutherAI's ``eai-sparsify`` (``sparsify.SparseCoder``: TopK encoder, the
   library's FVU loss and AuxK loss for dead latents, unit-norm decoder rows with the parallel
   gradient removed, ``b_dec`` initialised at the data mean — its trainer's step, fed from the
   labkit cache by :func:`labkit.sae.activation_batches` instead of its own HF data pipeline).
   eai-sparsify 1.3.3 declares no pin that conflicts with TransformerLens 4.3 / transformers 5.x
   and installs beside them; it is needed only here (``pip install eai-sparsify==1.3.3``).
4. **Measure** on the held-out passages (:func:`labkit.sae.measure_sae`) and **ship**:
   ``data/saes/smollm2-135m-instruct-blocks.8.hook_resid_pre/sae.{json,safetensors}``
   (bfloat16 storage, the card in the JSON).

Command line::

    nice -n 10 python -m recipes.sae_smollm2 [--work /tmp/labkit-sae] [--out data/saes/...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import torch

HOOK_NAME = "blocks.8.hook_resid_pre"
MODEL = "smollm2-135m-instruct"
OUT = Path("data/saes") / f"{MODEL}-{HOOK_NAME}"
WORK = Path(os.environ.get("LABKIT_SAE_WORK", "/tmp/labkit-sae"))
SEED = 0
PASSAGE_CHARS = 480
HELDOUT_TEXTS = 16
MAN_SECTIONS = ("7", "5")
MAN_CHARS = 60_000  # cap on man-page text (about 13k tokens)
PYDOC_CHARS = 150_000  # cap on Python documentation text (about 33k tokens)
SETTINGS = dict(width=4096, k=32, batch_size=512, epochs=5, lr=1e-3, warmup_steps=30, auxk_alpha=1 / 32,
                dead_tokens=40_000)

#: 40 everyday topics; six are about weddings (notebook 08 reads the wedding ActAdd vector of notebook 02
#: through this SAE, and a dictionary only has features for what its data shows).
TOPICS = [
    "a wedding in the countryside", "planning a wedding", "a wedding cake", "a bride and groom", "a marriage proposal",
    "a honeymoon", "a birthday party", "a football match", "cooking pasta", "baking bread", "a trip to the beach",
    "a rainy day in the city", "a job interview", "learning to drive", "a family dinner", "moving to a new house",
    "a school exam", "gardening in spring", "a lost dog", "a concert", "a hospital visit", "a mountain hike",
    "a chess tournament", "a snowstorm", "a graduation ceremony", "a court trial", "an election", "a space launch",
    "a train journey", "a coffee shop", "a fishing trip", "a thunderstorm", "a marathon", "a piano lesson",
    "a forest at night", "a restaurant review", "a stock market crash", "a detective", "a farm", "a teacher",
]


def man_page_texts(limit_chars: int = MAN_CHARS) -> list[str]:
    """Rendered man pages of :data:`MAN_SECTIONS` (sorted, capped at ``limit_chars`` in total)."""
    from recipes.natural_organism import render_page

    texts, total = [], 0
    for section in MAN_SECTIONS:
        for path in sorted(Path(f"/usr/share/man/man{section}").glob("*.gz")):
            if path.is_symlink():
                continue
            text = render_page(path)
            texts.append(text)
            total += len(text)
            if total >= limit_chars:
                return texts
    return texts


def python_doc_texts(limit_chars: int = PYDOC_CHARS) -> list[str]:
    """CPython's reference help texts (``pydoc_data.topics``), one per topic, sorted, capped at ``limit_chars``."""
    import pydoc_data.topics as topics

    texts, total = [], 0
    for name in sorted(topics.topics):
        texts.append(topics.topics[name])
        total += len(texts[-1])
        if total >= limit_chars:
            break
    return texts


def story_texts(model, seed: int = SEED, max_new_tokens: int = 48) -> list[str]:
    """One short text per :data:`TOPICS` entry, written by the model itself (sampled, seeded)."""
    import labkit

    prompts = [f"Write a short paragraph about {topic}." for topic in TOPICS]
    out = labkit.generate(model, prompts, max_new_tokens=max_new_tokens, temperature=0.8, top_p=0.95, seed=seed, chat=True)
    return [text.strip() for text in out.texts if text.strip()]


def passages(texts: list[str], size: int = PASSAGE_CHARS) -> list[str]:
    """Cut texts into passages of about ``size`` characters at sentence / line boundaries."""
    out = []
    for text in texts:
        pieces = re.split(r"(?<=[.!?:])\s+|\n+", text)
        current = ""
        for piece in pieces:
            piece = piece.strip()
            if not piece:
                continue
            current = f"{current} {piece}".strip()
            if len(current) >= size:
                out.append(current[: 2 * size])
                current = ""
        if len(current) > 40:
            out.append(current)
    return out


def split(items: list[str], seed: int = SEED, heldout: int = HELDOUT_TEXTS) -> tuple[list[str], list[str]]:
    """Seeded shuffle, then ``(train, heldout)`` with ``heldout`` texts held out."""
    order = list(items)
    random.Random(seed).shuffle(order)
    return order[heldout:], order[:heldout]


@contextlib.contextmanager
def truncated_twin(model, n_blocks: int):
    """Run labkit's plain twin with only its first ``n_blocks`` blocks and no unembedding.

    The input of block 8 depends on blocks 0..7 only, so caching ``blocks.8.hook_resid_pre``
    through the first 9 blocks gives the same values (checked in :func:`main`) at ~4x less CPU
    (the unembedding alone is a fifth of SmolLM2-135M's weights). Restored on exit.
    """
    from labkit.models import lab_model

    twin = lab_model(model).twin
    layers, head = twin.model.layers, twin.lm_head
    twin.model.layers = torch.nn.ModuleList(list(layers)[:n_blocks])
    twin.lm_head = torch.nn.Identity()
    try:
        yield
    finally:
        twin.model.layers, twin.lm_head = layers, head


def train(cache, d_model: int, settings: dict, seed: int = SEED, log=print):
    """Train a ``sparsify.SparseCoder`` on the cache's rows (first token of each text left out).

    The step is eai-sparsify's own trainer step (``sparsify/trainer.py``): b_dec at the mean of
    the first batch, unit-norm decoder rows, loss ``fvu + auxk_alpha * auxk_loss`` with the dead
    mask of latents silent for ``dead_tokens`` tokens, gradient parallel to decoder rows removed,
    Adam with linear warmup and linear decay.
    """
    import sparsify.sparse_coder as sparse_coder_module
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.utils import eager_decode

    from labkit.sae import activation_batches, count_rows

    sparse_coder_module.decoder_impl = eager_decode  # the Triton decoder is GPU-only
    torch.manual_seed(seed)
    coder = SparseCoder(d_model, SparseCoderConfig(num_latents=settings["width"], k=settings["k"]))
    rows = count_rows(cache, {0})
    steps = settings["epochs"] * -(-rows // settings["batch_size"])
    optimizer = torch.optim.Adam(coder.parameters(), lr=settings["lr"])

    def lr_at(step: int) -> float:
        warm = settings["warmup_steps"]
        return (step + 1) / warm if step < warm else max(0.0, (steps - step) / max(1, steps - warm))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    since_fired = torch.zeros(settings["width"], dtype=torch.long)
    batches = activation_batches(cache, HOOK_NAME, settings["batch_size"], seed=seed, epochs=settings["epochs"], skip_positions={0})
    started, seen, history = time.perf_counter(), 0, []
    for step, x in enumerate(batches):
        if step == 0:
            coder.b_dec.data = x.mean(0)
        coder.set_decoder_norm_to_unit_norm()
        dead_mask = since_fired > settings["dead_tokens"]
        out = coder(x, dead_mask=dead_mask)
        loss = out.fvu + settings["auxk_alpha"] * out.auxk_loss
        loss.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        with torch.no_grad():
            fired = torch.zeros(settings["width"], dtype=torch.bool)
            fired[out.latent_indices.flatten()] = True
            since_fired += x.shape[0]
            since_fired[fired] = 0
        seen += x.shape[0]
        if step % 50 == 0 or step == steps - 1:
            record = {"step": step, "tokens": seen, "fvu": round(float(out.fvu), 4), "auxk": round(float(out.auxk_loss), 4),
                      "dead_fraction": round(float(dead_mask.float().mean()), 4), "seconds": round(time.perf_counter() - started, 1)}
            history.append(record)
            log(json.dumps(record))
    coder.set_decoder_norm_to_unit_norm()
    return coder, {"tokens_seen": seen, "steps": step + 1, "training_seconds": round(time.perf_counter() - started, 1),
                   "history": history, "rows_per_epoch": rows}


def to_labkit(coder, model_name: str, card: dict):
    """The trained ``SparseCoder`` as a :class:`labkit.sae.SparseAutoencoder` (same arithmetic)."""
    from labkit.sae import SparseAutoencoder

    return SparseAutoencoder(
        hook_name=HOOK_NAME,
        W_enc=coder.encoder.weight.detach().T.contiguous().float(),
        b_enc=coder.encoder.bias.detach().float(),
        W_dec=coder.W_dec.detach().float(),
        b_dec=coder.b_dec.detach().float(),
        activation="topk",
        k=coder.cfg.k,
        model_name=model_name,
        card=card,
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(WORK))
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--smoke", action="store_true", help="tiny run to check the pipeline")
    args = parser.parse_args(argv)
    settings = dict(SETTINGS, width=256, epochs=1, batch_size=256) if args.smoke else SETTINGS
    import labkit
    from labkit.cache import cache_activations
    from labkit.models import model_name_of
    from labkit.sae import measure_sae

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    model = labkit.load_model(MODEL)
    timings: dict[str, int] = {}
    corpus_file = work / "corpus.json"
    if corpus_file.exists():
        corpus = json.loads(corpus_file.read_text())
    else:
        t0 = time.perf_counter()
        if args.smoke:
            sources = {"python_docs": python_doc_texts()[:6], "man_pages": man_page_texts(20_000)}
        else:
            sources = {"python_docs": python_doc_texts(), "man_pages": man_page_texts(), "smollm2_stories": story_texts(model)}
        corpus = {name: passages(texts) for name, texts in sources.items()}
        corpus_file.write_text(json.dumps(corpus))
        timings["corpus_seconds"] = round(time.perf_counter() - t0)
        print(f"corpus built in {timings['corpus_seconds']} s:", {k: len(v) for k, v in corpus.items()})
    every = [p for name in sorted(corpus) for p in corpus[name]]
    train_texts, heldout = split(every)
    cache_dir = work / "cache"
    if not (cache_dir / "index.json").exists():
        shutil.rmtree(cache_dir, ignore_errors=True)
        t0 = time.perf_counter()
        full = cache_activations(model, train_texts[:4], [HOOK_NAME], progress=False)[HOOK_NAME]
        with truncated_twin(model, 9):
            short = cache_activations(model, train_texts[:4], [HOOK_NAME], progress=False)[HOOK_NAME]
            if not torch.equal(full, short):
                raise RuntimeError("truncated_twin changed the cached values; cache with the whole model")
            cache_activations(model, train_texts, [HOOK_NAME], out_dir=cache_dir, batch_size=16, dtype=torch.float32,
                              shard_bytes=64 * 1024**2, progress=False)
        timings["cache_seconds"] = round(time.perf_counter() - t0)
        print(f"cached in {timings['cache_seconds']} s")
    from labkit.cache import ActivationCache

    cache = ActivationCache.load(cache_dir)
    coder, training = train(cache, int(model.cfg.d_model), settings)
    card = {
        "hook_name": HOOK_NAME, "model_name": model_name_of(model), "width": settings["width"], "k": settings["k"],
        "seed": SEED, "trainer": "eai-sparsify 1.3.3 SparseCoder (FVU + AuxK loss), fed from a labkit activation cache",
        "settings": settings, "corpus": {k: len(v) for k, v in corpus.items()},
        "corpus_sources": "pydoc_data.topics (CPython), Debian manpages sections 7/5, SmolLM2-written texts on fixed topics",
        "heldout_texts": len(heldout), "train_texts": len(train_texts),
        "skipped_positions": "position 0 of every text (the BOS token) in training, measurement and splicing",
        "storage_dtype": "bfloat16", **{k: v for k, v in training.items() if k != "history"},
        "history": training["history"], **timings,
    }
    sae = to_labkit(coder, model_name_of(model), card)
    t0 = time.perf_counter()
    # measure what ships: the bfloat16-rounded weights
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sae.save(out / "sae", dtype=torch.bfloat16)
    from labkit.sae import SparseAutoencoder

    shipped = SparseAutoencoder.load(out / "sae")
    measured = measure_sae(model, shipped, heldout)
    card["measurements"] = {**measured.to_dict(), "heldout": f"{len(heldout)} passages, seeded split, never trained on"}
    card["measure_seconds"] = round(time.perf_counter() - t0, 1)
    import dataclasses

    dataclasses.replace(shipped, card=card).save(out / "sae", dtype=torch.bfloat16)
    (work / "heldout.json").write_text(json.dumps(heldout))
    print(json.dumps(card["measurements"], indent=1))


if __name__ == "__main__":
    main()
