"""Named logical-axis rule sets: which mesh axes each logical axis name maps to.

The model annotates parameters and activations with logical names only; an experiment picks a rule set by
name (`config.sharding.rules`). Mesh axes of size 1 cost nothing, so every set is valid on every mesh.

Parameters are stored the same way whatever the pipeline degree: the model dimension (`embed`) is also split
over `pipe`, so a pipelined run keeps its weights, gradients and optimizer state fully sharded, and a checkpoint
does not depend on how the run was pipelined. The train step gathers the layer stack into its pipeline layout
(`model.pipeline.to_stages`; stages over `pipe`); code that does not pipeline (evaluation, sampling) runs on a
`pipe` mesh as if `pipe` were one more FSDP axis for the weights.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding

Rules = tuple[tuple[str, Any], ...]

# Activations: batch over all data-parallel axes, sequence over context.
_ACTIVATIONS: Rules = (
    ("act_batch", ("data", "fsdp")),
    ("act_length", "context"),
    ("act_embed", None),
)

RULE_SETS: dict[str, Rules] = {
    # Pure data parallel: parameters and optimizer state replicated on every device (split over `pipe` only).
    "dp": _ACTIVATIONS + (
        ("act_heads", None), ("act_kv_heads", None), ("act_mlp", None), ("act_vocab", None),
        ("embed", "pipe"), ("vocab", None), ("heads", None), ("kv_heads", None), ("mlp", None),
        ("head_dim", None), ("layers", None), ("norm", None),
    ),
    # ZeRO-3 / FSDP: every weight sharded along its model dimension over `fsdp`, gathered per layer.
    "fsdp": _ACTIVATIONS + (
        ("act_heads", None), ("act_kv_heads", None), ("act_mlp", None), ("act_vocab", None),
        ("embed", ("fsdp", "pipe")), ("vocab", None), ("heads", None), ("kv_heads", None), ("mlp", None),
        ("head_dim", None), ("layers", None), ("norm", None),
    ),
    # FSDP + Megatron tensor parallelism: heads, FFN hidden and vocabulary split over `tensor`.
    "fsdp_tp": _ACTIVATIONS + (
        ("act_heads", "tensor"), ("act_kv_heads", "tensor"), ("act_mlp", "tensor"), ("act_vocab", "tensor"),
        ("embed", ("fsdp", "pipe")), ("vocab", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"),
        ("head_dim", None), ("layers", None), ("norm", None),
    ),
}


def get_rules(name: str) -> Rules:
    if name not in RULE_SETS:
        raise ValueError(f"unknown sharding rule set {name!r}; known: {', '.join(RULE_SETS)}")
    return RULE_SETS[name]


def logical_to_sharding(logical_specs, mesh: Mesh, rules: Rules):
    """Pytree of logical PartitionSpecs -> pytree of NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def check_divisible(shapes, shardings) -> None:
    """Raises a clear error if a sharded dimension does not divide by its mesh axes' size."""
    def check(path, shape, sharding: NamedSharding):
        for dim, axes in zip(shape.shape, sharding.spec):
            if axes is None:
                continue
            axes = axes if isinstance(axes, tuple) else (axes,)
            size = 1
            for a in axes:
                size *= sharding.mesh.shape[a]
            if dim % size:
                raise ValueError(f"parameter {jax.tree_util.keystr(path)} of shape {shape.shape} cannot be "
                                 f"sharded: dimension {dim} is not divisible by mesh axes {axes} (size {size})")
    jax.tree_util.tree_map_with_path(check, shapes, shardings)
