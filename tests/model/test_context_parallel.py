"""Context parallelism: the load-balanced order and the sharded attention equal the unsharded model."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from llama_jax.model import config, transformer
from llama_jax.model import context_parallel as cpl
from llama_jax.sharding import mesh as mesh_lib
from llama_jax.sharding import rules as rules_lib


def packed_rows(batch, length, vocab, seed=0):
    """Packed documents of random lengths (segment ids from 1, positions restarting, padding at the end)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    seg = np.zeros((batch, length), np.int32)
    pos = np.zeros((batch, length), np.int32)
    for b in range(batch):
        t, doc = 0, 1
        end = length - int(rng.integers(0, length // 4))  # some padding (segment 0) at the end
        while t < end:
            n = min(int(rng.integers(1, length // 2)), end - t)
            seg[b, t:t + n] = doc
            pos[b, t:t + n] = np.arange(n)
            t, doc = t + n, doc + 1
    return tokens, pos, seg


@pytest.mark.parametrize("length,cp", [(8, 1), (8, 2), (16, 4), (24, 3), (64, 8)])
def test_order_round_trips_and_gives_device_i_chunks_i_and_mirror(length, cp):
    x = np.arange(3 * length).reshape(3, length)
    p = cpl.permute(x, cp)
    np.testing.assert_array_equal(cpl.unpermute(p, cp), x)
    np.testing.assert_array_equal(np.sort(cpl.load_balanced_order(length, cp)), np.arange(length))
    c = length // (2 * cp)
    for i, dev in enumerate(np.split(p[0], cp)):  # device i's contiguous slice of the permuted sequence
        np.testing.assert_array_equal(dev, np.r_[i * c:(i + 1) * c, (2 * cp - 1 - i) * c:(2 * cp - i) * c])


def test_bad_lengths_are_named():
    with pytest.raises(ValueError, match=r"length 12 is not divisible by 2 x context = 8"):
        cpl.load_balanced_order(12, 4)
    with pytest.raises(ValueError, match=r"context axis \(8\) is larger than the sequence length \(4\)"):
        cpl.check_length(4, 8)
    with pytest.raises(ValueError, match="not divisible by 2 x context"):
        cpl.permute_batch({"inputs": np.zeros((2, 6), np.int32)}, 2)


def _forward(cfg, params, mesh_shape, tokens, pos, seg, rules="fsdp"):
    mesh = mesh_lib.make_mesh(mesh_shape)
    cp = mesh.shape["context"]
    t, p, s = (cpl.permute(a, cp) for a in (tokens, pos, seg))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules_lib.get_rules(rules)):
        out = jax.jit(lambda prm, a, b, c: transformer.forward(cfg, prm, a, b, c))(params, t, p, s)
    return cpl.unpermute(np.asarray(out), cp)


@pytest.mark.parametrize("mesh_shape,backend", [
    ({"context": 2, "fsdp": 2, "data": 2}, "xla_chunked"),  # "auto" on CPU under context parallelism
    ({"context": 4, "data": 2}, "xla"),
])
def test_forward_equals_unsharded_on_packed_documents(mesh_shape, backend):
    cfg = config.tiny().replace(n_layers=1, attention=backend)
    params = transformer.init(cfg, jax.random.key(0))
    tokens, pos, seg = packed_rows(4, 32, cfg.vocab_size)
    ref = np.asarray(transformer.forward(cfg.replace(attention="xla"), params, tokens, pos, seg))
    out = _forward(cfg, params, mesh_shape, tokens, pos, seg)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)


def test_splash_and_bad_length_refused_under_context():
    cfg = config.tiny().replace(n_layers=1, attention="xla")
    params = transformer.init(cfg, jax.random.key(0))
    cfg = cfg.replace(attention="splash")
    tokens, pos, seg = packed_rows(2, 16, cfg.vocab_size)
    with pytest.raises(ValueError, match="'splash'.*context parallelism"):
        _forward(cfg, params, {"context": 2, "data": 4}, tokens, pos, seg)
    cfg = cfg.replace(attention="xla")
    mesh = mesh_lib.make_mesh({"context": 4, "data": 2})
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="length 12 is not divisible by 2 x context = 8"):
        transformer.forward(cfg, params, tokens[:, :12], pos[:, :12], seg[:, :12])
