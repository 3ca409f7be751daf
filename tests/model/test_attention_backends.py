"""Every attention backend computes the reference function (causal + document mask, GQA, decode offsets)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.model import attention as attn
from llama_jax.model import config as config_lib

ON = jax.default_backend()


def _segments(rng, b, t, with_padding=True):
    """Packed documents (ids 1, 2, ...) followed by a padding tail (id 0) on some rows."""
    seg = np.zeros((b, t), np.int32)
    for i in range(b):
        end = t - (int(rng.integers(1, t // 4)) if with_padding and i % 2 == 0 else 0)
        cuts = np.sort(rng.choice(np.arange(1, end), size=min(3, end - 1), replace=False))
        seg[i, :end] = np.searchsorted(cuts, np.arange(end), side="right") + 1
    return jnp.asarray(seg)


def _qkv(b, t, s, h, k, dh, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, h, dh)), dtype)
    kk = jnp.asarray(rng.normal(size=(b, s, k, dh)), dtype)
    v = jnp.asarray(rng.normal(size=(b, s, k, dh)), dtype)
    return q, kk, v, rng


def _run(backend, q, k, v, qs, ks, off, **kw):
    if backend == "jax_nn_xla":  # independent reference: jax's own implementation with the same boolean mask
        mask = attn.attention_mask(qs, ks, off)[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    if backend == "chunked_block":
        return attn.chunked_attention(q, k, v, qs, ks, off, **kw)
    return attn.dot_product_attention(q, k, v, q_segment_ids=qs, kv_segment_ids=ks, q_offset=off,
                                      backend=backend)


@pytest.mark.parametrize("backend,h,k", [("xla_chunked", 4, 2), ("xla_chunked", 6, 1), ("xla_chunked", 4, 4),
                                         ("xla_blocked", 4, 2), ("xla_blocked", 6, 1), ("auto", 4, 2),
                                         ("jax_nn_xla", 6, 2)])
def test_training_shapes_forward_and_grads(backend, h, k):
    b, t, dh = 2, 40, 8
    q, kk, v, rng = _qkv(b, t, t, h, k, dh)
    seg = _segments(rng, b, t)
    ref = _run("xla", q, kk, v, seg, seg, 0)
    out = jax.jit(lambda *a: _run(backend, *a, seg, seg, 0))(q, kk, v)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)

    w = jnp.asarray(rng.normal(size=ref.shape), jnp.float32)  # a non-trivial cotangent
    loss = lambda be: (lambda *a: jnp.sum(_run(be, *a, seg, seg, 0) * w))  # noqa: E731
    g_ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, kk, v)
    g = jax.jit(jax.grad(loss(backend), argnums=(0, 1, 2)))(q, kk, v)
    for a, r in zip(g, g_ref):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block", [7, 64])
def test_chunked_block_sizes_including_non_dividing(block):
    b, t, h, k, dh = 2, 37, 4, 2, 8
    q, kk, v, rng = _qkv(b, t, t, h, k, dh, seed=1)
    seg = _segments(rng, b, t)
    ref = _run("xla", q, kk, v, seg, seg, 0)
    out = _run("chunked_block", q, kk, v, seg, seg, 0, block_size=block)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
    g_ref = jax.grad(lambda kk: jnp.sum(_run("xla", q, kk, v, seg, seg, 0) ** 2))(kk)
    g = jax.grad(lambda kk: jnp.sum(_run("chunked_block", q, kk, v, seg, seg, 0, block_size=block) ** 2))(kk)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block", [5, 16, 37])
def test_causal_blocks_with_non_dividing_blocks(block):
    b, t, h, k, dh = 2, 37, 6, 2, 8
    q, kk, v, rng = _qkv(b, t, t, h, k, dh, seed=4)
    seg = _segments(rng, b, t)
    ref = _run("xla", q, kk, v, seg, seg, 0)
    out = attn.causal_blocks_attention(q, kk, v, seg, seg, block=block)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
    w = jnp.asarray(rng.normal(size=ref.shape), jnp.float32)
    g_ref = jax.grad(lambda *a: jnp.sum(_run("xla", *a, seg, seg, 0) * w), argnums=(0, 1, 2))(q, kk, v)
    g = jax.grad(lambda *a: jnp.sum(attn.causal_blocks_attention(*a, seg, seg, block=block) * w),
                 argnums=(0, 1, 2))(q, kk, v)
    for a, r in zip(g, g_ref):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,t,offset", [("xla_chunked", 1, 0), ("xla_chunked", 5, 9), ("auto", 1, 13),
                                              ("xla_blocked", 5, 9), ("jax_nn_xla", 5, 9)])
def test_decode_shapes_with_offset(backend, t, offset):
    """Queries at slots [offset, offset + t) over a 24-slot cache whose unwritten slots have segment id 0."""
    b, s, h, k, dh = 2, 24, 4, 2, 8
    q, kk, v, _ = _qkv(b, t, s, h, k, dh, seed=2)
    kv_seg = np.zeros((b, s), np.int32)
    kv_seg[:, :offset + t] = 1
    kv_seg[1, :min(3, offset)] = 7  # an earlier document in row 1 that the queries must not see
    kv_seg = jnp.asarray(kv_seg)
    q_seg = jnp.ones((b, t), jnp.int32)
    ref = _run("xla", q, kk, v, q_seg, kv_seg, offset)
    # traced offset, as in the KV-cache decode loop
    out = jax.jit(lambda q, kk, v, off: _run(backend, q, kk, v, q_seg, kv_seg, off))(q, kk, v, offset)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
    g_ref = jax.grad(lambda v: jnp.sum(_run("xla", q, kk, v, q_seg, kv_seg, offset) ** 2))(v)
    g = jax.grad(lambda v: jnp.sum(_run(backend, q, kk, v, q_seg, kv_seg, offset) ** 2))(v)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)


def test_reference_respects_the_mask():
    """The reference itself: changing a key outside a query's document / future leaves its output alone."""
    b, t, h, k, dh = 1, 12, 2, 1, 4
    q, kk, v, _ = _qkv(b, t, t, h, k, dh, seed=3)
    seg = jnp.asarray([[1] * 5 + [2] * 7])
    out = _run("xla", q, kk, v, seg, seg, 0)
    v2 = v.at[:, 5:].set(100.0)  # document 2's values cannot reach document 1
    np.testing.assert_allclose(_run("xla", q, kk, v2, seg, seg, 0)[:, :5], out[:, :5])
    v3 = v.at[:, 9:].set(100.0)  # the future cannot reach position 8
    np.testing.assert_allclose(_run("xla", q, kk, v3, seg, seg, 0)[:, :9], out[:, :9])


