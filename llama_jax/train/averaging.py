"""Parameter averaging, the one implementation: Polyak averaging of annealing checkpoints (Llama 3 section
3.4.3) and model averaging across runs (section 4.1.5).

`average_checkpoints(sources, abstract_params, weights=None)` reads the parameters of each (checkpoint directory,
step) one at a time (only one checkpoint and the running sum are alive at once, whatever their number), each
restored straight onto the target shardings of `abstract_params` (so any mesh works: Orbax reshards on read),
and accumulates in float32 in the order given:

    uniform (weights None):  (p_1 + p_2 + ... + p_n) / n      one rounding per add, one exact division
    weighted:                w_1 p_1 + w_2 p_2 + ... + w_n p_n with w normalized to sum to 1

The uniform mean is exactly what numpy computes for the same float32 arrays in the same order (tests/train/
test_averaging.py checks bit equality), and within one float32 rounding per add of the float64 mean. `average`
does the same for parameter trees already in memory.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.train import checkpoint as ckpt_lib


def normalized_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """`weights` divided by their sum (uniform when None); errors name a bad count or value."""
    if count < 1:
        raise ValueError("average needs at least one model")
    weights = [1.0] * count if weights is None else [float(w) for w in weights]
    if len(weights) != count:
        raise ValueError(f"average: {len(weights)} weights for {count} models")
    if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"average: weights must be finite, >= 0 and not all 0; got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def _mean(trees: Iterable[Any], count: int, abstract_params: Any, weights: Sequence[float] | None) -> Any:
    """The float32 accumulation of `count` trees (an iterable, consumed one at a time), cast back to the dtypes
    of `abstract_params`; placed on its shardings (None: where JAX puts them)."""
    leaves = jax.tree.leaves(abstract_params)
    shardings = None if any(getattr(x, "sharding", None) is None for x in leaves) else \
        jax.tree.map(lambda x: x.sharding, abstract_params)
    norm = None if weights is None else normalized_weights(weights, count)
    # weights and n are arguments, not constants: a constant may be folded (a divisor into a multiply by its
    # rounded reciprocal), which is not the exact quotient
    first = jax.jit(lambda p, w: jax.tree.map(lambda x: w * x.astype(jnp.float32), p), out_shardings=shardings)
    add = jax.jit(lambda acc, p, w: jax.tree.map(lambda a, x: a + w * x.astype(jnp.float32), acc, p),
                  out_shardings=shardings, donate_argnums=(0,))
    finish = jax.jit(lambda t, n: jax.tree.map(lambda a, ref: (a / n).astype(ref.dtype), t, abstract_params),
                     out_shardings=shardings)
    total, seen = None, 0
    for i, params in enumerate(trees):
        w = jnp.float32(1.0 if norm is None else norm[i])
        total = first(params, w) if total is None else add(total, params, w)
        seen += 1
        del params
    if seen != count:
        raise ValueError(f"average: {seen} models for {count} expected")
    return finish(total, jnp.float32(count if norm is None else 1.0))


def average_checkpoints(sources: Sequence[tuple[str, int | None]], abstract_params: Any,
                        weights: Sequence[float] | None = None) -> Any:
    """The float32 mean (uniform, or weighted by `weights` normalized to sum to 1) of the params of checkpoints
    `sources` = [(a stage's `checkpoints` folder, step or None for its newest)], streamed, restored onto and
    returned with the shardings and dtypes of `abstract_params` (ShapeDtypeStructs)."""
    sources = [(d, None if s is None else int(s)) for d, s in sources]
    if not sources:
        raise ValueError("no checkpoints to average (the list is empty)")
    if len(set(sources)) != len(sources):
        raise ValueError(f"checkpoints to average repeat one: {sources}")
    for directory in dict.fromkeys(d for d, _ in sources):
        available = ckpt_lib.list_steps(directory)
        missing = [s if s is not None else "(newest)" for d, s in sources
                   if d == directory and (s not in available if s is not None else not available)]
        if missing:
            raise FileNotFoundError(f"checkpoint step(s) {missing} not found in {directory!r}; available: "
                                    f"{available}")
    trees = (ckpt_lib.load_params(directory, abstract_params, step)[0] for directory, step in sources)
    return _mean(trees, len(sources), abstract_params, weights)


def average(trees: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
    """The same mean of parameter trees of one structure already in memory; errors name a structure or shape
    mismatch."""
    trees = list(trees)
    if not trees:
        raise ValueError("average needs at least one parameter tree")
    structure = jax.tree.structure(trees[0])
    for i, t in enumerate(trees[1:], 1):
        if jax.tree.structure(t) != structure:
            raise ValueError(f"average: model {i} has another parameter structure than model 0")
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(trees[0]), jax.tree.leaves(t)):
            if np.shape(a) != np.shape(b):
                raise ValueError(f"average: {jax.tree_util.keystr(path)} has shape {np.shape(b)} in model {i} but "
                                 f"{np.shape(a)} in model 0")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), trees[0])
    return _mean(iter(trees), len(trees), abstract, weights)


def last_checkpoints(directory: str, count: int, after: int = 0) -> list[int]:
    """The newest `count` committed checkpoint steps of a stage with step > `after` (oldest first)."""
    if count < 1:
        raise ValueError(f"number of checkpoints to average must be >= 1, got {count}")
    steps = [s for s in ckpt_lib.list_steps(directory) if s > after]
    if not steps:
        raise FileNotFoundError(f"no checkpoint after step {after} in {directory!r} to average")
    return steps[-count:]


__all__ = ["average", "average_checkpoints", "last_checkpoints", "normalized_weights"]
