"""Checkpoints: one Orbax CheckpointManager per stage holding the train state, the data-iterator state and
run metadata, written atomically (Orbax writes to a temporary directory and renames it when complete).

Layout: `<stage_dir>/checkpoints/<step>/{state,data,meta}`.
  * state: the TrainState (params, optimizer state, step, skipped), restored onto any mesh by giving the target
    shardings (Orbax reshards on read);
  * data: the data-iterator state (JSON), so a resumed run continues with exactly the next batch: for a
    `data.hosts.ShardedTrainIterator` the state of every logical data shard, gathered from all processes, so a
    restart with another process count resumes the same stream; for a plain grain iterator, grain's per-process
    files;
  * meta: JSON (phase index, tokens seen, skipped data windows, ...).
Retention: keep the last `keep` checkpoints plus every `keep_every`-th step. A checkpoint that fails to restore
(corrupted or partially deleted after it was committed) is moved aside to `<step>.corrupt` and the previous
one is used, with a warning.
"""

from __future__ import annotations

import os
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from llama_jax.data import hosts


class StageCheckpoints:
    """Save / restore for one stage. `iterator` is the grain DatasetIterator whose state is checkpointed."""

    def __init__(self, directory: str, keep: int = 3, keep_every: int | None = None, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, keep_period=keep_every or None, enable_async_checkpointing=async_save,
            create=True, cleanup_tmp_directories=True)
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(self.directory, options=self._options,
                                     item_names=("state", "data", "meta"))

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, iterator: Any | None, meta: dict, force: bool = False) -> bool:
        """Starts an (async) save of `state`, the iterator position and `meta` at `step`."""
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if step in self._manager.all_steps():
            return False
        if isinstance(iterator, hosts.ShardedTrainIterator):
            items["data"] = ocp.args.JsonSave(iterator.global_state())  # a collective: every process saves
        elif iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(iterator)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def delete(self, step: int) -> None:
        self._manager.delete(step)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any, iterator: Any | None) -> tuple[Any, dict]:
        """Restores step `step` onto the shardings in `abstract_state` (ShapeDtypeStructs with .sharding);
        sets `iterator` to the saved position. Returns (state, meta)."""
        items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if isinstance(iterator, hosts.ShardedTrainIterator):
            items["data"] = ocp.args.JsonRestore()
        elif iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if isinstance(iterator, hosts.ShardedTrainIterator):
            iterator.set_state(restored["data"])
        return restored["state"], dict(restored["meta"] or {})

    def read_meta(self, step: int) -> dict:
        """The JSON metadata of checkpoint `step` alone (cheap: no arrays are read)."""
        return dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {})

    def restore_latest(self, abstract_state: Any, iterator_factory) -> tuple[int, Any, Any, dict] | None:
        """Restores the newest checkpoint that reads back cleanly: (step, state, iterator, meta), or None.

        `iterator_factory(meta_or_None)` builds a fresh iterator for the checkpoint's data phase; a checkpoint
        that fails to restore is moved aside (`<step>.corrupt`) with a warning and the previous one is tried.
        """
        for step in reversed(self.all_steps()):
            try:
                iterator = iterator_factory(self.read_meta(step))
                state, meta = self.restore(step, abstract_state, iterator)
                return step, state, iterator, meta
            except hosts.ReshardError:  # the checkpoint is fine; this process count cannot split its data
                raise
            except Exception as e:  # noqa: BLE001 - any read failure means this checkpoint is unusable
                logging.warning("checkpoint %s/%d could not be restored (%s: %s); falling back to the previous one",
                                self.directory, step, type(e).__name__, str(e).splitlines()[0][:300])
                self._quarantine(step)
        return None

    def _quarantine(self, step: int) -> None:
        path = os.path.join(self.directory, str(step))
        if jax.process_index() == 0 and os.path.exists(path):
            os.replace(path, f"{path}.corrupt-{int(time.time())}")
        self._manager = self._open()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def load_params(directory: str, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
    """Params only, from a stage checkpoint directory (`.../checkpoints`) or a workdir stage: for `init_from`
    and for the next stage. Returns (params, step)."""
    manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "data", "meta"))
    steps = sorted(manager.all_steps())
    if not steps:
        raise FileNotFoundError(f"no checkpoint found in {directory!r}")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"checkpoint step {step} not found in {directory!r}; available: {steps}")
    abstract_state = {"params": abstract_params}
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=abstract_state, restore_args=jax.tree.map(
            lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
            abstract_state), partial_restore=True)))
    manager.close()
    return restored["state"]["params"], step


def is_workdir(path: str) -> bool:
    """A training workdir: the run's config.json plus stages/<name>/checkpoints."""
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "stages"))


def load_workdir(path: str, stage: str | None = None, dtype: str = "float32"):
    """(ModelConfig, params) of a training workdir: the latest checkpoint of `stage`, by default the last stage
    of the experiment that has a checkpoint. Params are loaded replicated on the default device."""
    import json

    import jax.numpy as jnp
    import ml_collections

    from llama_jax import experiment
    from llama_jax.model import transformer

    with open(os.path.join(path, "config.json")) as f:
        c = ml_collections.ConfigDict(json.load(f))
    stages = [st for st in c.stages if os.path.isdir(os.path.join(path, "stages", st["name"], "checkpoints"))]
    if stage is not None:
        stages = [st for st in stages if st["name"] == stage]
    if not stages:
        raise FileNotFoundError(f"no stage checkpoints{' for stage ' + repr(stage) if stage else ''} in workdir "
                                f"{path!r}")
    st = stages[-1]
    cfg = experiment.resolve_model(c, st).replace(remat="none")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            transformer.param_shapes(cfg))
    params, _ = load_params(os.path.join(path, "stages", st["name"], "checkpoints"), abstract)
    return cfg, jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), params)
