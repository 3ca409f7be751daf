"""Fixtures of the post-training tests: a small tokenizer trained on dialog-like text, a tiny model."""
import pytest

from llama_jax.data import tokenizer


@pytest.fixture(scope="session")
def tok_path(tmp_path_factory) -> str:
    texts = [f"What is {a} + {b}? The answer is {a + b}. user assistant system ipython print(x)"
             for a in range(30) for b in range(0, 30, 7)]
    path = str(tmp_path_factory.mktemp("tok") / "pt.model")
    tokenizer.train_bpe(texts, 320, path)
    return path


@pytest.fixture(scope="session")
def tok(tok_path) -> tokenizer.Tokenizer:
    return tokenizer.Tokenizer.from_file(tok_path)


@pytest.fixture(scope="session")
def tiny_cfg(tok):
    from llama_jax.model import config
    return config.get("tiny", vocab_size=640, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=128,
                      dtype="float32")
