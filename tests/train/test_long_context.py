"""Stage kinds long_context and anneal in the driver: a failed gate stops naming gate, value and threshold; a
rerun after fixing the config resumes and passes; annealing averages its checkpoints into the final model.
The run uses context parallelism (mesh context 4 x data 2) throughout."""
import os

import jax
import numpy as np
import pytest

from llama_jax import experiment as E
from llama_jax import workdir as workdir_lib
from llama_jax.model import transformer
from llama_jax.train import checkpoint as ckpt_lib
from llama_jax.train import loop
from llama_jax.train.long_context import GateFailed
from tests.train.test_driver import _config


def _stages(threshold):
    gates = dict(short_seq_len=32, short_tolerance=1.0, needle_threshold=threshold, needle_trials=1,
                 needle_depths=[0.5])
    return [E.stage("pretrain", [E.phase(32, 8)], E.optim(1e-3, 1), steps=2),
            E.stage("long", [E.phase(128, 2)], E.optim(1e-3, 1), steps=2, kind="long_context", options=gates),
            E.stage("anneal", [E.phase(128, 2)], E.optim(1e-3, 0, decay="linear", final_lr_ratio=0.0), steps=3,
                    kind="anneal", options=dict(average_last=2),
                    data=dict(sources=[dict(name="stdlib_prose", kind="corpus", path="prose", weight=1.0)]))]


def test_gates_stop_then_resume_and_anneal_averages(data_cache, tmp_path):
    c = _config(data_cache, **{"mesh.context": 4, "eval.batches": 1})
    c.stages = _stages(threshold=1.0)
    wd = str(tmp_path / "run")
    with pytest.raises(GateFailed, match=r"stage 'long': gate 'needle' failed: measured 0\.0000, needs >= 1"):
        loop.run_experiment(c, wd)
    long_dir = workdir_lib.stage_dir(wd, "long")
    assert os.path.exists(os.path.join(long_dir, "gates.json")) and os.path.exists(os.path.join(long_dir, "needle.png"))
    assert workdir_lib.read_done(wd, "long") is None and workdir_lib.read_done(wd, "pretrain") is not None

    c.stages = _stages(threshold=0.0)  # fixed config: the rerun resumes the stage at its final checkpoint
    results = loop.run_experiment(c, wd, allow_config_change=True)
    long = results["long"]
    assert long["step"] == 2 and long["gates"]["gate_needle"]["passed"]
    short = long["gates"]["gate_short_loss"]
    assert short["reference"] == pytest.approx(results["pretrain"]["eval_loss"])
    assert short["value"] == pytest.approx(long["short_loss"] - results["pretrain"]["eval_loss"])

    anneal = results["anneal"]
    assert anneal["averaged_steps"] == [2, 3] and anneal["averaged_checkpoint"] == 4
    cfg = E.resolve(c)[2].model
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev),
                            transformer.param_shapes(cfg))
    d = workdir_lib.checkpoints_dir(wd, "anneal")
    p2, p3, p4 = (jax.device_get(ckpt_lib.load_params(d, abstract, s)[0]) for s in (2, 3, 4))
    jax.tree.map(lambda a, b, m: np.testing.assert_array_equal(m, (a + b) / np.float32(2)), p2, p3, p4)
    assert anneal["averaged_loss"] != anneal["last_checkpoint_loss"]


def test_bad_options_and_lengths_are_named(data_cache):
    c = _config(data_cache)
    c.stages = _stages(0.0)
    c.stages[1]["options"]["needle_treshold"] = 0.5
    with pytest.raises(ValueError, match=r"stage 'long': unknown option\(s\) \['needle_treshold'\]"):
        E.resolve(c)
    c.stages = _stages(0.0)
    c.stages[1]["phases"] = [E.phase(4096, 1)]
    with pytest.raises(ValueError, match="stage 'long': seq_len 4096 exceeds the model's max_seq_len 2048"):
        E.resolve(c)
    c.stages = _stages(0.0)
    c.mesh.context = 4
    c.stages[1]["phases"] = [E.phase(36, 4)]
    with pytest.raises(ValueError, match=r"stage 'long': seq_len 36 cannot be split over mesh.context=4"):
        E.resolve(c)
