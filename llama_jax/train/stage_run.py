"""One stage run: the shared driver's loop, for every stage kind.

`StageRun.run` is a few named parts: `restore_or_init` (the resume order, `train.resume`), `StageStream` (the
stage's one data stream, `train.stream`), the compiled step, `SpikeMonitor` (bad steps -> rollback,
`train.spikes`), periodic actions (`due`: checkpoint, metrics, eval), the SIGTERM flag and `finish` (the kind's
final evaluation and outputs, then DONE.json). What a stage trains on and how it is evaluated comes from its kind
(`train.kind`); a kind that trains nothing (`trains = False`) takes no step: its stage saves the model it starts
from as checkpoint 0 and finishes.

Fault handling: the step skips any update whose loss or gradient is not finite. On the host,
`spike.max_bad_steps` bad steps within `spike.window` steps roll the run back to the last checkpoint before the
first bad step and skip the data consumed since that checkpoint; if the bad steps come back after a rollback to
a checkpoint before any newer one was written, that checkpoint reproduces the fault and the next rollback walks
back past it. SIGTERM (preemption) saves a checkpoint at the next step boundary and exits; one that arrives
during a stage's final evaluation or samples stops the run after the stage is recorded as finished.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import zlib
from typing import Any

import jax
import numpy as np
from absl import logging

from llama_jax import experiment
from llama_jax import workdir as workdir_lib
from llama_jax.data import batch as batch_lib
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.model import context_parallel
from llama_jax.sharding import mesh as mesh_lib
from llama_jax.train import checkpoint as ckpt_lib
from llama_jax.train import kind as kind_lib
from llama_jax.train import metrics as metrics_lib
from llama_jax.train import optim as optim_lib
from llama_jax.train import resume
from llama_jax.train import step as step_lib
from llama_jax.train.spikes import SpikeMonitor
from llama_jax.train.stream import StageState, StageStream

_PROGRESS_KEYS = ("loss", "learning_rate", "grad_norm", "tokens_per_s", "mfu")


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "preempted, checkpoint saved: run the same command again" (SLURM requeue)


class Preempted(SystemExit):
    """Raised after a SIGTERM: the stage's checkpoint (or its DONE.json) was written. The process exits with
    `EXIT_PREEMPTED`, which a scheduler tells apart from a failure (status 1 or 2)."""

    def __init__(self, message: str):
        super().__init__(EXIT_PREEMPTED)
        self.message = message
        logging.warning("%s", message)

    def __str__(self) -> str:
        return self.message


class ShapeMismatch(ValueError):
    """A checkpoint holds arrays of other shapes than the config's model (never "corrupt": the run stops)."""


def due(step: int, every: int) -> bool:
    """A periodic action at `step` every `every` steps; `every` 0 = never."""
    return every > 0 and step % every == 0


