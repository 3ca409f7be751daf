"""A stage's one data stream across its phases, and the host-side progress saved with each checkpoint.

`StageStream` is the kind's train iterator at the current phase's shape and mixture weights (a phase's
`weights`), continued at each phase change from the documents not yet used; `StageState` is what a checkpoint's
metadata records of the stage's progress (phase, tokens, rollbacks, skipped windows, and each logical data
shard's stream position).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from absl import logging

from llama_jax.data import batch as batch_lib
from llama_jax.data import hosts
from llama_jax.data import sources as sources_lib
from llama_jax.train import kind as kind_lib


@dataclasses.dataclass
class StageState:
    """Host-side progress of a stage, saved as each checkpoint's metadata (JSON)."""

    phase: int = 0
    tokens: int = 0
    rollbacks: int = 0
    skipped_windows: list = dataclasses.field(default_factory=list)
    last_rollback_target: int = -1  # the checkpoint the last rollback restored (-1: none)
    seed: int = 0
    # The stage's data stream, per logical data shard ([shard][source]; `data_shards` of them, data.hosts):
    # where the current phase's stream starts and the last document index each source contributed tokens from
    # in this phase (-1 = none yet).
    data_shards: int = 0
    phase_start: list = dataclasses.field(default_factory=list)
    consumed: list = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "StageState":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(d).items() if k in known})


class StageStream:
    """A stage's one data stream: the kind's iterator at the current phase's shape, continued at each phase
    change from the documents not yet used (the rest of a document split across the boundary is dropped).

    The stream is cut into `num_shards` logical shards (`data.hosts`: fixed when the stage starts, stored in its
    checkpoints); this process reads its own shards, each a document stream of its own with its own start and
    consumed positions, so the global batch does not depend on the process count."""

    def __init__(self, kind: kind_lib.StageKind, ctx: kind_lib.StageContext):
        self.kind, self.ctx = kind, ctx
        self.sources = [s["name"] for s in ctx.data_cfg["sources"]]
        self.phase, self.iterator, self.num_shards = -1, None, 0
        self.start: dict[int, list[int]] = {}  # local shard -> per source: first document of this phase
        self.consumed: dict[int, list[int]] = {}  # local shard -> per source: last document used (-1 = none)

    def default_shards(self) -> int:
        """`data.host_shards`, or `hosts.default_shards` of the global batches of every stage that shares this
        stream (`Stage.stream_batches`): fixed by the data and the batches, not by the process count, so any
        process count that divides it trains the same run, and a stage that continues the stream can too."""
        configured = int(self.ctx.data_cfg.get("host_shards", 0) or 0)
        stage = self.ctx.stage
        return configured or hosts.default_shards(list(stage.stream_batches), self.kind.batch_granule(stage))

    def open(self, phase: int, num_shards: int, start: list[list[int]] | None = None,
             consumed: list[list[int]] | None = None) -> hosts.ShardedTrainIterator:
        """Opens phase `phase` over `num_shards` shards; `start` / `consumed` have one row per shard (all shards,
        in shard order; None = from the beginning / nothing consumed)."""
        n = len(self.sources)
        if start is not None and len(start) != num_shards:
            raise ValueError(f"data stream state has {len(start)} shard rows, expected {num_shards}")
        p = self.ctx.stage.phases[phase]
        mix = sources_lib.reweighted(self.ctx.data_cfg["sources"], p.weights)  # the phase's mixture weights
        data_cfg = dict(self.ctx.data_cfg, sources=mix)

        def factory(shard: int, shards: int):
            ctx = dataclasses.replace(self.ctx, data_shard=(shard, shards), data_cfg=data_cfg,
                                      readers_here=max(shards // jax.process_count(), 1))
            row = start[shard] if start is not None else [0] * n
            return self.kind.train_iterator(ctx, phase, {name: int(s) for name, s in zip(self.sources, row) if s})

        self.phase, self.num_shards = phase, int(num_shards)
        self.iterator = hosts.ShardedTrainIterator(factory, num_shards, p.global_batch, jax.process_index(),
                                                   jax.process_count())
        local = self.iterator.local_shards
        self.start = {k: [int(x) for x in start[k]] if start is not None else [0] * n for k in local}
        self.consumed = {k: [int(x) for x in consumed[k]] if consumed is not None else [-1] * n for k in local}
        return self.iterator

    def next(self, step: int) -> dict:
        phase = self.ctx.stage.phase_at(step)
        if phase != self.phase:
            p = self.ctx.stage.phases[phase]
            logging.info("stage %r: phase %d -> %d at step %d (seq_len %d, global batch %d, mixture weights %s)",
                         self.ctx.stage.name, self.phase, phase, step, p.seq_len, p.global_batch,
                         dict(p.weights) or "the stage's")
            nxt = {k: [c + 1 if c >= 0 else s for s, c in zip(self.start[k], self.consumed[k])] for k in self.start}
            rows = [nxt.get(k, [0] * len(self.sources)) for k in range(self.num_shards)]  # only local rows are read
            self.open(phase, self.num_shards, rows)
        parts = []
        for shard, batch in self.iterator.next_parts():
            documents = batch.pop(batch_lib.DOCUMENT_KEY, None) if isinstance(batch, dict) else None
            if documents is not None:
                for source, last in batch_lib.consumed_documents(documents, len(self.sources)).items():
                    self.consumed[shard][source] = max(self.consumed[shard][source], last)
            parts.append(batch)
        return hosts.concat_rows(parts)

    def gathered(self) -> tuple[list[list[int]], list[list[int]]]:
        """(start, consumed) of every shard, gathered from all processes (a collective)."""
        local = self.iterator.local_shards
        return (_all_shards([self.start[k] for k in local], len(self.sources)),
                _all_shards([self.consumed[k] for k in local], len(self.sources)))


def _all_shards(rows: list[list[int]], width: int) -> list[list[int]]:
    """Every process's rows (its local shards), concatenated in process order = shard order."""
    if jax.process_count() == 1:
        return [list(r) for r in rows]
    from jax.experimental import multihost_utils  # noqa: PLC0415
    gathered = np.asarray(multihost_utils.process_allgather(np.asarray(rows, np.int64).reshape(-1, width)))
    return gathered.reshape(-1, width).tolist()


__all__ = ["StageState", "StageStream"]
