"""Shared fixtures: offline settings and tiny random-weight models built from configs."""

from __future__ import annotations

import os

# No test may reach a model hub: set before transformers / huggingface_hub are imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

WORDS = (
    "the cat sat on a mat and the dog ran to the park while love and hate wedding party "
    "what happened in the city during war peace question answer one two three four five"
).split()


def make_tokenizer():
    """A small byte-level BPE tokenizer trained in memory (no files, no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


def tiny_llama_hf(tokenizer, seed: int = 0, n_layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture()
def tiny_llama(tiny_tokenizer):
    """A 3-layer random Llama as a labkit bridge (fresh per test: tests attach hooks)."""
    from labkit.models import from_hf

    return from_hf(tiny_llama_hf(tiny_tokenizer), tiny_tokenizer, name="tiny-llama")


@pytest.fixture(scope="session")
def smollm2():
    """The embedded real model (SmolLM2-135M-Instruct), loaded once per test session."""
    from labkit import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def shared_tiny_llama(tiny_tokenizer):
    """One 3-layer random Llama bridge for a session, for tests that leave no hook behind
    (they check it: ``labkit.hooks.count_hooks``). Context window 64 tokens."""
    from labkit.models import from_hf

    return from_hf(tiny_llama_hf(tiny_tokenizer), tiny_tokenizer, name="tiny-llama")


@pytest.fixture(scope="session")
def shared_tiny_olmoe(tiny_tokenizer):
    """One 3-layer random OLMoE bridge (8 experts, top-2, context 128) for a session; same rule."""
    from labkit.models import from_hf
    from tests.moe_fixtures import tiny_moe_hf

    return from_hf(tiny_moe_hf("olmoe", tiny_tokenizer), tiny_tokenizer, name="tiny-olmoe")
