"""Pipeline execution over the mesh axis `pipe`: one schedule table (`sharding.schedule`) run by every stage.

`value_and_grad(schedule, fns, stage_w, embed_w, head_w, micro)` runs a whole pipelined forward and backward
pass and returns the loss (sum, count) and the gradients of the three parameter groups:

  * `stage_w`: the layer stack laid out per stage, every leaf [V, P, Lc, ...] with P over `pipe` (chunk
    v * P + s of the model runs on stage s); `real` [V, P, Lc] marks the slots that hold a layer (the others
    pass their input through: uneven layer counts and the lighter first and last stages);
  * `embed_w`: what the first chunk's `embed(embed_w, tokens)` reads (the embedding table), on every stage;
  * `head_w`: what the last chunk's `head(head_w, hidden, targets, mask) -> (loss sum, count)` reads.

It runs under a `jax.shard_map` that is manual over `pipe` only: data, fsdp, context and tensor stay automatic,
so every other kind of parallelism (and context-parallel attention's own shard_map) composes unchanged. Each
tick, a stage runs the forward its table row names (input: the embedding of its microbatch, or an activation
that arrived earlier and waits in a slot), then the backward (the chunk's forward recomputed from the stashed
input under `jax.vjp`: remat at chunk granularity, each layer under the model's own remat policy inside), and
then every stage passes its output to the next stage and its input gradient to the previous one with
`ppermute`. Every stage runs the same program in lockstep (SPMD): a stage with no unit in a tick computes one
with zero weight (seeds and outputs masked), which costs no time on real devices because the tick lasts as long
as its busiest stage; only ticks in which no stage has a forward (or a backward) skip it, for all stages at
once (`lax.cond` on a predicate every device shares: a device-dependent branch around the automatic axes'
collectives would stall them). Each tick thus costs one chunk forward and one chunk backward with recompute,
the embedding and the head included, whichever stage needs them.

`loss_fn(...)` wraps it as a differentiable `(loss sum, count)` whose forward pass computes the gradients as it
goes (as a real 1F1B pipeline must: a microbatch's backward starts before the last microbatch's forward) and
whose backward pass only scales them, so it drops into the ordinary `jax.value_and_grad` train step, gradient
accumulation included.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from llama_jax.sharding import schedule as schedule_lib

AXIS = "pipe"
COL = schedule_lib.COL


@dataclasses.dataclass(frozen=True)
class StageFns:
    """The model pieces a pipeline runs (pure functions of their parameters)."""

    embed: Callable  # (embed_w, tokens [mb, T]) -> x [mb, T, D]
    chunk: Callable  # (layer params [Lc, ...], real [Lc], x, micro of one microbatch) -> x
    head: Callable  # (head_w, x, micro of one microbatch) -> (loss sum, count)
    place: Callable = lambda x: x  # pins an activation's sharding over the automatic axes (every branch agrees)


def _index(tree, i):
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), tree)


def _add_at(tree, i, delta):
    def add(acc, d):
        cur = jax.lax.dynamic_index_in_dim(acc, i, 0, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(acc, cur + d.astype(acc.dtype), i, 0)
    return jax.tree.map(add, tree, delta)


def _zeros_f32(tree):
    return jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), tree)


def _add(acc, delta):
    return jax.tree.map(lambda a, d: a + d.astype(jnp.float32), acc, delta)


def value_and_grad(schedule: schedule_lib.Schedule, fns: StageFns, stage_w: Any, real: jax.Array, embed_w: Any,
                   head_w: Any, micro: dict[str, jax.Array], x_dtype) -> tuple:
    """(loss sum, count, d stage_w, d embed_w, d head_w), float32; see the module docstring. `micro` holds
    [M, mb, T] arrays (at least `tokens`); gradients are of the loss sum."""
    n_stages = schedule.stages
    tokens = micro["tokens"]
    mb, length = tokens.shape[1], tokens.shape[2]
    hidden = jax.eval_shape(lambda w, t: fns.embed(w, t), embed_w, tokens[0]).shape[-1]
    x_zero = jnp.zeros((mb, length, hidden), x_dtype)

    any_f = jnp.asarray((schedule.table[:, :, COL["f_micro"]] >= 0).any(axis=1))
    any_b = jnp.asarray((schedule.table[:, :, COL["b_micro"]] >= 0).any(axis=1))

    def per_stage(table, stage_w, real, embed_w, head_w, micro):
        w = jax.tree.map(lambda a: a[:, 0], stage_w)  # [V, Lc, ...]: this stage's chunks
        real = real[:, 0]
        place = lambda x: fns.place(x.astype(x_dtype))  # noqa: E731
        one = lambda m: jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, m, 0, False), micro)  # noqa: E731

        def stashed(box, slot):
            return place(jax.lax.dynamic_index_in_dim(box, jnp.maximum(slot, 0), 0, False))

        def run_forward(inbox, row):
            m, v, slot = row[COL["f_micro"]], row[COL["f_virtual"]], row[COL["f_slot"]]
            mic = one(jnp.maximum(m, 0))
            x = jnp.where(slot < 0, place(fns.embed(embed_w, mic["tokens"])), stashed(inbox, slot))
            y = place(fns.chunk(_index(w, v), _index(real, v), x, mic))
            return place(jnp.where(m >= 0, y, jnp.zeros_like(y)))

        def run_backward(acc, inbox, ginbox, row):
            m, v = row[COL["b_micro"]], row[COL["b_virtual"]]
            valid, first, last = m >= 0, row[COL["b_slot"]] < 0, row[COL["b_gslot"]] < 0
            mic = one(jnp.maximum(m, 0))

            def f(w_v, e_w, h_w, x_in):
                x = jnp.where(first, place(fns.embed(e_w, mic["tokens"])), x_in)
                y = place(fns.chunk(w_v, _index(real, v), x, mic))
                return y, fns.head(h_w, y, mic)

            (y, (loss, count)), vjp = jax.vjp(f, _index(w, v), embed_w, head_w, stashed(inbox, row[COL["b_slot"]]))
            g_y = jnp.where(valid & ~last, stashed(ginbox, row[COL["b_gslot"]]), 0).astype(y.dtype)
            g_loss = jnp.where(valid & last, 1, 0).astype(loss.dtype)
            d_w, d_e, d_h, d_x = vjp((g_y, (g_loss, jnp.zeros_like(count))))
            dw_acc, de_acc, dh_acc, loss_acc, count_acc = acc
            take = (valid & last).astype(jnp.float32)
            acc = (_add_at(dw_acc, v, d_w), _add(de_acc, d_e), _add(dh_acc, d_h),
                   loss_acc + take * loss.astype(jnp.float32), count_acc + take * count.astype(jnp.float32))
            return acc, place(jnp.where(valid & ~first, d_x, 0))

        def tick(carry, xs):
            row, any_f, any_b = xs
            acc, inbox, ginbox, arrived_x, arrived_g = carry
            put = lambda box, slot, x: jnp.where(  # noqa: E731
                slot >= 0, jax.lax.dynamic_update_index_in_dim(box, x, jnp.maximum(slot, 0), 0), box)
            inbox = put(inbox, row[COL["recv_slot"]], place(arrived_x))
            ginbox = put(ginbox, row[COL["recv_gslot"]], place(arrived_g))
            # Every stage runs the same program (SPMD, in lockstep): a stage without a unit this tick computes one
            # with zero weight, which costs no time because the tick lasts as long as its busiest stage. Ticks
            # where no stage has a forward (or a backward) skip it for all stages at once.
            send_x = jax.lax.cond(any_f, lambda: run_forward(inbox, row), lambda: place(x_zero))
            acc, send_g = jax.lax.cond(any_b, lambda: run_backward(acc, inbox, ginbox, row),
                                       lambda: (acc, place(x_zero)))
            ring = [(i, (i + 1) % n_stages) for i in range(n_stages)]
            arrived_x = jax.lax.ppermute(send_x, AXIS, ring)
            arrived_g = jax.lax.ppermute(send_g, AXIS, [(j, i) for i, j in ring])
            return (acc, inbox, ginbox, arrived_x, arrived_g), None

        acc = (_zeros_f32(w), _zeros_f32(embed_w), _zeros_f32(head_w), jnp.float32(0), jnp.float32(0))
        inbox = jnp.zeros((schedule.slots, mb, length, hidden), x_dtype)
        ginbox = jnp.zeros((schedule.gslots, mb, length, hidden), x_dtype)
        (acc, *_), _ = jax.lax.scan(tick, (acc, inbox, ginbox, x_zero, x_zero), (table[:, 0], any_f, any_b))
        dw, de, dh, loss, count = acc
        de, dh, loss, count = jax.lax.psum((de, dh, loss, count), AXIS)
        return loss, count, jax.tree.map(lambda a: a[:, None], dw), de, dh

    stage_spec = jax.tree.map(lambda _: P(None, AXIS), stage_w)
    rep = lambda tree: jax.tree.map(lambda _: P(), tree)  # noqa: E731
    fn = jax.shard_map(per_stage,
                       in_specs=(P(None, AXIS), stage_spec, P(None, AXIS), rep(embed_w), rep(head_w), rep(micro)),
                       out_specs=(P(), P(), stage_spec, rep(embed_w), rep(head_w)),
                       axis_names=frozenset({AXIS}), check_vma=False)
    return fn(jnp.asarray(schedule.table), stage_w, real, embed_w, head_w, micro)


def loss_fn(schedule: schedule_lib.Schedule, fns: StageFns, x_dtype) -> Callable:
    """`(stage_w, real, embed_w, head_w, micro) -> (loss sum, count)`, differentiable in the three weight groups
    (gradients computed by the pipeline in the forward pass; see the module docstring)."""

    @jax.custom_vjp
    def pipelined(stage_w, real, embed_w, head_w, micro):
        return value_and_grad(schedule, fns, stage_w, real, embed_w, head_w, micro, x_dtype)[:2]

    def fwd(stage_w, real, embed_w, head_w, micro):
        loss, count, dw, de, dh = value_and_grad(schedule, fns, stage_w, real, embed_w, head_w, micro, x_dtype)
        dtypes = jax.tree.map(lambda a: jnp.zeros((0,), a.dtype), (stage_w, embed_w, head_w))
        return (loss, count), (dw, de, dh, dtypes, real, micro)

    def bwd(res, g):
        dw, de, dh, dtypes, real, micro = res
        scale = lambda tree, like: jax.tree.map(lambda d, p: (d * g[0]).astype(p.dtype), tree, like)  # noqa: E731
        zero_int = lambda tree: jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), tree)  # noqa: E731
        return (scale(dw, dtypes[0]), zero_int(real), scale(de, dtypes[1]), scale(dh, dtypes[2]), zero_int(micro))

    pipelined.defvjp(fwd, bwd)
    return pipelined
