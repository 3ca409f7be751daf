"""Pipeline parallelism: the schedules' tables against their formulas, the layer layout, and the pipelined loss and
gradients against the unpipelined model on the simulated 8-device mesh."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.model import config as model_config
from llama_jax.model import pipeline as pipeline_lib
from llama_jax.model import transformer
from llama_jax.sharding import mesh as mesh_lib
from llama_jax.sharding import rules as rules_lib
from llama_jax.sharding import schedule as schedule_lib
from llama_jax.train import step as step_lib

COL = schedule_lib.COL


@pytest.mark.parametrize("name", schedule_lib.SCHEDULES)
@pytest.mark.parametrize("stages,virtual,micro", [(1, 1, 1), (2, 1, 4), (4, 1, 4), (4, 1, 8), (3, 1, 5), (4, 1, 1),
                                                  (2, 2, 4), (4, 2, 8), (4, 4, 16), (16, 1, 16)])
def test_schedule_runs_every_unit_once_in_dependency_order_with_the_formula_bubble(name, stages, virtual, micro):
    sched = schedule_lib.build(stages, virtual, micro, name)
    t = sched.table
    chunks = stages * virtual
    f_at, b_at = {}, {}
    for tick in range(sched.ticks):
        for s in range(stages):
            if t[tick, s, COL["f_micro"]] >= 0:
                unit = (t[tick, s, COL["f_micro"]], t[tick, s, COL["f_virtual"]] * stages + s)
                assert unit not in f_at
                f_at[unit] = tick
            if t[tick, s, COL["b_micro"]] >= 0:
                unit = (t[tick, s, COL["b_micro"]], t[tick, s, COL["b_virtual"]] * stages + s)
                assert unit not in b_at
                b_at[unit] = tick
    units = {(m, c) for m in range(micro) for c in range(chunks)}
    assert set(f_at) == units and set(b_at) == units
    for m, c in units:
        assert c == 0 or f_at[(m, c - 1)] < f_at[(m, c)]  # an input arrives one tick after it is sent
        assert f_at[(m, c)] <= b_at[(m, c)]
        assert c == chunks - 1 or b_at[(m, c + 1)] < b_at[(m, c)]
    # (P - 1) / (V M + P - 1): Narayanan et al. 2021, eq. for the interleaved schedule (V = 1: GPipe / 1F1B)
    assert sched.bubble() == pytest.approx((stages - 1) / (virtual * micro + stages - 1), abs=1e-12)
    if name == "1f1b" and micro >= 2 * stages:  # 1F1B keeps fewer inputs alive than GPipe once M >> P
        assert max(sched.stash) < max(schedule_lib.build(stages, virtual, micro, "gpipe").stash)


def test_schedule_refuses_bad_settings():
    with pytest.raises(ValueError, match="unknown pipeline schedule 'zb'"):
        schedule_lib.build(2, 1, 2, "zb")
    with pytest.raises(ValueError, match="microbatches=6 is not a multiple of 4"):
        schedule_lib.build(4, 2, 6, "1f1b")


def test_layout_places_every_layer_once_in_model_order():
    for layers, stages, virtual, lighter in [(126, 16, 1, 1), (126, 16, 2, 1), (32, 4, 2, 0), (80, 8, 1, 0),
                                             (7, 4, 1, 0), (5, 2, 1, 0), (4, 2, 1, 1)]:
        slots = schedule_lib.layout(layers, stages, virtual, lighter)
        order = [int(x) for chunk in slots.reshape(-1, slots.shape[-1]) for x in chunk if x >= 0]  # chunk v*P+s
        assert order == list(range(layers))
    slots = schedule_lib.layout(126, 16, 1, 1)  # Llama 3 405B: 16 stages of 8 slots, first and last one lighter
    per_stage = (slots >= 0).sum(axis=(0, 2))
    assert slots.shape == (1, 16, 8) and per_stage[0] == per_stage[-1] == 7 and set(per_stage[1:-1]) == {8}
    with pytest.raises(ValueError, match="lighter_ends must be >= 0"):
        schedule_lib.layout(4, 2, 1, -1)


def _batch(cfg, rows=8, length=16, seed=0):
    rng = np.random.default_rng(seed)
    seg = np.ones((rows, length), np.int32)
    seg[::3, length // 2:] = 2  # packed documents
    seg[1, -3:] = 0  # padding
    pos = np.where(seg == 2, np.arange(length) - length // 2, np.arange(length)).astype(np.int32)
    return {"inputs": rng.integers(0, cfg.vocab_size, (rows, length)).astype(np.int32),
            "targets": rng.integers(0, cfg.vocab_size, (rows, length)).astype(np.int32),
            "positions": pos, "segment_ids": seg, "loss_mask": (seg > 0).astype(np.float32)}


# Each case: mesh (pipe and the other axes), rules, pipeline settings, model overrides.
CASES = {
    "pipe2_data4_1f1b": (dict(pipe=2, data=4), "fsdp", dict(microbatches=4), {}),
    "pipe4_interleaved_fsdp2_gpipe_uneven": (dict(pipe=4, fsdp=2), "fsdp",
                                             dict(virtual=2, microbatches=4, schedule="gpipe"), dict(n_layers=7)),
    "pipe2_interleaved_tensor2_context2_lighter": (dict(pipe=2, tensor=2, context=2), "fsdp_tp",
                                                   dict(virtual=2, microbatches=2, lighter_ends=1),
                                                   dict(remat="full")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pipelined_loss_and_gradients_equal_the_unpipelined_model(case):
    mesh_shape, rules_name, pipe_kw, overrides = CASES[case]
    cfg = dataclasses.replace(model_config.tiny(), dtype="float32", **overrides)
    params = transformer.init(cfg, jax.random.key(1))
    batch = _batch(cfg)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda p: step_lib.loss_sum(cfg, p, batch, 0)[0]))(params)

    mesh = mesh_lib.make_mesh(mesh_shape)
    rules = rules_lib.get_rules(rules_name)
    pipe = schedule_lib.PipelineConfig(stages=mesh_shape["pipe"], **pipe_kw)
    shardings = rules_lib.logical_to_sharding(transformer.param_logical_specs(cfg), mesh, rules)
    from llama_jax.model import context_parallel
    device_batch = context_parallel.permute_batch(batch, mesh.shape["context"])

    def loss(p, b):
        with nn.logical_axis_rules(rules):
            return step_lib.loss_sum(cfg, p, b, 8, pipe)

    with jax.set_mesh(mesh):
        fn = jax.jit(jax.value_and_grad(loss, has_aux=True),
                     in_shardings=(shardings, mesh_lib.data_sharding(mesh)))
        (got_loss, count), grads = fn(params, device_batch)
    assert float(count) == float(batch["loss_mask"].sum())
    np.testing.assert_allclose(float(got_loss), float(ref_loss), rtol=2e-6)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref_grads))
    for path, g, r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads),
                          jax.tree.leaves(ref_grads)):
        # float32 sums in another order: a few ulps of the largest gradient entry
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=0, atol=4e-6 * scale,
                                   err_msg=jax.tree_util.keystr(path[0]))


def test_a_pipelined_train_step_with_gradient_accumulation_equals_the_unpipelined_step():
    """One AdamW step, 2 accumulated micro-batches each cut into 2 pipeline microbatches (pipe 2 x data 4), against
    the same step without a pipeline (data 8): the same loss and the same updated parameters."""
    from llama_jax import experiment as E
    cfg = dataclasses.replace(model_config.tiny(), dtype="float32")
    optim = E.OptimConfig(peak_lr=1e-2, warmup_steps=0, total_steps=10)
    rules = rules_lib.get_rules("fsdp")
    batch = _batch(cfg, rows=16)
    out = {}
    for name, shape, pipe in (("plain", {"data": 8}, None),
                              ("piped", {"pipe": 2, "data": 4},
                               schedule_lib.PipelineConfig(stages=2, microbatches=2))):
        mesh = mesh_lib.make_mesh(shape)
        state, shardings = step_lib.init_train_state(cfg, optim, mesh, rules, jax.random.key(0))
        step = step_lib.jit_train_step(step_lib.make_train_step(cfg, optim, grad_accum=2, loss_chunk=8,
                                                                pipeline=pipe), mesh, rules, shardings)
        state, metrics = step(state, {k: jax.device_put(v, mesh_lib.data_sharding(mesh)) for k, v in batch.items()})
        out[name] = (float(metrics["loss"]), jax.tree.map(np.asarray, state.params))
    np.testing.assert_allclose(out["piped"][0], out["plain"][0], rtol=2e-6)
    # Adam's first step moves every entry by lr x g / (|g| + eps): +-lr wherever |g| >> eps. An entry whose
    # gradient is at round-off level may flip its sign between the two summation orders (up to 2 lr apart);
    # every other entry agrees to float32 round-off.
    diffs = np.concatenate([np.abs(a - b).ravel() for a, b in zip(jax.tree.leaves(out["piped"][1]),
                                                                   jax.tree.leaves(out["plain"][1]))])
    assert diffs.max() <= 2 * optim.peak_lr + 1e-6
    assert np.mean(diffs > 1e-6) < 1e-3, np.sort(diffs)[-10:]
