"""Shared fixtures: a tiny random BERT configuration, the shipped tokenizer, and a slice of the shipped dev set."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, BertConfig

from pruning import squad
from pruning.resources import shipped_model_dir, squad_file

DEV_SUBSET_SIZE = 40


@pytest.fixture
def tiny_bert_config() -> BertConfig:
    """A 2-layer BERT small enough for CPU tests, with the shipped tokenizer's vocabulary and no dropout."""
    return BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=512, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="session")
def tokenizer():
    """The shipped model's fast (uncased WordPiece) tokenizer."""
    return AutoTokenizer.from_pretrained(shipped_model_dir())


@pytest.fixture(scope="session")
def dev_subset() -> list[squad.Example]:
    """The first questions of the shipped SQuAD v1.1 dev set."""
    return squad.load_squad(squad_file("dev"), limit=DEV_SUBSET_SIZE)


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_test_process():
    """Tiny models gain nothing from threads, and thread contention on a busy machine slows them by 50x."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
