"""A naturally trained MoE organism: a tiny OLMoE trained on English and French manual pages.

The shipped organisms (``recipes.organism``) localise their behaviour by design. This recipe
trains one whose experts specialise on their own: the ordinary next-token loss plus OLMoE's usual
load-balancing loss (``router_aux_loss_coef``, Switch-Transformer style; Muennighoff et al. 2024,
"OLMoE", section 2) and nothing else -- no routing supervision, no designated experts, no
intervention training. The behaviour is the language of the text: MoE routers are known to
specialise on language and domain (OLMoE section 5, "domain and vocabulary specialisation";
Mixtral, Jiang et al. 2024, section 5), and language can be measured in a way garble cannot fake
(per-language perplexity, the language of generated text).

1. ``install_sources()``: the Debian packages ``manpages``/``manpages-dev`` (English, the Linux
   man-pages project) and ``manpages-fr``/``manpages-fr-dev`` (French, the manpages-l10n project),
   via ``apt-get`` (root). Versions are recorded.
2. ``render_corpus()``: every page of sections 2, 5 and 7 present in both languages, rendered to
   plain text by man-db (``man -l``, groff's ``grotty``) and ``col -b``; header/footer dropped.
3. ``split_documents()``: train / held-out by *document* (a page name is held out in both languages,
   so the held-out English and French sets are translations of each other).
4. ``train_tokenizer()``, ``natural_config()``, ``train()``: byte-level BPE on the training
   documents; a 3-layer OLMoE (hidden 128, 16 experts of width 128, top-2) trained on random 128-token windows.
   Checkpoints every ``checkpoint_every`` steps, so a cut-off run still leaves a model.
5. ``measure()``: the lab's own tools on the shipped model (``labkit.load_model``): fTRI frequency
   attribution (French vs English passages), causal attribution (exact and first order) on each
   French passage's own continuation, minimal masks validated on held-out pages, and the MoTE
   table (per-language perplexity, language of generated text); ``measurement.json``;
   ``model_card()`` writes ``README.md``.

Command line::

    python -m recipes.natural_organism corpus          # install sources, render, split, prompt sets
    python -m recipes.natural_organism train --out data/models/moe-organism-natural
    python -m recipes.natural_organism measure --model data/models/moe-organism-natural
    python -m recipes.natural_organism card --model data/models/moe-organism-natural
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import random
import re
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

__all__ = [
    "LANGUAGES",
    "PACKAGES",
    "SECTIONS",
    "TrainSettings",
    "behavior_metrics",
    "install_sources",
    "logprob_ablation",
    "measure",
    "model_card",
    "language_of",
    "natural_config",
    "passages",
    "render_corpus",
    "render_page",
    "split_documents",
    "train",
    "train_tokenizer",
]

LANGUAGES = ("en", "fr")
PACKAGES = {"en": ("manpages", "manpages-dev"), "fr": ("manpages-fr", "manpages-fr-dev")}
MAN_ROOTS = {"en": Path("/usr/share/man"), "fr": Path("/usr/share/man/fr")}
SECTIONS = ("2", "5", "7")
HELDOUT_FRACTION = 0.12
PROMPT_TOKENS = 24
TARGET_TOKENS = 8
DEFAULT_WORK = Path(os.environ.get("LABKIT_NATURAL_WORK", "/tmp/labkit-natural"))
PROMPT_DIR = Path("data/prompts/natural")

# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def install_sources() -> dict[str, str]:
    """Install the manual-page packages with ``apt-get`` (needs root) and return their versions.

    Raises:
        RuntimeError: ``apt-get`` failed (not root, no package index): the message says which
            packages to install by hand.
    """
    packages = [p for pair in PACKAGES.values() for p in pair]
    missing = [p for p in packages if not _version(p)]
    if missing:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        done = subprocess.run(["apt-get", "install", "-y", *missing], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(
                f"install_sources: apt-get install {' '.join(missing)} failed (rc {done.returncode}); "
                f"run it as root (after apt-get update). stderr: {done.stderr[-500:]}"
            )
    return {p: _version(p) for p in packages}


def _version(package: str) -> str:
    done = subprocess.run(["dpkg-query", "-W", "-f=${Status} ${Version}", package], capture_output=True, text=True)
    if done.returncode != 0 or not done.stdout.startswith("install ok installed"):
        return ""
    return done.stdout.split()[-1]


def render_page(path: str | os.PathLike) -> str:
    """Render one manual page to plain text: ``man -l`` (groff/grotty, UTF-8), ``col -b``, cleaned.

    Lines are not wrapped (``MANWIDTH=4000``), so each paragraph is one line; the header and footer
    lines are dropped, indentation and tab runs collapse to one space, paragraphs are separated by
    one blank line.
    """
    env = dict(os.environ, MANWIDTH="4000", MAN_KEEP_FORMATTING="", LC_ALL="C.UTF-8")
    formatted = subprocess.run(["man", "-l", "-E", "UTF-8", str(path)], env=env, capture_output=True)
    plain = subprocess.run(["col", "-b", "-x"], input=formatted.stdout, capture_output=True, env=env).stdout
    lines = plain.decode("utf-8", errors="replace").splitlines()[1:-1]
    paragraphs, current = [], []
    for line in lines:
        line = re.sub(r"\s+", " ", line).strip()
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def _page_names(section: str) -> list[str]:
    names = {}
    for language in LANGUAGES:
        folder = MAN_ROOTS[language] / f"man{section}"
        names[language] = {p.name for p in folder.glob("*.gz")} if folder.is_dir() else set()
    return sorted(names["en"] & names["fr"])


def render_corpus(work: str | os.PathLike = DEFAULT_WORK, workers: int = 6) -> Path:
    """Render every page of ``SECTIONS`` present in both languages to ``work/<lang>/<page>.txt``.

    Symbolic links (aliases such as ``_exit.2`` -> ``exit.2``) are skipped, so a document appears
    once. Pages already rendered are kept. Returns ``work``.
    """
    work = Path(work)
    jobs = []
    for section in SECTIONS:
        for name in _page_names(section):
            for language in LANGUAGES:
                source = MAN_ROOTS[language] / f"man{section}" / name
                if source.is_symlink():
                    continue
                target = work / language / (name.removesuffix(".gz") + ".txt")
                if not target.exists():
                    jobs.append((source, target))
    for language in LANGUAGES:
        (work / language).mkdir(parents=True, exist_ok=True)

    def one(job):
        source, target = job
        target.write_text(render_page(source) + "\n")

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, jobs))
    return work


def documents(work: str | os.PathLike = DEFAULT_WORK) -> dict[str, dict[str, str]]:
    """``{page: {"en": text, "fr": text}}`` for every page rendered in both languages (non-empty)."""
    work = Path(work)
    out = {}
    for path in sorted((work / "en").glob("*.txt")):
        other = work / "fr" / path.name
        if other.exists():
            en, fr = path.read_text().strip(), other.read_text().strip()
            if en and fr:
                out[path.name.removesuffix(".txt")] = {"en": en, "fr": fr}
    return out


def split_documents(names: Sequence[str], seed: int = 0, heldout_fraction: float = HELDOUT_FRACTION) -> dict[str, list[str]]:
    """Split page names into ``train`` and ``heldout`` (seeded, over the sorted names)."""
    names = sorted(names)
    heldout = set(random.Random(seed).sample(names, max(1, round(heldout_fraction * len(names)))))
    return {"train": [n for n in names if n not in heldout], "heldout": [n for n in names if n in heldout]}


# --------------------------------------------------------------------------------------------
# Language detector
# --------------------------------------------------------------------------------------------

STOP_WORDS = {
    "en": frozenset("the of and to is in that for it with as are be by this on not or an if which "
                    "from when can has was will been these than then there their its only".split()),
    "fr": frozenset("le la les de des du et est un une dans pour que qui sur par pas ne avec au aux ce "
                    "cette sont être ou il elle si lorsque peut été sera ces dont leur où mais être".split()),
}


def language_of(text: str, min_hits: int = 2) -> str:
    """``"en"``, ``"fr"`` or ``"unknown"`` by counting stop words (lower-cased word tokens).

    A text is in a language when that language's stop words outnumber the other's and occur at
    least ``min_hits`` times; otherwise ``"unknown"`` (garble, code, a list of names). A stop-word
    count cannot be faked by repetition of one token only if it is not one of these words; the
    measurement reports the ``unknown`` share beside it.
    """
    words = re.findall(r"[a-zà-ÿ']+", text.lower())
    words = [w.split("'")[-1] for w in words]  # l'erreur -> erreur, d'un -> un
    hits = {lang: sum(w in STOP_WORDS[lang] for w in words) for lang in LANGUAGES}
    en, fr = hits["en"], hits["fr"]
    if fr > en and fr >= min_hits:
        return "fr"
    if en > fr and en >= min_hits:
        return "en"
    return "unknown"


# --------------------------------------------------------------------------------------------
# Tokenizer, passages, model
# --------------------------------------------------------------------------------------------


def train_tokenizer(texts: Sequence[str], vocab_size: int = 2048):
    """Byte-level BPE (``tokenizers``) on ``texts``; ``<pad>`` id 0, ``<eos>`` id 1, left padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                                   padding_side="left")


