"""The pure training step and its sharded compilation.

`make_train_step(model_cfg, optim_cfg, grad_accum)` returns `train_step(state, batch) -> (state, metrics)`:
a pure function (no I/O) that computes the masked next-token loss, its gradient (accumulated in float32 over
`grad_accum` micro-batches so the result equals the full-batch gradient), applies AdamW, and skips the update
(counting it in `state.skipped`) when the loss or gradient is not finite.

`init_train_state` creates the state already sharded (eval_shape -> logical specs -> shardings -> jit with
out_shardings), so no host ever holds the full parameter tree; `jit_train_step` compiles the step with explicit
in/out shardings and donates the state.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from llama_jax.data.batch import BATCH_KEYS, device_keys, make_global_batch  # noqa: F401 - the batch contract
from llama_jax.model import context_parallel, transformer
from llama_jax.model import pipeline as pipeline_lib
from llama_jax.model.config import ModelConfig
from llama_jax.sharding import mesh as mesh_lib
from llama_jax.sharding import rules as rules_lib
from llama_jax.train import loss as loss_lib
from llama_jax.train.optim import OptimConfig, make_optimizer, make_schedule
from llama_jax.train.state import TrainState

Batch = Mapping[str, jax.Array]


def token_loss(loss_chunk: int) -> Callable:
    """`(hidden [B, L, D], w_out [D, V], targets, mask) -> (NLL sum, count)`: the output head and the loss, fused
    and chunked when `loss_chunk > 0`."""
    if loss_chunk > 0:
        return lambda h, w, t, m: loss_lib.chunked_cross_entropy_sum(h, w, t, m, loss_chunk)
    return lambda h, w, t, m: loss_lib.cross_entropy_sum(
        jnp.einsum("btd,dv->btv", h, w.astype(h.dtype), preferred_element_type=jnp.float32), t, m)


def loss_sum(model_cfg: ModelConfig, params, batch: Batch, loss_chunk: int = 0,
             pipeline: pipeline_lib.PipelineConfig | None = None):
    """(sum of masked next-token NLL, number of counted tokens) for one batch.

    `loss_chunk > 0` fuses the output head with the loss, `loss_chunk` positions at a time, so the full
    [B, L, V] float32 logits are never materialised (`loss.chunked_cross_entropy_sum`); same value.
    `pipeline` with more than one stage runs the model as a pipeline over the mesh axis `pipe`
    (`model.pipeline.loss_sum`); same value.
    """
    if pipeline is not None and pipeline.stages > 1:
        return pipeline_lib.loss_sum(model_cfg, pipeline, params, dict(batch), token_loss(loss_chunk))
    if loss_chunk > 0:
        hidden, _ = transformer.apply(model_cfg, params, batch["inputs"], batch["positions"], batch["segment_ids"],
                                      return_hidden=True)
        return loss_lib.chunked_cross_entropy_sum(hidden, transformer.output_embedding(model_cfg, params),
                                                  batch["targets"], batch["loss_mask"], loss_chunk)
    logits, _ = transformer.apply(model_cfg, params, batch["inputs"], batch["positions"], batch["segment_ids"])
    return loss_lib.cross_entropy_sum(logits, batch["targets"], batch["loss_mask"])


def _global_norm(tree) -> jax.Array:
    return optax.global_norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def make_train_step(model_cfg: ModelConfig, optim_cfg: OptimConfig, grad_accum: int = 1,
                    loss_fn: Callable | None = None, loss_chunk: int = 0,
                    pipeline: pipeline_lib.PipelineConfig | None = None,
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Builds the pure `train_step(state, batch) -> (state, metrics)`.

    `loss_fn(params, batch) -> (loss_sum, count)` defaults to next-token cross-entropy on the model, pipelined
    over the mesh axis `pipe` when `pipeline` has more than one stage (each accumulation micro-batch is cut into
    `pipeline.microbatches`); a custom `loss_fn` does not pipeline.
    """
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    pipelined = pipeline is not None and pipeline.stages > 1
    if pipelined and loss_fn is not None:
        raise ValueError("a custom loss does not pipeline: pipeline parallelism (mesh.pipe > 1) runs the model's "
                         "next-token loss only")
    optimizer = make_optimizer(optim_cfg)
    schedule = make_schedule(optim_cfg)
    loss_fn = loss_fn or (lambda params, batch: loss_sum(model_cfg, params, batch, loss_chunk, pipeline))

    def grad_fn(params, batch):
        (total, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        return total, count, grads

    def train_step(state: TrainState, batch: Batch):
        params = state.params
        if grad_accum == 1:
            total, count, grads = grad_fn(params, batch)
            grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        else:
            def body(acc, micro):
                t, c, g = grad_fn(params, micro)
                acc_t, acc_c, acc_g = acc
                return (acc_t + t, acc_c + c, jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc_g, g)), None
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            (total, count, grads), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0), zeros),
                                                    pipeline_lib.split_micro(batch, grad_accum, "grad_accum"))
        denom = jnp.maximum(count, 1.0)
        loss = total / denom
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = _global_norm(grads)
        updates, new_opt_state = optimizer.update(grads, state.opt_state, params)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = TrainState(step=state.step + 1, params=keep(new_params, params),
                               opt_state=keep(new_opt_state, state.opt_state),
                               skipped=state.skipped + jnp.where(finite, 0, 1).astype(jnp.int32))
        metrics = {
            "loss": loss,
            "tokens": count,
            "grad_norm": grad_norm,
            "param_norm": _global_norm(new_state.params),
            "update_norm": jnp.where(finite, _global_norm(updates), 0.0),
            "learning_rate": schedule(state.step - state.skipped),  # updates applied so far = optax count
            "nonfinite": jnp.logical_not(finite).astype(jnp.int32),
        }
        return new_state, metrics

    train_step.grad_accum = grad_accum
    train_step.microbatches = pipeline.n_micro if pipelined else 1
    return train_step