def test_chunked_memory_is_blockwise():
    """The differentiated xla_chunked program keeps no [.., T, S] float32 buffer; the reference does."""
    b, t, h, k, dh = 1, 2048, 4, 2, 16
    q = jax.ShapeDtypeStruct((b, t, h, dh), jnp.float32)
    kv = jax.ShapeDtypeStruct((b, t, k, dh), jnp.float32)
    seg = jnp.ones((b, t), jnp.int32)

    def temp_bytes(backend):
        f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(_run(backend, q, k, v, seg, seg, 0)), argnums=(0, 1, 2)))
        return f.lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes

    scores_bytes = b * h * t * t * 4
    assert temp_bytes("xla") >= scores_bytes
    assert temp_bytes("xla_chunked") < scores_bytes / 3


def test_chunked_mask_is_not_stacked_over_key_blocks_under_remat():
    """Under a remat of the whole model, JAX's partial evaluation used to split the key-block loop and keep every
    block's mask: a [n_blocks, B, K, G, T, block] boolean, T x S x heads bytes. No 6-d mask may remain."""
    import re  # noqa: PLC0415

    from llama_jax.model import transformer  # noqa: PLC0415
    cfg = config_lib.get("tiny", attention="xla_chunked", remat="full")
    params = jax.eval_shape(lambda: transformer.init(cfg, jax.random.key(0)))
    tokens = jnp.ones((1, 1024), jnp.int32)
    hlo = jax.jit(jax.grad(lambda p: jnp.sum(transformer.forward(cfg, p, tokens)))).lower(params).compile().as_text()
    assert "while" in hlo  # the key-block loop is there
    assert not re.findall(r"pred\[\d+(?:,\d+){5,}\]", hlo)


def test_splash_kernel_in_interpreter_matches_reference():
    """The splash backend's wrapping (scaling, GQA as per-KV-head MQA, segment ids) run through the Pallas
    interpreter, which executes the TPU kernel on any platform."""
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    b, t, h, k, dh = 1, 128, 4, 2, 128
    q, kk, v, rng = _qkv(b, t, t, h, k, dh, seed=4)
    seg = _segments(rng, b, t)
    ref = _run("xla", q, kk, v, seg, seg, 0)
    out = attn.splash_attention(q, kk, v, seg, seg, 0, interpret=True)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(ON == "gpu", reason="on a GPU the cudnn backend runs (see test_cudnn_on_gpu)")
