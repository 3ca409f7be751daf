"""Golden one-step test: loss, grad norm and a parameter checksum of the tiny model after one step on a fixed
batch, stored in `golden_step.json`. A failure means the numerics of the model, loss, optimizer or step
changed. Update the file (`UPDATE_GOLDEN=1 pytest tests/train/test_golden_step.py`) only when that change is
intended (a fixed bug, a new default) and say why in the commit; never to make an unexplained change pass."""

import json
import os
import pathlib

import jax
import numpy as np

from llama_jax.data import batch as batch_lib
from llama_jax.model import config as model_config
from llama_jax.sharding import mesh as mesh_lib
from llama_jax.sharding import rules as rules_lib
from llama_jax.train import step as step_lib
from llama_jax.train.optim import OptimConfig

GOLDEN = pathlib.Path(__file__).with_name("golden_step.json")


def _one_step():
    cfg = model_config.get("tiny", n_layers=2)
    opt = OptimConfig(peak_lr=1e-3, warmup_steps=0, total_steps=10)
    mesh = mesh_lib.make_mesh({"data": 8})
    rules = rules_lib.get_rules("dp")
    state, shardings = step_lib.init_train_state(cfg, opt, mesh, rules, jax.random.key(0))
    rng = np.random.default_rng(1234)
    tokens = rng.integers(0, cfg.vocab_size, (8, 33))
    segments = np.repeat(np.array([[1] * 20 + [2] * 13]), 8, axis=0)
    positions = np.concatenate([np.arange(20), np.arange(13)])[None].repeat(8, 0)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments[:, :32],
             "positions": positions[:, :32], "loss_mask": np.ones((8, 32), np.int32)}
    batch_lib.check(batch)
    fn = step_lib.jit_train_step(step_lib.make_train_step(cfg, opt), mesh, rules, shardings)
    state, metrics = fn(state, batch_lib.make_global_batch(batch, mesh))
    params = jax.device_get(state.params)
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(params)]
    return {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
            "param_abs_sum": float(sum(np.abs(x).sum() for x in leaves)),
            "param_weighted_sum": float(sum((x.ravel() * np.cos(np.arange(x.size))).sum() for x in leaves))}


def test_one_step_matches_the_golden_values():
    got = _one_step()
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    want = json.loads(GOLDEN.read_text())
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=2e-5, err_msg=(
            f"{key} changed: the numerics of one training step differ from {GOLDEN.name}. If the change is "
            "intended (see this file's docstring), rerun with UPDATE_GOLDEN=1 and explain it in the commit."))
    # Independent sanity: a random init on random tokens scores about ln(vocab).
    assert abs(got["loss"] - np.log(4096)) < 0.5
