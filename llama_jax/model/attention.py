"""Attention kernels behind one function.

`dot_product_attention(q, k, v, q_segment_ids, kv_segment_ids, q_offset, backend)` computes causal,
document-masked grouped-query attention:

    out[b, t, h] = softmax_s( q[b,t,h] · k[b,s,h//G] / sqrt(Dh)  masked unless allowed(b, t, s) ) · v[b,s,h//G]
    allowed(b, t, s) = (s <= q_offset + t) and (kv_segment_ids[b, s] == q_segment_ids[b, t])

Query t sits at key slot q_offset + t (0 in training; the cache index when decoding). Segment id 0 marks
padding; padding attends only to padding, so no row is ever fully masked and no NaN can appear.

Backends: "xla" is the reference (einsum + float32 softmax, GQA without materialising repeated K/V).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_segment_ids_BT: Array, kv_segment_ids_BS: Array, q_offset) -> Array:
    """Boolean [B, T, S]: causal in key-slot order and restricted to the query's own document."""
    t = q_segment_ids_BT.shape[1]
    s = kv_segment_ids_BS.shape[1]
    q_slot = jnp.arange(t, dtype=jnp.int32)[:, None] + jnp.asarray(q_offset, jnp.int32)
    causal = jnp.arange(s, dtype=jnp.int32)[None, :] <= q_slot  # [T, S]
    same_doc = q_segment_ids_BT[:, :, None] == kv_segment_ids_BS[:, None, :]  # [B, T, S]
    return causal[None] & same_doc


def xla_attention(q_BTHD: Array, k_BSKD: Array, v_BSKD: Array, mask_BTS: Array) -> Array:
    b, t, h, dh = q_BTHD.shape
    kheads = k_BSKD.shape[2]
    g = h // kheads
    q = q_BTHD.reshape(b, t, kheads, g, dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k_BSKD, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / jnp.sqrt(jnp.float32(dh)))
    scores = jnp.where(mask_BTS[:, None, None, :, :], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKD.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_BSKD, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, dh).astype(q_BTHD.dtype)


def dot_product_attention(q_BTHD: Array, k_BSKD: Array, v_BSKD: Array, *, q_segment_ids: Array,
                          kv_segment_ids: Array, q_offset=0, backend: str = "xla") -> Array:
    """Causal, document-masked GQA. Shapes: q [B,T,H,Dh], k/v [B,S,K,Dh], segment ids [B,T] / [B,S]."""
    if q_BTHD.shape[2] % k_BSKD.shape[2]:
        raise ValueError(f"query heads {q_BTHD.shape[2]} not a multiple of kv heads {k_BSKD.shape[2]}")
    if backend in ("xla", "auto"):
        mask = attention_mask(q_segment_ids, kv_segment_ids, q_offset)
        return xla_attention(q_BTHD, k_BSKD, v_BSKD, mask)
    raise NotImplementedError(f"attention backend {backend!r} is not available in this build; use 'xla'")
