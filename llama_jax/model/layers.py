"""Llama 3 building blocks as Flax Linen modules: RMSNorm, RoPE (with 3.1 scaling), GQA attention, SwiGLU.

Shapes use suffixes: B batch, T query length, S key/value length, D model dim, H query heads, K KV heads,
G = H/K query heads per KV head, Dh head dim, F FFN hidden dim. Parameters carry logical axis names only
("embed", "heads", "kv_heads", "head_dim", "mlp", "norm"); activations are constrained by logical names
("act_batch", "act_length", "act_embed", "act_heads", "act_kv_heads", "act_mlp"). Which mesh axes those names
map to is decided by the experiment's rule set (llama_jax.sharding.rules), never here.

RoPE layout: rotate-half (the Hugging Face layout): channel i is paired with channel i + Dh/2. Meta's
checkpoints pair adjacent channels (2i, 2i+1); llama_jax.interop permutes wq/wk once at import/export.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from llama_jax.model import attention as attention_lib
from llama_jax.model import context_parallel
from llama_jax.model.config import ModelConfig, RopeScaling

Array = jax.Array


def _dtype(name: str):
    return jnp.dtype(name)


def constrain(x: Array, names: tuple) -> Array:
    """Activation sharding constraint by logical names (a no-op outside a mesh / rule context)."""
    return nn.with_logical_constraint(x, names)


# ----------------------------------------------------------------------------------------------- RMSNorm


class RMSNorm(nn.Module):
    """x / rms(x) * scale, computed in float32 and cast back to the input dtype before the gain (as Meta)."""

    eps: float = 1e-5
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), _dtype(self.param_dtype))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * scale.astype(x.dtype)


# -------------------------------------------------------------------------------------------------- RoPE


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies f_i = θ^(-2i/Dh), i < Dh/2, with Llama 3.1 frequency-dependent scaling applied.

    Scaling rule (Meta `apply_scaling`, HF `_compute_llama3_parameters`): with wavelength λ = 2π/f,
    λ < L0/high: unchanged; λ > L0/low: f/s; otherwise a smooth blend (1-γ)·f/s + γ·f with
    γ = (L0/λ - low)/(high - low).
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        return inv_freq.astype(np.float32)
    s, low, high, l0 = (scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor,
                        scaling.original_max_position)
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = l0 / low, l0 / high
    gamma = (l0 / wavelen - low) / (high - low)
    smoothed = (1 - gamma) * inv_freq / s + gamma * inv_freq
    out = np.where(wavelen < high_wavelen, inv_freq, np.where(wavelen > low_wavelen, inv_freq / s, smoothed))
    return out.astype(np.float32)


def apply_rope(x_BTHD: Array, positions_BT: Array, inv_freq: np.ndarray) -> Array:
    """Rotates pairs (i, i + Dh/2) of every head by angle position·f_i. Angles computed in float32."""
    angles = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, Dh/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x_BTHD.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHD.dtype)


# --------------------------------------------------------------------------------------------- Attention


def _kernel(module: nn.Module, name: str, shape: tuple, names: tuple) -> Array:
    """A bias-free linear map's weight: parameter `name/kernel` of `shape` with logical axes `names`."""
    cfg = module.cfg
    return module.param(name, nn.with_logical_partitioning(nn.initializers.normal(stddev=cfg.init_std), names),
                        shape, _dtype(cfg.param_dtype))


def _matmul(spec: str, x: Array, kernel: Array, dtype) -> Array:
    """einsum in the compute dtype with float32 accumulation, cast back to the compute dtype."""
    out = jnp.einsum(spec, x.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)
    return out.astype(dtype)


