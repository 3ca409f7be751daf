"""Experiments: the builders an experiment file composes its config from, and `resolve(config, kinds)`.

`llama_jax.experiment.builders` (base_config, stage, phase, optim, parse_arg, ...) and
`llama_jax.experiment.schema` (Stage, Phase, resolve, ...) are re-exported here; neither imports JAX, so
`from llama_jax import experiment as E` in an experiment file keeps config loading cheap.
"""

from llama_jax.experiment.builders import (PAPER_MIX, base_config, check_knobs, data_value_probe, given_knobs,
                                           named_sources, optim, parse_arg, phase, require_files, stage)
from llama_jax.experiment.options import StageOptions, StageRef
from llama_jax.experiment.schema import (INTERVALS, PHASE_KEYS, STAGE_KEYS, OptimConfig, Phase, Stage,
                                         check_intervals, init_directory, prepare, resolve, resolve_chunk,
                                         resolve_model, stage_steps, thaw)

__all__ = ["INTERVALS", "OptimConfig", "PAPER_MIX", "PHASE_KEYS", "STAGE_KEYS", "Phase", "Stage", "StageOptions",
           "StageRef", "base_config", "check_intervals", "check_knobs", "data_value_probe", "given_knobs",
           "init_directory", "named_sources", "optim", "parse_arg", "phase", "prepare", "require_files", "resolve",
           "resolve_chunk", "resolve_model", "stage", "stage_steps", "thaw"]
