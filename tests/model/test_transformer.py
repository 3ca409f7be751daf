"""Behaviour of the full model: causality through gradients, document masking, GQA, scan, remat, cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import model
from llama_jax.model import config

CFG = config.get("tiny", n_layers=2)


@pytest.fixture(scope="module")
def params():
    return model.init(CFG, jax.random.key(0))


def test_forward_shapes_and_dtype(params):
    tokens = jnp.arange(24, dtype=jnp.int32).reshape(2, 12)
    logits = model.forward(CFG, params, tokens)
    assert logits.shape == (2, 12, CFG.vocab_size) and logits.dtype == jnp.float32
    bf16 = CFG.replace(dtype="bfloat16")
    logits16 = model.forward(bf16, params, tokens)
    assert logits16.dtype == jnp.float32
    np.testing.assert_allclose(logits16, logits, atol=5e-2)


def test_causality_through_gradients(params):
    """d logits[t] / d embedding(token at s) is zero exactly when s > t (all tokens distinct, untied head)."""
    length = 10
    tokens = jnp.arange(100, 100 + length, dtype=jnp.int32)[None]
    for t in (0, 4, 9):
        grads = jax.grad(lambda p: model.forward(CFG, p, tokens)[0, t].sum())(params)
        g_rows = np.abs(np.asarray(grads["embed"]["embedding"]))[100:100 + length].sum(-1)
        assert np.all(g_rows[t + 1:] == 0.0), (t, g_rows)
        assert np.all(g_rows[:t + 1] > 0.0), (t, g_rows)


def test_packed_document_equals_document_alone(params):
    rng = np.random.default_rng(0)
    doc_a, doc_b = rng.integers(0, CFG.vocab_size, 5), rng.integers(0, CFG.vocab_size, 7)
    packed = np.concatenate([doc_a, doc_b])[None]
    segs = np.array([[1] * 5 + [2] * 7])
    pos = np.array([list(range(5)) + list(range(7))])
    packed_logits = model.forward(CFG, params, packed, pos, segs)
    alone_b = model.forward(CFG, params, doc_b[None])
    alone_a = model.forward(CFG, params, doc_a[None])
    np.testing.assert_allclose(packed_logits[0, 5:], alone_b[0], atol=1e-5)
    np.testing.assert_allclose(packed_logits[0, :5], alone_a[0], atol=1e-5)
    # Without segment ids the second document sees the first: the mask is doing real work.
    unmasked = model.forward(CFG, params, packed, pos)
    assert np.abs(np.asarray(unmasked[0, 5:] - alone_b[0])).max() > 1e-3


@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_gqa_equals_mha_with_repeated_kv(n_kv_heads):
    cfg = config.get("tiny", n_layers=2, n_kv_heads=n_kv_heads)
    p = model.init(cfg, jax.random.key(1))
    mha = cfg.replace(n_kv_heads=cfg.n_heads)
    g = cfg.n_heads // n_kv_heads
    p_mha = jax.tree.map(lambda x: x, p)
    attn = dict(p["layers"]["block"]["attention"])
    # Query head h reads KV head h // G: repeat every KV head G times along the head axis.
    attn["wk"] = jnp.repeat(attn["wk"], g, axis=2)
    attn["wv"] = jnp.repeat(attn["wv"], g, axis=2)
    p_mha["layers"]["block"]["attention"] = attn
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 16))
    np.testing.assert_allclose(model.forward(cfg, p, tokens), model.forward(mha, p_mha, tokens), atol=1e-5)


def test_scanned_equals_unrolled(params):
    tokens = np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 16))
    unrolled_cfg = CFG.replace(scan_layers=False)
    per_layer = model.unstack_layers(CFG, params)
    assert "layers_1" in per_layer and "layers" not in per_layer
    np.testing.assert_allclose(model.forward(CFG, params, tokens), model.forward(unrolled_cfg, per_layer, tokens),
                               atol=1e-5)
    restacked = model.stack_layers(CFG, per_layer)
    jax.tree.map(np.testing.assert_array_equal, restacked, params)
    # The unrolled model initialises to the per-layer structure.
    shapes = model.param_shapes(unrolled_cfg)
    assert jax.tree.structure(shapes) == jax.tree.structure(per_layer)


def test_fused_projections_equal_separate_matmuls(params):
    """Q/K/V and gate/up computed as one matmul each give the same function and gradients as five separate
    matmuls, from the same parameters (the parameter tree does not depend on the setting)."""
    tokens = np.random.default_rng(5).integers(0, CFG.vocab_size, (2, 12))
    separate = CFG.replace(fuse_projections=False)
    assert CFG.fuse_projections
    assert jax.tree.structure(model.param_shapes(separate)) == jax.tree.structure(params)
    np.testing.assert_allclose(model.forward(CFG, params, tokens), model.forward(separate, params, tokens),
                               rtol=1e-5, atol=1e-5)

    def loss(p, cfg):
        return jnp.mean(jax.nn.log_softmax(model.forward(cfg, p, tokens))[..., 1])

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 jax.grad(loss)(params, CFG), jax.grad(loss)(params, separate))


@pytest.mark.parametrize("policy", ["full", "save_dots", "save_dots_no_batch", "save_qkv_out"])
def test_remat_policies_do_not_change_gradients(params, policy):
    tokens = np.random.default_rng(4).integers(0, CFG.vocab_size, (2, 8))

    def loss(p, cfg):
        return jnp.mean(jax.nn.log_softmax(model.forward(cfg, p, tokens))[..., 0])

    ref = jax.grad(loss)(params, CFG)
    got = jax.grad(loss)(params, CFG.replace(remat=policy))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, ref)


def test_jit_and_no_jit_agree(params):
    tokens = np.random.default_rng(5).integers(0, CFG.vocab_size, (1, 8))
    eager = model.forward(CFG, params, tokens)
    jitted = jax.jit(lambda p, t: model.forward(CFG, p, t))(params, jnp.asarray(tokens))
    np.testing.assert_allclose(eager, jitted, atol=1e-5)


def test_cached_decode_equals_full_forward(params):
    tokens = np.random.default_rng(6).integers(0, CFG.vocab_size, (2, 12))
    full = model.forward(CFG, params, tokens)
    cache = model.init_cache(CFG, batch=2, max_len=16)
    logits, cache = model.apply(CFG, params, tokens[:, :7], cache=cache)
    outs = [logits]
    for t in range(7, 12):
        step_logits, cache = model.apply(CFG, params, tokens[:, t:t + 1], cache=cache)
        outs.append(step_logits)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=1e-5)
    assert int(cache["index"]) == 12


def test_tied_embeddings_share_the_table():
    cfg = config.get("tiny", n_layers=1, tie_embeddings=True)
    p = model.init(cfg, jax.random.key(0))
    assert "lm_head" not in p
    tokens = np.array([[1, 2, 3]])
    hidden, _ = model.apply(cfg, p, tokens, return_hidden=True)
    expected = np.einsum("btd,vd->btv", np.asarray(hidden), np.asarray(p["embed"]["embedding"]))
    np.testing.assert_allclose(model.forward(cfg, p, tokens), expected, atol=1e-4)


def test_token_ids_outside_vocabulary_are_named(params):
    with pytest.raises(ValueError, match=r"token id 4096 is outside the vocabulary \[0, 4096\)"):
        model.forward(CFG, params, np.array([[1, 4096]]))
    with pytest.raises(ValueError, match="token id -1"):
        model.forward(CFG, params, np.array([[-1, 3]]))
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        model.forward(CFG, params, np.array([1, 2, 3]))
