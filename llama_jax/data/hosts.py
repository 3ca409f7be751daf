"""Process-count-invariant training data: a fixed number of logical data shards split among the processes.

The training stream is cut into `num_shards` logical shards, fixed when a stage starts and stored in its
checkpoints: `data.host_shards`, or by default `default_shards` of the stream's batches (the largest count up to
`MAX_DEFAULT_SHARDS` that divides every global batch of the stream into whole groups of at least
`MIN_DEFAULT_ROWS` rows), a number fixed by the data and the batch, never by the process count. Shard k reads documents k::num_shards of every source
and yields `global_batch / num_shards` packed rows per step (`pipeline.make_train_iterator` with
`process_index=k, process_count=num_shards`); the global batch is the shards' rows in shard order. Process p of
P owns the contiguous shards [p*S/P, (p+1)*S/P) and reads only those: every process reads its own data, and the
global batch (hence every loss and parameter) does not depend on how many processes share the work.

So 1 x 8, 2 x 4 and 4 x 2 processes train the same run with default flags, and a restart with a different
process count resumes the same stream: the checkpoint holds every shard's grain iterator state (gathered to all
processes when saved), and P' processes pick up exactly where P left off as long as P' divides the shard count
(an error names both numbers and `data.host_shards` otherwise).
"""

from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np

from llama_jax.sharding import mesh as mesh_lib

ShardFactory = Callable[[int, int], Any]  # (shard index, shard count) -> grain iterator of that shard's rows


class ReshardError(ValueError):
    """The processes cannot split the checkpoint's data shards (not a corrupt checkpoint)."""


def _check_split(num_shards: int, process_count: int, global_batch: int) -> None:
    if num_shards < 1:
        raise ValueError(f"data.host_shards must be >= 1 (or 0 = the default, `default_shards`), got {num_shards}")
    if num_shards % process_count:
        raise ReshardError(f"{num_shards} data shards cannot be split among {process_count} processes: use a "
                           f"process count that divides {num_shards}, or set data.host_shards when the stage "
                           "starts")
    mesh_lib.check_global_batch(global_batch, shards=num_shards)


MAX_DEFAULT_SHARDS = 64  # the most processes a stage can be split among without setting data.host_shards
MIN_DEFAULT_ROWS = 8  # rows per shard per step by default: a shard's mixture of sources is proportional over
                      # its rows (grain's mix is deterministic), so one-row shards would make whole batches of
                      # one source at a time


def default_shards(global_batches: list[int], granule: int = 1, min_rows: int = MIN_DEFAULT_ROWS) -> int:
    """The default number of logical data shards of a data stream: the largest count up to `MAX_DEFAULT_SHARDS`
    that splits every global batch of the stream into equal parts of whole `granule`-row groups (a record's
    rows, gradient-accumulation layouts: `StageKind.batch_granule`) of at least `min_rows` rows; 1 when the
    batches are too small to split."""
    if any(b % granule for b in global_batches):
        raise ValueError(f"global batch(es) {global_batches} do not hold whole groups of {granule} rows")
    fits = [s for s in range(1, MAX_DEFAULT_SHARDS + 1)
            if all(b % (s * granule) == 0 and b // s >= min_rows for b in global_batches)]
    return fits[-1] if fits else 1


class ShardedTrainIterator:
    """This process's rows of the global batch, drawn from its logical shards (module docstring)."""

    def __init__(self, factory: ShardFactory, num_shards: int, global_batch: int, process_index: int,
                 process_count: int):
        self._factory, self._global_batch = factory, int(global_batch)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self._build(int(num_shards))

    def _build(self, num_shards: int) -> None:
        _check_split(num_shards, self.process_count, self._global_batch)
        self.num_shards = num_shards
        per = num_shards // self.process_count
        self.local_shards = list(range(self.process_index * per, (self.process_index + 1) * per))
        self._iterators = {k: self._factory(k, num_shards) for k in self.local_shards}

    def __iter__(self) -> ShardedTrainIterator:
        return self

    def next_parts(self) -> list[tuple[int, dict[str, np.ndarray]]]:
        """The next rows of each local shard: [(shard index, rows)], in shard order."""
        return [(k, next(self._iterators[k])) for k in self.local_shards]

    def __next__(self) -> dict[str, np.ndarray]:
        return concat_rows([rows for _, rows in self.next_parts()])

    def get_state(self) -> dict[str, Any]:
        """This process's shards: {"num_shards": S, "shards": {"k": grain state}} (JSON-serializable)."""
        return {"num_shards": self.num_shards,
                "shards": {str(k): self._iterators[k].get_state() for k in self.local_shards}}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores from a (gathered) state; rebuilds the shards if the state has a different shard count."""
        num_shards = int(state["num_shards"])
        if num_shards != self.num_shards:
            self._build(num_shards)
        missing = [k for k in self.local_shards if str(k) not in state["shards"]]
        if missing:
            raise ValueError(f"data state lacks shard(s) {missing} of {num_shards}")
        for k in self.local_shards:
            self._iterators[k].set_state(state["shards"][str(k)])

    def global_state(self) -> dict[str, Any]:
        """Every shard's state, gathered from all processes (a collective: all processes must call it)."""
        state = self.get_state()
        if self.process_count == 1:
            return state
        merged: dict[str, Any] = {}
        for part in _allgather_json(state["shards"]):
            merged.update(part)
        if len(merged) != self.num_shards:
            raise RuntimeError(f"gathered {len(merged)} data shard states, expected {self.num_shards}")
        return {"num_shards": self.num_shards, "shards": merged}


def concat_rows(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The shards' rows of one step stacked in shard order (this process's part of the global batch)."""
    if len(parts) == 1:
        return parts[0]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _allgather_json(obj: Any) -> list[Any]:
    """Every process's JSON-serializable `obj`, in process order."""
    from jax.experimental import multihost_utils  # noqa: PLC0415

    data = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(data.size)))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, sizes)]


def make_train_iterator(cfg: Any, tokenizer: Any, seq_len: int, global_batch: int, seed: int,
                        num_shards: int = 0, process_index: int | None = None,
                        process_count: int | None = None) -> ShardedTrainIterator:
    """The training iterator of this process over `num_shards` logical shards (0 = one per process)."""
    from llama_jax.data import pipeline  # noqa: PLC0415

    if process_index is None or process_count is None:
        import jax  # noqa: PLC0415
        process_index, process_count = jax.process_index(), jax.process_count()

    def factory(shard: int, shards: int):
        return pipeline.make_train_iterator(cfg, tokenizer, seq_len, global_batch, seed, process_index=shard,
                                            process_count=shards)

    return ShardedTrainIterator(factory, int(num_shards) or process_count, global_batch, process_index,
                                process_count)