def _project(module: nn.Module, name: str, x: Array, shape: tuple, names: tuple, spec: str) -> Array:
    """A bias-free linear map: parameter `name/kernel` of `shape` (logical axes `names`), applied by einsum in
    the compute dtype with float32 accumulation."""
    return _matmul(spec, x, _kernel(module, name, shape, names), _dtype(module.cfg.dtype))


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE, a causal mask and a document mask from segment ids.

    With `cache=(k_BSKD, v_BSKD, kv_segment_ids_BS)` and `cache_index`, the new keys/values are written at
    slots [cache_index, cache_index + T) and attention runs over the whole cache (decode / chunked prefill).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: Array, positions_BT: Array, segment_ids_BT: Array, cache=None, cache_index=None):
        cfg = self.cfg
        dtype = _dtype(cfg.dtype)
        h, k, dh = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim

        wq = _kernel(self, "wq", (cfg.dim, h, dh), ("embed", "heads", "head_dim"))
        wk = _kernel(self, "wk", (cfg.dim, k, dh), ("embed", "kv_heads", "head_dim"))
        wv = _kernel(self, "wv", (cfg.dim, k, dh), ("embed", "kv_heads", "head_dim"))
        if cfg.fuse_projections:
            # One matmul for Q, K and V: the query heads are grouped under their KV head ([D, K, G, Dh]) and
            # each group gets its K and V columns appended ([D, K, G + 2, Dh]), so the concatenation runs along
            # an axis no rule shards (a heads/kv_heads split stays where it is). Parameters keep their layout.
            g = h // k
            w_qkv = jnp.concatenate([wq.reshape(cfg.dim, k, g, dh), wk[:, :, None], wv[:, :, None]], axis=2)
            qkv = _matmul("btd,dkgh->btkgh", x_BTD, w_qkv, dtype)
            b, t = qkv.shape[:2]
            q = qkv[:, :, :, :g].reshape(b, t, h, dh)
            kk, v = qkv[:, :, :, g], qkv[:, :, :, g + 1]
        else:
            q = _matmul("btd,dhk->bthk", x_BTD, wq, dtype)
            kk = _matmul("btd,dhk->bthk", x_BTD, wk, dtype)
            v = _matmul("btd,dhk->bthk", x_BTD, wv, dtype)
        q = constrain(q, ("act_batch", "act_length", "act_heads", None))
        kk = constrain(kk, ("act_batch", "act_length", "act_kv_heads", None))
        v = constrain(v, ("act_batch", "act_length", "act_kv_heads", None))

        inv_freq = rope_inv_freq(dh, cfg.rope_theta, cfg.rope_scaling)
        q = apply_rope(q, positions_BT, inv_freq)
        kk = apply_rope(kk, positions_BT, inv_freq)
        q = checkpoint_name(q, "query_proj")
        kk = checkpoint_name(kk, "key_proj")
        v = checkpoint_name(v, "value_proj")

        new_cache = None
        if cache is None and context_parallel.context_size() > 1 and not self.is_initializing():
            # the mesh splits the sequence over `context`: it arrives in load-balanced order
            out = context_parallel.context_parallel_attention(q, kk, v, segment_ids_BT, backend=cfg.attention)
        elif cache is None:
            out = attention_lib.dot_product_attention(
                q, kk, v, q_segment_ids=segment_ids_BT, kv_segment_ids=segment_ids_BT, q_offset=0,
                backend=cfg.attention)
        else:
            k_cache, v_cache, kv_seg = cache
            k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, kk.astype(k_cache.dtype), cache_index, axis=1)
            v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), cache_index, axis=1)
            new_cache = (k_cache, v_cache)
            out = attention_lib.dot_product_attention(
                q, k_cache.astype(dtype), v_cache.astype(dtype), q_segment_ids=segment_ids_BT,
                kv_segment_ids=kv_seg, q_offset=cache_index, backend="xla")
        out = constrain(out, ("act_batch", "act_length", "act_heads", None))
        y = _project(self, "wo", out, (h, dh, cfg.dim), ("heads", "head_dim", "embed"), "bthk,hkd->btd")
        y = checkpoint_name(y, "out_proj")
        return y, new_cache


# ------------------------------------------------------------------------------------------------ SwiGLU


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) ⊙ w3 x), no biases."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: Array) -> Array:
        cfg = self.cfg
        w1 = _kernel(self, "w1", (cfg.dim, cfg.ffn_dim), ("embed", "mlp"))
        w3 = _kernel(self, "w3", (cfg.dim, cfg.ffn_dim), ("embed", "mlp"))
        if cfg.fuse_projections:  # gate and up in one matmul, stacked on a new (unsharded) axis
            gate_up = _matmul("btd,dsf->btsf", x_BTD, jnp.stack([w1, w3], axis=1), _dtype(cfg.dtype))
            gate, up = gate_up[:, :, 0], gate_up[:, :, 1]
        else:
            gate = _matmul("btd,df->btf", x_BTD, w1, _dtype(cfg.dtype))
            up = _matmul("btd,df->btf", x_BTD, w3, _dtype(cfg.dtype))
        hidden = constrain(nn.silu(gate) * up, ("act_batch", "act_length", "act_mlp"))
        hidden = checkpoint_name(hidden, "mlp_hidden")
        return _project(self, "w2", hidden, (cfg.ffn_dim, cfg.dim), ("mlp", "embed"), "btf,fd->btd")


class Block(nn.Module):
    """Pre-norm transformer block: h = x + Attn(norm(x)); out = h + MLP(norm(h))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT, cache=None, cache_index=None):
        cfg = self.cfg
        x_BTD = constrain(x_BTD, ("act_batch", "act_length", "act_embed"))
        attn_out, new_cache = Attention(cfg, name="attention")(
            RMSNorm(cfg.norm_eps, cfg.param_dtype, name="attention_norm")(x_BTD), positions_BT, segment_ids_BT,
            cache, cache_index)
        h = x_BTD + attn_out
        out = h + MLP(cfg, name="mlp")(RMSNorm(cfg.norm_eps, cfg.param_dtype, name="ffn_norm")(h))
        return constrain(out, ("act_batch", "act_length", "act_embed")), new_cache
