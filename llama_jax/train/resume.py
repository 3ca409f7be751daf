"""Where a stage starts, and loading any stage's parameters onto a mesh: the resume order as one module.

Resume order for a stage (first that applies; `StageRun.restore_or_init` walks it):
  1. the stage's own checkpoints in the workdir: the newest that restores (`checkpoint.first_restorable`);
  2. the parameters the stage's kind provides (`StageKind.initial_params`; e.g. `average`);
  3. the previous stage's final parameters (later stages; `start` below), with its optimizer state and data
     stream position when the stage carries them over;
  4. `config.init_from` (first stage; another run's stage checkpoint directory, params only);
  5. scratch (random init from `config.seed`).

`start_params` is steps 3-5 for parameters alone; kinds use it for the model a stage started from (the DPO
reference, SFT's starting accuracy). `load_stage` / `load_workdir` read the newest restorable checkpoint of any
stage (this run's or another workdir's: a reward model, a sampler, a teacher) with its ModelConfig. Everything is
restored straight onto the target shardings (the stage's mesh and rules, or one device for entry points without
a mesh), so no model is ever gathered onto one device on the way.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp

from llama_jax import experiment
from llama_jax import workdir as workdir_lib
from llama_jax.model import config as model_config
from llama_jax.model import transformer
from llama_jax.sharding import rules as rules_lib
from llama_jax.train import checkpoint as ckpt_lib


@dataclasses.dataclass(frozen=True)
class Start:
    """What a stage without checkpoints of its own starts from (steps 3-5 of the resume order)."""

    params: Any  # None: scratch
    opt_state: Any = None  # carried over from the previous stage (option carry_optimizer)
    meta: dict | None = None  # the previous checkpoint's metadata (option continue_data: its stream position)
    description: str = "scratch"


def abstract_params(cfg: model_config.ModelConfig, mesh=None, rules=None) -> Any:
    """The model's parameters as ShapeDtypeStructs carrying their target shardings: the model's logical axes
    mapped by `rules` onto `mesh`, or one device when `mesh` is None."""
    shapes = transformer.param_shapes(cfg)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)
    shardings = rules_lib.logical_to_sharding(transformer.param_logical_specs(cfg), mesh, rules)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def newest_items(directory: str, abstract: dict, with_meta: bool = False) -> tuple[dict, int, dict]:
    """Items of the newest checkpoint in a stage checkpoint directory that restores ({"params": ...,
    "opt_state": ...} of abstract arrays with shardings): (items, step, meta or {}); an error naming each
    checkpoint and why when none does."""
    steps = ckpt_lib.list_steps(directory)
    if not steps:
        raise FileNotFoundError(f"no checkpoint found in {directory!r}")
    step, loaded, failures = ckpt_lib.first_restorable(
        directory, steps, lambda s: ckpt_lib.load_state_items(directory, abstract, s, with_meta=with_meta))
    if step is None:
        raise ValueError(f"no checkpoint in {directory!r} restores: "
                         + "; ".join(f"step {s}: {why}" for s, why in failures))
    items, _, meta = loaded
    return items, step, meta


def start(workdir: str, stage: experiment.Stage, abstract_state: Any) -> Start:
    """Steps 3-5 of the resume order for `stage` (TrainState of abstract arrays with their shardings)."""
    origin, _, where = stage.init_source.partition(":")
    if origin == "previous":
        items = {"params": abstract_state.params}
        if stage.carry_optimizer:
            items["opt_state"] = abstract_state.opt_state
        loaded, at, meta = newest_items(workdir_lib.checkpoints_dir(workdir, where), items,
                                        with_meta=stage.continue_data)
        opt_state = loaded.get("opt_state")
        return Start(loaded["params"], opt_state, meta if stage.continue_data else None,
                     f"previous stage {where!r} step {at}" + (" with its optimizer state" if opt_state else ""))
    if origin == "init_from":
        loaded, at, _ = newest_items(where, {"params": abstract_state.params})
        return Start(loaded["params"], description=f"init_from {where!r} step {at}")
    return Start(None)


def start_params(workdir: str, stage: experiment.Stage, mesh, rules) -> Any:
    """The parameters `stage` started from (its init source) on the stage's mesh; an error when it starts from
    scratch."""
    origin, _, where = stage.init_source.partition(":")
    if origin not in ("previous", "init_from"):
        raise ValueError(f"stage {stage.name!r} ({stage.kind}) needs a starting model: it cannot be the first "
                         "stage of a run trained from scratch (set init_from or put a training stage before it)")
    directory = workdir_lib.checkpoints_dir(workdir, where) if origin == "previous" else where
    return newest_items(directory, {"params": abstract_params(stage.model, mesh, rules)})[0]["params"]


def stage_model_config(workdir: str, stage: str, kinds=None) -> model_config.ModelConfig:
    """The ModelConfig of a stage's checkpoints: its model_config.json, else resolved from config.json."""
    path = workdir_lib.model_config_path(workdir, stage)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                return model_config.ModelConfig.from_dict(json.load(f))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: not a model config ({e})") from None
    config = workdir_lib.read_config(workdir)
    (st,) = [s for s in config.stages if s["name"] == stage]
    return experiment.resolve_model(config, st)


def load_stage(workdir: str, stage: str, mesh=None, rules=None, dtype: str | None = None
               ) -> tuple[model_config.ModelConfig, Any]:
    """(ModelConfig, params) of the newest restorable checkpoint of `stage` in `workdir`, on `mesh` (one device
    when None); `dtype` casts the parameters."""
    cfg = stage_model_config(workdir, stage).replace(remat="none")
    params = newest_items(workdir_lib.checkpoints_dir(workdir, stage),
                          {"params": abstract_params(cfg, mesh, rules)})[0]["params"]
    if dtype is not None:
        params = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), params)
    return cfg, params


def last_stage_with_checkpoints(workdir: str) -> str | None:
    """The last stage of a workdir's experiment that has a checkpoint."""
    config = workdir_lib.read_config(workdir)
    names = [s["name"] for s in config.stages if ckpt_lib.list_steps(workdir_lib.checkpoints_dir(workdir, s["name"]))]
    return names[-1] if names else None


def load_workdir(path: str, stage: str | None = None, mesh=None, rules=None, dtype: str = "float32"
                 ) -> tuple[model_config.ModelConfig, Any]:
    """(ModelConfig, params) of a training workdir as a checkpoint (for `generate`, `convert`, a sampler or a
    reward model from another run): the newest readable checkpoint of `stage`, by default the last stage of the
    experiment that has one, falling back past checkpoints that do not restore."""
    path = os.path.abspath(path)
    name = stage
    if name is None or not ckpt_lib.list_steps(workdir_lib.checkpoints_dir(path, name)):
        name = last_stage_with_checkpoints(path) if stage is None else None
    if name is None:
        raise FileNotFoundError(f"no stage checkpoints{' for stage ' + repr(stage) if stage else ''} in workdir "
                                f"{path!r}")
    return load_stage(path, name, mesh, rules, dtype)


__all__ = ["Start", "abstract_params", "last_stage_with_checkpoints", "load_stage", "load_workdir", "newest_items",
           "stage_model_config", "start", "start_params"]