def test_cudnn_without_gpu_is_a_clear_error():
    q, kk, v, _ = _qkv(1, 8, 8, 2, 1, 8, dtype=jnp.bfloat16)
    seg = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="'cudnn' needs an NVIDIA GPU"):
        _run("cudnn", q, kk, v, seg, seg, 0)


@pytest.mark.skipif(ON == "tpu", reason="on a TPU the splash backend runs (see test_splash_on_tpu)")
def test_splash_without_tpu_is_a_clear_error():
    q, kk, v, _ = _qkv(1, 8, 8, 2, 1, 8)
    seg = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="'splash' needs a TPU"):
        _run("splash", q, kk, v, seg, seg, 0)


def test_unknown_backend_and_auto_resolution():
    q, kk, v, _ = _qkv(1, 8, 8, 2, 1, 8)
    seg = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        _run("flash", q, kk, v, seg, seg, 0)
    if ON == "cpu":
        assert attn.resolve_backend("auto", q, kk, 0) == "xla_blocked"
    assert set(config_lib.ATTENTION_BACKENDS) == {"xla", "xla_blocked", "xla_chunked", "cudnn", "splash", "auto"}
    # decode shapes never go to a fused training kernel
    assert attn.resolve_backend("auto", q[:, :1], kk, 5) == "xla"


def test_choose_is_the_one_auto_rule():
    train = {"training": True, "length": 256}
    assert attn.choose(platform="gpu", dtype="bfloat16", **train) == "cudnn"
    assert attn.choose(platform="gpu", dtype=jnp.float16, **train) == "cudnn"
    assert attn.choose(platform="gpu", dtype="float32", **train) == "xla_blocked"
    assert attn.choose(platform="tpu", dtype="bfloat16", **train) == "splash"
    assert attn.choose(platform="tpu", dtype="bfloat16", training=True, length=100) == "splash"
    assert attn.choose(platform="tpu", dtype="bfloat16", training=True, length=200) == "xla_blocked"
    assert attn.choose(platform="cpu", dtype="bfloat16", **train) == "xla_blocked"
    for platform in ("cpu", "gpu", "tpu"):  # decoding / chunked prefill
        assert attn.choose(platform=platform, dtype="bfloat16", training=False) == "xla"
        # context parallelism: two query chunks against all keys, whatever the shapes
        want = "cudnn" if platform == "gpu" else "xla_chunked"
        assert attn.choose(platform=platform, dtype="bfloat16", training=True, context_parallel=True) == want
        assert attn.choose(platform=platform, dtype="float32", training=False, context_parallel=True) == "xla_chunked"
    # a named backend is kept, except splash under context parallelism
    assert attn.choose("xla_chunked", platform="gpu", dtype="bfloat16", **train) == "xla_chunked"
    assert attn.choose("xla", platform="tpu", dtype="float32", training=True, context_parallel=True) == "xla"
    with pytest.raises(ValueError, match="'splash'.*context parallelism"):
        attn.choose("splash", platform="tpu", dtype="bfloat16", training=True, context_parallel=True)
    # the model's resolution is this rule on the arrays' platform, dtype and shapes
    q, kk, _, _ = _qkv(1, 8, 8, 2, 1, 8)
    assert attn.resolve_backend("auto", q, kk, 0) == attn.choose(platform=ON, dtype=q.dtype, training=True, length=8)


@pytest.mark.skipif(ON != "gpu", reason="needs an NVIDIA GPU (cuDNN); absent on this machine")
def test_cudnn_on_gpu():
    b, t, h, k, dh = 2, 256, 8, 2, 64
    q, kk, v, rng = _qkv(b, t, t, h, k, dh, dtype=jnp.bfloat16)
    seg = _segments(rng, b, t)
    ref = _run("xla", q, kk, v, seg, seg, 0).astype(jnp.float32)
    out = _run("cudnn", q, kk, v, seg, seg, 0).astype(jnp.float32)
    np.testing.assert_allclose(out, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(ON != "tpu", reason="needs a TPU (Pallas splash kernel); absent on this machine")
def test_splash_on_tpu():
    b, t, h, k, dh = 2, 256, 8, 2, 128
    q, kk, v, rng = _qkv(b, t, t, h, k, dh)
    seg = _segments(rng, b, t)
    ref = _run("xla", q, kk, v, seg, seg, 0)
    out = _run("splash", q, kk, v, seg, seg, 0)
    np.testing.assert_allclose(out, ref, rtol=2e-2, atol=2e-2)
