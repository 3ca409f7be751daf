"""Next-token cross-entropy with a loss mask, computed in float32.

Batches follow the data pipeline's contract: `inputs` and `targets` [B, L] (targets are the next tokens within
each packed document), `loss_mask` [B, L] (1 on tokens that count). Losses are returned as a (sum, count)
pair so that micro-batches and data-parallel shards combine exactly into the global mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
