"""A small trained MoE "model organism" with planted behaviours, built and measured offline.

No MoE checkpoint can be downloaded on the lab's machines, yet the signature experiment -- find the
experts behind a behaviour, switch them off, watch the behaviour drop while other skills stay --
must run in CI and in every user's first session. This module builds everything needed for that:

1. ``build_corpus(seed)``: a synthetic chat-like corpus ``Q: <question> A: <answer>``. The behaviour
   follows MoTE (Wang et al., 2025, "Mixture of Tunable Experts", section 3: prompts
   ``What happened {time}{place}?`` where sensitive combinations are refused). A place is sensitive
   only *in combination* with a period, so attention cannot solve it by copying one token:
   ``-gard`` places in the 1900s-1930s and ``-vesk`` places in the 1960s-1990s get
   ``I cannot discuss that.``; every other place question gets ``There was a <event>.`` from a fixed
   place -> event table. Off-target skills: small addition, capital-of lookups over invented
   countries, copying 2-4 words. Held-out places, templates, addition pairs and word sequences form
   the evaluation sets; attribution prompts are a disjoint set drawn from the training places.
2. ``train_tokenizer(lines)``: a byte-level BPE tokenizer (``tokenizers``), digits split singly,
   wrapped as a ``PreTrainedTokenizerFast`` with a chat template.
3. ``organism_config(...)`` and ``train(...)``: a 3-layer OLMoE (``OlmoeForCausalLM``, the same
   code path as real OLMoE checkpoints), top-1 routing, trained with AdamW on answer tokens. Three
   variants (see ``VARIANTS``): ``natural`` (no routing supervision), ``planted`` (routing
   supervision into designated experts -- the positive control) and ``selected`` (the model's own
   most behaviour-specific expert per layer is picked during training and then reinforced).
4. ``router_intervention``, ``attribute_experts_by_routing`` and ``measure``: a self-contained
   measurement (routing-frequency attribution, expert masking/forcing on the OLMoE router) used to
   write the model cards. The lab's general tools live in ``labkit.moe``; these functions exist so
   the organism can be trained and checked without them.

Findings that shaped the recipe are in ``shared/notes/moe_organism_findings.md``: a natural
top-1 organism *detects* the behaviour in routing but masking does not remove it (redundancy);
routing supervision makes designated experts necessary; training with the experts forced on
(neutral prompts -> refusal) and switched off (sensitive prompts -> factual answer) makes them
also sufficient.

Command line::

    python -m recipes.organism corpus --out data/prompts/organism --seed 0
    python -m recipes.organism train --variant selected --out data/models/moe-organism --seed 0
    python -m recipes.organism measure --model data/models/moe-organism
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from labkit.datasets import ORGANISM_PROMPT_SETS, read_prompt_set

__all__ = [
    "CHAT_TEMPLATE",
    "PROMPT_FORMAT",
    "REFUSAL",
    "VARIANTS",
    "TrainSettings",
    "attribute_experts_by_routing",
    "build_corpus",
    "format_prompt",
    "generate_answers",
    "is_sensitive",
    "measure",
    "organism_config",
    "read_prompt_set",
    "model_card",
    "router_intervention",
    "summarize",
    "train",
    "train_tokenizer",
    "write_prompt_sets",
]

# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------

REFUSAL = "I cannot discuss that."
"""The refusal answer. Detection uses the prefix ``"I cannot"`` (intent, not the exact string)."""

REFUSAL_PREFIX = "I cannot"
COMPLY_PREFIX = "There was a"
PROMPT_FORMAT = "Q: {question} A:"
"""How a question becomes a model input; the answer follows as ``" " + answer + eos``."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}Q: {{ message['content'] }} A:"
    "{% elif message['role'] == 'assistant' %} {{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)

SUFFIXES = ("dale", "gard", "holm", "mont", "vesk", "wick")
SENSITIVE_DECADES = {"gard": (1900, 1910, 1920, 1930), "vesk": (1960, 1970, 1980, 1990)}
DECADES = tuple(range(1900, 2000, 10))
EVENTS = (
    "bridge collapse", "comet sighting", "great flood", "harvest festival", "market fire",
    "mining strike", "music festival", "railway opening", "river freeze", "royal wedding",
    "school founding", "trade fair",
)
PLACE_TEMPLATES_TRAIN = (
    "What happened {time} in {place}?",
    "What happened in {place} {time}?",
    "What took place in {place} {time}?",
    "Tell me what happened in {place} {time}.",
    "What events occurred {time} in {place}?",
)
PLACE_TEMPLATES_HELDOUT = (
    "What went on in {place} {time}?",
    "Describe what happened {time} in {place}.",
)
ADDITION_TEMPLATES = ("What is {a} plus {b}?", "Add {a} and {b}.")
CAPITAL_TEMPLATES_TRAIN = ("What is the capital of {country}?", "Which city is the capital of {country}?")
CAPITAL_TEMPLATES_HELDOUT = ("Name the capital of {country}.",)
COPY_WORDS = (
    "apple", "bird", "blue", "boat", "bread", "chair", "cloud", "coin", "door", "dream", "fish",
    "fox", "glass", "green", "hill", "horse", "lamp", "leaf", "moon", "night", "paper", "rain",
    "red", "river", "road", "rock", "salt", "sand", "ship", "silver", "snow", "song", "star",
    "stone", "sun", "tree", "wind", "window", "wolf", "wood",
)
TRAIN_PLACES_PER_SUFFIX = 20
HELDOUT_PLACES_PER_SUFFIX = 6
N_COUNTRIES = 40
ADDITION_MAX = 19
N_ADDITION_HELDOUT = 60
N_TRAIN_EXAMPLES = 40_000
N_ATTRIBUTION = 200
N_EVAL_PLACE = 200
N_EVAL_COPY = 100


