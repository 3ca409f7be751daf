"""Fault injection for tests and drills, kept out of the production driver: `FaultyStageRun` is the driver's
`StageRun` with two of its parts overridden; pass `faulty(...)` as `run_experiment(..., stage_run=...)`.

    nan_at_steps                a NaN loss (and gradient) the first time each listed step runs (steps counted as
                                in the metrics, from 1)
    nan_params_in_checkpoints   silent bit-rot: the parameters saved at each listed step are NaN (the checkpoint
                                restores cleanly and then reproduces the fault)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llama_jax.train import stage_run
from llama_jax.train import step as step_lib


class FaultyStageRun(stage_run.StageRun):

    def __init__(self, *args, nan_at_steps=(), nan_params_in_checkpoints=(), **kwargs):
        super().__init__(*args, **kwargs)
        self._nan_steps = {int(s) for s in nan_at_steps}
        self._nan_checkpoints = {int(s) for s in nan_params_in_checkpoints}
        self._injected: set[int] = set()

    def _nan_loss(self, params, batch):
        """The real loss times NaN, so the loss and every gradient are non-finite."""
        total, count = step_lib.loss_sum(self.stage.model, params, batch, self.stage.loss_chunk)
        return total * jnp.nan, count

    def step_fn(self, step, phase):
        if step + 1 in self._nan_steps and step + 1 not in self._injected:
            self._injected.add(step + 1)
            return self.compiled_step(phase, loss_fn=self._nan_loss, key="nan")
        return super().step_fn(step, phase)

    def save(self, step, state, info, force=False):
        if step in self._nan_checkpoints:
            self._nan_checkpoints.discard(step)  # once: a rollback may save this step again, cleanly
            state = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
        return super().save(step, state, info, force)


def faulty(nan_at_steps=(), nan_params_in_checkpoints=()):
    """A `stage_run` for `run_experiment` that injects the listed faults."""
    return functools.partial(FaultyStageRun, nan_at_steps=nan_at_steps,
                             nan_params_in_checkpoints=nan_params_in_checkpoints)
