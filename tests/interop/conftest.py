"""Shared fixtures for the interop tests: a small BPE tokenizer trained on standard-library sources (built once)
and held-out sources to compare encodings on."""

import os

import pytest

from llama_jax.data import corpus, tokenizer


@pytest.fixture(scope="session")
def stdlib_texts() -> tuple[list[str], list[str]]:
    """(train, held_out): disjoint deterministic samples of standard-library sources."""
    root = corpus.stdlib_dir()
    files = [f for f in corpus.list_files(root) if f.endswith(".py")]
    texts = [corpus.read_text(os.path.join(root, f)) for f in files]
    return texts[::24], texts[5::97]


@pytest.fixture(scope="session")
def bpe_tokenizer_path(tmp_path_factory, stdlib_texts) -> str:
    """Meta-format tokenizer.model: 1024 BPE ranks + the 256 Llama 3.1 specials (1280 ids)."""
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    tokenizer.train_bpe(stdlib_texts[0], 1024, path)
    return path


@pytest.fixture(scope="session")
def bpe_tokenizer(bpe_tokenizer_path) -> tokenizer.Tokenizer:
    return tokenizer.Tokenizer.from_file(bpe_tokenizer_path)
