"""Context parallelism on the `context` mesh axis, as Llama 3 does it (paper section 3.3.2).

The sequence of length T is cut into 2·CP chunks of c = T / (2·CP) tokens. Device i of the context axis holds
chunk i and chunk 2·CP-1-i (an early and a late chunk), so every device does the same amount of causal
attention work. On the host the batch is reordered once into that *load-balanced order*
(:func:`permute_batch`); the sharded length axis then gives device i exactly its two chunks, and the whole
model (embedding, RoPE through the permuted `positions`, norms, MLP, the loss) is position-wise and runs
unchanged on the permuted sequence. Only attention needs every key: :func:`context_parallel_attention`
runs under an explicit `jax.shard_map` that is manual over `context` only, all-gathers K, V and the key
segment ids over the axis, puts the keys back in natural slot order (a static reshape), and computes
attention for the two local query chunks with the causal + document mask at their true slot offsets
(i·c and (2·CP-1-i)·c). The loss is a sum over tokens, so it is unchanged by the permutation; logits come
back in permuted order (:func:`unpermute` restores the natural order).

Backends inside the shard_map: the query chunks are not training shapes (T_q = c < S = T, offset > 0), so
"xla" and "xla_blocked" run the reference, "xla_chunked" the blockwise online-softmax kernel (memory
O(c·block) per head: the choice for long sequences), "cudnn" the fused kernel with an explicit mask, and
"auto" picks cudnn on a GPU for bfloat16 / float16, otherwise xla_chunked (`attention.choose`). "splash" supports
training shapes only and is refused under context parallelism with an error naming it.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from llama_jax.model import attention as attention_lib

AXIS = "context"
Array = jax.Array


def context_size() -> int:
    """Size of the `context` axis of the mesh set by `jax.set_mesh` (1 without a mesh or without the axis)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or AXIS not in mesh.axis_names:
        return 1
    return int(mesh.shape[AXIS])


def check_length(length: int, cp: int, what: str = "sequence") -> None:
    """Raises a ValueError naming the numbers unless `length` splits into 2·cp equal chunks."""
    if cp < 1:
        raise ValueError(f"context axis size must be >= 1, got {cp}")
    if cp == 1:
        return
    if cp > length:
        raise ValueError(f"context axis ({cp}) is larger than the {what} length ({length})")
    if length % (2 * cp):
        raise ValueError(f"{what} length {length} is not divisible by 2 x context = {2 * cp} (context "
                         f"parallelism splits it into 2 x {cp} load-balanced chunks)")


def load_balanced_order(length: int, cp: int) -> np.ndarray:
    """Indices `order` (int32 [length]) with permuted[j] = natural[order[j]]: chunks 0, 2cp-1, 1, 2cp-2, ...

    Device i of the context axis receives the i-th contiguous slice of the permuted sequence, i.e. natural
    chunks i and 2cp-1-i.
    """
    check_length(length, cp)
    if cp == 1:
        return np.arange(length, dtype=np.int32)
    c = length // (2 * cp)
    chunks = []
    for i in range(cp):
        chunks += [i, 2 * cp - 1 - i]
    return np.concatenate([np.arange(k * c, (k + 1) * c, dtype=np.int32) for k in chunks])


def permute(x, cp: int, axis: int = 1):
    """Natural order -> load-balanced order along `axis` (numpy or jax arrays)."""
    order = load_balanced_order(x.shape[axis], cp)
    return x.take(order, axis=axis) if isinstance(x, np.ndarray) else jnp.take(x, order, axis=axis)


def unpermute(x, cp: int, axis: int = 1):
    """Load-balanced order -> natural order along `axis` (the inverse of :func:`permute`)."""
    inverse = np.argsort(load_balanced_order(x.shape[axis], cp)).astype(np.int32)
    return x.take(inverse, axis=axis) if isinstance(x, np.ndarray) else jnp.take(x, inverse, axis=axis)


def permute_batch(batch: Mapping[str, np.ndarray], cp: int) -> dict:
    """Every [B, L, ...] entry of a host batch (tokens, targets, positions, segment ids, loss mask, document
    ids) put in load-balanced order; other entries are passed through. cp = 1 returns the batch unchanged."""
    if cp == 1:
        return dict(batch)
    length = np.shape(batch["inputs"])[1]
    check_length(length, cp)
    return {k: permute(np.asarray(v), cp) if np.ndim(v) >= 2 and np.shape(v)[1] == length else v
            for k, v in batch.items()}


def _natural_order_keys(x_BS, cp: int):
    """All-gathered keys in load-balanced order [B, S, ...] -> natural slot order (reshape + reverse)."""
    b, s = x_BS.shape[:2]
    c = s // (2 * cp)
    x = x_BS.reshape((b, cp, 2, c) + x_BS.shape[2:])
    early = x[:, :, 0]  # natural chunks 0 .. cp-1
    late = x[:, ::-1, 1]  # natural chunks cp .. 2cp-1
    return jnp.concatenate([early, late], axis=1).reshape(x_BS.shape)


def _gather(x):
    """All-gather over `context` along the sequence axis. On CPU, XLA's all-reduce promotion pass cannot
    rewrite the bfloat16 reduce-scatter of the backward pass, so the CPU gathers in float32 (exact: a gather
    only moves values)."""
    if jax.default_backend() == "cpu" and x.dtype in (jnp.bfloat16, jnp.float16):
        return jax.lax.all_gather(x.astype(jnp.float32), AXIS, axis=1, tiled=True).astype(x.dtype)
    return jax.lax.all_gather(x, AXIS, axis=1, tiled=True)


def context_parallel_attention(q_BTHD: Array, k_BSKD: Array, v_BSKD: Array, segment_ids_BT: Array,
                               backend: str = "auto") -> Array:
    """Causal, document-masked GQA over a sequence in load-balanced order, sharded over `context`.

    Takes and returns global arrays (the sequence in load-balanced order, as :func:`permute` makes it) under a
    mesh set by `jax.set_mesh`; equals `dot_product_attention` on the natural order, permuted.
    """
    cp = context_size()
    t = q_BTHD.shape[1]
    check_length(t, cp, "attention sequence")
    local = attention_lib.choose(backend, platform=jax.default_backend(), dtype=q_BTHD.dtype, training=False,
                                 context_parallel=True)
    c = t // (2 * cp)

    def per_device(q, k, v, seg):
        k_all = _natural_order_keys(_gather(k), cp)
        v_all = _natural_order_keys(_gather(v), cp)
        seg_all = _natural_order_keys(jax.lax.all_gather(seg, AXIS, axis=1, tiled=True), cp)
        i = jax.lax.axis_index(AXIS)
        outs = []
        for half, chunk in ((0, i), (1, 2 * cp - 1 - i)):
            sl = slice(half * c, (half + 1) * c)
            outs.append(attention_lib.dot_product_attention(
                q[:, sl], k_all, v_all, q_segment_ids=seg[:, sl], kv_segment_ids=seg_all,
                q_offset=(chunk * c).astype(jnp.int32), backend=local))
        return jnp.concatenate(outs, axis=1)

    spec4, spec2 = P(None, AXIS, None, None), P(None, AXIS)
    fn = jax.shard_map(per_device, in_specs=(spec4, spec4, spec4, spec2), out_specs=spec4,
                       axis_names=frozenset({AXIS}), check_vma=False)
    return fn(q_BTHD, k_BSKD, v_BSKD, segment_ids_BT.astype(jnp.int32))
