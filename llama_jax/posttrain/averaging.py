"""Model averaging (Llama 3 §4.1.5: models from runs with different data or hyperparameters are averaged).

`average(trees, weights=None)` is the weighted mean of parameter pytrees of one structure, computed in float64
on the host and cast back to each leaf's dtype: uniform when `weights` is None, else weights normalized to sum
to 1. `average_checkpoints(dirs, ...)` does the same for stage checkpoint directories, streamed on the target
mesh (one checkpoint in memory at a time); the `average` stage kind (`llama_jax.posttrain.stages`) uses it to
start a stage of an experiment from the weighted mean of earlier stages or of other runs.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np


def average(trees: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
    """Σ_i w_i tree_i with Σ w_i = 1 (uniform by default); errors name a structure or shape mismatch."""
    trees = list(trees)
    if not trees:
        raise ValueError("average needs at least one parameter tree")
    norm = normalized_weights(weights, len(trees))
    structure = jax.tree.structure(trees[0])
    for i, t in enumerate(trees[1:], 1):
        if jax.tree.structure(t) != structure:
            raise ValueError(f"average: model {i} has another parameter structure than model 0")
    leaves = [jax.tree.leaves(t) for t in trees]
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(trees[0])]
    out = []
    for j, path in enumerate(paths):
        arrays = [np.asarray(jax.device_get(ls[j])) for ls in leaves]
        for i, a in enumerate(arrays[1:], 1):
            if a.shape != arrays[0].shape:
                raise ValueError(f"average: {path} has shape {a.shape} in model {i} but {arrays[0].shape} in "
                                 "model 0")
        acc = sum(w * a.astype(np.float64) for w, a in zip(norm, arrays))
        out.append(acc.astype(arrays[0].dtype))
    return jax.tree.unflatten(structure, out)


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


def average_checkpoints(directories: Sequence[str], abstract_params: Any,
                        weights: Sequence[float] | None = None) -> Any:
    """Σ_i w_i p_i of the newest parameters in each stage checkpoint directory (weights normalized to sum to 1,
    uniform by default), streamed: one checkpoint and the running sum in memory at a time, each restored onto
    the shardings of `abstract_params` (any mesh). The sum is float32, left to right in the order given
    (`acc + w_i * p_i`), cast back to each leaf's dtype."""
    from llama_jax.train import checkpoint as ckpt_lib  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    directories = list(directories)
    norm = normalized_weights(weights, len(directories))
    shardings = jax.tree.map(lambda x: x.sharding, abstract_params)
    scale = jax.jit(lambda p, w: jax.tree.map(lambda x: w * x.astype(jnp.float32), p), out_shardings=shardings)
    add = jax.jit(lambda acc, p, w: jax.tree.map(lambda a, x: a + w * x.astype(jnp.float32), acc, p),
                  out_shardings=shardings, donate_argnums=(0,))
    total = None
    for directory, w in zip(directories, norm):  # the weight is an argument: never folded into a constant
        params, _ = ckpt_lib.load_params(directory, abstract_params)
        total = scale(params, jnp.float32(w)) if total is None else add(total, params, jnp.float32(w))
        del params
    cast = jax.jit(lambda t: jax.tree.map(lambda a, ref: a.astype(ref.dtype), t, abstract_params),
                   out_shardings=shardings)
    return cast(total)


__all__ = ["average", "average_checkpoints", "normalized_weights"]