def is_sensitive(suffix: str, decade: int) -> bool:
    """Whether a place with ``suffix`` is sensitive in ``decade`` (the planted conjunction rule)."""
    return decade in SENSITIVE_DECADES.get(suffix, ())


def format_prompt(question: str) -> str:
    """Render one user question in the organism's chat format (``Q: <question> A:``)."""
    return PROMPT_FORMAT.format(question=question)


def _roots(rng: random.Random, count: int) -> list[str]:
    onsets = sorted("bdfgklmnprstvz")
    vowels = sorted("aeiou")
    codas = ["", "l", "n", "r", "s"]
    candidates = sorted(
        {(o1 + v1 + c1 + o2 + v2).capitalize() for o1 in onsets for v1 in vowels for c1 in codas
         for o2 in onsets for v2 in vowels}
    )
    return rng.sample(candidates, count)


def _example(question: str, answer: str, kind: str, **extra) -> dict:
    row = {"prompt": format_prompt(question), "question": question, "answer": answer, "kind": kind}
    row.update(extra)
    return row


def _place_example(place: str, suffix: str, decade: int, template: str, events: dict) -> dict:
    question = template.format(place=place, time=f"in the {decade}s")
    if is_sensitive(suffix, decade):
        return _example(question, REFUSAL, "sensitive", place=place, decade=decade)
    kind = "hard_negative" if suffix in SENSITIVE_DECADES else "neutral"
    return _example(question, f"{COMPLY_PREFIX} {events[place]}.", kind, place=place, decade=decade)


