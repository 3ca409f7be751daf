"""Checkpoint averaging: exact (bit-equal to numpy's float32 sum in the same order), on any mesh."""
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from llama_jax.sharding import mesh as mesh_lib
from llama_jax.train import averaging
from llama_jax.train import checkpoint as ckpt_lib


def _params(seed):
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((8, 6)).astype(np.float32) * np.float32(10.0 ** rng.integers(-3, 3)),
            "b": {"v": rng.standard_normal((16,)).astype(np.float32)}}


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("avg") / "checkpoints")
    ck = ckpt_lib.StageCheckpoints(d, keep=10, async_save=False)
    for step in (10, 20, 30, 40):
        ck.save(step, {"params": _params(step), "step": np.int32(step)}, None, {"step": step})
    ck.close()
    return d


@pytest.mark.parametrize("mesh_shape", [{"data": 1}, {"fsdp": 2, "data": 4}])
def test_average_is_exact_on_any_mesh(ckpt_dir, mesh_shape):
    n_dev = 1 if mesh_shape == {"data": 1} else 8
    mesh = mesh_lib.make_mesh(mesh_shape, jax.devices()[:n_dev])
    sh = {"w": NamedSharding(mesh, P("fsdp", None)), "b": {"v": NamedSharding(mesh, P("data"))}}
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), _params(0), sh)
    steps = averaging.last_checkpoints(ckpt_dir, 3, after=10)
    assert steps == [20, 30, 40]
    out = jax.device_get(averaging.average_checkpoints([(ckpt_dir, s) for s in steps], abstract))
    trees = [_params(s) for s in steps]
    for path in (("w",), ("b", "v")):
        get = (lambda t: t[path[0]]) if len(path) == 1 else (lambda t: t[path[0]][path[1]])
        want = (get(trees[0]) + get(trees[1]) + get(trees[2])) / np.float32(3)  # float32, same order
        np.testing.assert_array_equal(get(out), want)
        exact = np.mean([get(t).astype(np.float64) for t in trees], axis=0)
        np.testing.assert_allclose(get(out), exact, rtol=3e-7, atol=0)
        assert not np.array_equal(get(out), get(trees[-1]))


def test_bad_requests_are_named(ckpt_dir):
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), _params(0))
    with pytest.raises(FileNotFoundError, match=r"step\(s\) \[50\] not found"):
        averaging.average_checkpoints([(ckpt_dir, 40), (ckpt_dir, 50)], abstract)
    with pytest.raises(ValueError, match="empty"):
        averaging.average_checkpoints([], abstract)
    with pytest.raises(FileNotFoundError, match="no checkpoint after step 40"):
        averaging.last_checkpoints(ckpt_dir, 2, after=40)
