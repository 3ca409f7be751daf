"""Pipeline settings of an experiment, read and checked when the config is resolved (no JAX).

`config.mesh.pipe` is the number of pipeline stages; `config.pipeline` holds the rest
(`llama_jax.sharding.schedule.PipelineConfig`: virtual stages, microbatches, schedule, lighter ends).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import ml_collections

from llama_jax.sharding import schedule as schedule_lib


def pipeline_config(c: ml_collections.ConfigDict) -> schedule_lib.PipelineConfig:
    """The experiment's pipeline settings (`config.pipeline`, stages = `config.mesh.pipe`), checked."""
    stages = int(c.mesh.get("pipe", 1))
    if stages < 1:
        raise ValueError(f"mesh.pipe={stages}: give the number of pipeline stages (>= 1; -1 is not allowed for pipe)")
    raw = dict(c.get("pipeline", {}))
    known = {f.name for f in dataclasses.fields(schedule_lib.PipelineConfig)} - {"stages"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown pipeline key(s) {unknown}; known: {sorted(known)}")
    pipe = schedule_lib.PipelineConfig(stages=stages, **raw)
    if pipe.microbatches < 0:
        raise ValueError(f"pipeline.microbatches={pipe.microbatches} must be >= 0 (0: as many as pipeline stages)")
    schedule_lib.check(stages, pipe.virtual, pipe.n_micro, pipe.schedule)
    return pipe


def check_stage(st: Mapping, pipe: schedule_lib.PipelineConfig, model_cfg, bounds) -> None:
    """Raises a ValueError naming stage `st` when its model or batches cannot be pipelined as `pipe` says."""
    where = f"stage {st['name']!r}"
    if not model_cfg.scan_layers:
        raise ValueError(f"{where}: pipeline parallelism (mesh.pipe={pipe.stages}) needs model.scan_layers=True")
    try:
        schedule_lib.layout(model_cfg.n_layers, pipe.stages, pipe.virtual, pipe.lighter_ends)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    for _, _, batch in bounds:
        if batch % (int(st["grad_accum"]) * pipe.n_micro):
            raise ValueError(f"{where}: global batch {batch} does not split into grad_accum={st['grad_accum']} x "
                             f"pipeline.microbatches={pipe.n_micro}: use a batch that is a multiple of "
                             f"{int(st['grad_accum']) * pipe.n_micro}, or change pipeline.microbatches")