def passages(docs: dict[str, dict[str, str]], names: Sequence[str], language: str, tokenizer, per_document: int,
             limit: int, seed: int = 0) -> list[dict]:
    """Prose passages of ``language`` from the pages ``names``: prompt = first 24 tokens, target = next 8.

    A paragraph qualifies when it has at least ``PROMPT_TOKENS + TARGET_TOKENS`` tokens and the
    stop-word detector assigns it ``language`` (French pages keep some untranslated English text
    and code). Prompt and target are decoded from the paragraph's own token ids and kept only if
    they re-encode to the same ids, so ``prompt + target`` is exactly the paragraph's beginning.
    At most ``per_document`` passages per page, then ``limit`` passages drawn over pages (seeded).
    """
    rows = []
    for name in names:
        taken = 0
        for paragraph in docs[name][language].split("\n\n"):
            if taken >= per_document:
                break
            ids = tokenizer.encode(paragraph, add_special_tokens=False)
            if len(ids) < PROMPT_TOKENS + TARGET_TOKENS or language_of(paragraph) != language:
                continue
            prompt = tokenizer.decode(ids[:PROMPT_TOKENS])
            target = tokenizer.decode(ids[PROMPT_TOKENS:PROMPT_TOKENS + TARGET_TOKENS])
            if (tokenizer.encode(prompt, add_special_tokens=False) != ids[:PROMPT_TOKENS]
                    or tokenizer.encode(target, add_special_tokens=False) != ids[PROMPT_TOKENS:PROMPT_TOKENS + TARGET_TOKENS]):
                continue
            text = tokenizer.decode(ids[:128])
            rows.append({"document": name, "language": language, "prompt": prompt, "target": target, "text": text})
            taken += 1
    rng = random.Random(seed)
    return sorted(rng.sample(rows, min(limit, len(rows))), key=lambda r: (r["document"], r["prompt"]))


