"""Test setup: simulate an 8-device CPU mesh before JAX is imported anywhere."""
import os

from llama_jax.sharding import simulated  # imports no JAX

# XLA_FLAGS=--xla_force_host_platform_device_count=8 (other flags kept) and PJRT_NPROC=32 runtime threads
os.environ.update(simulated.cpu_device_env(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # noqa: E402

# One persistent compilation cache per test session (also inherited by the subprocesses tests start): the
# suite compiles the same tiny programs in many tests and runs; a cache hit is the same executable.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="llama_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The best-measured matmul peaks (the MFU denominator) go to a per-session file, not the user's cache.
os.environ.setdefault("LLAMA_JAX_PEAK_STORE", os.path.join(tempfile.mkdtemp(prefix="llama_jax_peaks_"), "p.json"))

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_threefry_partitionable", True)

assert jax.device_count() == 8, f"expected 8 simulated CPU devices, got {jax.devices()}"


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def embedded_data_cache(tmp_path_factory):
    """A data cache holding the embedded corpus and the default tokenizer, built once per test session."""
    from llama_jax.data import corpus
    path = tmp_path_factory.mktemp("embedded_data_cache")
    corpus.default_tokenizer(str(path))
    return str(path)
