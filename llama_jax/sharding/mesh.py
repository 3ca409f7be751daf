"""The device mesh: the only place that enumerates devices.

Mesh axes, outermost first: data (pure data parallel, replicas), fsdp (data parallel with sharded params,
gradients and optimizer state), pipe (pipeline parallel: the layer stack cut into stages, `model.pipeline`),
context (sequence / context parallel), tensor (tensor parallel, innermost so it maps to the fastest links).
Innermost first this is Llama 3's [TP, CP, PP, DP] order (paper section 3.3.2).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "pipe", "context", "tensor")


def resolve_mesh_shape(shape: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """Fills in one -1 ("the rest") and checks that the product equals the number of devices."""
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axis name(s) {sorted(unknown)}; mesh axes are {MESH_AXES}")
    sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {free}")
    bad = [a for a, s in sizes.items() if s == 0 or s < -1]
    if bad:
        raise ValueError(f"mesh axis sizes must be positive or -1, got {[(a, sizes[a]) for a in bad]}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if n_devices % fixed:
            raise ValueError(f"mesh {dict(shape)} does not divide the {n_devices} devices: the fixed axes "
                             f"multiply to {fixed}")
        sizes[free[0]] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(f"mesh {sizes} has {math.prod(sizes.values())} positions but there are {n_devices} "
                         "devices; the axis sizes must multiply to the device count (use -1 for 'the rest')")
    return sizes


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh over axes (data, fsdp, pipe, context, tensor); `shape` maps axis -> size, -1 = the rest (default data)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(shape if shape is not None else {"data": -1}, len(devices))
    dims = tuple(sizes[a] for a in MESH_AXES)
    try:
        from jax.experimental import mesh_utils
        device_array = mesh_utils.create_device_mesh(dims, devices=devices)
    except Exception:  # noqa: BLE001 - topology-aware placement is best effort; fall back to given order
        device_array = np.asarray(devices).reshape(dims)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def data_sharding(mesh: Mesh, rank: int = 2) -> NamedSharding:
    """Sharding of a batch array [B, L, ...]: batch over (data, fsdp), length over context."""
    spec = [("data", "fsdp"), "context"] + [None] * (rank - 2)
    return NamedSharding(mesh, PartitionSpec(*spec[:rank]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_divisor(mesh: Mesh) -> int:
    """The global batch must be a multiple of this (the devices that split the batch axis)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_global_batch(global_batch: int, *, devices: int = 1, shards: int = 1, grad_accum: int = 1,
                       roles: int | None = None, mesh: Mesh | Mapping[str, int] | None = None,
                       where: str = "") -> None:
    """Raises a ValueError naming the batch, the divisor and what to change unless `global_batch` rows split:

      * into `shards` logical data shards (`data.host_shards`; `llama_jax.data.hosts`), equal rows per shard;
      * with `roles` given (rows per record, e.g. 3 for chosen / rejected / edited), each shard's rows into whole
        records, a multiple of `grad_accum` of them, so that no record straddles two micro-batches;
      * over `devices` data-parallel devices (data x fsdp: `batch_divisor(mesh)`) times `grad_accum`
        micro-batches, equal rows per device per micro-batch.

    `mesh` (a Mesh or its axis sizes) is only named in the message; `where` (e.g. "stage 'sft'") prefixes it.
    """
    prefix = f"{where}: " if where else ""
    if global_batch < 1:
        raise ValueError(f"{prefix}global batch must be >= 1, got {global_batch}")
    if shards < 1 or devices < 1 or grad_accum < 1 or (roles is not None and roles < 1):
        raise ValueError(f"{prefix}batch divisors must be >= 1, got devices={devices} shards={shards} "
                         f"grad_accum={grad_accum} roles={roles}")
    if global_batch % shards:
        raise ValueError(f"{prefix}global batch {global_batch} is not divisible by the {shards} data shards "
                         f"(data.host_shards): use a multiple of {shards} as the global batch, or a data.host_shards "
                         "that divides it")
    local = global_batch // shards
    if roles is not None and (local % roles or (local // roles) % grad_accum):
        raise ValueError(f"{prefix}{local} rows per data shard must hold {roles} roles x a multiple of "
                         f"grad_accum={grad_accum} (global batch {global_batch}, {shards} data shards): use a "
                         f"global batch that is a multiple of {shards * roles * grad_accum}, or change grad_accum")
    if global_batch % (devices * grad_accum):
        accum = f" times grad_accum={grad_accum}" if grad_accum > 1 else ""
        sizes = "" if mesh is None else f" of mesh {dict(getattr(mesh, 'shape', mesh))}"
        change = "the data / fsdp mesh axes" + (" or grad_accum" if grad_accum > 1 else "")
        raise ValueError(f"{prefix}global batch size {global_batch} is not divisible by data x fsdp = {devices} "
                         f"devices{accum}{sizes}: use a multiple of {devices * grad_accum} as the global batch, or "
                         f"change {change}")
