"""The batch contract: what every data iterator yields and every train / eval step consumes.

A batch is a dict of arrays ``[B, L]`` (``B`` rows of this host, ``L`` the sequence length)::

    inputs, targets, segment_ids, positions, loss_mask    int32, sent to the devices (BATCH_KEYS)
    documents                                             int64, host only (optional; DOCUMENT_KEY)

``segment_ids`` number the documents of a row from 1 (0 = padding), ``positions`` restart at 0 for each
document, ``loss_mask`` is 1 on counted targets. A stage kind whose loss reads more per-token values (DPO's reference log-probabilities) adds them as extra
``[B, L]`` keys (:func:`device_keys`): they travel to the devices beside BATCH_KEYS (floats as float32, integers
as int32). ``documents`` (training iterators built with
``track_documents=True``) identifies the document of each token in its source's stream, so the driver can
continue a stage's one document stream at a new batch shape (:func:`consumed_documents`); it never reaches the
devices.

:func:`make_global_batch` is the one place a host batch becomes global ``jax.Array`` s: on one process it holds
the whole batch, on several each contributes its rows (``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
DTYPE = np.int32
DOCUMENT_KEY = "documents"


def check(batch: Mapping[str, Any]) -> None:
    """Raises a ValueError naming the key when `batch` breaks the contract (missing key, shape, dtype)."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch is missing key(s) {missing}; expected {BATCH_KEYS}")
    shape = np.shape(batch["inputs"])
    if len(shape) != 2:
        raise ValueError(f"batch['inputs'] must be [batch, length], got shape {shape}")
    for key in BATCH_KEYS:
        if tuple(np.shape(batch[key])) != tuple(shape):
            raise ValueError(f"batch[{key!r}] has shape {tuple(np.shape(batch[key]))}, expected {tuple(shape)}")
        if not np.issubdtype(np.asarray(batch[key]).dtype, np.integer):
            raise ValueError(f"batch[{key!r}] must be integer, got {np.asarray(batch[key]).dtype}")


def device_keys(batch: Mapping[str, Any]) -> tuple[str, ...]:
    """The keys of `batch` sent to the devices: BATCH_KEYS, then any extra key but the host-only DOCUMENT_KEY."""
    return BATCH_KEYS + tuple(sorted(k for k in batch if k not in BATCH_KEYS and k != DOCUMENT_KEY))


def make_global_batch(local_batch: Mapping[str, Any], sharding: Any) -> dict[str, Any]:
    """Host batch -> global int32 ``jax.Array`` s of the contract's device keys.

    Args:
      local_batch: this process's rows, ``[B_local, L]`` per key (on one process: the whole batch); keys
        outside BATCH_KEYS (``documents``) are left on the host.
      sharding: a ``jax.sharding.Sharding`` for every key, a mapping key -> sharding, or a ``Mesh`` (its data
        sharding: rows over the ``data`` and ``fsdp`` axes).
    """
    import jax  # pylint: disable=import-outside-toplevel

    if isinstance(sharding, jax.sharding.Mesh):
        from llama_jax.sharding import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
        sharding = mesh_lib.data_sharding(sharding)
    out = {}
    for key in device_keys(local_batch):
        s = sharding[key] if isinstance(sharding, Mapping) else sharding
        value = np.asarray(local_batch[key])
        dtype = np.float32 if key not in BATCH_KEYS and np.issubdtype(value.dtype, np.floating) else DTYPE
        out[key] = jax.make_array_from_process_local_data(s, value.astype(dtype, copy=False))
    return out


def encode_document_id(stream_index: int | np.ndarray, source_number: int, num_sources: int):
    """The ``documents`` value of a token: 1 + stream_index x num_sources + source_number (0 = padding)."""
    return 1 + np.asarray(stream_index, np.int64) * num_sources + source_number


def consumed_documents(documents: np.ndarray, num_sources: int) -> dict[int, int]:
    """{source number: highest stream index with a token in `documents`} (sources absent are left out)."""
    ids = np.asarray(documents, np.int64).ravel()
    ids = ids[ids > 0] - 1
    out = {}
    for source in range(num_sources):
        mine = ids[ids % num_sources == source]
        if mine.size:
            out[source] = int(mine.max() // num_sources)
    return out


__all__ = ["BATCH_KEYS", "DOCUMENT_KEY", "DTYPE", "check", "consumed_documents", "device_keys",
           "encode_document_id", "make_global_batch"]
