"""Fixtures for the launcher tests: the embedded corpus and default tokenizer, built once."""
import pytest


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    from llama_jax.data import corpus
    path = tmp_path_factory.mktemp("launch_data_cache")
    corpus.default_tokenizer(str(path))
    return str(path)