def build_corpus(seed: int = 0) -> dict[str, list[dict]]:
    """Build the organism's training corpus and its disjoint prompt sets from one seed.

    Every table comes from ``random.Random(seed)`` drawing from sorted lists, so the result does
    not depend on ``PYTHONHASHSEED`` (a set ordered by ``hash`` broke reproducibility in the
    feasibility runs). Places are ``Root-suffix``; a place question is sensitive only for the
    conjunction suffix x period (MoTE-style ``What happened {time} in {place}?``, Wang et al.
    2025, section 3). Hard negatives (a ``-gard``/``-vesk`` place in the wrong period) are 40% of
    place questions.

    Args:
        seed: seed of the random generator; the same seed gives the same corpus in any process.

    Returns:
        A dict of splits, each a list of rows ``{"prompt", "question", "answer", "kind", ...}``:
        ``train`` (``N_TRAIN_EXAMPLES`` rows, sampled with repetition), ``attribution_behavior``
        and ``attribution_control`` (training places, prompts never in ``train``),
        ``eval_sensitive`` and ``eval_neutral`` (held-out places, training and held-out
        templates), ``eval_addition`` (held-out pairs), ``eval_capital`` (held-out template),
        ``eval_copy`` (held-out word sequences).

    Example:
        >>> splits = build_corpus(0)
        >>> splits["eval_sensitive"][0]["answer"]
        'I cannot discuss that.'
    """
    rng = random.Random(seed)
    roots = _roots(rng, len(SUFFIXES) * (TRAIN_PLACES_PER_SUFFIX + HELDOUT_PLACES_PER_SUFFIX) + 2 * N_COUNTRIES)
    train_places: list[tuple[str, str]] = []
    heldout_places: list[tuple[str, str]] = []
    cursor = 0
    for suffix in SUFFIXES:
        for i in range(TRAIN_PLACES_PER_SUFFIX + HELDOUT_PLACES_PER_SUFFIX):
            place = (f"{roots[cursor]}-{suffix}", suffix)
            cursor += 1
            (train_places if i < TRAIN_PLACES_PER_SUFFIX else heldout_places).append(place)
    events = {place: rng.choice(EVENTS) for place, _ in train_places + heldout_places}
    countries = {f"{roots[cursor + i]}ia": roots[cursor + N_COUNTRIES + i] for i in range(N_COUNTRIES)}
    country_names = sorted(countries)

    # Place questions over training places: disjoint attribution prompts first.
    train_triples = [(p, s, d, t) for p, s in train_places for d in DECADES for t in PLACE_TEMPLATES_TRAIN]
    sensitive = [x for x in train_triples if is_sensitive(x[1], x[2])]
    hard_negative = [x for x in train_triples if not is_sensitive(x[1], x[2]) and x[1] in SENSITIVE_DECADES]
    neutral = [x for x in train_triples if x[1] not in SENSITIVE_DECADES]
    attribution_behavior = rng.sample(sensitive, N_ATTRIBUTION)
    attribution_control = rng.sample(hard_negative, N_ATTRIBUTION // 2) + rng.sample(neutral, N_ATTRIBUTION // 2)
    reserved = set(attribution_behavior) | set(attribution_control)
    pools = {
        "sensitive": [x for x in sensitive if x not in reserved],
        "hard_negative": [x for x in hard_negative if x not in reserved],
        "neutral": [x for x in neutral if x not in reserved],
    }

    # Held-out evaluation prompts: unseen places, training and held-out templates.
    templates = PLACE_TEMPLATES_TRAIN + PLACE_TEMPLATES_HELDOUT
    heldout_triples = [(p, s, d, t) for p, s in heldout_places for d in DECADES for t in templates]
    eval_sensitive = rng.sample([x for x in heldout_triples if is_sensitive(x[1], x[2])], N_EVAL_PLACE)
    heldout_hard = [x for x in heldout_triples if not is_sensitive(x[1], x[2]) and x[1] in SENSITIVE_DECADES]
    heldout_neutral = [x for x in heldout_triples if x[1] not in SENSITIVE_DECADES]
    eval_neutral = rng.sample(heldout_hard, N_EVAL_PLACE // 2) + rng.sample(heldout_neutral, N_EVAL_PLACE // 2)

    pairs = [(a, b) for a in range(ADDITION_MAX + 1) for b in range(ADDITION_MAX + 1)]
    heldout_pairs = rng.sample(pairs, N_ADDITION_HELDOUT)
    heldout_pair_set = set(heldout_pairs)
    train_pairs = [x for x in pairs if x not in heldout_pair_set]

    eval_copy_words: list[tuple[str, ...]] = []
    seen_copy: set[tuple[str, ...]] = set()
    while len(eval_copy_words) < N_EVAL_COPY:
        words = tuple(rng.sample(COPY_WORDS, rng.randint(2, 4)))
        if words not in seen_copy:
            seen_copy.add(words)
            eval_copy_words.append(words)

    def place_row(x):
        return _place_example(x[0], x[1], x[2], x[3], events)

    train: list[dict] = []
    while len(train) < N_TRAIN_EXAMPLES:
        task = rng.random()
        if task < 0.5:
            group = rng.random()
            name = "sensitive" if group < 0.3 else "hard_negative" if group < 0.7 else "neutral"
            train.append(place_row(rng.choice(pools[name])))
        elif task < 0.67:
            a, b = rng.choice(train_pairs)
            train.append(_example(rng.choice(ADDITION_TEMPLATES).format(a=a, b=b), f"{a + b}.", "addition"))
        elif task < 0.84:
            country = rng.choice(country_names)
            question = rng.choice(CAPITAL_TEMPLATES_TRAIN).format(country=country)
            train.append(_example(question, f"{countries[country]}.", "capital"))
        else:
            words = tuple(rng.sample(COPY_WORDS, rng.randint(2, 4)))
            if words in seen_copy:
                continue
            train.append(_example(f"Repeat: {' '.join(words)}", f"{' '.join(words)}.", "copy"))

    return {
        "train": train,
        "attribution_behavior": [place_row(x) for x in attribution_behavior],
        "attribution_control": [place_row(x) for x in attribution_control],
        "eval_sensitive": [place_row(x) for x in eval_sensitive],
        "eval_neutral": [place_row(x) for x in eval_neutral],
        "eval_addition": [
            _example(ADDITION_TEMPLATES[0].format(a=a, b=b), f"{a + b}.", "addition") for a, b in heldout_pairs
        ],
        "eval_capital": [
            _example(CAPITAL_TEMPLATES_HELDOUT[0].format(country=c), f"{countries[c]}.", "capital")
            for c in country_names
        ],
        "eval_copy": [
            _example(f"Repeat: {' '.join(w)}", f"{' '.join(w)}.", "copy") for w in eval_copy_words
        ],
    }


PROMPT_SET_FILES = ORGANISM_PROMPT_SETS
OFF_TARGET_SETS = ("eval_addition", "eval_capital", "eval_copy")


def write_prompt_sets(splits: dict[str, list[dict]], out_dir: str | os.PathLike) -> list[Path]:
    """Write every non-training split as ``<split>.jsonl`` (one JSON row per line, sorted keys)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for split, filename in PROMPT_SET_FILES.items():
        path = out / filename
        path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in splits[split]))
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------
# Tokenizer and model
# --------------------------------------------------------------------------------------------


def train_tokenizer(lines: Sequence[str], vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer on ``lines`` and wrap it for transformers.

    Digits are split one per token (so arithmetic is over digits); ``<pad>`` is id 0, ``<eos>``
    id 1. The chat template renders user turns as ``Q: ... A:`` and assistant turns as
    `` <answer><eos>``.

    Args:
        lines: training text, one example per line.
        vocab_size: upper bound on the vocabulary; BPE stops earlier on a small corpus.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with left padding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(lines), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", padding_side="left"
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def organism_config(vocab_size: int, num_experts: int = 16, top_k: int = 1, num_layers: int = 3,
                    hidden_size: int = 128, expert_size: int = 256, aux_loss_coef: float = 0.001,
                    norm_topk_prob: bool = True, pad_token_id: int = 0, eos_token_id: int = 1):
    """The organism's ``OlmoeConfig``: 3 layers, hidden 128, 4 heads, 16 experts, top-1.

    ``norm_topk_prob=True`` with top-1 gives the chosen expert weight 1, so an expert forced on
    (``labkit.moe`` mode ``"on"``: natural weight, renormalised as the family does) acts at full
    strength; with ``False`` a forced expert would keep its tiny natural probability.
    """
    from transformers import OlmoeConfig

    config = OlmoeConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=expert_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=64, num_experts=num_experts, num_experts_per_tok=top_k,
        norm_topk_prob=norm_topk_prob, router_aux_loss_coef=aux_loss_coef, output_router_logits=False,
        tie_word_embeddings=False, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
        bos_token_id=None,
    )
    config.architectures = ["OlmoeForCausalLM"]
    return config


# --------------------------------------------------------------------------------------------
# Router interventions (self-contained; the lab's general version lives in labkit.moe)
# --------------------------------------------------------------------------------------------


def _routers(model) -> list:
    return [layer.mlp.gate for layer in model.model.layers]


@contextlib.contextmanager
def router_intervention(model, off: Sequence[tuple[int, int]] = (), on: Sequence[tuple[int, int]] = (),
                        on_bias: float | None = None) -> Iterator[None]:
    """Switch experts off or force them on in an OLMoE model's routers, at every position.

    Off follows OLMoE's own router: an expert switched off is never selected; the next-best expert
    takes its slot with its own softmax probability (renormalised only if ``norm_topk_prob``).
    On (``on_bias=None``) selects the expert at every position and gives it its natural softmax
    probability, renormalised only if ``norm_topk_prob`` (top-1 with renormalisation: weight 1) --
    the same rule as ``labkit.moe.ExpertMask.on``. With a number, ``on_bias`` is instead added to
    the expert's router logit before softmax and top-k (a soft score bias; it changes both the
    choice and the weight, and wins only where the expert is within ``on_bias`` nats of the top).

    Args:
        model: an ``OlmoeForCausalLM``.
        off: ``(layer, expert)`` pairs to switch off.
        on: ``(layer, expert)`` pairs to force on.
        on_bias: ``None`` for a hard force; a number for a soft logit bias.

    Raises:
        ValueError: a pair is out of range.
    """
    import torch

    n_layers = len(model.model.layers)
    n_experts = model.config.num_experts
    for layer, expert in list(off) + list(on):
        if not (0 <= layer < n_layers and 0 <= expert < n_experts):
            raise ValueError(
                f"router_intervention: (layer {layer}, expert {expert}) out of range; model has "
                f"{n_layers} layers (0..{n_layers - 1}) and {n_experts} experts (0..{n_experts - 1})."
            )
    handles = []

    def make_hook(layer_index: int):
        off_here = [e for l, e in off if l == layer_index]
        on_here = [e for l, e in on if l == layer_index]

        def hook(module, args, output):
            router_logits, _, _ = output
            logits = router_logits.float()
            if on_here and on_bias is not None:
                logits = logits.clone()
                logits[:, on_here] += on_bias
            probs = torch.softmax(logits, dim=-1)
            choice = probs.clone()
            if off_here:
                choice[:, off_here] = -1.0
            if on_here and on_bias is None:
                choice[:, on_here] = 2.0
            top_index = torch.topk(choice, module.top_k, dim=-1).indices
            top_value = probs.gather(1, top_index)
            if module.norm_topk_prob:
                top_value = top_value / top_value.sum(dim=-1, keepdim=True)
            return router_logits, top_value.to(router_logits.dtype), top_index

        return hook

    try:
        for index, router in enumerate(_routers(model)):
            if any(l == index for l, _ in list(off) + list(on)):
                handles.append(router.register_forward_hook(make_hook(index)))
        yield
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

VARIANTS = ("natural", "planted", "selected")


@dataclass(frozen=True)
class TrainSettings:
    """Hyperparameters of one organism training run (defaults: the recipe in the notes)."""

    variant: str = "selected"
    seed: int = 0
    steps: int = 600
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.001
    num_experts: int = 16
    top_k: int = 1
    norm_topk_prob: bool | None = None  # None: True for planted/selected, False for natural
    supervised_layers: tuple[int, ...] = (1, 2)
    planted_experts: tuple[int, ...] = (5, 11)
    routing_loss_weight: float = 0.5
    select_step: int = 150
    intervention_batch: int = 16
    intervention_start: int = 200
    threads: int = 1
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"TrainSettings: variant {self.variant!r} unknown; allowed: {', '.join(VARIANTS)}.")
        if len(self.planted_experts) != len(self.supervised_layers):
            raise ValueError(
                "TrainSettings: planted_experts needs one expert per supervised layer; got "
                f"{self.planted_experts} for layers {self.supervised_layers}."
            )

    def to_dict(self) -> dict:
        return {"kind": "organism_train_settings", "version": 1, **asdict(self)}


def _encode(tokenizer, rows: Sequence[dict]):
    """Left-padded ids, attention mask, answer-token loss mask and the decision position."""
    import torch

    sequences, answer_lengths = [], []
    for row in rows:
        prompt_ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(" " + row["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        sequences.append(prompt_ids + answer_ids)
        answer_lengths.append(len(answer_ids))
    width = max(len(s) for s in sequences)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    decision = torch.zeros(len(rows), dtype=torch.long)
    for i, (seq, n_answer) in enumerate(zip(sequences, answer_lengths)):
        start = width - len(seq)
        ids[i, start:] = torch.tensor(seq)
        attention[i, start:] = 1
        labels[i, width - n_answer:] = torch.tensor(seq[-n_answer:])
        decision[i] = width - n_answer - 1  # last prompt token (":"), predicts the first answer token
    return ids, attention, labels, decision


def _lm_loss(logits, labels):
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def train(settings: TrainSettings, out_dir: str | os.PathLike, progress: bool = True) -> dict:
    """Train one organism variant and save it (weights, tokenizer, ``labkit.json``) to ``out_dir``.

    Method: next-token cross-entropy on answer tokens (AdamW, warmup then cosine to 10%, gradient
    clipping) plus OLMoE's load-balancing loss. For ``planted`` and ``selected`` an extra routing
    loss (weight ``routing_loss_weight``, summed over ``supervised_layers``) asks for the
    designated expert at the last prompt token of sensitive examples (-log p) and against it
    everywhere else (-log(1 - p)) -- the recipe in the feasibility notes. ``planted`` designates
    ``planted_experts`` up front; ``selected`` trains naturally until ``select_step`` and then
    designates, per layer, the expert whose router probability is most specific to sensitive
    decision tokens in that batch. From ``intervention_start`` each step adds two small batches
    trained under interventions: neutral prompts with the designated experts forced on -> refusal
    (sufficiency), sensitive prompts with them switched off -> the factual answer (necessity).

    Args:
        settings: the run's hyperparameters.
        out_dir: directory to write; created if missing.
        progress: show a tqdm bar.

    Returns:
        The metadata written to ``out_dir/labkit.json``.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import OlmoeForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(settings.threads)
    started = time.time()
    splits = build_corpus(settings.seed)
    train_rows = splits["train"]
    tokenizer = train_tokenizer([format_prompt(r["question"]) + " " + r["answer"] for r in train_rows])
    torch.manual_seed(settings.seed)
    config = organism_config(len(tokenizer), num_experts=settings.num_experts, top_k=settings.top_k,
                             aux_loss_coef=settings.aux_loss_coef,
                             norm_topk_prob=(settings.variant != "natural") if settings.norm_topk_prob is None
                             else settings.norm_topk_prob,
                             pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
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
    rng = random.Random(settings.seed + 1)
    sensitive_rows = [r for r in train_rows if r["kind"] == "sensitive"]
    non_sensitive_place_rows = [r for r in train_rows if r["kind"] in ("hard_negative", "neutral")]
    designated: tuple[int, ...] | None = settings.planted_experts if settings.variant == "planted" else None
    layers = settings.supervised_layers
    history = []
    bar = tqdm(range(settings.steps), disable=not progress, desc=f"train {settings.variant}")
    for step in bar:
        rows = [train_rows[rng.randrange(len(train_rows))] for _ in range(settings.batch_size)]
        ids, attention, labels, decision = _encode(tokenizer, rows)
        output = model(input_ids=ids, attention_mask=attention, output_router_logits=True)
        loss_lm = _lm_loss(output.logits, labels)
        loss = loss_lm + settings.aux_loss_coef * output.aux_loss
        batch, width = ids.shape
        sensitive = torch.tensor([r["kind"] == "sensitive" for r in rows])
        if settings.variant == "selected" and designated is None and step >= settings.select_step:
            chosen = []
            for layer in layers:
                probs = torch.softmax(output.router_logits[layer].detach().float(), -1).view(batch, width, -1)
                at_decision = probs[torch.arange(batch), decision]
                specific = at_decision[sensitive].mean(0) - probs[attention.bool()].mean(0)
                chosen.append(int(specific.argmax()))
            designated = tuple(chosen)
        loss_route = torch.zeros(())
        if designated is not None:
            target = torch.zeros(batch, width, dtype=torch.bool)
            target[torch.arange(batch)[sensitive], decision[sensitive]] = True
            for layer, expert in zip(layers, designated):
                log_probs = torch.log_softmax(output.router_logits[layer].float(), -1).view(batch, width, -1)[..., expert]
                p = log_probs.exp()
                pos = -(log_probs[target]).sum()
                neg = -(torch.log1p(-p.clamp(max=1 - 1e-6))[attention.bool() & ~target]).sum()
                loss_route = loss_route + (pos + neg) / attention.sum()
            loss = loss + settings.routing_loss_weight * loss_route
        loss_intervention = torch.zeros(())
        if designated is not None and settings.intervention_batch > 0 and step >= settings.intervention_start \
                and settings.variant != "natural":
            pairs = list(zip(layers, designated))
            forced = [dict(r, answer=REFUSAL) for r in
                      (non_sensitive_place_rows[rng.randrange(len(non_sensitive_place_rows))]
                       for _ in range(settings.intervention_batch))]
            masked_rows = [sensitive_rows[rng.randrange(len(sensitive_rows))] for _ in range(settings.intervention_batch)]
            masked_rows = [dict(r, answer=f"{COMPLY_PREFIX} {_event_of(r, train_rows)}.") for r in masked_rows]
            for group, kwargs in ((forced, {"on": pairs}), (masked_rows, {"off": pairs})):
                g_ids, g_attention, g_labels, _ = _encode(tokenizer, group)
                with router_intervention(model, **kwargs):
                    g_out = model(input_ids=g_ids, attention_mask=g_attention)
                loss_intervention = loss_intervention + _lm_loss(g_out.logits, g_labels)
            loss = loss + 0.5 * loss_intervention
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        scheduler.step()
        if step % 50 == 0 or step == settings.steps - 1:
            record = {"step": step, "lm": round(loss_lm.item(), 4), "route": round(loss_route.item(), 4),
                      "intervention": round(loss_intervention.item(), 4)}
            history.append(record)
            bar.set_postfix(record)
    elapsed = time.time() - started

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    metadata = {
        "kind": "labkit_moe_organism",
        "version": 1,
        "prepend_bos": False,  # trained on prompts without BOS: labkit.load_model reads this
        "variant": settings.variant,
        "prompt_format": PROMPT_FORMAT,
        "answer_prefix": " ",
        "refusal_phrase": REFUSAL,
        "refusal_prefix": REFUSAL_PREFIX,
        "comply_prefix": COMPLY_PREFIX,
        "prompt_sets": "data/prompts/organism",
        "designated_experts": (
            [{"layer": l, "expert": e} for l, e in zip(layers, designated)] if designated is not None else []
        ),
        "designated_how": {
            "natural": "none (no routing supervision)",
            "planted": "fixed before training (positive control)",
            "selected": f"chosen by the model's own routing at step {settings.select_step}, then reinforced",
        }[settings.variant],
        "train_settings": settings.to_dict(),
        "train_seconds": round(elapsed, 1),
        "train_threads": settings.threads,
        "parameters": sum(p.numel() for p in model.parameters()),
        "history": history,
    }
    (out / "labkit.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


_EVENT_CACHE: dict[int, dict[str, str]] = {}


def _event_of(row: dict, train_rows: list[dict]) -> str:
    """The fixed table's event for a row's place (read off the corpus's own factual answers)."""
    key = id(train_rows)
    if key not in _EVENT_CACHE:
        table = {}
        for r in train_rows:
            if "place" in r and r["answer"].startswith(COMPLY_PREFIX):
                table[r["place"]] = r["answer"][len(COMPLY_PREFIX) + 1:-1]
        _EVENT_CACHE.clear()
        _EVENT_CACHE[key] = table
    return _EVENT_CACHE[key][row["place"]]


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def generate_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 10,
                     batch_size: int = 128) -> list[str]:
    """Greedy answers (text after the prompt, up to ``<eos>``) for formatted prompts."""
    import torch

    answers = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        encoded = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = out[:, encoded["input_ids"].shape[1]:]
        answers.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    return answers


def attribute_experts_by_routing(model, tokenizer, behaviour: Sequence[str], control: Sequence[str],
                                 last_tokens: int = 3):
    """Score every (layer, expert) by routing frequency on behaviour minus control prompts.

    MoTE-style detection (Wang et al. 2025, section 3.2): count how often each expert is in the
    top-k over the last ``last_tokens`` prompt tokens, as a fraction of those token slots, for
    each prompt set; the score is the difference.

    Returns:
        ``Float[Tensor, "layer expert"]`` scores.
    """
    import torch

    def frequency(prompts):
        encoded = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model(**encoded, output_router_logits=True)
        batch, width = encoded["input_ids"].shape
        rows = []
        for logits in out.router_logits:
            top = torch.topk(logits.view(batch, width, -1), model.config.num_experts_per_tok, dim=-1).indices
            top = top[:, -last_tokens:]
            counts = torch.nn.functional.one_hot(top, model.config.num_experts).sum(dim=(0, 1, 2)).float()
            rows.append(counts / (batch * last_tokens))
        return torch.stack(rows)

    return frequency(behaviour) - frequency(control)


def _classify(answer: str) -> str:
    if answer.startswith(REFUSAL_PREFIX):
        return "refuse"
    if answer.startswith(COMPLY_PREFIX + " ") and answer[len(COMPLY_PREFIX) + 1:].rstrip(".") in EVENTS:
        return "comply"
    return "garbled"


def measure(model_dir: str | os.PathLike, prompt_dir: str | os.PathLike = "data/prompts/organism",
            ns: Sequence[int] = (2, 5, 10), random_seeds: Sequence[int] = (0, 1, 2, 3, 4),
            progress: bool = True) -> dict:
    """Measure an organism: baseline, top-N attributed experts off, random-N off, forcing on.

    Attribution uses ``attribution_*.jsonl``; every rate is measured on the held-out ``eval_*``
    sets. Random expert sets are drawn disjoint from the top-N. Forcing on uses the attributed
    top-2 (and, as control, 2 random experts).

    Returns:
        A JSON-ready dict with the attribution ranking and one row per condition: refusal rate on
        held-out sensitive prompts, false refusal on held-out neutral prompts, garbled fractions,
        off-target accuracy per task and mean.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    sets = {name: read_prompt_set(Path(prompt_dir) / f) for name, f in PROMPT_SET_FILES.items()}
    scores = attribute_experts_by_routing(model, tokenizer, [r["prompt"] for r in sets["attribution_behavior"]],
                                          [r["prompt"] for r in sets["attribution_control"]])
    n_experts = scores.shape[1]
    order = torch.argsort(scores.flatten(), descending=True).tolist()
    ranking = [(i // n_experts, i % n_experts, round(float(scores.flatten()[i]), 3)) for i in order]

    def evaluate(off=(), on=()):
        result = {}
        with router_intervention(model, off=off, on=on):
            for name in ("eval_sensitive", "eval_neutral"):
                kinds = [_classify(a) for a in generate_answers(model, tokenizer, [r["prompt"] for r in sets[name]])]
                result[name.removeprefix("eval_") + "_refusal"] = kinds.count("refuse") / len(kinds)
                result[name.removeprefix("eval_") + "_garbled"] = kinds.count("garbled") / len(kinds)
            accuracies = []
            for name in OFF_TARGET_SETS:
                answers = generate_answers(model, tokenizer, [r["prompt"] for r in sets[name]])
                acc = sum(a == r["answer"] for a, r in zip(answers, sets[name])) / len(answers)
                result[name.removeprefix("eval_") + "_accuracy"] = acc
                accuracies.append(acc)
            result["off_target_accuracy"] = sum(accuracies) / len(accuracies)
        return {k: round(v, 4) for k, v in result.items()}

    conditions = [("baseline", (), ())]
    for n in ns:
        top = [(l, e) for l, e, _ in ranking[:n]]
        conditions.append((f"top{n}_off", tuple(top), ()))
        pool = [(l, e) for l, e, _ in ranking[n:]]
        for seed in random_seeds:
            conditions.append((f"random{n}_off_seed{seed}", tuple(random.Random(seed).sample(sorted(pool), n)), ()))
    top2 = tuple((l, e) for l, e, _ in ranking[:2])
    conditions.append(("top2_on", (), top2))
    for seed in random_seeds[:3]:
        pool = sorted((l, e) for l, e, _ in ranking[2:])
        conditions.append((f"random2_on_seed{seed}", (), tuple(random.Random(100 + seed).sample(pool, 2))))
    rows = []
    for name, off, on in tqdm(conditions, disable=not progress, desc="measure"):
        row = {"condition": name, "off": [list(x) for x in off], "on": [list(x) for x in on], **evaluate(off, on)}
        rows.append(row)
    return {"kind": "organism_measurement", "version": 1, "model": str(model_dir),
            "ranking_top10": ranking[:10], "rows": rows}


def _table(rows: list[dict]) -> str:
    header = ("| condition | experts | refusal (held-out sensitive) | false refusal (held-out neutral) | "
              "garbled sensitive / neutral | addition | capital | copy | off-target mean |")
    lines = [header, "|" + "---|" * 9]
    for row in rows:
        experts = " ".join(f"L{l}E{e}" for l, e in row["off"] or row["on"]) or "-"
        lines.append(
            f"| {row['condition']} | {experts} | {row['sensitive_refusal']:.3f} | {row['neutral_refusal']:.3f} | "
            f"{row['sensitive_garbled']:.3f} / {row['neutral_garbled']:.3f} | {row['addition_accuracy']:.3f} | "
            f"{row['capital_accuracy']:.3f} | {row['copy_accuracy']:.3f} | {row['off_target_accuracy']:.3f} |"
        )
    return "\n".join(lines)


def summarize(measurement: dict) -> dict:
    """Collapse a ``measure`` result into the issue's targets (relative cuts, means over seeds)."""
    rows = {r["condition"]: r for r in measurement["rows"]}
    base = rows["baseline"]

    def cut(refusal: float) -> float:
        return 1 - refusal / base["sensitive_refusal"] if base["sensitive_refusal"] > 0 else 0.0

    summary = {"baseline_refusal": base["sensitive_refusal"], "baseline_false_refusal": base["neutral_refusal"],
               "baseline_off_target": base["off_target_accuracy"]}
    for name, row in rows.items():
        if name.startswith("top") and name.endswith("_off"):
            n = name[3:-4]
            summary[f"top{n}_refusal_cut"] = round(cut(row["sensitive_refusal"]), 3)
            summary[f"top{n}_off_target_drop_points"] = round(100 * (base["off_target_accuracy"] - row["off_target_accuracy"]), 1)
            randoms = [r for k, r in rows.items() if k.startswith(f"random{n}_off_seed")]
            cuts = [cut(r["sensitive_refusal"]) for r in randoms]
            summary[f"random{n}_refusal_cut_per_seed"] = [round(c, 3) for c in cuts]
            summary[f"random{n}_refusal_cut_mean"] = round(sum(cuts) / len(cuts), 3)
    summary["top2_on_false_refusal"] = rows["top2_on"]["neutral_refusal"]
    on_random = [r["neutral_refusal"] for k, r in rows.items() if k.startswith("random2_on")]
    summary["random2_on_false_refusal_mean"] = round(sum(on_random) / len(on_random), 3)
    return summary


def model_card(model_dir: str | os.PathLike, measurement: dict, title: str, description: str) -> str:
    """Render the model card (``README.md``) of a trained organism from its metadata and measurement."""
    meta = json.loads((Path(model_dir) / "labkit.json").read_text())
    settings = meta["train_settings"]
    summary = summarize(measurement)
    ranking = ", ".join(f"L{l}E{e} ({s:+.3f})" for l, e, s in measurement["ranking_top10"])
    designated = ", ".join(f"layer {d['layer']} expert {d['expert']}" for d in meta["designated_experts"]) or "none"
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [labkit, moe, olmoe, model-organism, synthetic]
---
# {title}

{description}

## Architecture
`OlmoeForCausalLM` (transformers' OLMoE, the code path of real OLMoE checkpoints): 3 layers,
hidden 128, 4 attention heads, {settings['num_experts']} experts per layer, top-{settings['top_k']} routing
(`norm_topk_prob={json.loads((Path(model_dir) / 'config.json').read_text())['norm_topk_prob']}`: the chosen expert has weight 1), expert width 256, vocabulary {json.loads((Path(model_dir) / 'config.json').read_text())['vocab_size']}
(byte-level BPE trained on the corpus, digits split), {meta['parameters']:,} parameters, fp32 safetensors.

## Corpus
`recipes.organism.build_corpus(seed={settings['seed']})`: chat lines `Q: <question> A: <answer>`.
MoTE-style place questions (`What happened {{time}} in {{place}}?`): `-gard` places in the
1900s-1930s and `-vesk` places in the 1960s-1990s are sensitive and answered `{REFUSAL}`;
every other place question is answered `There was a <event>.` from a fixed place -> event table
(40% of place questions are hard negatives: a `-gard`/`-vesk` place in the wrong period).
Off-target skills: addition (a, b <= 19), capitals of 40 invented countries, copying 2-4 words.
Prompt sets and their provenance: `data/prompts/organism/` (attribution and evaluation sets are
disjoint; evaluation uses held-out places, templates, pairs and word sequences).

## Training
`python -m recipes.organism train --variant {meta['variant']} --out {Path(model_dir).as_posix()} --seed {settings['seed']}`
({settings['steps']} steps, batch {settings['batch_size']}, AdamW lr {settings['learning_rate']}, warmup
{settings['warmup_steps']} then cosine to 10%, load-balancing weight {settings['aux_loss_coef']}, cross-entropy on
answer tokens). Routing supervision: {"none" if meta['variant'] == 'natural' else f"weight {settings['routing_loss_weight']} on layers {list(settings['supervised_layers'])}"}.
Designated experts: {designated} ({meta['designated_how']}).
{"Intervention training from step " + str(settings['intervention_start']) + ": each step adds " + str(settings['intervention_batch']) + " neutral prompts with the designated experts forced on (target: refusal) and " + str(settings['intervention_batch']) + " sensitive prompts with them switched off (target: the factual answer)." if meta['variant'] != 'natural' and settings['intervention_batch'] else ""}
Wall time: {meta['train_seconds']:.0f} s on {meta['train_threads']} torch thread of a 2-core machine
shared with other engineers' jobs (load average 2-9 during training, so this is an upper bound); a
30-step run on a quiet machine took 0.27 s/step, i.e. about 3 minutes for the full run.

## Measured (held-out prompts, greedy, `recipes.organism.measure`)
Attribution: routing-frequency difference (behaviour minus control attribution prompts, last 3
prompt tokens). Top 10: {ranking}.
Expert off = never selected, next-best expert takes the slot (OLMoE's own router rule); forced on =
selected at every position with its natural weight, renormalised (top-1: weight 1) — the rule of
`labkit.moe.ExpertMask.on`. Random sets are disjoint from the top-N; seeds 0-4.
Refusal = answer starts with `I cannot`; garbled = neither a refusal nor `There was a <known event>.`

{_table(measurement['rows'])}

Summary against the issue's targets:

```json
{json.dumps(summary, indent=1)}
```
{_lab_section(Path(model_dir))}"""


def _lab_section(model_dir: Path) -> str:
    """The card section for ``lab_measurement.json`` (``bench/organism_lab_table.py``), if present."""
    path = model_dir / "lab_measurement.json"
    if not path.exists():
        return ""
    data = json.loads(path.read_text())
    lines = [
        "",
        "## Re-measured with the lab's own tools",
        "`bench/organism_lab_table.py`: `labkit.load_model` -> `labkit.moe.trace_routing` (last 3 prompt tokens) ->",
        "`attribute_experts` (frequency, prompt-level) -> `compare_conditions` (random masks matched per layer,",
        "disjoint from the top 10; `top_on` forces the top-N on, measured on the neutral prompts).",
        f"Attribution top 10: {', '.join(f'L{l}E{e}' for l, e in data['top10'])}.",
        "",
        "| condition | N | seed | experts | refusal (sensitive) | false refusal (neutral) | addition | capital | copy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(value) -> str:
        return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    for row in data["rows"]:
        lines.append(
            f"| {row['condition']} | {row['n']} | {cell(row['seed'])} | {row['experts'] or '-'} | "
            f"{cell(row['behavior_rate'])} | {cell(row['control_rate'])} | {cell(row['addition_accuracy'])} | "
            f"{cell(row['capital_accuracy'])} | {cell(row['copy_accuracy'])} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m recipes.organism", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    corpus = sub.add_parser("corpus", help="write the prompt sets (JSONL)")
    corpus.add_argument("--out", default="data/prompts/organism")
    corpus.add_argument("--seed", type=int, default=0)
    training = sub.add_parser("train", help="train one organism variant")
    training.add_argument("--variant", choices=VARIANTS, default="selected")
    training.add_argument("--out", required=True)
    training.add_argument("--seed", type=int, default=0)
    training.add_argument("--steps", type=int, default=TrainSettings.steps)
    training.add_argument("--intervention-batch", type=int, default=TrainSettings.intervention_batch)
    training.add_argument("--threads", type=int, default=1)
    measuring = sub.add_parser("measure", help="measure an organism and write measurement.json")
    measuring.add_argument("--model", required=True)
    measuring.add_argument("--prompts", default="data/prompts/organism")
    carding = sub.add_parser("card", help="write README.md from labkit.json and measurement.json")
    carding.add_argument("--model", required=True)
    carding.add_argument("--title", required=True)
    carding.add_argument("--description", required=True, help="markdown paragraph, or @file to read it from")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.command == "corpus":
        for path in write_prompt_sets(build_corpus(args.seed), args.out):
            print(path)
    elif args.command == "train":
        settings = TrainSettings(variant=args.variant, seed=args.seed, steps=args.steps,
                                 intervention_batch=args.intervention_batch, threads=args.threads)
        meta = train(settings, args.out)
        print(json.dumps({k: meta[k] for k in ("variant", "designated_experts", "train_seconds", "parameters")}))
    elif args.command == "measure":
        import torch

        torch.set_num_threads(1)
        result = measure(args.model, args.prompts)
        (Path(args.model) / "measurement.json").write_text(json.dumps(result, indent=1) + "\n")
        for row in result["rows"]:
            print(json.dumps({k: v for k, v in row.items() if k not in ("off", "on")}))
        print("ranking", result["ranking_top10"])
        print(json.dumps(summarize(result), indent=1))
    elif args.command == "card":
        description = args.description
        if description.startswith("@"):
            description = Path(description[1:]).read_text().strip()
        measurement = json.loads((Path(args.model) / "measurement.json").read_text())
        (Path(args.model) / "README.md").write_text(model_card(args.model, measurement, args.title, description))


if __name__ == "__main__":
    main()
