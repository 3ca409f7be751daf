"""The stage-kind protocol: what differs between pretraining, long-context extension, annealing and post-training.

The driver (`llama_jax.train.driver`, `stage_run`) is shared by every kind and knows none of them: it restores or
initializes the stage, steps, observes the metrics (spike / rollback monitor), checkpoints, evaluates
periodically, honours SIGTERM and finishes the stage. A kind is an object with the hooks below (subclass
`StageKind`, which declares each one with its default); the table of kinds (`llama_jax.stages.KINDS`) is passed
to `experiment.resolve(config, kinds)` and `driver.run_experiment(config, workdir, kinds)`. Adding a kind is one
module plus one line in that table.

    name                                   the `kind` a stage names in its config
    trains                                 False: the stage trains nothing (no step is taken; its checkpoint
                                           is the model it starts from, or `initial_params`)
    Options                                its options (a frozen dataclass, `experiment.options`; parsed once
                                           by `parse_options`, read as `ctx.stage.options`)
    check(stage)                           checks that need the resolved stage (lengths, the model)
    checkpoint_plan(stage)                 (every_steps, keep) of a stage that sets no `checkpoint` of its
                                           own: the run's config.checkpoint, or what the kind needs (anneal:
                                           the checkpoints it averages)
    check_data(stage)                      reads the stage's own data files (content, not only existence);
                                           the driver calls it for every unfinished stage before the first
                                           one trains, so bad data stops a run before hours of earlier stages
    batch_granule(stage)                   rows of a step's batch that must come from one logical data shard
                                           (records of several rows, gradient-accumulation layouts); it bounds
                                           the default number of data shards (`data.hosts.default_shards`)
    initial_params(ctx, abstract)          (params, description) a stage without checkpoints starts from
                                           instead of its init source, or None (e.g. `average`)
    train_iterator(ctx, phase, start)      a checkpointable iterator of batches of the logical data shard
                                           `ctx.data_shard` (only kinds that train)
    loss_fn(ctx)                           (params, batch) -> (loss_sum, count), or None for next-token CE
    evaluate(ctx, params, phase, step)     {metric: float}
    finish(ctx, state)                     {key: JSON value} merged into the stage's DONE.json

`ctx` is a `StageContext`: the typed stage, the experiment config, the tokenizer, the mesh and rules, the metric
writer, the run's workdir, compiled evaluation steps, and a per-stage `cache` a kind may keep built data or
compiled functions in (it lives as long as the stage runs; nothing is cached across stages or runs). Batches
follow the one batch contract (`llama_jax.data.batch`): a kind whose examples are not packed documents
(preference pairs, dialogs with masks) still yields `inputs/targets/segment_ids/positions/loss_mask` rows (plus
keys its own loss reads), and its iterator must be a grain `DatasetIterator` (get_state / set_state) so that
resume is exact. The optional host-only `documents` key lets the driver continue one document stream across a
batch-shape ramp; iterators without it restart their stream at a phase change.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping

import ml_collections

from llama_jax import experiment
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.experiment import options as options_lib


@dataclasses.dataclass
class StageContext:
    """What a kind may read: the typed stage and the run's shared objects (no mutable training state)."""

    stage: experiment.Stage
    config: ml_collections.ConfigDict
    tokenizer: Tokenizer
    mesh: Any
    rules: Any
    writer: Any
    data_cfg: dict
    to_device: Callable[[Mapping[str, Any]], dict]
    eval_step: Callable[[int, int], Callable]  # (seq_len, global_batch) -> compiled (params, batch) -> (sum, n)
    workdir: str = ""  # the run's workdir (kinds that read an earlier stage's results)
    # (shard, shard count) of the logical data shard a train iterator reads (`data.hosts`): documents
    # shard::count of every source, global_batch / count rows per step. None = this process of all processes.
    data_shard: tuple[int, int] | None = None
    readers_here: int = 1  # logical data shards this process reads side by side (they share its read threads)
    cache: dict = dataclasses.field(default_factory=dict)  # the kind's per-stage cache (see the module docstring)

    def cached(self, key: Any, build: Callable[[], Any]) -> Any:
        """`build()` once per stage run under `key`."""
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]


class StageKind:
    """Base class and protocol of a stage kind (see the module docstring); every hook has its default here."""

    name: str = ""
    trains: bool = True
    frozen_models: int = 0  # models held beside the trained one (e.g. DPO's reference), for the memory planner
    Options: type = options_lib.StageOptions

    def parse_options(self, stage: str, raw: Mapping[str, Any]) -> options_lib.StageOptions:
        """The stage's typed options (`experiment.options.parse` into `Options`)."""
        return options_lib.parse(self.Options, stage, self.name, raw)

    def check(self, stage: experiment.Stage) -> None:
        """Checks of the options that need the resolved stage; errors name the stage."""

    def checkpoint_plan(self, stage: experiment.Stage) -> tuple[int, int]:
        """(checkpoint every_steps, keep) of a stage that sets none of its own; default: the run's."""
        return stage.checkpoint_every, stage.checkpoint_keep

    def check_data(self, stage: experiment.Stage) -> None:
        """Raises naming the file when one of the stage's own data files holds no valid record."""

    def batch_granule(self, stage: experiment.Stage) -> int:
        """Rows that must stay in one logical data shard (1: any split of the rows works)."""
        return 1

    def initial_params(self, ctx: StageContext, abstract_params: Any) -> tuple[Any, str] | None:
        """(params, description) a stage without checkpoints starts from instead of its init source, placed as
        `abstract_params` (ShapeDtypeStructs with the target shardings); None = the init source."""
        return None

    def train_iterator(self, ctx: StageContext, phase: int, start_documents: Mapping[str, int]) -> Iterator:
        raise NotImplementedError(f"stage kind {self.name!r} trains, but has no train_iterator")

    def loss_fn(self, ctx: StageContext) -> Callable | None:
        return None

    def evaluate(self, ctx: StageContext, params: Any, phase: int, step: int) -> dict[str, float]:
        return {}

    def finish(self, ctx: StageContext, state: Any) -> dict[str, Any]:
        return {}


def check_table(kinds: Mapping[str, StageKind]) -> None:
    """A table of kinds maps each kind's own name to it."""
    for name, kind in kinds.items():
        if not isinstance(kind, StageKind) or kind.name != name:
            raise ValueError(f"the table of stage kinds maps {name!r} to {kind!r}, whose name is "
                             f"{getattr(kind, 'name', None)!r}")


__all__ = ["StageContext", "StageKind", "check_table"]
