"""The chunked (fused) cross-entropy equals the materialised-logits reference and never builds [B, L, V]."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.train import loss as loss_lib


def _inputs(b=2, t=37, d=16, v=101, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(b, t, d)), dtype)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, size=(b, t)), jnp.int32)
    mask = jnp.asarray(rng.random((b, t)) < 0.7, jnp.int32)
    return hidden, w, targets, mask


def _reference(hidden, w, targets, mask):
    logits = jnp.einsum("btd,dv->btv", hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32)
    return loss_lib.cross_entropy_sum(logits, targets, mask)


@pytest.mark.parametrize("chunk", [8, 64])  # 37 positions: 8 leaves a ragged tail, 64 > L
def test_chunked_matches_reference_value_and_grads(chunk):
    hidden, w, targets, mask = _inputs()
    ref_total, ref_count = _reference(hidden, w, targets, mask)
    total, count = jax.jit(loss_lib.chunked_cross_entropy_sum, static_argnums=4)(hidden, w, targets, mask, chunk)
    np.testing.assert_allclose(total, ref_total, rtol=1e-5)
    assert float(count) == float(ref_count) == float(mask.sum())

    def f(fn):
        # a non-trivial upstream cotangent (the step divides by the token count)
        return lambda h, w_: fn(h, w_)[0] * 0.37
    g_ref = jax.grad(f(lambda h, w_: _reference(h, w_, targets, mask)), argnums=(0, 1))(hidden, w)
    g = jax.jit(jax.grad(f(lambda h, w_: loss_lib.chunked_cross_entropy_sum(h, w_, targets, mask, chunk)),
                         argnums=(0, 1)))(hidden, w)
    for a, b in zip(g, g_ref):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # masked-out positions get exactly zero gradient
    dh = np.asarray(g[0])
    assert np.all(dh[np.asarray(mask) == 0] == 0)


def test_chunked_bfloat16_hidden():
    hidden, w, targets, mask = _inputs(dtype=jnp.bfloat16)
    ref_total, _ = _reference(hidden, w, targets, mask)
    total, _ = loss_lib.chunked_cross_entropy_sum(hidden, w, targets, mask, 16)
    np.testing.assert_allclose(total, ref_total, rtol=1e-3)
    dh, dw = jax.grad(lambda h, w_: loss_lib.chunked_cross_entropy_sum(h, w_, targets, mask, 16)[0],
                      argnums=(0, 1))(hidden, w)
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    dh_ref, dw_ref = jax.grad(lambda h, w_: _reference(h, w_, targets, mask)[0], argnums=(0, 1))(hidden, w)
    np.testing.assert_allclose(np.asarray(dw, np.float32), np.asarray(dw_ref, np.float32), rtol=5e-2, atol=5e-2)


def test_chunked_rejects_bad_arguments():
    hidden, w, targets, mask = _inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        loss_lib.chunked_cross_entropy_sum(hidden, w, targets, mask, 0)
    with pytest.raises(ValueError, match="hidden"):
        loss_lib.chunked_cross_entropy_sum(hidden, w.T, targets, mask, 8)


def _shapes_in_jaxpr(jaxpr):
    """Every array shape produced anywhere in a (closed) jaxpr, including inside scan / custom_vjp bodies."""
    shapes = set()

    def walk(jx):
        for eqn in jx.eqns:
            for var in eqn.outvars:
                shapes.add(tuple(getattr(var.aval, "shape", ())))
            for param in eqn.params.values():
                for sub in (param if isinstance(param, (tuple, list)) else (param,)):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)
    walk(jaxpr.jaxpr)
    return shapes


def test_chunked_never_materialises_full_logits():
    b, t, d, v, chunk = 2, 512, 64, 32000, 32
    hidden = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    targets = jax.ShapeDtypeStruct((b, t), jnp.int32)
    mask = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def grads(fn):
        return jax.jit(jax.value_and_grad(lambda h, w_, y, m: fn(h, w_, y, m)[0], argnums=(0, 1)))

    chunked = grads(lambda h, w_, y, m: loss_lib.chunked_cross_entropy_sum(h, w_, y, m, chunk))
    full = grads(_reference)

    # 1) no [B, L, V] (or [B*L, V]) array anywhere in the differentiated program
    shapes = _shapes_in_jaxpr(jax.make_jaxpr(chunked)(hidden, w, targets, mask))
    assert (b, chunk, v) in shapes  # sanity: the walk does see the per-chunk logits
    assert (b, t, v) not in shapes and (b * t, v) not in shapes
    assert (b, t, v) in _shapes_in_jaxpr(jax.make_jaxpr(full)(hidden, w, targets, mask))

    # 2) the compiled program's scratch memory is far below one full float32 logits buffer
    full_logits_bytes = b * t * v * 4
    temp_chunked = chunked.lower(hidden, w, targets, mask).compile().memory_analysis().temp_size_in_bytes
    temp_full = full.lower(hidden, w, targets, mask).compile().memory_analysis().temp_size_in_bytes
    assert temp_full >= full_logits_bytes, (temp_full, full_logits_bytes)
    # per chunk: a few [B, chunk, V] float32 buffers (logits, probabilities) plus the float32 dW accumulator
    assert temp_chunked < full_logits_bytes / 4, (temp_chunked, full_logits_bytes)


def test_train_step_loss_chunk_equals_full_logits_loss():
    from llama_jax.model import config, transformer
    from llama_jax.train import step as step_lib

    cfg = config.get("tiny", n_layers=1, vocab_size=512)
    params = transformer.init(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    b, t = 2, 24
    seg = np.ones((b, t), np.int32)
    seg[1, 10:] = 2
    seg[0, 20:] = 0
    batch = {"inputs": jnp.asarray(rng.integers(0, 512, (b, t)), jnp.int32),
             "targets": jnp.asarray(rng.integers(0, 512, (b, t)), jnp.int32),
             "segment_ids": jnp.asarray(seg), "positions": jnp.asarray(np.tile(np.arange(t), (b, 1)), jnp.int32),
             "loss_mask": jnp.asarray(seg > 0, jnp.int32)}
    f = lambda chunk: jax.jit(jax.value_and_grad(  # noqa: E731
        lambda p: step_lib.loss_sum(cfg, p, batch, chunk)[0]))(params)
    (l_full, g_full), (l_chunk, g_chunk) = f(0), f(7)
    np.testing.assert_allclose(l_chunk, l_full, rtol=1e-5)
    for a, r in zip(jax.tree.leaves(g_chunk), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-6)