# ------------------------------------------------------------------------------------------ sharded setup


def _opt_state_shardings(opt_shapes, params_treedef, param_shardings, mesh: Mesh):
    """Optimizer-state leaves that mirror the parameter tree (Adam's mu / nu) take the parameters' shardings;
    every other leaf (counters) is replicated."""
    def is_param_tree(x):
        return jax.tree.structure(x) == params_treedef
    return jax.tree.map(lambda x: param_shardings if is_param_tree(x) else mesh_lib.replicated(mesh),
                        opt_shapes, is_leaf=is_param_tree)


def state_shardings(model_cfg: ModelConfig, optim_cfg: OptimConfig, mesh: Mesh, rules) -> TrainState:
    """NamedShardings for every leaf of the TrainState, derived from the model's logical axis names."""
    specs = transformer.param_logical_specs(model_cfg)
    param_sh = rules_lib.logical_to_sharding(specs, mesh, rules)
    shapes = transformer.param_shapes(model_cfg)
    rules_lib.check_divisible(shapes, param_sh)
    opt_shapes = jax.eval_shape(make_optimizer(optim_cfg).init, shapes)
    rep = mesh_lib.replicated(mesh)
    return TrainState(step=rep, params=param_sh,
                      opt_state=_opt_state_shardings(opt_shapes, jax.tree.structure(shapes), param_sh, mesh),
                      skipped=rep)


def _new_state(model_cfg: ModelConfig, optim_cfg: OptimConfig, rng, params: Any = None) -> TrainState:
    """A fresh TrainState: `params` (or a random init from `rng`) with a new optimizer state at step 0."""
    if params is None:
        params = transformer.init(model_cfg, rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=make_optimizer(optim_cfg).init(params),
                      skipped=jnp.zeros((), jnp.int32))


