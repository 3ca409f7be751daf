"""Next-token cross-entropy with a loss mask, computed in float32.

Batches follow the data pipeline's contract: `inputs` and `targets` [B, L] (targets are the next tokens within
each packed document), `loss_mask` [B, L] (1 on tokens that count). Losses are returned as a (sum, count)
pair so that micro-batches and data-parallel shards combine exactly into the global mean.

Two paths:
  * `cross_entropy_sum(logits, ...)` takes materialised logits [B, L, V] (the reference).
  * `chunked_cross_entropy_sum(hidden, w, ...)` fuses the output projection with the loss and walks the
    sequence in chunks of `chunk_size` positions, so the largest live buffer is [B, chunk, V] float32 instead
    of [B, L, V]; under differentiation its custom VJP forms each chunk's gradient while the chunk's logits
    are live (dH, and dW accumulated in float32), so the backward pass only scales them by the incoming
    cotangent and no logits are computed twice. At Llama 3 scale (V = 128,256) the full logits of one 8K sequence are
    4 GiB in float32, about as much as all the activations of the 1B model's blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llama_jax.experiment import schema


def cross_entropy_sum(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array):
    """Returns (sum of masked token NLLs, number of masked tokens), both float32 scalars."""
    logits = logits_BTV.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = mask_BT.astype(jnp.float32)
    return jnp.sum((logz - target_logit) * mask), jnp.sum(mask)


def token_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """log p(target_t | prefix) per position, float32 [B, L] (DPO, rejection sampling, evaluation)."""
    logits = logits_BTV.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return target_logit - jax.nn.logsumexp(logits, axis=-1)


# ------------------------------------------------------------------------------- chunked (fused) loss

# A stage's `loss_chunk` of -1 means the platform's choice: the rule is the config layer's
# (`experiment.schema.resolve_chunk`), applied when the experiment is resolved.
resolve_chunk = schema.resolve_chunk


def chunked_cross_entropy_sum(hidden_BTD: jax.Array, w_DV: jax.Array, targets_BT: jax.Array,
                              mask_BT: jax.Array, chunk_size: int):
    """`cross_entropy_sum(hidden @ w, targets, mask)` without ever materialising the [B, L, V] logits.

    The matmul runs in the hidden states' dtype (bfloat16 on accelerators) with float32 accumulation; the
    logsumexp, the loss and the dW accumulator are float32. `chunk_size` positions (of the L axis; the batch
    axis stays whole so its data-parallel sharding is untouched) are processed per step; L need not be a
    multiple of it (the tail is padded with masked-out positions). Differentiable w.r.t. `hidden_BTD` and
    `w_DV`. Returns (sum of masked token NLLs, number of masked tokens), float32 scalars.
    """
    if hidden_BTD.ndim != 3 or w_DV.ndim != 2 or hidden_BTD.shape[-1] != w_DV.shape[0]:
        raise ValueError(f"expected hidden [B, L, D] and w [D, V], got {hidden_BTD.shape} and {w_DV.shape}")
    if targets_BT.shape != hidden_BTD.shape[:2] or mask_BT.shape != hidden_BTD.shape[:2]:
        raise ValueError(f"targets {targets_BT.shape} / mask {mask_BT.shape} must be {hidden_BTD.shape[:2]}")
    chunk_size = int(chunk_size)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    length = hidden_BTD.shape[1]
    chunk = min(chunk_size, length)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    targets = targets_BT.astype(jnp.int32)
    mask = mask_BT.astype(jnp.float32)
    hidden = hidden_BTD
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    total = _fused_ce(chunk, n_chunks, hidden, w_DV, targets, mask)
    return total, jnp.sum(mask)


def _chunk(x, i, chunk):
    return jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1)


def _chunk_logits(h_BCD, w_DV):
    """[B, C, V] float32 logits of one chunk; the matmul runs in the hidden dtype."""
    return jnp.einsum("bcd,dv->bcv", h_BCD, w_DV.astype(h_BCD.dtype), preferred_element_type=jnp.float32)


def _target_mask(logits_BCV, targets_BC):
    vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits_BCV.shape, 2)
    return vocab_ids == targets_BC[..., None]


def _fused_ce_fwd_impl(chunk, n_chunks, hidden, w, targets, mask):
    b = hidden.shape[0]

    def body(total, i):
        logits = _chunk_logits(_chunk(hidden, i, chunk), w)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.sum(jnp.where(_target_mask(logits, _chunk(targets, i, chunk)), logits, 0.0), axis=-1)
        return total + jnp.sum((lse - target_logit) * _chunk(mask, i, chunk)), lse

    total, lse = jax.lax.scan(body, jnp.float32(0.0), jnp.arange(n_chunks))
    # lse: [n_chunks, B, C] -> [B, n_chunks * C], float32 (a few bytes per token: the only residual)
    return total, jnp.swapaxes(lse, 0, 1).reshape(b, n_chunks * chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused_ce(chunk, n_chunks, hidden, w, targets, mask):
    return _fused_ce_fwd_impl(chunk, n_chunks, hidden, w, targets, mask)[0]


def _fused_ce_fwd(chunk, n_chunks, hidden, w, targets, mask):
    """Under differentiation the loss is the end of the graph, so its gradient is known up to the incoming
    scalar cotangent: each chunk's dlogits = softmax - onehot (masked) is turned into dH and accumulated into
    dW right here, while the chunk's logits are live, instead of recomputing the logits in the backward pass
    (one [B, L, D] x [D, V] matmul fewer per step). The residuals are dH [B, L, D] (hidden dtype) and dW
    [D, V] (float32)."""
    b = hidden.shape[0]
    cdtype = hidden.dtype
    w_c = w.astype(cdtype)

    def body(carry, i):
        total, dw = carry
        h = _chunk(hidden, i, chunk)
        logits = _chunk_logits(h, w_c)
        lse = jax.nn.logsumexp(logits, axis=-1)
        is_target = _target_mask(logits, _chunk(targets, i, chunk))
        m = _chunk(mask, i, chunk)
        total = total + jnp.sum((lse - jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)) * m)
        probs = jnp.exp(logits - lse[..., None])
        dlogits = (jnp.where(is_target, probs - 1.0, probs) * m[..., None]).astype(cdtype)
        dh_i = jnp.einsum("bcv,dv->bcd", dlogits, w_c, preferred_element_type=jnp.float32)
        dw = dw + jnp.einsum("bcd,bcv->dv", h, dlogits, preferred_element_type=jnp.float32)
        return (total, dw), dh_i.astype(cdtype)

    (total, dw), dh = jax.lax.scan(body, (jnp.float32(0.0), jnp.zeros(w.shape, jnp.float32)),
                                   jnp.arange(n_chunks))
    dh = jnp.swapaxes(dh, 0, 1).reshape(b, n_chunks * chunk, hidden.shape[-1])  # [n, B, C, D] -> [B, L, D]
    return total, (dh, dw, jnp.zeros((0,), w.dtype))  # (the empty array carries w's dtype)


def _fused_ce_bwd(chunk, n_chunks, residuals, g_total):
    dh, dw, w_probe = residuals
    dh = (dh.astype(jnp.float32) * g_total).astype(dh.dtype)
    return dh, (dw * g_total).astype(w_probe.dtype), None, None


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd)
