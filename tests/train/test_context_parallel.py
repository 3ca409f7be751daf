"""Context parallelism in training: loss and gradients on permuted, context-sharded batches equal context 1."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from llama_jax.model import config, transformer
from llama_jax.model import context_parallel as cpl
from llama_jax.sharding import mesh as mesh_lib
from llama_jax.sharding import rules as rules_lib
from llama_jax.train import step as step_lib
from tests.model.test_context_parallel import packed_rows


def _batch(cfg, b=4, length=32):
    tokens, pos, seg = packed_rows(b, length + 1, cfg.vocab_size, seed=3)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    seg, pos = seg[:, :-1], pos[:, :-1]
    loss_mask = ((seg > 0) & (np.roll(seg, -1, axis=1) == seg)).astype(np.int32)  # no target across documents
    return {"inputs": inputs, "targets": targets, "segment_ids": seg, "positions": pos, "loss_mask": loss_mask}


def _loss_and_grads(cfg, params, batch, mesh, loss_chunk):
    cp = mesh.shape["context"]
    batch = cpl.permute_batch(batch, cp)
    fn = jax.value_and_grad(lambda p, b: step_lib.loss_sum(cfg, p, b, loss_chunk), has_aux=True)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules_lib.get_rules("fsdp")):
        (total, count), grads = jax.jit(fn)(params, batch)
    return float(total), float(count), jax.device_get(grads)


@pytest.mark.parametrize("mesh_shape,n_devices,loss_chunk", [
    ({"context": 2}, 2, 0),
    ({"context": 4, "fsdp": 2}, 8, 8),
])
def test_loss_and_gradients_equal_context_1(mesh_shape, n_devices, loss_chunk):
    cfg = config.tiny().replace(n_layers=1, attention="auto")
    params = transformer.init(cfg, jax.random.key(1))
    batch = _batch(cfg)
    ref_t, ref_n, ref_g = _loss_and_grads(cfg, params, batch, mesh_lib.make_mesh({"data": 1}, jax.devices()[:1]),
                                          loss_chunk)
    mesh = mesh_lib.make_mesh(mesh_shape, jax.devices()[:n_devices])
    t, n, g = _loss_and_grads(cfg, params, batch, mesh, loss_chunk)
    assert n == ref_n and n > 0
    np.testing.assert_allclose(t, ref_t, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g, ref_g)
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(ref_g)) > 1e-3  # the gradients are not trivial


def test_train_step_refuses_length_not_divisible_by_2_x_context():
    mesh = mesh_lib.make_mesh({"context": 4, "data": 2})
    shapes = {k: (2, 12) for k in step_lib.BATCH_KEYS}
    with pytest.raises(ValueError, match="length 12 is not divisible by 2 x context = 8"):
        step_lib.check_batch_shapes(shapes, mesh)