def abstract_train_state(model_cfg: ModelConfig, optim_cfg: OptimConfig, mesh: Mesh, rules) -> TrainState:
    """The TrainState as ShapeDtypeStructs carrying their target shardings (a restore target; no allocation)."""
    shardings = state_shardings(model_cfg, optim_cfg, mesh, rules)
    shapes = jax.eval_shape(lambda r: _new_state(model_cfg, optim_cfg, r), jax.random.key(0))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def init_train_state(model_cfg: ModelConfig, optim_cfg: OptimConfig, mesh: Mesh, rules, rng,
                     params: Any = None) -> tuple[TrainState, TrainState]:
    """Creates (state, shardings) with every array born sharded. `params`, if given, seed the state."""
    shardings = state_shardings(model_cfg, optim_cfg, mesh, rules)
    with jax.set_mesh(mesh):
        if params is None:
            state = jax.jit(lambda r: _new_state(model_cfg, optim_cfg, r), out_shardings=shardings)(rng)
        else:
            state = jax.jit(lambda r, p: _new_state(model_cfg, optim_cfg, r, p),
                            in_shardings=(None, shardings.params), out_shardings=shardings)(rng, params)
    return state, shardings


def check_batch_shapes(batch_shapes: Mapping[str, tuple], mesh: Mesh, grad_accum: int = 1,
                       microbatches: int = 1) -> None:
    """Clear errors for a batch the mesh cannot split (into `grad_accum` x pipeline `microbatches`)."""
    missing = [k for k in BATCH_KEYS if k not in batch_shapes]
    if missing:
        raise ValueError(f"batch is missing key(s) {missing}; expected {BATCH_KEYS}")
    b, length = batch_shapes["inputs"][:2]
    for k in BATCH_KEYS:
        if tuple(batch_shapes[k][:2]) != (b, length):
            raise ValueError(f"batch[{k!r}] has shape {batch_shapes[k]}, expected ({b}, {length})")
    mesh_lib.check_global_batch(b, devices=mesh_lib.batch_divisor(mesh), grad_accum=grad_accum * microbatches,
                                mesh=mesh)
    context_parallel.check_length(length, mesh.shape["context"])


def jit_train_step(train_step: Callable, mesh: Mesh, rules, shardings: TrainState,
                   donate: bool = True) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Compiles `train_step` with explicit in/out shardings under the mesh and logical-axis rules.

    The batch holds BATCH_KEYS plus any extra [B, L] keys a stage kind's loss reads (`device_keys`); every
    batch array has rows over (data, fsdp) and its length over context.
    """
    batch_sh = mesh_lib.data_sharding(mesh)

    def step_with_rules(state, batch):
        with nn.logical_axis_rules(rules):
            return train_step(state, batch)

    jitted = jax.jit(step_with_rules, in_shardings=(shardings, batch_sh),
                     out_shardings=(shardings, mesh_lib.replicated(mesh)),
                     donate_argnums=(0,) if donate else ())

    grad_accum = getattr(train_step, "grad_accum", 1)
    microbatches = getattr(train_step, "microbatches", 1)

    def run(state: TrainState, batch: Batch):
        check_batch_shapes({k: v.shape for k, v in batch.items()}, mesh, grad_accum, microbatches)
        with jax.set_mesh(mesh):
            return jitted(state, {k: batch[k] for k in device_keys(batch)})

    def lower(state: TrainState, batch: Batch):  # inspection: the compiled program, its memory
        with jax.set_mesh(mesh):
            return jitted.lower(state, {k: batch[k] for k in device_keys(batch)})

    run.lower = lower
    return run


def jit_eval_step(model_cfg: ModelConfig, mesh: Mesh, rules, param_shardings, loss_chunk: int = 0):
    """Compiled `(params, batch) -> (loss_sum, count)` for evaluation, sharded like the train step."""
    batch_sh = {k: mesh_lib.data_sharding(mesh) for k in BATCH_KEYS}

    def fn(params, batch):
        with nn.logical_axis_rules(rules):
            return loss_sum(model_cfg, params, batch, loss_chunk)

    jitted = jax.jit(fn, in_shardings=(param_shardings, batch_sh), out_shardings=mesh_lib.replicated(mesh))

    def run(params, batch):
        with jax.set_mesh(mesh):
            return jitted(params, {k: batch[k] for k in BATCH_KEYS})

    return run
