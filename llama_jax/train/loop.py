"""The experiment driver: runs an experiment's typed stages in order, shared by every stage kind.

This is the one module that wires model, data, sharding and checkpointing together. `run_experiment` resolves
the config once (`experiment.resolve`), checks it against the workdir, and runs each unfinished stage with a
`StageRun`, whose loop is a few named parts: `restore_or_init`, `StageStream` (the stage's one data stream),
the compiled step, `SpikeMonitor` (bad steps -> rollback), periodic actions (`due`: checkpoint, metrics, eval),
the SIGTERM flag (`Preemption`) and `finish` (the kind's final eval and outputs, DONE.json). What a stage
trains on and how it is evaluated comes from its kind (`llama_jax.train.kinds`).

Resume order for a stage (first that applies):
  1. the stage's own checkpoints in the workdir: the newest that restores (one that fails to restore is moved
     aside once an older one restored; if none restores the run stops and names each and why, unless
     `start_over`); a checkpoint whose arrays have other shapes than the config is never "corrupt": the run
     stops and names the tensors;
  2. the parameters the stage's kind provides (`StageKind.initial_params`; e.g. `average`: a weighted mean of
     checkpoints), for kinds that provide them;
  3. the previous stage's final parameters (later stages);
  4. `config.init_from` (first stage; another run's checkpoint directory, params only);
  5. scratch (random init from `config.seed`).
A finished stage leaves `<workdir>/stages/<name>/DONE.json` and is skipped on restart. A config whose defining
keys (`workdir.DEFINING_KEYS`) differ from the workdir's `config.json` is refused, naming the keys, unless
`allow_config_change`; `config.json` is rewritten only when a stage then runs.

Fault handling: the step skips any update whose loss or gradient is not finite. On the host, `spike.max_bad_steps`
bad steps within `spike.window` steps roll the run back to the last checkpoint before the first bad step and
skip the data consumed since that checkpoint; if the bad steps come back after a rollback to a checkpoint
before any newer one was written, that checkpoint reproduces the fault and the next rollback walks back past it.
SIGTERM (preemption) saves a checkpoint at the next step boundary and exits; one that arrives during a stage's
final evaluation or samples stops the run after the stage is recorded as finished, before the next stage.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time
import zlib
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from llama_jax import experiment
from llama_jax import workdir as workdir_lib
from llama_jax.data import batch as batch_lib
from llama_jax.data import corpus as corpus_lib
from llama_jax.data import hosts
from llama_jax.data import pipeline
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.model import context_parallel
from llama_jax.sharding import mesh as mesh_lib
from llama_jax.sharding import rules as rules_lib
from llama_jax.train import checkpoint as ckpt_lib
from llama_jax.train import kinds as kinds_lib
from llama_jax.train import metrics as metrics_lib
from llama_jax.train import optim as optim_lib
from llama_jax.train import step as step_lib

_PROGRESS_KEYS = ("loss", "learning_rate", "grad_norm", "tokens_per_s", "mfu")


class Preempted(SystemExit):
    """Raised after a SIGTERM: the stage's checkpoint (or its DONE.json) was written."""


def due(step: int, every: int) -> bool:
    """A periodic action at `step` every `every` steps; `every` 0 = never."""
    return every > 0 and step % every == 0


def load_tokenizer(c: ml_collections.ConfigDict, workdir: str) -> Tokenizer:
    """The run's tokenizer (config.tokenizer, or the embedded default one), also copied to
    `<workdir>/tokenizer.model` so that the workdir is a self-contained checkpoint for `llama_jax.generate`."""
    if c.tokenizer:
        if not os.path.exists(c.tokenizer):
            raise FileNotFoundError(f"config.tokenizer: {c.tokenizer!r} does not exist")
        path = c.tokenizer
    else:
        cache = workdir_lib.data_cache_dir(workdir, c.data.cache_dir)
        corpus_lib.default_tokenizer(cache)  # trains and caches it on first use
        path = os.path.join(corpus_lib.corpus_dir(cache), f"tokenizer-{corpus_lib.DEFAULT_BPE_RANKS}.model")
    target = workdir_lib.tokenizer_path(workdir)
    if jax.process_index() == 0 and not os.path.exists(target):
        shutil.copyfile(path, target + ".tmp")
        os.replace(target + ".tmp", target)
    return Tokenizer.from_file(path)


