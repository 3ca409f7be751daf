"""Checkpoint averaging (Polyak averaging of the annealing checkpoints, Llama 3 section 3.4.3).

`average_checkpoints(directory, steps, abstract_params)` reads the parameters of the listed checkpoints of a
stage one at a time (only one checkpoint and the running sum are alive at once, whatever their number), each
restored straight onto the target shardings of `abstract_params` (so any mesh works: Orbax reshards on read),
sums them in float32 in the order given, and divides once by their number:

    average = (p_1 + p_2 + ... + p_n) / n      (float32, left-to-right sums, one rounding per add)

which is exactly what numpy computes for the same float32 arrays in the same order (tests/train/
test_averaging.py checks bit equality), and within one float32 rounding per add of the float64 mean.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from llama_jax.train import checkpoint as ckpt_lib


def _add(acc, x):
    return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, x)


def average_checkpoints(directory: str, steps: Sequence[int], abstract_params: Any) -> Any:
    """The float32 mean of the params of checkpoints `steps` in `directory` (a stage's `checkpoints` folder),
    cast back to the dtypes of `abstract_params` (ShapeDtypeStructs with target shardings)."""
    steps = [int(s) for s in steps]
    if not steps:
        raise ValueError(f"no checkpoints to average in {directory!r} (the list of steps is empty)")
    if len(set(steps)) != len(steps):
        raise ValueError(f"checkpoint steps to average repeat a step: {steps}")
    available = ckpt_lib.list_steps(directory)
    missing = [s for s in steps if s not in available]
    if missing:
        raise FileNotFoundError(f"checkpoint step(s) {missing} not found in {directory!r}; available: {available}")
    shardings = jax.tree.map(lambda x: x.sharding, abstract_params)
    add = jax.jit(_add, out_shardings=shardings, donate_argnums=(0,))
    total = None
    for step in steps:  # one checkpoint in memory at a time
        params, _ = ckpt_lib.load_params(directory, abstract_params, step)
        if total is None:
            total = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(jnp.float32), p), out_shardings=shardings)(params)
        else:
            total = add(total, params)
        del params
    # n is an argument, not a constant: a constant divisor may be compiled into a multiply by its (rounded)
    # reciprocal, which is not the exact quotient
    finish = jax.jit(lambda t, n: jax.tree.map(lambda a, ref: (a / n).astype(ref.dtype), t, abstract_params),
                     out_shardings=shardings)
    return finish(total, jnp.float32(len(steps)))


def last_checkpoints(directory: str, count: int, after: int = 0) -> list[int]:
    """The newest `count` committed checkpoint steps of a stage with step > `after` (oldest first)."""
    if count < 1:
        raise ValueError(f"number of checkpoints to average must be >= 1, got {count}")
    steps = [s for s in ckpt_lib.list_steps(directory) if s > after]
    if not steps:
        raise FileNotFoundError(f"no checkpoint after step {after} in {directory!r} to average")
    return steps[-count:]
