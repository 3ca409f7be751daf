"""Shared fixtures for the data tests: small trained tokenizers and the embedded corpus, built once."""
import os

import pytest

from llama_jax.data import corpus, tokenizer


def _stdlib_py_texts() -> list[str]:
    root = corpus.stdlib_dir()
    files = [f for f in corpus.list_files(root) if f.endswith(".py")]
    return [corpus.read_text(os.path.join(root, f)) for f in files]


@pytest.fixture(scope="session")
def stdlib_sample() -> tuple[list[str], list[str]]:
    """(train, held_out): disjoint deterministic samples of standard-library sources."""
    texts = _stdlib_py_texts()
    return texts[::12], texts[5::97]


@pytest.fixture(scope="session")
def small_tokenizer_path(tmp_path_factory, stdlib_sample) -> str:
    path = str(tmp_path_factory.mktemp("tok") / "small.model")
    tokenizer.train_bpe(stdlib_sample[0], 1024, path)
    return path


@pytest.fixture(scope="session")
def small_tokenizer(small_tokenizer_path) -> tokenizer.Tokenizer:
    return tokenizer.Tokenizer.from_file(small_tokenizer_path)


@pytest.fixture(scope="session")
def corpus_cache(embedded_data_cache) -> str:
    """A cache directory holding the embedded stdlib corpus (tests/conftest.py's session-wide cache)."""
    return embedded_data_cache


@pytest.fixture(scope="session")
def default_tokenizer(corpus_cache) -> tokenizer.Tokenizer:
    return corpus.default_tokenizer(corpus_cache)