class StageRun:
    """Trains one stage: the shared driver. Holds the compiled steps (one per batch shape), the checkpoints
    and the host-side counters. `previous` is the resolved stage this one starts from (or None)."""

    def __init__(self, c, stage: experiment.Stage, workdir: str, mesh, rules, tokenizer: Tokenizer, writer,
                 preemption, kind: kind_lib.StageKind, previous: experiment.Stage | None = None,
                 start_over: bool = False):
        self.config, self.stage, self.workdir, self.mesh, self.rules = c, stage, workdir, mesh, rules
        self.tokenizer, self.writer, self.preemption, self.start_over = tokenizer, writer, preemption, start_over
        self.kind, self.previous = kind, previous
        self.name, self.dir = stage.name, workdir_lib.stage_dir(workdir, stage.name)
        if tokenizer.n_words > stage.model.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.n_words} ids but model {stage.model.name!r} has "
                             f"vocab_size {stage.model.vocab_size}")
        for p in stage.phases if kind.trains else ():
            mesh_lib.check_global_batch(p.global_batch, devices=mesh_lib.batch_divisor(mesh),
                                        grad_accum=stage.grad_accum, mesh=mesh, where=f"stage {self.name!r}")
        self.total_steps = stage.total_steps
        if c.debug.max_steps:
            self.total_steps = min(self.total_steps, int(c.debug.max_steps))
        data_cfg = experiment.thaw(stage.data)
        data_cfg["cache_dir"] = workdir_lib.data_cache_dir(workdir, c.data.cache_dir)
        self.ctx = kind_lib.StageContext(stage=stage, config=c, tokenizer=tokenizer, mesh=mesh, rules=rules,
                                         writer=writer, data_cfg=data_cfg, to_device=self.to_device,
                                         eval_step=self._eval_step, workdir=workdir)
        self.stream = StageStream(kind, self.ctx)
        ck = c.checkpoint
        self.ckpts = ckpt_lib.StageCheckpoints(workdir_lib.checkpoints_dir(workdir, stage.name),
                                               keep=stage.checkpoint_keep,
                                               keep_every=ck.keep_every or None, async_save=ck.async_save)
        self.monitor = SpikeMonitor(int(c.spike.max_bad_steps), int(c.spike.window), float(c.spike.spike_factor))
        self._steps: dict[Any, Any] = {}
        self._eval_steps: dict[tuple[int, int], Any] = {}

    # ----------------------------------------------------------------------------------------- parts

    def to_device(self, batch_np):
        # a context axis > 1 splits the sequence into load-balanced chunks (llama_jax.model.context_parallel)
        batch_np = context_parallel.permute_batch(batch_np, self.mesh.shape["context"])
        return batch_lib.make_global_batch(batch_np, mesh_lib.data_sharding(self.mesh))

    def compiled_step(self, phase: int, loss_fn=None, key: Any = None):
        key = (phase, key)
        if key not in self._steps:
            loss_fn = loss_fn or self.kind.loss_fn(self.ctx)
            fn = step_lib.make_train_step(self.stage.model, self.stage.optim, self.stage.grad_accum, loss_fn=loss_fn,
                                          loss_chunk=self.stage.loss_chunk,
                                          pipeline=None if loss_fn else self.stage.pipeline)
            self._steps[key] = step_lib.jit_train_step(fn, self.mesh, self.rules, self.shardings)
        return self._steps[key]

    def step_fn(self, step: int, phase: int):  # noqa: ARG002 - `step` is for subclasses (fault injection)
        """The compiled step that runs step `step` (0-based) of phase `phase`."""
        return self.compiled_step(phase)

    def _eval_step(self, seq_len: int, global_batch: int):
        key = (seq_len, global_batch)
        if key not in self._eval_steps:
            self._eval_steps[key] = step_lib.jit_eval_step(self.stage.model, self.mesh, self.rules,
                                                           self.shardings.params, self.stage.loss_chunk)
        return self._eval_steps[key]

    def save(self, step: int, state, info: StageState, force: bool = False) -> None:
        if self.stream.iterator is not None:
            info.phase, info.data_shards = self.stream.phase, self.stream.num_shards
            info.phase_start, info.consumed = self.stream.gathered()
        self.ckpts.save(step, state, self.stream.iterator, info.to_json(), force=force)

    def _restore(self, step: int) -> tuple[Any, StageState]:
        mismatch = self._shape_mismatch(step)
        if mismatch:
            raise ShapeMismatch(f"stage {self.name!r}: checkpoint {self.ckpts.directory}/{step} holds arrays of "
                                f"other shapes than the config's model (checkpoint vs config: {mismatch}); it was "
                                f"written with another model config: use a new workdir")
        info = StageState.from_json(self.ckpts.read_meta(step))
        iterator = None
        if self.kind.trains:
            if not info.data_shards or len(info.phase_start) != info.data_shards:
                raise ValueError(f"checkpoint {step} has no data stream state of its {info.data_shards} data "
                                 "shards")
            iterator = self.stream.open(info.phase, info.data_shards, info.phase_start, info.consumed)
        state, meta = self.ckpts.restore(step, self.abstract, iterator)
        return state, StageState.from_json(meta)

    def _shape_mismatch(self, step: int) -> str:
        try:
            stored = self.ckpts.state_shapes(step)
        except Exception:  # noqa: BLE001 - unreadable metadata: the restore reports it
            return ""
        want = {ckpt_lib.path_names(k): tuple(v.shape)
                for k, v in jax.tree_util.tree_leaves_with_path(self.abstract)}
        diffs = [f"{k} {stored[k]} vs {want[k]}" for k in want if k in stored and stored[k] != want[k]]
        return ", ".join(diffs[:4]) + (", ..." if len(diffs) > 4 else "")

    def restore_or_init(self) -> tuple[int, Any, StageState]:
        """The resume order (`train.resume`): own checkpoints (a checkpoint that fails to restore is moved aside
        once an older one restored; if none restores the run stops and names each and why, unless
        `start_over`), then the kind's initial parameters, the previous stage, init_from, scratch."""
        self.abstract = step_lib.abstract_train_state(self.stage.model, self.stage.optim, self.mesh, self.rules)
        self.shardings = jax.tree.map(lambda x: x.sharding, self.abstract)
        steps = [s for s in self.ckpts.all_steps() if s <= self.stage.total_steps]  # not a kind's outputs after them
        step, restored, failures = ckpt_lib.first_restorable(self.ckpts.directory, steps, self._restore,
                                                             keep=(ShapeMismatch,))
        if step is not None:
            for bad, _ in failures:
                self.ckpts.quarantine(bad)
            logging.info("stage %r: resumed from its checkpoint at step %d", self.name, step)
            self.writer.drop_after(step, self.name)  # the steps after it are trained (and logged) again
            return step, *restored
        if failures:
            listed = "; ".join(f"{self.ckpts.directory}/{s}: {why}" for s, why in failures)
            if not self.start_over:
                raise ValueError(f"stage {self.name!r}: none of its checkpoints restores ({listed}); nothing was "
                                 "changed. Pass --start_over to move them aside and train the stage again")
            logging.warning("stage %r: no checkpoint restores (%s); moved aside, starting over", self.name, listed)
            for bad, _ in failures:
                self.ckpts.quarantine(bad)
        provided = self.kind.initial_params(self.ctx, self.abstract.params)
        begin = resume.Start(*provided[:1], description=provided[1]) if provided is not None else \
            resume.start(self.workdir, self.stage, self.abstract)
        state, _ = step_lib.init_train_state(self.stage.model, self.stage.optim, self.mesh, self.rules,
                                             jax.random.key(self.stage.seed), params=begin.params)
        if begin.opt_state is not None:  # the moments carried over; the new stage's LR schedule starts at its step 0
            state = state.replace(opt_state=jax.device_put(optim_lib.restart_schedule(begin.opt_state),
                                                           self.shardings.opt_state))
        logging.info("stage %r: starting from %s", self.name, begin.description)
        info = StageState(seed=self.stage.seed)
        if self.kind.trains:
            rows = self._continued_stream(begin.meta) if begin.meta is not None else None
            self.stream.open(0, len(rows) if rows is not None else self.stream.default_shards(), rows)
        self.save(0, state, info)  # a rollback target, and a resumable start for the stage
        return 0, state, info

    def _continued_stream(self, meta: dict) -> list[list[int]]:
        """Where this stage's stream starts (per data shard, per source) when it continues the previous stage's:
        each source shared with it resumes after the last document the previous stage used; a new source starts
        at its beginning."""
        info = StageState.from_json(meta)
        previous = self.previous.name
        if not info.data_shards or len(info.consumed) != info.data_shards:
            raise ValueError(f"stage {self.name!r}: option continue_data, but the checkpoint of stage {previous!r} "
                             "records no data stream position")
        names = [s["name"] for s in self.previous.data["sources"]]
        rows = []
        for start, consumed in zip(info.phase_start, info.consumed):
            nxt = {n: (c + 1 if c >= 0 else s) for n, s, c in zip(names, start, consumed)}
            rows.append([int(nxt.get(n, 0)) for n in self.stream.sources])
        logging.info("stage %r: continues the data stream of stage %r at documents %s", self.name, previous, rows)
        return rows

    def observe(self, pending, next_dispatch: float | None, info: StageState) -> None:
        """Host-side metrics of a finished step: throughput, logging, progress, spike monitor."""
        p_step, p_phase, p_metrics, p_t0 = pending
        host = {k: float(v) for k, v in jax.device_get(p_metrics).items()}
        # A step ran from its dispatch, or from the host's seeing the previous step done if that was later, until
        # the host saw it done. The host sees a step done late only when it was busy (a save, an evaluation):
        # that inflates the step's time, never shrinks it, so the MFU the log prints is never flattered (the
        # interval between dispatches would be near zero for the step after a blocking save).
        done = time.perf_counter()
        seconds, self._last_done = done - max(p_t0, self._last_done), done
        # The first step of a shape includes compilation, the last one the final save: neither is timed.
        if next_dispatch is not None and p_phase not in self._throughput:
            self._throughput[p_phase] = metrics_lib.Throughput(
                self.stage.model.flops_per_token(self.stage.phases[p_phase].seq_len), jax.device_count(),
                self._peak)
        elif next_dispatch is not None and seconds > 0:
            host.update(self._throughput[p_phase].update(int(host["tokens"]), seconds))
        host["perplexity"] = math.exp(min(host["loss"], 50.0))
        bad = self.monitor.observe(p_step, host["loss"], host["nonfinite"] > 0)
        if bad:
            logging.warning("stage %r step %d: bad step (loss %s, grad_norm %s)%s", self.name, p_step,
                            host["loss"], host["grad_norm"], "; update skipped" if host["nonfinite"] else "")
        if due(p_step, int(self.config.log_every_steps)) or p_step == self.total_steps or bad:
            self.writer.write_scalars(p_step, host, prefix=f"{self.name}/train")
        self._progress.update(p_step, {k: host[k] for k in _PROGRESS_KEYS if k in host})

    def rollback(self, first_bad: int, current_step: int, info: StageState) -> tuple[int, Any, StageState]:
        """Restores the last checkpoint before `first_bad` (walking back past one that just reproduced the
        fault, and past one that does not restore) and skips the data consumed since it."""
        self.ckpts.wait()
        rollbacks = info.rollbacks + 1
        if rollbacks > int(self.config.spike.max_rollbacks):
            raise RuntimeError(f"stage {self.name!r}: more than {self.config.spike.max_rollbacks} rollbacks; giving up "
                               f"(bad steps again at step {first_bad})")
        candidates = [s for s in self.ckpts.all_steps() if s < first_bad]
        if candidates and candidates[-1] == info.last_rollback_target:
            logging.warning("stage %r: the bad steps came back after the rollback to step %d before any newer "
                            "checkpoint: walking back past it", self.name, candidates[-1])
            candidates.pop()
        target, restored, _ = ckpt_lib.first_restorable(self.ckpts.directory, candidates, self._restore,
                                                        on_failure=self.ckpts.quarantine)
        if target is None:
            raise RuntimeError(f"stage {self.name!r}: no usable checkpoint before bad step {first_bad} to roll "
                               "back to")
        state, restored = restored
        for step in range(target, current_step):  # the data of the bad window is skipped, phase changes included
            self.stream.next(step)
        restored.skipped_windows = list(restored.skipped_windows) + [[target, current_step]]
        restored.rollbacks, restored.tokens, restored.last_rollback_target = rollbacks, info.tokens, target
        logging.warning("stage %r: %d bad steps from step %d: rolled back to step %d and skipped the %d batches "
                        "of steps %d..%d", self.name, self.config.spike.max_bad_steps, first_bad, target,
                        current_step - target, target, current_step - 1)
        self.writer.write_text(current_step, f"{self.name}/rollback",
                               f"rolled back to step {target}; skipped data of steps {target}..{current_step - 1}")
        for s in [s for s in self.ckpts.all_steps() if s > target]:
            self.ckpts.delete(s)
        self.monitor.reset()
        return target, state, restored

    def save_due(self, step: int) -> bool:
        """Whether step `step` ends with a checkpoint: periodic, the stage's last, or a preemption all
        processes agreed on (`Preemption.agreed`, a collective on a multi-process job)."""
        self._preempt = self.preemption.agreed()
        return due(step, self.stage.checkpoint_every) or step == self.total_steps or self._preempt

    def periodic(self, step: int, state, info: StageState, save: bool) -> None:
        """Checkpoint, preemption and evaluation after step `step` was dispatched (and, when `save`, its metrics
        written: a kill right after the checkpoint loses no metrics row)."""
        if save:
            self.save(step, state, dataclasses.replace(info), force=True)
        if self._preempt:
            self.ckpts.wait()
            raise Preempted(f"SIGTERM: checkpoint saved at step {step} of stage {self.name!r}; run the same "
                            f"command again to resume (exit status {EXIT_PREEMPTED})")
        if int(self.config.eval.batches) and due(step, int(self.config.eval.every_steps)) and step < self.total_steps:
            self.evaluate(state, step)

    def evaluate(self, state, step: int) -> dict:
        out = self.kind.evaluate(self.ctx, state.params, max(self.stream.phase, 0), step)
        self.writer.write_scalars(step, out, prefix=f"{self.name}/eval")
        logging.info("stage %r step %d: eval %s", self.name, step, out)
        return out

    def finish(self, step: int, state, info: StageState) -> dict:
        """The kind's final evaluation and outputs, then DONE.json; a SIGTERM meanwhile stops the run after it."""
        self.ckpts.wait()
        final = {"step": step, "tokens": info.tokens, "skipped_steps": int(jax.device_get(state.skipped)),
                 "rollbacks": info.rollbacks}
        if int(self.config.eval.batches):
            final.update({f"eval_{k}": v for k, v in self.evaluate(state, step).items()})
        final.update(self.kind.finish(self.ctx, state))
        if jax.process_index() == 0:
            workdir_lib.write_json_atomic(workdir_lib.done_path(self.workdir, self.name), final)
        logging.info("stage %r finished: %s", self.name, {k: v for k, v in final.items() if k != "samples"})
        if self.preemption.agreed():  # a collective: every process stops here, or none does
            raise Preempted(f"SIGTERM during the end of stage {self.name!r}: the stage is finished and recorded; "
                            "stopping before the next stage")
        return final

    # ---------------------------------------------------------------------------------------------- run

    def run(self) -> dict:
        os.makedirs(self.dir, exist_ok=True)
        if jax.process_index() == 0:
            workdir_lib.write_model_config(self.workdir, self.name, self.stage.model)
        try:
            step, state, info = self.restore_or_init()
            logging.info("stage %r (%s): %d steps; phases %s; model %s (%.3gM params)", self.name, self.stage.kind,
                         self.total_steps, self.stage.phases, self.stage.model.name,
                         self.stage.model.param_count() / 1e6)
            if self.kind.trains:
                step, state, info = self.train(step, state, info)
            return self.finish(step, state, info)
        finally:
            self.ckpts.close()

    def train(self, step: int, state, info: StageState) -> tuple[int, Any, StageState]:
        """Steps from `step` to the end of the stage: dispatch, observe the previous step, roll back, act."""
        self._peak = metrics_lib.PeakFlops(self.stage.model.dtype)
        logging.info("MFU peak per device: %.3g FLOP/s (%s)", self._peak.value, self._peak.source)
        self._progress = metrics_lib.Progress(self.total_steps, start_step=step, desc=self.name)
        self._throughput: dict[int, metrics_lib.Throughput] = {}
        self._last_done = -math.inf  # when the host last saw a step's metrics (observe)
        self._preempt = False
        pending = None  # (step, phase, metrics, t_dispatch) of the step in flight
        while step < self.total_steps or pending is not None:
            current = None
            if step < self.total_steps:
                batch_np = self.stream.next(step)
                if self.config.debug.log_batches:
                    self._log_batch(step, batch_np)
                t0 = time.perf_counter()
                state, metrics = self.step_fn(step, self.stream.phase)(state, self.to_device(batch_np))
                step += 1
                info.tokens += int(np.prod(batch_np["inputs"].shape)) * jax.process_count()
                current = (step, self.stream.phase, metrics, t0)
            save = current is not None and self.save_due(step)
            # pipelined: the previous step's metrics, fetched after this dispatch; before a checkpoint, this
            # step's too, so that the metrics of every checkpointed step are written before its checkpoint
            for observed in [p for p in (pending, current if save else None) if p is not None]:
                self.observe(observed, current[3] if current is not None and observed is pending else None, info)
                first_bad = self.monitor.rollback_from()
                if first_bad is not None:
                    break
            else:
                first_bad = None
            if first_bad is not None:
                jax.block_until_ready(state)
                step, state, info = self.rollback(first_bad, step, info)
                pending = None
                continue
            pending = None if save else current
            if current is not None:
                self.periodic(step, state, info, save)
        return step, state, info

    def _log_batch(self, step: int, batch_np) -> None:
        if jax.process_index() != 0:
            return
        crc = zlib.crc32(np.ascontiguousarray(batch_np["inputs"]).tobytes())
        with open(workdir_lib.batches_path(self.workdir, self.name), "a") as f:
            f.write(json.dumps({"step": step, "crc32": crc}) + "\n")


__all__ = ["Preempted", "ShapeMismatch", "StageRun", "due"]
