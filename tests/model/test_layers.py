"""RoPE with Llama 3.1 scaling and RMSNorm against independent NumPy implementations of the formulas."""

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.model import config, layers


def _reference_llama31_freqs(head_dim, theta, factor, low, high, l0):
    """Direct transcription of the published rule, one frequency at a time, in float64."""
    out = []
    for i in range(head_dim // 2):
        f = theta ** (-(2 * i) / head_dim)
        lam = 2 * math.pi / f
        if lam < l0 / high:
            out.append(f)
        elif lam > l0 / low:
            out.append(f / factor)
        else:
            g = (l0 / lam - low) / (high - low)
            out.append((1 - g) * f / factor + g * f)
    return np.array(out)


@pytest.mark.parametrize("preset", ["llama3.1-8b", "llama3.2-1b", "tiny"])
def test_rope_scaling_matches_formula(preset):
    cfg = config.get(preset)
    s = cfg.rope_scaling
    ours = layers.rope_inv_freq(cfg.resolved_head_dim, cfg.rope_theta, s)
    ref = _reference_llama31_freqs(cfg.resolved_head_dim, cfg.rope_theta, s.factor, s.low_freq_factor,
                                   s.high_freq_factor, s.original_max_position)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


def test_rope_fact_sheet_vectors_and_bands():
    cfg = config.get("llama3.1-8b")
    plain = layers.rope_inv_freq(128, 500_000.0, None)
    scaled = layers.rope_inv_freq(128, 500_000.0, cfg.rope_scaling)
    np.testing.assert_allclose([plain[30], scaled[30]], [2.131120e-3, 1.371894e-3], rtol=1e-5)
    np.testing.assert_allclose([plain[63], scaled[63]], [2.455141e-6, 3.068926e-7], rtol=1e-5)
    ratio = plain / scaled
    np.testing.assert_allclose(ratio[:29], 1.0, rtol=1e-6)  # indices 0-28 unchanged
    np.testing.assert_allclose(ratio[35:], 8.0, rtol=1e-6)  # 35-63 divided by 8
    assert np.all((ratio[29:35] > 1.0) & (ratio[29:35] < 8.0))  # 29-34 blended


def test_apply_rope_is_a_rotation_of_pairs_i_and_i_plus_half():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 3, 2, 8)).astype(np.float32)
    pos = np.array([[0, 5, 1000]])
    inv = layers.rope_inv_freq(8, 10_000.0, None)
    out = np.asarray(layers.apply_rope(jnp.asarray(x), jnp.asarray(pos), inv))
    for t in range(3):
        for i in range(4):
            a = pos[0, t] * inv[i]
            c, s = math.cos(a), math.sin(a)
            x1, x2 = x[0, t, :, i], x[0, t, :, i + 4]
            np.testing.assert_allclose(out[0, t, :, i], x1 * c - x2 * s, atol=1e-5)
            np.testing.assert_allclose(out[0, t, :, i + 4], x2 * c + x1 * s, atol=1e-5)
    # Position 0 is the identity; norms are preserved.
    np.testing.assert_allclose(out[0, 0], x[0, 0], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_rmsnorm_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 16)).astype(np.float32) * 3
    norm = layers.RMSNorm(eps=1e-5)
    params = norm.init(__import__("jax").random.key(0), x)
    scale = rng.normal(size=16).astype(np.float32)
    out = norm.apply({"params": {"scale": scale}}, x)
    ref = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + 1e-5) * scale
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(nn.meta.unbox(params)["params"]["scale"]), np.ones(16))


def test_rmsnorm_bf16_normalises_in_float32():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 64)) * 1e3, jnp.bfloat16)
    norm = layers.RMSNorm()
    out = norm.apply({"params": {"scale": jnp.ones(64)}}, x)
    assert out.dtype == jnp.bfloat16
    x32 = np.asarray(x, np.float32)
    ref = x32 / np.sqrt(np.mean(x32 ** 2, -1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=1e-2, atol=1e-2)
