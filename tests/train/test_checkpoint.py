"""Checkpoint checksums: written with every save, verified on restore; bit rot falls back to the previous one."""

import json
import logging

import jax
import numpy as np
import pytest

from llama_jax.sharding import mesh as mesh_lib
from llama_jax.train import checkpoint as ckpt_lib


def _state(value: float) -> dict:
    sharding = mesh_lib.replicated(mesh_lib.make_mesh({"data": 8}))
    return {"params": {"w": jax.device_put(np.full((64, 32), value, np.float32), sharding),
                       "b": jax.device_put(np.arange(32, dtype=np.float32) + value, sharding)},
            "step": jax.device_put(np.int32(value), sharding)}


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _flip_one_byte(step_dir):
    """Flips one byte in the middle of the largest array file of the state item (its size is unchanged)."""
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file()]
    target = max(files, key=lambda f: f.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x10
    target.write_bytes(bytes(data))
    return target


@pytest.mark.parametrize("async_save", [False, True])
def test_checksums_are_written_with_each_save_and_verify(tmp_path, async_save):
    ck = ckpt_lib.StageCheckpoints(str(tmp_path / "ck"), async_save=async_save)
    ck.save(0, _state(0.0), None, {"phase": 0})
    ck.save(4, _state(4.0), None, {"phase": 0})
    ck.close()
    for step in (0, 4):
        record = json.loads((tmp_path / f"ck/{step}" / ckpt_lib.CHECKSUM_FILE).read_text())
        assert any(name.startswith("state/") for name in record["files"]), record
        assert ckpt_lib.verify_checkpoint(str(tmp_path / f"ck/{step}")) is True
    assert not list((tmp_path / "ck").rglob(ckpt_lib.CHECKSUM_FILE + ".tmp*"))


def test_flipped_byte_is_detected_and_restore_falls_back_to_the_previous_checkpoint(tmp_path, caplog):
    ck = ckpt_lib.StageCheckpoints(str(tmp_path / "ck"), async_save=False)
    ck.save(4, _state(4.0), None, {"phase": 0, "tag": "four"})
    ck.save(8, _state(8.0), None, {"phase": 0, "tag": "eight"})
    ck.wait()
    size_before = {f: f.stat().st_size for f in (tmp_path / "ck/8").rglob("*") if f.is_file()}
    flipped = _flip_one_byte(tmp_path / "ck/8")
    assert {f: f.stat().st_size for f in (tmp_path / "ck/8").rglob("*") if f.is_file()} == size_before

    with pytest.raises(ckpt_lib.CorruptCheckpointError, match="fails its checksum") as err:
        ck.verify(8)
    message = str(err.value)
    assert "\n" not in message and str(flipped.relative_to(tmp_path / "ck/8")) in message

    caplog.set_level(logging.WARNING)
    step, restored, _, meta = ck.restore_latest(_abstract(_state(0.0)), lambda meta: None)
    assert step == 4 and meta["tag"] == "four"
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(_state(4.0)))
    warnings = [r.getMessage() for r in caplog.records if "could not be restored" in r.getMessage()]
    assert len(warnings) == 1 and "fails its checksum" in warnings[0] and "\n" not in warnings[0], warnings
    assert list(tmp_path.glob("ck/8.corrupt-*")) and ck.all_steps() == [4]
    ck.close()


def test_load_params_refuses_a_corrupt_checkpoint(tmp_path):
    ck = ckpt_lib.StageCheckpoints(str(tmp_path / "ck"), async_save=False)
    ck.save(3, _state(3.0), None, {"phase": 0})
    ck.close()
    abstract = _abstract(_state(0.0))["params"]
    params, step = ckpt_lib.load_params(str(tmp_path / "ck"), abstract)
    assert step == 3
    np.testing.assert_array_equal(jax.device_get(params["w"]), np.full((64, 32), 3.0, np.float32))
    _flip_one_byte(tmp_path / "ck/3")
    with pytest.raises(ckpt_lib.CorruptCheckpointError, match=r"checkpoint .*3: file state/.* fails its checksum"):
        ckpt_lib.load_params(str(tmp_path / "ck"), abstract)


def test_missing_file_is_corrupt_and_no_checksum_file_restores_unverified(tmp_path):
    ck = ckpt_lib.StageCheckpoints(str(tmp_path / "ck"), async_save=False)
    ck.save(1, _state(1.0), None, {"phase": 0})
    ck.save(2, _state(2.0), None, {"phase": 0})
    ck.wait()
    (tmp_path / "ck/2" / ckpt_lib.CHECKSUM_FILE).unlink()  # e.g. written by an older version
    assert ck.verify(2) is False
    state, _ = ck.restore(2, _abstract(_state(0.0)), None)
    np.testing.assert_array_equal(jax.device_get(state["params"]["b"]), np.arange(32, dtype=np.float32) + 2)
    victim = next(f for f in (tmp_path / "ck/1/state").rglob("*") if f.is_file())
    victim.unlink()
    with pytest.raises(ckpt_lib.CorruptCheckpointError, match="is missing"):
        ck.verify(1)
    ck.close()


def test_unreadable_checkpoint_without_checksums_is_one_warning_line_naming_the_cause(tmp_path, caplog):
    ck = ckpt_lib.StageCheckpoints(str(tmp_path / "ck"), async_save=False)
    ck.save(4, _state(4.0), None, {"phase": 0})
    ck.save(8, _state(8.0), None, {"phase": 0})
    ck.wait()
    (tmp_path / "ck/8" / ckpt_lib.CHECKSUM_FILE).unlink()  # unverified: Orbax's own read must fail
    for f in (tmp_path / "ck/8/state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:50])  # truncated array files
    caplog.set_level(logging.WARNING)
    step, _, _, _ = ck.restore_latest(_abstract(_state(0.0)), lambda meta: None)
    assert step == 4
    (warning,) = [r.getMessage() for r in caplog.records if "could not be restored" in r.getMessage()]
    assert "\n" not in warning and "TensorStore details" not in warning and "OUT_OF_RANGE" in warning, warning
    assert len(warning) < 600, warning
    ck.close()


def test_first_line_drops_the_tensorstore_spec():
    error = RuntimeError("Encountered error while reading array index: (0,). See full TensorStore details: "
                         "{'driver': 'zarr',\n 'kvstore': ...}")
    assert ckpt_lib.first_line(error) == "Encountered error while reading array index: (0,)."
