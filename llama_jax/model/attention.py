"""Attention kernels behind one function.

`dot_product_attention(q, k, v, q_segment_ids, kv_segment_ids, q_offset, backend)` computes causal,
document-masked grouped-query attention:

    out[b, t, h] = softmax_s( q[b,t,h] · k[b,s,h//G] / sqrt(Dh)  masked unless allowed(b, t, s) ) · v[b,s,h//G]
    allowed(b, t, s) = (s <= q_offset + t) and (kv_segment_ids[b, s] == q_segment_ids[b, t])

Query t sits at key slot q_offset + t (0 in training; the cache index when decoding). Segment id 0 marks
padding; padding attends only to padding, so no row is ever fully masked and no NaN can appear.

Backends (all compute the same function; `ATTENTION_BACKENDS` in model.config lists them):
  "xla"          the reference: einsum + float32 softmax over the full [T, S] scores, GQA without materialising
                 repeated K/V. Memory O(T·S) per head, forward and backward.
  "xla_blocked"  exact causal query blocks for training shapes (T = S, offset 0): block i attends to keys
                 [0, end of block i) only, skipping the masked upper triangle; the fastest choice on CPU.
                 Other shapes fall back to the reference.
  "xla_chunked"  pure-JAX blockwise ("flash-like") attention: an online softmax over key blocks and a custom
                 VJP that recomputes each block's probabilities from the saved log-sum-exp, so forward and
                 backward keep O(T·block) per head instead of O(T·S). Runs on every platform.
  "cudnn"        cuDNN fused attention through `jax.nn.dot_product_attention(implementation="cudnn")`: NVIDIA
                 GPU only, bfloat16 / float16 only. The document mask is passed as a boolean [B, 1, T, S] mask
                 (cuDNN turns it into a bias); `is_causal` is set when the causal part is the plain lower
                 triangle (training shapes), so the kernel skips the upper-triangle blocks.
  "splash"       Pallas splash attention (TPU): causal mask + `SegmentIds`, GQA as one multi-query kernel per
                 KV head. Training shapes only (q_offset = 0, T = S, T a multiple of the 128-wide blocks when
                 T > 128). Imported lazily.
  "auto"         `choose`: cudnn on a GPU for bfloat16 / float16 training shapes, splash on a TPU for training
                 shapes, xla_blocked for other training shapes, otherwise (decoding) xla; under context
                 parallelism cudnn on a GPU for bfloat16 / float16, otherwise xla_chunked.
A backend that the platform cannot run raises a ValueError that names the backend, the platform and the
alternative, never a kernel compiler error.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

Array = jax.Array

_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)
CHUNKED_BLOCK = 128  # key block of the "xla_chunked" backend
_SPLASH_BLOCK = 128


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


def causal_blocks_attention(q_BTHD: Array, k_BSKD: Array, v_BSKD: Array, q_segment_ids: Array,
                            kv_segment_ids: Array, block: int = 128) -> Array:
    """Exact causal attention for training shapes (T == S, offset 0) that skips the masked upper triangle at
    block granularity: query block [i, i+block) attends only to keys [0, i+block). With n blocks this computes
    (n+1)/(2n) of the full T x S square, and each block's scores are small enough to stay in cache, so on CPU
    it runs about 2.5x faster than the reference at T = 512 (benchmarks/README.md). Heads are laid out
    [B, K, G, T, Dh] so that both products are plain batched matmuls."""
    b, t, h, dh = q_BTHD.shape
    kheads = k_BSKD.shape[2]
    g = h // kheads
    q = q_BTHD.reshape(b, t, kheads, g, dh).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, Dh]
    k = k_BSKD.transpose(0, 2, 1, 3)  # [B, K, S, Dh]
    v = v_BSKD.transpose(0, 2, 1, 3)
    scale = 1.0 / jnp.sqrt(jnp.float32(dh))
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        scores = jnp.einsum("bkgtd,bksd->bkgts", q[:, :, :, start:end], k[:, :, :end],
                            preferred_element_type=jnp.float32) * scale
        causal = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
        mask = causal[None] & (q_segment_ids[:, start:end, None] == kv_segment_ids[:, None, :end])
        scores = jnp.where(mask[:, None, None], scores, _NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("bkgts,bksd->bkgtd", probs, v[:, :, :end], preferred_element_type=jnp.float32))
    out = jnp.concatenate(outs, axis=3)  # [B, K, G, T, Dh]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh).astype(q_BTHD.dtype)


def _is_static_zero(x) -> bool:
    return isinstance(x, int) and x == 0


def _training_shapes(q_BTHD, k_BSKD, q_offset) -> bool:
    return _is_static_zero(q_offset) and q_BTHD.shape[1] == k_BSKD.shape[1]


def choose(backend: str = "auto", *, platform: str, dtype, training: bool, length: int | None = None,
           context_parallel: bool = False) -> str:
    """The concrete backend that runs for `backend`: the one "auto" rule (module docstring), used by the model,
    by context parallelism and by the memory planner.

    platform: JAX's platform name ("cpu", "gpu", "tpu"). dtype: the compute dtype of q / k / v (a dtype or its
    name). training: training shapes (query length = key length, q_offset 0) rather than decoding or chunked
    prefill. length: the query length of training shapes (splash needs at most 128 or a multiple of 128; None
    skips that check). context_parallel: attention under context parallelism, where each device attends with
    two query chunks against all keys (never training shapes, whatever `training` says); splash cannot run
    there and is refused with an error naming it. A backend other than "auto" is returned as it is.
    """
    half = jnp.dtype(dtype).name in ("bfloat16", "float16")
    if context_parallel:
        if backend == "splash":
            raise ValueError("attention backend 'splash' supports training shapes only and cannot run under "
                             "context parallelism (mesh context > 1); use 'xla_chunked', 'cudnn' or 'auto'")
        if backend != "auto":
            return backend
        return "cudnn" if platform == "gpu" and half else "xla_chunked"
    if backend != "auto":
        return backend
    if not training:
        return "xla"
    if platform == "gpu" and half:
        return "cudnn"
    if platform == "tpu" and (length is None or _splash_shapes_ok(length)):
        return "splash"
    return "xla_blocked"


def resolve_backend(backend: str, q_BTHD: Array, k_BSKD: Array, q_offset=0) -> str:
    """The concrete backend `dot_product_attention` will run for these arguments ("auto" resolved by `choose`)."""
    return choose(backend, platform=jax.default_backend(), dtype=q_BTHD.dtype,
                  training=_training_shapes(q_BTHD, k_BSKD, q_offset), length=q_BTHD.shape[1])


def dot_product_attention(q_BTHD: Array, k_BSKD: Array, v_BSKD: Array, *, q_segment_ids: Array,
                          kv_segment_ids: Array, q_offset=0, backend: str = "xla") -> Array:
    """Causal, document-masked GQA. Shapes: q [B,T,H,Dh], k/v [B,S,K,Dh], segment ids [B,T] / [B,S]."""
    if q_BTHD.shape[2] % k_BSKD.shape[2]:
        raise ValueError(f"query heads {q_BTHD.shape[2]} not a multiple of kv heads {k_BSKD.shape[2]}")
    backend = resolve_backend(backend, q_BTHD, k_BSKD, q_offset)
    if backend == "xla":
        mask = attention_mask(q_segment_ids, kv_segment_ids, q_offset)
        return xla_attention(q_BTHD, k_BSKD, v_BSKD, mask)
    if backend == "xla_blocked":
        if not _training_shapes(q_BTHD, k_BSKD, q_offset):  # decode / chunked prefill: the reference
            return xla_attention(q_BTHD, k_BSKD, v_BSKD, attention_mask(q_segment_ids, kv_segment_ids, q_offset))
        return causal_blocks_attention(q_BTHD, k_BSKD, v_BSKD, q_segment_ids, kv_segment_ids)
    if backend == "xla_chunked":
        return chunked_attention(q_BTHD, k_BSKD, v_BSKD, q_segment_ids, kv_segment_ids, q_offset)
    if backend == "cudnn":
        return cudnn_attention(q_BTHD, k_BSKD, v_BSKD, q_segment_ids, kv_segment_ids, q_offset)
    if backend == "splash":
        return splash_attention(q_BTHD, k_BSKD, v_BSKD, q_segment_ids, kv_segment_ids, q_offset)
    raise ValueError(f"unknown attention backend {backend!r}; expected one of "
                     "('xla', 'xla_blocked', 'xla_chunked', 'cudnn', 'splash', 'auto')")


# ------------------------------------------------------------------------------------ xla_chunked (flash)


def chunked_attention(q_BTHD: Array, k_BSKD: Array, v_BSKD: Array, q_segment_ids: Array, kv_segment_ids: Array,
                      q_offset=0, block_size: int = CHUNKED_BLOCK) -> Array:
    """Blockwise attention with an online softmax (FlashAttention's recurrence in plain JAX).

    Keys are visited `block_size` at a time (S is padded internally to a multiple of it); the largest live
    buffers are [B, H, T, block] float32. The backward pass recomputes each block's probabilities from the
    saved per-row log-sum-exp, so nothing of size T·S is kept between forward and backward.
    """
    s = k_BSKD.shape[1]
    block = max(1, min(int(block_size), s))
    n_blocks = -(-s // block)
    pad = n_blocks * block - s
    k, v, kv_seg = k_BSKD, v_BSKD, kv_segment_ids.astype(jnp.int32)
    if pad:
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
        kv_seg = jnp.pad(kv_seg, ((0, 0), (0, pad)))
    out = _flash(block, n_blocks, s, q_BTHD, k, v, q_segment_ids.astype(jnp.int32), kv_seg,
                 jnp.asarray(q_offset, jnp.int32))
    return out


def _block_scores(block, s_valid, qr, k_blk, q_seg, kv_seg_blk, q_offset, j, scale):
    """Masked float32 scores [B, K, G, T, block] of key block j, and the boolean mask (broadcastable)."""
    # The mask depends only on integers that are never differentiated, so when a remat (or any partial
    # evaluation) splits the loop into a "known" and an "unknown" part, JAX would compute every block's
    # [B, K, G, T, block] mask in a loop of its own and keep all of them: a T x S x heads buffer, the quadratic
    # memory this kernel exists to avoid (8 GiB per device for one 65,536-token 8B layer on 8 context devices).
    # Tying the mask's inputs to the key block through a barrier keeps the mask inside this loop iteration.
    k_blk, q_seg, kv_seg_blk, q_offset, j = jax.lax.optimization_barrier((k_blk, q_seg, kv_seg_blk, q_offset, j))
    t = qr.shape[1]
    scores = jnp.einsum("btkgd,bskd->bkgts", qr, k_blk, preferred_element_type=jnp.float32) * scale
    slot = j * block + jnp.arange(block, dtype=jnp.int32)
    q_slot = jnp.arange(t, dtype=jnp.int32) + q_offset
    allowed = (slot[None, :] <= q_slot[:, None]) & (slot < s_valid)[None, :]  # [T, block]
    allowed = allowed[None] & (q_seg[:, :, None] == kv_seg_blk[:, None, :])  # [B, T, block]
    allowed = allowed[:, None, None]
    return jnp.where(allowed, scores, _NEG_INF), allowed


def _slice_block(x, j, block):
    return jax.lax.dynamic_slice_in_dim(x, j * block, block, axis=1)


def _flash_forward(block, n_blocks, s_valid, q, k, v, q_seg, kv_seg, q_offset):
    b, t, h, dh = q.shape
    kh = k.shape[2]
    g = h // kh
    qr = q.reshape(b, t, kh, g, dh)
    scale = 1.0 / math.sqrt(dh)

    def body(carry, j):
        m, l, acc = carry
        v_blk = _slice_block(v, j, block)
        scores, allowed = _block_scores(block, s_valid, qr, _slice_block(k, j, block), q_seg,
                                        _slice_block(kv_seg, j, block), q_offset, j, scale)
        m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
        p = jnp.where(allowed, jnp.exp(scores - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        l = l * corr + jnp.sum(p, axis=-1)
        acc = acc * corr[..., None] + jnp.einsum("bkgts,bskd->bkgtd", p.astype(v.dtype), v_blk,
                                                 preferred_element_type=jnp.float32)
        return (m_new, l, acc), None

    init = (jnp.full((b, kh, g, t), _NEG_INF, jnp.float32), jnp.zeros((b, kh, g, t), jnp.float32),
            jnp.zeros((b, kh, g, t, dh), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(body, init, jnp.arange(n_blocks))
    l = jnp.maximum(l, 1e-30)  # only reachable for a fully masked row, which the mask contract rules out
    out_bkgtd = acc / l[..., None]
    lse = m + jnp.log(l)
    out = jnp.transpose(out_bkgtd, (0, 3, 1, 2, 4)).reshape(b, t, h, dh).astype(q.dtype)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _flash(block, n_blocks, s_valid, q, k, v, q_seg, kv_seg, q_offset):
    return _flash_forward(block, n_blocks, s_valid, q, k, v, q_seg, kv_seg, q_offset)[0]


def _flash_fwd(block, n_blocks, s_valid, q, k, v, q_seg, kv_seg, q_offset):
    out, lse = _flash_forward(block, n_blocks, s_valid, q, k, v, q_seg, kv_seg, q_offset)
    return out, (q, k, v, q_seg, kv_seg, q_offset, out, lse)


def _flash_bwd(block, n_blocks, s_valid, residuals, d_out):
    q, k, v, q_seg, kv_seg, q_offset, out, lse = residuals
    b, t, h, dh = q.shape
    kh = k.shape[2]
    g = h // kh
    cdtype = q.dtype
    scale = 1.0 / math.sqrt(dh)
    qr = q.reshape(b, t, kh, g, dh)
    do = d_out.reshape(b, t, kh, g, dh)
    # D_i = sum_d dO_i · O_i (= sum_s P_is dP_is), float32
    delta = jnp.einsum("btkgd,btkgd->bkgt", do.astype(jnp.float32), out.reshape(b, t, kh, g, dh).astype(jnp.float32))
    do = do.astype(cdtype)

    def body(dq, j):
        k_blk = _slice_block(k, j, block)
        v_blk = _slice_block(v, j, block)
        scores, allowed = _block_scores(block, s_valid, qr, k_blk, q_seg, _slice_block(kv_seg, j, block),
                                        q_offset, j, scale)
        p = jnp.where(allowed, jnp.exp(scores - lse[..., None]), 0.0)  # [B, K, G, T, blk]
        dv_blk = jnp.einsum("bkgts,btkgd->bskd", p.astype(cdtype), do, preferred_element_type=jnp.float32)
        dp = jnp.einsum("btkgd,bskd->bkgts", do, v_blk, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[..., None]) * scale).astype(cdtype)
        dq = dq + jnp.einsum("bkgts,bskd->btkgd", ds, k_blk, preferred_element_type=jnp.float32)
        dk_blk = jnp.einsum("bkgts,btkgd->bskd", ds, qr, preferred_element_type=jnp.float32)
        return dq, (dk_blk.astype(k.dtype), dv_blk.astype(v.dtype))

    dq, (dk, dv) = jax.lax.scan(body, jnp.zeros((b, t, kh, g, dh), jnp.float32), jnp.arange(n_blocks))
    # [n_blocks, B, block, K, Dh] -> [B, n_blocks * block, K, Dh]
    dk = jnp.swapaxes(dk, 0, 1).reshape(k.shape)
    dv = jnp.swapaxes(dv, 0, 1).reshape(v.shape)
    return dq.reshape(q.shape).astype(q.dtype), dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------------------------- cuDNN


def cudnn_attention(q_BTHD: Array, k_BSKD: Array, v_BSKD: Array, q_segment_ids: Array, kv_segment_ids: Array,
                    q_offset=0) -> Array:
    """cuDNN fused attention (NVIDIA GPU, bfloat16 / float16) with the causal + document mask."""
    platform = jax.default_backend()
    if platform != "gpu":
        raise ValueError(f"attention backend 'cudnn' needs an NVIDIA GPU, but JAX's platform is {platform!r}; "
                         "use 'xla', 'xla_chunked' or 'auto'")
    if q_BTHD.dtype not in (jnp.bfloat16, jnp.float16) or k_BSKD.dtype != q_BTHD.dtype:
        raise ValueError(f"attention backend 'cudnn' supports bfloat16 / float16 only, got q {q_BTHD.dtype}, "
                         f"k {k_BSKD.dtype}; set ModelConfig.dtype='bfloat16' or use 'xla' / 'auto'")
    if _training_shapes(q_BTHD, k_BSKD, q_offset):
        # causal lower triangle handled by the kernel (it skips masked blocks); only documents go in the mask
        mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
        is_causal = True
    else:
        mask = attention_mask(q_segment_ids, kv_segment_ids, q_offset)[:, None]
        is_causal = False
    return jax.nn.dot_product_attention(q_BTHD, k_BSKD, v_BSKD, mask=mask, is_causal=is_causal,
                                        implementation="cudnn")


# ------------------------------------------------------------------------------------------------ splash


def _splash_shapes_ok(t: int) -> bool:
    return t <= _SPLASH_BLOCK or t % _SPLASH_BLOCK == 0


def splash_attention(q_BTHD: Array, k_BSKD: Array, v_BSKD: Array, q_segment_ids: Array, kv_segment_ids: Array,
                     q_offset=0, *, interpret: bool = False) -> Array:
    """Pallas splash attention (TPU kernel; `interpret=True` runs the same kernel in the Pallas interpreter
    on any platform, slowly, for testing)."""
    platform = jax.default_backend()
    if platform != "tpu" and not interpret:
        raise ValueError(f"attention backend 'splash' needs a TPU, but JAX's platform is {platform!r}; "
                         "use 'xla', 'xla_chunked' or 'auto'")
    if not _training_shapes(q_BTHD, k_BSKD, q_offset):
        raise ValueError("attention backend 'splash' supports training shapes only (q_offset = 0 and query "
                         f"length = key length), got q {q_BTHD.shape}, k {k_BSKD.shape}, q_offset={q_offset}; "
                         "the decode path uses 'xla'")
    b, t, h, dh = q_BTHD.shape
    if not _splash_shapes_ok(t):
        raise ValueError(f"attention backend 'splash' needs the sequence length ({t}) to be at most "
                         f"{_SPLASH_BLOCK} or a multiple of it")
    from jax.experimental.pallas.ops.tpu import splash_attention as splash  # lazy: TPU-only module

    kh = k_BSKD.shape[2]
    g = h // kh
    blk = min(_SPLASH_BLOCK, t)
    sizes = splash.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                              block_kv_dkv=blk, block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
    mask = splash.MultiHeadMask([splash.CausalMask((t, t)) for _ in range(g)])
    kernel = splash.make_splash_mqa_single_device(mask=mask, block_sizes=sizes, interpret=interpret)
    scale = 1.0 / math.sqrt(dh)
    # [B, T, K, G, Dh] -> [B, K, G, T, Dh]; k, v -> [B, K, S, Dh]; one MQA kernel call per (batch, KV head)
    q = jnp.transpose((q_BTHD * jnp.asarray(scale, q_BTHD.dtype)).reshape(b, t, kh, g, dh), (0, 2, 3, 1, 4))
    k = jnp.transpose(k_BSKD, (0, 2, 1, 3))
    v = jnp.transpose(v_BSKD, (0, 2, 1, 3))
    seg = splash.SegmentIds(q=q_segment_ids.astype(jnp.int32), kv=kv_segment_ids.astype(jnp.int32))

    def per_example(q_KGTD, k_KSD, v_KSD, seg_ids):
        return jax.vmap(lambda qq, kk, vv: kernel(qq, kk, vv, segment_ids=seg_ids))(q_KGTD, k_KSD, v_KSD)

    out = jax.vmap(per_example)(q, k, v, seg)  # [B, K, G, T, Dh]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, dh).astype(q_BTHD.dtype)
