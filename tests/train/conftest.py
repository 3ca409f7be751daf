import pytest


@pytest.fixture(scope="session")
def data_cache(embedded_data_cache):
    """The embedded corpus and default tokenizer (tests/conftest.py's session-wide cache)."""
    return embedded_data_cache
