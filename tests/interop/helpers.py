"""Tiny random Llama models shared by the interop and inference tests."""

import jax
import numpy as np

from llama_jax import model
from llama_jax.model.config import ModelConfig, RopeScaling

# Llama 3.1 scaling with a short original context, so that sequences longer than it exercise the blend.
SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=32)


def tiny_cfg(**overrides) -> ModelConfig:
    base = dict(name="tiny-test", vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                ffn_dim_multiplier=1.0, multiple_of=32, rope_scaling=SCALING, max_seq_len=256, init_std=0.15)
    base.update(overrides)
    return ModelConfig(**base)


def random_params(cfg: ModelConfig, seed: int = 0):
    """Initialised params with random (not all-one) norm gains, so every tensor's mapping is exercised."""
    params = jax.jit(model.init, static_argnums=0)(cfg, jax.random.key(seed))
    rng = np.random.default_rng(seed)

    def gains(x):
        return np.asarray(1.0 + 0.3 * rng.standard_normal(x.shape), np.float32)

    block = params["layers"]["block"]
    for name in ("attention_norm", "ffn_norm"):
        block[name]["scale"] = gains(block[name]["scale"])
    params["norm"]["scale"] = gains(params["norm"]["scale"])
    return params


def random_tokens(cfg: ModelConfig, shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, shape).astype(np.int32)
