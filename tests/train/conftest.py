import pytest


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """The embedded corpus and default tokenizer, built once for all driver tests."""
    path = tmp_path_factory.mktemp("data_cache")
    from llama_jax.data import corpus
    corpus.default_tokenizer(str(path))
    return str(path)