class Preemption:
    """The SIGTERM flag, installed for the whole experiment (main thread only)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _on_sigterm(self, signum, frame):  # noqa: ARG002
        logging.warning("SIGTERM received: saving a checkpoint at the next step boundary")
        self.requested = True


def run_experiment(c: ml_collections.ConfigDict, workdir: str, allow_config_change: bool = False,
                   start_over: bool = False) -> dict[str, dict]:
    """Runs (or resumes) every stage of the experiment `c` in `workdir`. Returns each stage's final metrics.

    allow_config_change: resume although the config's defining keys differ from the workdir's config.json
      (the checkpoints must still have the config's shapes).
    start_over: when none of a stage's checkpoints restores, move them aside and start the stage again.
    """
    stages = experiment.resolve(c)
    workdir = os.path.abspath(workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"workdir {workdir!r} exists and is not a directory")
    os.makedirs(workdir, exist_ok=True)
    config_current = _check_workdir_config(c, workdir, allow_config_change)
    mesh = mesh_lib.make_mesh(c.mesh.to_dict())
    rules = rules_lib.get_rules(c.sharding_rules)
    tokenizer = load_tokenizer(c, workdir)
    logging.info("mesh %s, rules %s, %d devices (%s)", dict(mesh.shape), c.sharding_rules, jax.device_count(),
                 jax.devices()[0].device_kind)
    run_class = StageRun
    if list(c.debug.nan_at_steps) or list(c.debug.get("nan_params_in_checkpoints", [])):
        from llama_jax.train import faults  # noqa: PLC0415 - test aids, outside the production loop
        run_class = faults.FaultyStageRun
    results = {}
    with metrics_lib.MetricWriter(workdir) as writer, Preemption() as preemption:
        for stage in stages:
            done = workdir_lib.read_done(workdir, stage.name)
            if done is not None:
                logging.info("stage %r already finished; skipping", stage.name)
                results[stage.name] = done
                continue
            if not config_current and jax.process_index() == 0:
                workdir_lib.write_config(workdir, c)
                config_current = True
            run = run_class(c, stage, workdir, mesh, rules, tokenizer, writer, preemption, start_over)
            results[stage.name] = run.run()
    return results


def _check_workdir_config(c, workdir: str, allow_config_change: bool) -> bool:
    """Refuses a config whose defining keys differ from the workdir's; True when config.json matches `c`."""
    if not os.path.exists(workdir_lib.config_path(workdir)):
        return False
    try:
        stored = workdir_lib.read_config(workdir)
    except (ValueError, OSError) as e:
        raise ValueError(f"workdir {workdir!r}: {workdir_lib.CONFIG} is unreadable ({e})") from None
    differences = workdir_lib.config_differences(stored, c)
    if differences and not allow_config_change:
        shown = "; ".join(differences[:8]) + ("; ..." if len(differences) > 8 else "")
        raise ValueError(f"the config differs from the one workdir {workdir!r} was trained with: {shown}. Use a "
                         "new workdir, or pass --allow_config_change to resume with it")
    return not differences and stored.to_json_best_effort(sort_keys=True) == c.to_json_best_effort(sort_keys=True)


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

    def __init__(self, kind: kinds_lib.StageKind, ctx: kinds_lib.StageContext):
        self.kind, self.ctx = kind, ctx
        self.sources = [s["name"] for s in ctx.data_cfg["sources"]]
        self.phase, self.iterator, self.num_shards = -1, None, 0
        self.start: dict[int, list[int]] = {}  # local shard -> per source: first document of this phase
        self.consumed: dict[int, list[int]] = {}  # local shard -> per source: last document used (-1 = none)

    def default_shards(self) -> int:
        return int(self.ctx.data_cfg.get("host_shards", 0) or 0) or jax.process_count()

    def open(self, phase: int, num_shards: int, start: list[list[int]] | None = None,
             consumed: list[list[int]] | None = None) -> hosts.ShardedTrainIterator:
        """Opens phase `phase` over `num_shards` shards; `start` / `consumed` have one row per shard (all shards,
        in shard order; None = from the beginning / nothing consumed)."""
        n = len(self.sources)
        if start is not None and len(start) != num_shards:
            raise ValueError(f"data stream state has {len(start)} shard rows, expected {num_shards}")
        p = self.ctx.stage.phases[phase]

        def factory(shard: int, shards: int):
            ctx = dataclasses.replace(self.ctx, data_shard=(shard, shards))
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
            logging.info("stage %r: phase %d -> %d at step %d (seq_len %d, global batch %d)", self.ctx.stage.name,
                         self.phase, phase, step, p.seq_len, p.global_batch)
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


class SpikeMonitor:
    """Counts bad steps (non-finite, or loss > spike_factor x its running mean) in a sliding window."""

    def __init__(self, max_bad_steps: int, window: int, spike_factor: float):
        self.max_bad_steps, self.window, self.spike_factor = max_bad_steps, window, spike_factor
        self.reset()

    def reset(self) -> None:
        self.bad_steps: collections.deque = collections.deque()
        self.ema_loss = None

    def observe(self, step: int, loss: float, nonfinite: bool) -> bool:
        """Records step `step`; True if it was bad."""
        bad = nonfinite or (self.spike_factor > 0 and self.ema_loss is not None
                            and loss > self.spike_factor * self.ema_loss)
        if bad:
            self.bad_steps.append(step)
        elif math.isfinite(loss):
            self.ema_loss = loss if self.ema_loss is None else 0.9 * self.ema_loss + 0.1 * loss
        while self.bad_steps and self.bad_steps[0] <= step - self.window:
            self.bad_steps.popleft()
        return bad

    def rollback_from(self) -> int | None:
        """The first bad step of the window when a rollback is due, else None."""
        return self.bad_steps[0] if len(self.bad_steps) >= self.max_bad_steps else None


class StageRun:
    """Trains one stage: the shared driver. Holds the compiled steps (one per batch shape), the checkpoints
    and the host-side counters."""

    def __init__(self, c, stage: experiment.Stage, workdir: str, mesh, rules, tokenizer: Tokenizer, writer,
                 preemption: Preemption, start_over: bool = False):
        self.c, self.stage, self.workdir, self.mesh, self.rules = c, stage, workdir, mesh, rules
        self.tokenizer, self.writer, self.preemption, self.start_over = tokenizer, writer, preemption, start_over
        self.name, self.dir = stage.name, workdir_lib.stage_dir(workdir, stage.name)
        if tokenizer.n_words > stage.model.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.n_words} ids but model {stage.model.name!r} has "
                             f"vocab_size {stage.model.vocab_size}")
        divisor = mesh_lib.batch_divisor(mesh) * stage.grad_accum
        for p in stage.phases:
            if p.global_batch % divisor:
                raise ValueError(f"stage {self.name!r}: global batch {p.global_batch} is not divisible by the "
                                 f"{divisor} data-parallel devices x grad_accum of mesh {dict(mesh.shape)}")
        self.total_steps = stage.total_steps
        if c.debug.max_steps:
            self.total_steps = min(self.total_steps, int(c.debug.max_steps))
        data_cfg = experiment.thaw(stage.data)
        data_cfg["cache_dir"] = workdir_lib.data_cache_dir(workdir, c.data.cache_dir)
        self.kind = kinds_lib.get(stage.kind)
        self.ctx = kinds_lib.StageContext(stage=stage, config=c, tokenizer=tokenizer, mesh=mesh, rules=rules,
                                          writer=writer, data_cfg=data_cfg, to_device=self.to_device,
                                          eval_step=self._eval_step, workdir=workdir)
        self.stream = StageStream(self.kind, self.ctx)
        ck = c.checkpoint
        self.ckpts = ckpt_lib.StageCheckpoints(os.path.join(self.dir, "checkpoints"), keep=ck.keep,
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
            fn = step_lib.make_train_step(self.stage.model, self.stage.optim, self.stage.grad_accum,
                                          loss_fn=loss_fn or self.kind.loss_fn(self.ctx),
                                          loss_chunk=self.stage.loss_chunk)
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
        info.phase, info.data_shards = self.stream.phase, self.stream.num_shards
        info.phase_start, info.consumed = self.stream.gathered()
        self.ckpts.save(step, state, self.stream.iterator, info.to_json(), force=force)

    def _restore(self, step: int, abstract) -> tuple[Any, StageState]:
        info = StageState.from_json(self.ckpts.read_meta(step))
        if not info.data_shards or len(info.phase_start) != info.data_shards:
            raise ValueError(f"checkpoint {step} has no data stream state of its {info.data_shards} data shards")
        iterator = self.stream.open(info.phase, info.data_shards, info.phase_start, info.consumed)
        state, meta = self.ckpts.restore(step, abstract, iterator)
        return state, StageState.from_json(meta)

    def _shape_mismatch(self, step: int) -> str:
        try:
            stored = self.ckpts.state_shapes(step)
        except Exception:  # noqa: BLE001 - unreadable metadata: the restore below reports it
            return ""
        want = {ckpt_lib.path_names(k): tuple(v.shape)
                for k, v in jax.tree_util.tree_leaves_with_path(self.abstract)}
        diffs = [f"{k} {stored[k]} vs {want[k]}" for k in want if k in stored and stored[k] != want[k]]
        return ", ".join(diffs[:4]) + (", ..." if len(diffs) > 4 else "")

    def restore_or_init(self) -> tuple[int, Any, StageState]:
        self.abstract = step_lib.abstract_train_state(self.stage.model, self.stage.optim, self.mesh, self.rules)
        self.shardings = jax.tree.map(lambda x: x.sharding, self.abstract)
        failures = []
        for step in reversed(self.ckpts.all_steps()):
            mismatch = self._shape_mismatch(step)
            if mismatch:
                raise ValueError(f"stage {self.name!r}: checkpoint {self.ckpts.directory}/{step} holds arrays of "
                                 f"other shapes than the config's model (checkpoint vs config: {mismatch}); it was "
                                 f"written with another model config: use a new workdir")
            try:
                state, info = self._restore(step, self.abstract)
            except hosts.ReshardError:  # the checkpoint is fine; this process count cannot split its data
                raise
            except Exception as e:  # noqa: BLE001 - any read failure means this checkpoint is unusable
                failures.append((step, f"{type(e).__name__}: {ckpt_lib.first_line(e)}"))
                logging.warning("stage %r: checkpoint %s/%d does not restore (%s)", self.name,
                                self.ckpts.directory, step, failures[-1][1])
                continue
            for bad, _ in failures:
                self.ckpts.quarantine(bad)
            logging.info("stage %r: resumed from its checkpoint at step %d", self.name, step)
            return step, state, info
        if failures:
            listed = "; ".join(f"{self.ckpts.directory}/{s}: {why}" for s, why in failures)
            if not self.start_over:
                raise ValueError(f"stage {self.name!r}: none of its checkpoints restores ({listed}); nothing was "
                                 "changed. Pass --start_over to move them aside and train the stage again")
            logging.warning("stage %r: no checkpoint restores (%s); moved aside, starting over", self.name, listed)
            for bad, _ in failures:
                self.ckpts.quarantine(bad)
        params, source, opt_state, rows = None, "scratch", None, None
        origin, _, where = self.stage.init_source.partition(":")
        provided = self.kind.initial_params(self.ctx, self.abstract.params)
        if provided is not None:
            params, source = provided
        elif origin == "previous":
            items = {"params": self.abstract.params}
            if self.stage.carry_optimizer:
                items["opt_state"] = self.abstract.opt_state
            loaded, at, meta = ckpt_lib.load_state_items(workdir_lib.checkpoints_dir(self.workdir, where), items,
                                                         with_meta=self.stage.continue_data)
            params, opt_state = loaded["params"], loaded.get("opt_state")
            source = f"previous stage {where!r} step {at}" + (" with its optimizer state" if opt_state else "")
            if self.stage.continue_data:
                rows = self._continued_stream(where, at, meta)
        elif origin == "init_from":
            params, at = ckpt_lib.load_params(where, self.abstract.params)
            source = f"init_from {where!r} step {at}"
        state, _ = step_lib.init_train_state(self.stage.model, self.stage.optim, self.mesh, self.rules,
                                             jax.random.key(self.stage.seed), params=params)
        if opt_state is not None:  # the moments carried over; the new stage's LR schedule starts at its step 0
            state = state.replace(opt_state=jax.device_put(optim_lib.restart_schedule(opt_state),
                                                           self.shardings.opt_state))
        logging.info("stage %r: starting from %s", self.name, source)
        info = StageState(seed=self.stage.seed)
        self.stream.open(0, len(rows) if rows is not None else self.stream.default_shards(), rows)
        self.save(0, state, info)  # a rollback target, and a resumable start for the stage
        return 0, state, info

    def _continued_stream(self, previous: str, at: int, meta: dict) -> list[list[int]]:
        """Where this stage's stream starts (per data shard, per source) when it continues the previous stage's:
        each source shared with it resumes after the last document the previous stage used; a new source starts
        at its beginning."""
        info = StageState.from_json(meta)
        if not info.data_shards or len(info.consumed) != info.data_shards:
            raise ValueError(f"stage {self.name!r}: option continue_data, but checkpoint {at} of stage {previous!r} "
                             "records no data stream position")
        prev = next(s for s in experiment.resolve(self.c) if s.name == previous)
        names = [s["name"] for s in prev.data["sources"]]
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
        if due(p_step, int(self.c.log_every_steps)) or p_step == self.total_steps or bad:
            self.writer.write_scalars(p_step, host, prefix=f"{self.name}/train")
        self._progress.update(p_step, {k: host[k] for k in _PROGRESS_KEYS if k in host})

    def rollback(self, first_bad: int, current_step: int, info: StageState) -> tuple[int, Any, StageState]:
        """Restores the last checkpoint before `first_bad` (walking back past one that just reproduced the
        fault, and past one that does not restore) and skips the data consumed since it."""
        self.ckpts.wait()
        rollbacks = info.rollbacks + 1
        if rollbacks > int(self.c.spike.max_rollbacks):
            raise RuntimeError(f"stage {self.name!r}: more than {self.c.spike.max_rollbacks} rollbacks; giving up "
                               f"(bad steps again at step {first_bad})")
        candidates = [s for s in self.ckpts.all_steps() if s < first_bad]
        if candidates and candidates[-1] == info.last_rollback_target:
            logging.warning("stage %r: the bad steps came back after the rollback to step %d before any newer "
                            "checkpoint: walking back past it", self.name, candidates[-1])
            candidates.pop()
        while candidates:
            target = candidates.pop()
            try:
                state, restored = self._restore(target, self.abstract)
                break
            except Exception as e:  # noqa: BLE001
                logging.warning("stage %r: rollback target %d does not restore (%s: %s); trying the previous one",
                                self.name, target, type(e).__name__, ckpt_lib.first_line(e))
                self.ckpts.quarantine(target)
        else:
            raise RuntimeError(f"stage {self.name!r}: no usable checkpoint before bad step {first_bad} to roll "
                               "back to")
        for step in range(target, current_step):  # the data of the bad window is skipped, phase changes included
            self.stream.next(step)
        restored.skipped_windows = list(restored.skipped_windows) + [[target, current_step]]
        restored.rollbacks, restored.tokens, restored.last_rollback_target = rollbacks, info.tokens, target
        logging.warning("stage %r: %d bad steps from step %d: rolled back to step %d and skipped the %d batches "
                        "of steps %d..%d", self.name, self.c.spike.max_bad_steps, first_bad, target,
                        current_step - target, target, current_step - 1)
        self.writer.write_text(current_step, f"{self.name}/rollback",
                               f"rolled back to step {target}; skipped data of steps {target}..{current_step - 1}")
        for s in [s for s in self.ckpts.all_steps() if s > target]:
            self.ckpts.delete(s)
        self.monitor.reset()
        return target, state, restored

    def periodic(self, step: int, state, info: StageState) -> None:
        """Checkpoint, preemption and evaluation after step `step` was dispatched."""
        if due(step, int(self.c.checkpoint.every_steps)) or step == self.total_steps or self.preemption.requested:
            self.save(step, state, dataclasses.replace(info), force=True)
        if self.preemption.requested:
            self.ckpts.wait()
            raise Preempted(f"SIGTERM: checkpoint saved at step {step} of stage {self.name!r}")
        if int(self.c.eval.batches) and due(step, int(self.c.eval.every_steps)) and step < self.total_steps:
            self.evaluate(state, step)

    def evaluate(self, state, step: int) -> dict:
        out = self.kind.evaluate(self.ctx, state.params, self.stream.phase, step)
        self.writer.write_scalars(step, out, prefix=f"{self.name}/eval")
        logging.info("stage %r step %d: eval %s", self.name, step, out)
        return out

    def finish(self, step: int, state, info: StageState) -> dict:
        """The kind's final evaluation and outputs, then DONE.json; a SIGTERM meanwhile stops the run after it."""
        self.ckpts.wait()
        final = {"step": step, "tokens": info.tokens, "skipped_steps": int(jax.device_get(state.skipped)),
                 "rollbacks": info.rollbacks}
        if int(self.c.eval.batches):
            final.update({f"eval_{k}": v for k, v in self.evaluate(state, step).items()})
        final.update(self.kind.finish(self.ctx, state))
        if jax.process_index() == 0:
            workdir_lib.write_json_atomic(workdir_lib.done_path(self.workdir, self.name), final)
        logging.info("stage %r finished: %s", self.name, {k: v for k, v in final.items() if k != "samples"})
        if self.preemption.requested:
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
            self._peak = metrics_lib.PeakFlops(self.stage.model.dtype)
            logging.info("MFU peak per device: %.3g FLOP/s (%s)", self._peak.value, self._peak.source)
            self._progress = metrics_lib.Progress(self.total_steps, start_step=step, desc=self.name)
            self._throughput: dict[int, metrics_lib.Throughput] = {}
            self._last_done = -math.inf  # when the host last saw a step's metrics (observe)
            pending = None  # (step, phase, metrics, t_dispatch) of the step in flight
            while step < self.total_steps or pending is not None:
                current = None
                if step < self.total_steps:
                    batch_np = self.stream.next(step)
                    if self.c.debug.log_batches:
                        self._log_batch(step, batch_np)
                    t0 = time.perf_counter()
                    state, metrics = self.step_fn(step, self.stream.phase)(state, self.to_device(batch_np))
                    step += 1
                    info.tokens += int(np.prod(batch_np["inputs"].shape)) * jax.process_count()
                    current = (step, self.stream.phase, metrics, t0)
                if pending is not None:  # pipelined: the previous step's metrics, fetched after this dispatch
                    self.observe(pending, current[3] if current else None, info)
                    first_bad = self.monitor.rollback_from()
                    if first_bad is not None:
                        jax.block_until_ready(state)
                        step, state, info = self.rollback(first_bad, step, info)
                        pending = None
                        continue
                pending = current
                if current is not None:
                    self.periodic(step, state, info)
            return self.finish(step, state, info)
        finally:
            self.ckpts.close()

    def _log_batch(self, step: int, batch_np) -> None:
        if jax.process_index() != 0:
            return
        crc = zlib.crc32(np.ascontiguousarray(batch_np["inputs"]).tobytes())
        with open(workdir_lib.batches_path(self.workdir, self.name), "a") as f:
            f.write(json.dumps({"step": step, "crc32": crc}) + "\n")


__all__ = ["Preempted", "Preemption", "SpikeMonitor", "StageRun", "StageState", "StageStream", "due",
           "load_tokenizer", "run_experiment"]