def natural_config(vocab_size: int, num_layers: int = 3, num_experts: int = 16, top_k: int = 2, hidden_size: int = 128,
                   expert_size: int = 128, aux_loss_coef: float = 0.01, max_positions: int = 256):
    """The natural organism's ``OlmoeConfig``: OLMoE's own defaults where they fit a tiny model.

    ``norm_topk_prob=False`` and ``router_aux_loss_coef=0.01`` as in OLMoE-1B-7B; 4 heads; 3 layers,
    16 experts of width 128, top-2.
    """
    from transformers import OlmoeConfig

    config = OlmoeConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=expert_size, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_positions, num_experts=num_experts,
        num_experts_per_tok=top_k, norm_topk_prob=False, router_aux_loss_coef=aux_loss_coef,
        output_router_logits=False, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )
    config.architectures = ["OlmoeForCausalLM"]
    return config


@dataclass(frozen=True)
class TrainSettings:
    """Hyperparameters of the natural organism's training run."""

    seed: int = 0
    steps: int = 650
    batch_size: int = 16
    context: int = 128
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01
    num_layers: int = 3
    num_experts: int = 16
    top_k: int = 2
    hidden_size: int = 128
    expert_size: int = 128
    vocab_size: int = 2048
    threads: int = 1  # on the shared 2-core machine 1 thread ran 5x faster per step than 2 (contention)
    checkpoint_every: int = 100
    max_minutes: float = 21.0

    def __post_init__(self):
        for name in ("steps", "batch_size", "context", "num_layers", "num_experts", "top_k", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainSettings: {name} must be ≥ 1, got {getattr(self, name)}.")
        if self.top_k > self.num_experts:
            raise ValueError(f"TrainSettings: top_k {self.top_k} > num_experts {self.num_experts}.")

    def to_dict(self) -> dict:
        return {"kind": "natural_organism_train_settings", "version": 1, **asdict(self)}


def _stream(tokenizer, docs, names) -> "object":
    import torch

    ids = []
    for name in names:
        for language in LANGUAGES:
            ids.extend(tokenizer.encode(docs[name][language], add_special_tokens=False))
            ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def _save(model, tokenizer, out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "labkit.json").write_text(json.dumps(meta, indent=1) + "\n")


def train(settings: TrainSettings, out_dir: str | os.PathLike, work: str | os.PathLike = DEFAULT_WORK,
          progress: bool = True) -> dict:
    """Train the natural organism on the rendered training pages and save it to ``out_dir``.

    Method: next-token cross-entropy over random ``context``-token windows of the concatenated
    training pages (both languages, each page ended by ``<eos>``) plus OLMoE's load-balancing loss
    (``output_router_logits=True``; ``loss = lm + router_aux_loss_coef * aux``). AdamW, linear
    warmup then cosine to 10%, gradient clipping. Saves a checkpoint (weights, tokenizer,
    ``labkit.json``) every ``checkpoint_every`` steps and stops early, saving, after
    ``max_minutes`` of wall time (the steps done are recorded).

    Returns:
        The metadata written to ``out_dir/labkit.json``.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import OlmoeForCausalLM

    torch.set_num_threads(settings.threads)
    started = time.time()
    docs = documents(work)
    split = split_documents(list(docs), settings.seed)
    tokenizer = train_tokenizer([docs[n][lang] for n in split["train"] for lang in LANGUAGES], settings.vocab_size)
    stream = _stream(tokenizer, docs, split["train"])
    heldout_stream = _stream(tokenizer, docs, split["heldout"])
    torch.manual_seed(settings.seed)
    config = natural_config(len(tokenizer), settings.num_layers, settings.num_experts, settings.top_k,
                            settings.hidden_size, settings.expert_size, settings.aux_loss_coef, max(256, settings.context))
    model = OlmoeForCausalLM(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, betas=(0.9, 0.95),
                                  weight_decay=settings.weight_decay)

    def lr_at(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        t = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    meta = {
        "kind": "labkit_moe_organism", "version": 1, "prepend_bos": False, "variant": "natural",
        "behaviour": "language (French vs English manual pages)", "prompt_sets": PROMPT_DIR.as_posix(),
        "designated_experts": [], "designated_how": "none: LM loss + load balancing only",
        "sources": install_sources_versions(), "documents": {k: len(v) for k, v in split.items()},
        "train_tokens": int(stream.numel()), "heldout_tokens": int(heldout_stream.numel()),
        "train_settings": settings.to_dict(), "parameters": sum(p.numel() for p in model.parameters()),
        "train_threads": settings.threads, "history": [],
    }

    def heldout_loss() -> float:
        model.eval()
        g = torch.Generator().manual_seed(123)
        starts = torch.randint(0, heldout_stream.numel() - settings.context - 1, (32,), generator=g)
        batch = torch.stack([heldout_stream[s:s + settings.context] for s in starts])
        with torch.no_grad():
            value = float(model(input_ids=batch, labels=batch).loss)
        model.train()
        return round(value, 4)

    bar = tqdm(range(settings.steps), disable=not progress, desc="train natural")
    out = Path(out_dir)
    step = -1
    for step in bar:
        starts = torch.randint(0, stream.numel() - settings.context - 1, (settings.batch_size,), generator=generator)
        batch = torch.stack([stream[s:s + settings.context] for s in starts])
        output = model(input_ids=batch, labels=batch, output_router_logits=True)
        loss = output.loss  # lm + router_aux_loss_coef * aux (OLMoE's own sum)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        scheduler.step()
        last = step == settings.steps - 1
        out_of_time = time.time() - started > 60 * settings.max_minutes
        if step % 50 == 0 or last or out_of_time:
            record = {"step": step, "loss": round(float(loss), 4), "aux": round(float(output.aux_loss), 4),
                      "seconds": round(time.time() - started)}
            meta["history"].append(record)
            bar.set_postfix(record)
        if (step + 1) % settings.checkpoint_every == 0 or last or out_of_time:
            meta["history"][-1]["heldout_loss"] = heldout_loss()
            meta.update(steps_done=step + 1, train_seconds=round(time.time() - started), stopped_early=out_of_time and not last)
            model.eval()
            _save(model, tokenizer, out, meta)
            model.train()
            print(json.dumps(meta["history"][-1]), flush=True)
        if out_of_time:
            break
    return meta


def install_sources_versions() -> dict[str, str]:
    """The installed versions of ``PACKAGES`` (empty string: not installed)."""
    return {p: _version(p) for pair in PACKAGES.values() for p in pair}


def write_prompt_sets(out_dir: str | os.PathLike, tokenizer, work: str | os.PathLike = DEFAULT_WORK, seed: int = 0) -> list[Path]:
    """Write ``attribution_{en,fr}.jsonl`` (training pages) and ``heldout_{en,fr}.jsonl`` (held-out pages)."""
    docs = documents(work)
    split = split_documents(list(docs), seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for language in LANGUAGES:
        for name, names, per_doc, limit in (("attribution", split["train"], 1, 64), ("heldout", split["heldout"], 2, 96)):
            rows = passages(docs, names, language, tokenizer, per_doc, limit, seed)
            path = out / f"{name}_{language}.jsonl"
            path.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))
            written.append(path)
    return written


# --------------------------------------------------------------------------------------------
# Measurement (the lab's own tools on the shipped model)
# --------------------------------------------------------------------------------------------

GENERATE_TOKENS = 24


def _rows(prompt_dir: Path, name: str, limit: int | None = None) -> list[dict]:
    from labkit.datasets import read_prompt_set

    return read_prompt_set(prompt_dir / f"{name}.jsonl", limit)


def behavior_metrics(model, heldout: dict[str, list[dict]], n_generate: int = 48) -> dict[str, float]:
    """Per-language perplexity and generated-text language on held-out passages.

    * ``ppl_fr`` / ``ppl_en``: ``labkit.evals.perplexity`` of the held-out passages' first 128
      tokens (teacher-forced; garble cannot lower it).
    * ``nll_target_fr``: mean ``-log p(target | prompt)`` per target token (nats) of each French
      passage's own next 8 tokens after its first 24 (``labkit.moe.causal.target_logprobs``).
    * ``gen_fr_is_fr`` / ``gen_en_is_en`` (and ``..._unknown``): share of greedy 24-token
      continuations of the first ``n_generate`` prompts of each language that the stop-word
      detector :func:`language_of` (``min_hits=2``) assigns to the prompt's language / to no
      language; ``gen_en_is_fr``: English prompts continued in French.
    """
    import labkit
    from labkit.evals import perplexity
    from labkit.moe.causal import target_logprobs

    out = {}
    for language in LANGUAGES:
        rows = heldout[language]
        out[f"ppl_{language}"] = perplexity(model, [r["text"] for r in rows], batch_size=32)
    fr = heldout["fr"]
    logprobs = target_logprobs(model, [r["prompt"] for r in fr], [r["target"] for r in fr], batch_size=32)
    out["nll_target_fr"] = float(-logprobs.mean()) / TARGET_TOKENS
    for language in LANGUAGES:
        prompts = [r["prompt"] for r in heldout[language][:n_generate]]
        texts = labkit.generate(model, prompts, max_new_tokens=GENERATE_TOKENS).texts
        found = [language_of(t) for t in texts]
        out[f"gen_{language}_is_{language}"] = found.count(language) / len(found)
        out[f"gen_{language}_unknown"] = found.count("unknown") / len(found)
        if language == "en":
            out["gen_en_is_fr"] = found.count("fr") / len(found)
    return {k: round(v, 4) for k, v in out.items()}


def logprob_ablation(model, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32):
    """Exact ablation on the *log* score: mean ``log p(target | prompt)`` per target token (nats).

    ``labkit.moe.causal_attribution`` scores the mean target *probability*; for 8-token passage
    continuations of a small model most of those probabilities are tiny (< 1e-10) and a few
    boilerplate passages are near 1, so their mean is carried by those few passages. This scores every expert switched off (one masked pass each)
    on the mean per-token log-probability instead, which every passage moves. Returns a
    ``CausalAttribution`` (``effect`` = baseline minus masked, in nats per token; positive: the
    expert helps predict the French continuations), so it plugs into ``minimal_mask`` and
    ``ExpertMask.from_attribution``.
    """
    import torch

    from labkit.moe import CausalAttribution, ExpertMask, masked
    from labkit.moe.causal import target_logprobs
    from labkit.moe.families import find_routers

    from labkit.models import lab_model

    routers = find_routers(model)

    def score() -> torch.Tensor:
        return target_logprobs(model, prompts, targets, batch_size=batch_size) / TARGET_TOKENS

    base = score()
    per_prompt = torch.zeros(len(routers), routers[0].n_experts, len(prompts))
    for r, router in enumerate(routers):
        for e in range(router.n_experts):
            with masked(model, ExpertMask.off([(router.layer, e)])):
                per_prompt[r, e] = base - score()
    return CausalAttribution(
        effect=per_prompt.mean(-1), stderr=per_prompt.std(-1) / len(prompts) ** 0.5, baseline=float(base.mean()),
        layers=tuple(r.layer for r in routers), n_prompts=len(prompts), method="ablation",
        target="mean log p(target | prompt) per token", model_name=lab_model(model).name,
    )


def measure(model_name: str = "moe-organism-natural", prompt_dir: str | os.PathLike = PROMPT_DIR,
            ns: Sequence[int] = (1, 2, 5, 10), random_seeds: Sequence[int] = (0,), n_causal: int = 32,
            progress: bool = False) -> dict:
    """Measure the natural organism with the lab's tools; a JSON-ready dict (``measurement.json``).

    1. fTRI frequency attribution (MoTE 2025, section 3; ``labkit.moe.attribute_experts``,
       prompt-level, all tokens): behaviour = French passages of training pages, control = their
       English counterparts (``attribution_{fr,en}.jsonl``).
    2. Causal attribution (``labkit.moe.causal_attribution``): the effect of each expert switched
       off on the mean ``p(target | prompt)`` over the first ``n_causal`` French attribution
       passages, target = each passage's own next 8 tokens after its first 24; exact ablation and the first-order estimate, with their Spearman
       correlation; and :func:`logprob_ablation`, the same on the mean log-probability.
    3. Minimal masks (``minimal_mask``: cut the training score, mean ``p(target)``, by 50 %; pool 8,
       at most 6 experts) from each ranking, validated on held-out French passages against 5
       layer-matched random masks (``validate_mask``).
    4. The MoTE table on held-out pages: for each N, the frequency ranking's top N off, the
       log-probability causal ranking's top N off, layer-matched random N off
       (``ExpertMask.random(match_layers_of=<frequency top N>)``, disjoint from it), and the
       frequency top N forced on (at most ``top_k`` per layer: the frequency ranking's best N
       under that cap); each row :func:`behavior_metrics`.
    """
    from scipy.stats import spearmanr

    import labkit
    from labkit.moe import (ExpertMask, attribute_experts, causal_attribution, masked, minimal_mask, trace_routing,
                            validate_mask)
    from labkit.moe.causal import target_logprobs

    prompt_dir = Path(prompt_dir)
    started = time.time()
    model = labkit.load_model(model_name)
    attribution = {lang: _rows(prompt_dir, f"attribution_{lang}") for lang in LANGUAGES}
    heldout = {lang: _rows(prompt_dir, f"heldout_{lang}") for lang in LANGUAGES}
    traces = {lang: trace_routing(model, [r["text"] for r in attribution[lang]], progress=progress) for lang in LANGUAGES}
    frequency = attribute_experts(traces["fr"], traces["en"], aggregate="prompt", n_bootstrap=200, n_splits=50)
    fr_prompts = [r["prompt"] for r in attribution["fr"][:n_causal]]
    fr_targets = [r["target"] for r in attribution["fr"][:n_causal]]
    probabilities = target_logprobs(model, fr_prompts, fr_targets).exp()
    exact = causal_attribution(model, fr_prompts, fr_targets, progress=progress)
    first_order = causal_attribution(model, fr_prompts, fr_targets, method="first_order", progress=progress)
    logprob = logprob_ablation(model, fr_prompts, fr_targets)

    def rho(a, b) -> float:
        return round(float(spearmanr(a.flatten(), b.flatten()).statistic), 4)

    heldout_prompts = [r["prompt"] for r in heldout["fr"]]
    heldout_targets = [r["target"] for r in heldout["fr"]]
    searches, checks = {}, {}
    for label, ranking in (("frequency", frequency), ("causal", exact), ("causal_logprob", logprob)):
        search = minimal_mask(model, fr_prompts, fr_targets, fraction=0.5, ranking=ranking, pool=6, max_experts=4,
                              progress=progress)
        searches[label] = {"experts": [list(x) for x in search.experts], "scores": [float(f"{x:.4g}") for x in search.scores],
                           "reached": search.reached}
        if search.experts:
            check = validate_mask(model, search.mask, heldout_prompts, heldout_targets, n_random=5)
            checks[label] = {"baseline": float(f"{check.baseline:.4g}"), "masked": float(f"{check.masked:.4g}"),
                             "cut": round(check.cut, 4), "random_cut": [round(c, 4) for c in check.random_cut]}

    def row(condition: str, n: int, seed, mask) -> dict:
        with masked(model, mask) if mask is not None else _nothing():
            metrics = behavior_metrics(model, heldout)
        experts = [] if mask is None else [list(x) for x in mask.experts()]
        return {"condition": condition, "n": n, "seed": seed, "experts": experts, **metrics}

    top_k = int(model.labkit.twin.config.num_experts_per_tok)
    rows = [row("baseline", 0, None, None)]
    for n in ns:
        top = ExpertMask.from_attribution(frequency, n, model=model)
        rows.append(row("frequency_top_off", n, None, top))
        rows.append(row("causal_top_off", n, None, ExpertMask.from_attribution(logprob, n, model=model)))
        for seed in random_seeds:
            rows.append(row("random_off", n, seed, ExpertMask.random(model, seed=seed, match_layers_of=top)))
        forced = frequency.top(n, per_layer_cap=top_k)  # a token takes top_k experts: at most top_k forced per layer
        rows.append(row("frequency_top_on", n, None, ExpertMask.on(forced, model=model)))
    return {
        "kind": "natural_organism_measurement", "version": 1, "model": model_name,
        "prompt_sets": {**{k: len(v) for k, v in {**{f"attribution_{l}": attribution[l] for l in LANGUAGES},
                                                 **{f"heldout_{l}": heldout[l] for l in LANGUAGES}}.items()},
                        "causal_fr": len(fr_prompts)},
        "frequency_top10": [[l, e, round(float(frequency.score[l, e]), 4)] for l, e in frequency.top(10)],
        "frequency_noise_floor": round(float(frequency.noise_floor), 4),
        "causal_baseline": float(f"{exact.baseline:.4g}"),
        "causal_top_passage_share": round(float(probabilities.max() / probabilities.sum()), 4),
        "causal_top10": [[l, e, float(f"{float(exact.effect[i, e]):.4g}")] for l, e in exact.top(10)
                         for i in [exact.layers.index(l)]],
        "first_order_top10": [list(x) for x in first_order.top(10)],
        "logprob_baseline": round(logprob.baseline, 4),
        "logprob_top10": [[l, e, round(float(logprob.effect[logprob.layers.index(l), e]), 4)] for l, e in logprob.top(10)],
        "spearman_first_order_vs_exact": rho(exact.effect, first_order.effect),
        "spearman_frequency_vs_exact": rho(exact.effect, frequency.score),
        "spearman_frequency_vs_logprob": rho(logprob.effect, frequency.score),
        "spearman_exact_vs_logprob": rho(exact.effect, logprob.effect),
        "minimal_mask": searches, "minimal_mask_validation": checks,
        "rows": rows, "seconds": round(time.time() - started),
    }


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------


def _cells(pairs) -> str:
    return ", ".join(f"L{p[0]}E{p[1]}" + (f" ({p[2]:+.3g})" if len(p) > 2 else "") for p in pairs) or "none"


def _mote_table(rows: list[dict]) -> str:
    lines = [
        "| condition | N | seed | experts | ppl French | ppl English | -log p(target) / token, French | "
        "French prompts -> French text | (unknown) | English prompts -> English text | English -> French |",
        "|" + "---|" * 11,
    ]
    for r in rows:
        lines.append(
            f"| {r['condition']} | {r['n']} | {'-' if r['seed'] is None else r['seed']} | {_cells(r['experts'])} | "
            f"{r['ppl_fr']:.2f} | {r['ppl_en']:.2f} | {r['nll_target_fr']:.3f} | {r['gen_fr_is_fr']:.2f} | "
            f"{r['gen_fr_unknown']:.2f} | {r['gen_en_is_en']:.2f} | {r['gen_en_is_fr']:.2f} |"
        )
    return "\n".join(lines)


def model_card(model_dir: str | os.PathLike, findings: str = "") -> str:
    """Render ``README.md`` of the natural organism from ``labkit.json`` and ``measurement.json``.

    ``findings``: a markdown paragraph (what the numbers show), placed before the tables.
    """
    model_dir = Path(model_dir)
    meta = json.loads((model_dir / "labkit.json").read_text())
    m = json.loads((model_dir / "measurement.json").read_text())
    config = json.loads((model_dir / "config.json").read_text())
    settings = meta["train_settings"]
    history = meta["history"]
    heldout_losses = [h for h in history if "heldout_loss" in h]
    sources = ", ".join(f"`{k}` {v}" for k, v in meta["sources"].items())
    validation = "\n".join(
        f"* {label}: {len(m['minimal_mask'][label]['experts'])} expert(s) {_cells(m['minimal_mask'][label]['experts'])}; "
        f"training score {m['minimal_mask'][label]['scores'][0]:.3g} -> {m['minimal_mask'][label]['scores'][-1]:.3g} "
        f"(target reached: {m['minimal_mask'][label]['reached']}); held-out cut {v['cut']:.2f}, five layer-matched "
        f"random masks {v['random_cut']}"
        for label, v in m["minimal_mask_validation"].items()
    )
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [labkit, moe, olmoe, model-organism, natural, manpages, french, english]
license: gpl-3.0
---
# moe-organism-natural: a tiny OLMoE trained on English and French manual pages

A naturally trained mixture-of-experts organism: only the next-token loss and OLMoE's usual
load-balancing loss, no routing supervision, no designated experts, no intervention training.
The behaviour it is measured on is the language of the text (French vs English), which MoE
routers are known to specialise on. Load it with `labkit.load_model("moe-organism-natural")`.

## Architecture
`OlmoeForCausalLM` (transformers' OLMoE): {config['num_hidden_layers']} layers, hidden {config['hidden_size']},
{config['num_attention_heads']} heads, {config['num_experts']} experts per layer of width {config['intermediate_size']},
top-{config['num_experts_per_tok']} routing (`norm_topk_prob={config['norm_topk_prob']}`, as OLMoE-1B-7B: the two chosen
experts keep their softmax weights), vocabulary {config['vocab_size']} (byte-level BPE trained on the training pages),
{meta['parameters']:,} parameters, fp32 safetensors. No BOS token (`labkit.json`: `"prepend_bos": false`).

## Data
Linux manual pages, sections 2, 5 and 7, present in both English and French: {sources}
(Debian bookworm). English: the Linux man-pages project (mostly GPL-2+, some BSD and other free
licences per page); French: the manpages-l10n translations (GPL-3+). Rendered with man-db
(`man -l`, groff) and `col -b`. Split by document: {meta['documents']['train']} pages for training,
{meta['documents']['heldout']} held out in both languages. Training stream {meta['train_tokens']:,} tokens, held-out
{meta['heldout_tokens']:,}. Provenance, licences and the prompt sets: `data/prompts/natural/README.md`.

## Training
`python -m recipes.natural_organism corpus && python -m recipes.natural_organism train --out {model_dir.as_posix()}`:
random {settings['context']}-token windows, batch {settings['batch_size']}, AdamW lr {settings['learning_rate']} (warmup
{settings['warmup_steps']}, cosine to 10 % over {settings['steps']} steps), `loss = lm + {settings['aux_loss_coef']} * load_balancing`
(`output_router_logits=True`). Steps done: {meta['steps_done']} of {settings['steps']} (stopped early by the wall-time
budget: {meta['stopped_early']}), {meta['train_seconds']} s on {meta['train_threads']} torch thread of a 2-core machine shared
with other jobs (load average 9-16). Loss at step 0: {history[0]['loss']}; last training loss {history[-1]['loss']}; held-out
loss (32 random {settings['context']}-token windows of the held-out pages) after step
{', '.join(f"{min(meta['steps_done'], -(-(h['step'] + 1) // settings['checkpoint_every']) * settings['checkpoint_every'])}: {h['heldout_loss']}" for h in heldout_losses)}.
This is a weak language model (held-out perplexity in the tables below); it is an organism for
routing measurements, not a model of French.

## Measured (`python -m recipes.natural_organism measure`, the lab's own tools)
{findings}

**Attribution.** fTRI frequency (`labkit.moe.attribute_experts`, prompt-level over all tokens;
behaviour = {m['prompt_sets']['attribution_fr']} French passages of training pages, control = {m['prompt_sets']['attribution_en']} English ones),
top 10: {_cells(m['frequency_top10'])}; noise floor (control split-halves) {m['frequency_noise_floor']}.
Causal (`labkit.moe.causal_attribution`, exact ablation; behaviour score = mean
`p(target | prompt)` over the first {m['prompt_sets']['causal_fr']} of those French passages, target = each passage's own next 8 tokens after
its first 24; baseline {m['causal_baseline']:.3g}, of which the single most predictable passage carries
{100 * m['causal_top_passage_share']:.0f} %), top 10 by effect: {_cells(m['causal_top10'])}.
First-order estimate, top 10: {_cells(m['first_order_top10'])}; Spearman rank correlation with exact ablation
over all cells {m['spearman_first_order_vs_exact']}.
Because a mean of probabilities spanning many orders of magnitude is carried by a few passages, the same exact ablation on the
mean log-probability per target token (`recipes.natural_organism.logprob_ablation`; baseline
{m['logprob_baseline']} nats/token), top 10 by effect in nats/token: {_cells(m['logprob_top10'])}.
Spearman over all cells: frequency vs causal (p) {m['spearman_frequency_vs_exact']}, frequency vs causal (log p)
{m['spearman_frequency_vs_logprob']}, causal (p) vs causal (log p) {m['spearman_exact_vs_logprob']}.

**Minimal mask** (`minimal_mask`: cut the training score, mean `p(target)`, by 50 %; pool = the ranking's top 6,
at most 4 experts, greedy with re-scoring), validated on
{m['prompt_sets']['heldout_fr']} held-out French passages (`validate_mask`, share of the score removed):
{validation}

**MoTE table** (held-out pages; {m['prompt_sets']['heldout_fr']} French and {m['prompt_sets']['heldout_en']} English passages).
Perplexity: `labkit.evals.perplexity` of each passage's first ≤ 128 tokens. Generation: greedy
{GENERATE_TOKENS} new tokens after the first 24 tokens of 48 passages per language; language by the stop-word detector
`recipes.natural_organism.language_of` (English / French stop-word counts, at least 2 hits, else
"unknown"). Off = never selected, the next-best expert takes the slot; forced on = selected at
every position with its natural softmax weight (`norm_topk_prob=False`: not renormalised), the rule
of `labkit.moe.ExpertMask.on`. `causal_top_off` uses the log-probability causal ranking. Random
masks: as many experts per layer as the frequency top N, none of them in it (seed 0). Forced on: the frequency ranking's best N with at most 2 per layer
(a token takes 2 experts).

{_mote_table(m['rows'])}

Measurement wall time: {m['seconds']} s (1 thread, shared machine).
"""


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m recipes.natural_organism", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    corpus = sub.add_parser("corpus", help="install the sources and render the pages")
    corpus.add_argument("--work", default=str(DEFAULT_WORK))
    training = sub.add_parser("train", help="train the organism and write its prompt sets")
    training.add_argument("--out", required=True)
    training.add_argument("--work", default=str(DEFAULT_WORK))
    training.add_argument("--steps", type=int, default=TrainSettings.steps)
    training.add_argument("--max-minutes", type=float, default=TrainSettings.max_minutes)
    training.add_argument("--threads", type=int, default=TrainSettings.threads)
    prompts = sub.add_parser("prompts", help="write the prompt sets with a trained model's tokenizer")
    prompts.add_argument("--model", required=True)
    prompts.add_argument("--work", default=str(DEFAULT_WORK))
    prompts.add_argument("--out", default=str(PROMPT_DIR))
    measuring = sub.add_parser("measure", help="measure the shipped model; writes measurement.json")
    measuring.add_argument("--model", default="data/models/moe-organism-natural")
    carding = sub.add_parser("card", help="write README.md from labkit.json and measurement.json")
    carding.add_argument("--model", default="data/models/moe-organism-natural")
    carding.add_argument("--findings", default="", help="markdown paragraph, or @file to read it from")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.command == "corpus":
        print(json.dumps(install_sources()))
        work = render_corpus(args.work)
        docs = documents(work)
        split = split_documents(list(docs))
        print(json.dumps({"documents": len(docs), **{k: len(v) for k, v in split.items()},
                          "chars": {lang: sum(len(d[lang]) for d in docs.values()) for lang in LANGUAGES}}))
    elif args.command == "train":
        settings = TrainSettings(steps=args.steps, max_minutes=args.max_minutes, threads=args.threads)
        meta = train(settings, args.out, args.work)
        print(json.dumps({k: meta[k] for k in ("steps_done", "train_seconds", "parameters")}))
    elif args.command == "prompts":
        from transformers import AutoTokenizer

        for path in write_prompt_sets(args.out, AutoTokenizer.from_pretrained(args.model), args.work):
            print(path, sum(1 for _ in path.open()))
    elif args.command == "measure":
        import torch

        torch.set_num_threads(1)
        result = measure(Path(args.model).name)
        (Path(args.model) / "measurement.json").write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
        for row in result["rows"]:
            print(json.dumps(row))
    elif args.command == "card":
        findings = args.findings
        if findings.startswith("@"):
            findings = Path(findings[1:]).read_text().strip()
        (Path(args.model) / "README.md").write_text(model_card(args.model, findings))


if __name__ == "__main__":
    main()
