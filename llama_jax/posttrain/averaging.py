"""Model averaging (Llama 3 §4.1.5: models from runs with different data or hyperparameters are averaged).

`average(trees, weights=None)` is the weighted mean of parameter pytrees of one structure, computed in float64
on the host and cast back to each leaf's dtype: uniform when `weights` is None, else weights normalized to sum
to 1. `average_checkpoints(dirs, ...)` does the same for stage checkpoint directories.
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
    if weights is None:
        weights = [1.0] * len(trees)
    weights = [float(w) for w in weights]
    if len(weights) != len(trees):
        raise ValueError(f"average: {len(weights)} weights for {len(trees)} models")
    if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"average: weights must be finite, >= 0 and not all 0; got {weights}")
    total = sum(weights)
    norm = [w / total for w in weights]
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


def average_checkpoints(directories: Sequence[str], abstract_params: Any,
                        weights: Sequence[float] | None = None) -> Any:
    """The average of the newest parameters in each stage checkpoint directory."""
    from llama_jax.train import checkpoint as ckpt_lib  # noqa: PLC0415
    trees = [ckpt_lib.load_params(d, abstract_params)[0] for d in directories]
    return average(trees, weights)


__all__ = ["average", "average_checkpoints"]
