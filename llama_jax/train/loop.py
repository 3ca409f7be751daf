"""The experiment driver: runs an experiment's stages in order, with checkpoints, evaluation and recovery.

This is the one module that wires model, data, sharding and checkpointing together.

Resume order for a stage (first that applies):
  1. the stage's own checkpoints in the workdir (newest that restores cleanly; a corrupted one is moved aside);
  2. the previous stage's final parameters (later stages);
  3. `config.init_from` (first stage; another run's checkpoint directory, params only);
  4. scratch (random init from `config.seed`).
A finished stage leaves `<workdir>/stages/<name>/DONE.json` and is skipped on restart.

Fault handling: the step skips any update whose loss or gradient is not finite. On the host, `spike.max_bad_steps`
bad steps within `spike.window` steps roll the run back to the last checkpoint before the first bad step and
skip the data window consumed since that checkpoint (logged, and recorded in the checkpoint metadata).
SIGTERM (preemption) saves a checkpoint at the next step boundary and exits.
"""

from __future__ import annotations

import collections
import json
import math
import os
import shutil
import signal
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from llama_jax import experiment
from llama_jax.data import corpus as corpus_lib
from llama_jax.data import hosts
from llama_jax.data import pipeline
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.model.config import ModelConfig
from llama_jax.sharding import mesh as mesh_lib
from llama_jax.sharding import rules as rules_lib
from llama_jax.train import checkpoint as ckpt_lib
from llama_jax.train import metrics as metrics_lib
from llama_jax.train import step as step_lib
from llama_jax.train.optim import OptimConfig


_PROGRESS_KEYS = ("loss", "learning_rate", "grad_norm", "tokens_per_s", "mfu")


class Preempted(SystemExit):
    """Raised after a SIGTERM-triggered checkpoint was written."""


def load_tokenizer(c: ml_collections.ConfigDict, workdir: str) -> Tokenizer:
    """The run's tokenizer (config.tokenizer, or the embedded default one), also copied to
    `<workdir>/tokenizer.model` so that the workdir is a self-contained checkpoint for `llama_jax.generate`."""
    if c.tokenizer:
        if not os.path.exists(c.tokenizer):
            raise FileNotFoundError(f"config.tokenizer: {c.tokenizer!r} does not exist")
        path = c.tokenizer
    else:
        cache = data_cache_dir(c, workdir)
        corpus_lib.default_tokenizer(cache)  # trains and caches it on first use
        path = os.path.join(corpus_lib.corpus_dir(cache), f"tokenizer-{corpus_lib.DEFAULT_BPE_RANKS}.model")
    target = os.path.join(workdir, "tokenizer.model")
    if jax.process_index() == 0 and not os.path.exists(target):
        shutil.copyfile(path, target + ".tmp")
        os.replace(target + ".tmp", target)
    return Tokenizer.from_file(path)


def data_cache_dir(c: ml_collections.ConfigDict, workdir: str) -> str:
    return c.data.cache_dir or os.path.join(workdir, "data_cache")


def stage_dir(workdir: str, name: str) -> str:
    return os.path.join(workdir, "stages", name)


def run_experiment(c: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
    """Runs (or resumes) every stage of the experiment `c` in `workdir`. Returns each stage's final metrics."""
    experiment.validate(c)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(c.to_json_best_effort(indent=1, sort_keys=True))
    mesh = mesh_lib.make_mesh(c.mesh.to_dict())
    rules = rules_lib.get_rules(c.sharding_rules)
    tokenizer = load_tokenizer(c, workdir)
    logging.info("mesh %s, rules %s, %d devices (%s)", dict(mesh.shape), c.sharding_rules, jax.device_count(),
                 jax.devices()[0].device_kind)
    results = {}
    previous = None
    with metrics_lib.MetricWriter(workdir) as writer:
        for index, st in enumerate(c.stages):
            sdir = stage_dir(workdir, st["name"])
            done = os.path.join(sdir, "DONE.json")
            if os.path.exists(done):
                logging.info("stage %r already finished; skipping", st["name"])
                with open(done) as f:
                    results[st["name"]] = json.load(f)
            else:
                results[st["name"]] = StageRunner(c, st, index, workdir, previous, mesh, rules, tokenizer,
                                                  writer).run()
            previous = sdir
    return results


class StageRunner:
    """Trains one stage. Holds the compiled steps (one per batch shape), checkpoints and host-side counters."""

    def __init__(self, c, st, index: int, workdir: str, previous_stage: str | None, mesh, rules,
                 tokenizer: Tokenizer, writer):
        self.c, self.st, self.index, self.workdir = c, st, index, workdir
        self.previous_stage, self.mesh, self.rules, self.tokenizer, self.writer = (previous_stage, mesh, rules,
                                                                                   tokenizer, writer)
        self.name = st["name"]
        self.dir = stage_dir(workdir, self.name)
        self.model_cfg: ModelConfig = experiment.resolve_model(c, st)
        if tokenizer.n_words > self.model_cfg.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.n_words} ids but model {self.model_cfg.name!r} has "
                             f"vocab_size {self.model_cfg.vocab_size}")
        self.total_steps, self.phases = experiment.stage_steps(st)
        divisor = mesh_lib.batch_divisor(mesh) * int(st["grad_accum"])
        for _, seq_len, batch in self.phases:
            if batch % divisor:
                raise ValueError(f"stage {self.name!r}: global batch {batch} is not divisible by the {divisor} "
                                 f"data-parallel devices x grad_accum of mesh {dict(mesh.shape)}")
        if c.debug.max_steps:
            self.total_steps = min(self.total_steps, int(c.debug.max_steps))
        schedule_steps = max(experiment.stage_steps(st)[0], int(st["optim"]["warmup_steps"]))
        self.optim_cfg = OptimConfig.from_dict({**dict(st["optim"]), "total_steps": schedule_steps})
        data = c.data.to_dict()
        data.update(dict(st["data"]))
        data["cache_dir"] = data_cache_dir(c, workdir)
        self.data_cfg = data
        ck = c.checkpoint
        self.ckpts = ckpt_lib.StageCheckpoints(os.path.join(self.dir, "checkpoints"), keep=ck.keep,
                                               keep_every=ck.keep_every or None, async_save=ck.async_save)
        self.steps: dict[tuple[int, int], Any] = {}
        self.eval_steps: dict[tuple[int, int], Any] = {}
        self._sigterm = False
        self._injected: set[int] = set()  # debug.nan_at_steps already injected (each only once)

    # ------------------------------------------------------------------------------------------ helpers

    def phase_at(self, step: int) -> int:
        return max(i for i, (first, _, _) in enumerate(self.phases) if first <= step)

    def make_iterator(self, phase: int):
        _, seq_len, batch = self.phases[phase]
        seed = (int(self.c.seed) * 1_000_003 + self.index * 1009 + phase) % (2 ** 31)
        return hosts.make_train_iterator(self.data_cfg, self.tokenizer, seq_len, batch, seed,
                                         num_shards=int(self.data_cfg.get("host_shards", 0) or 0))

    def compiled_step(self, phase: int, poisoned: bool = False):
        key = (phase, int(poisoned))
        if key not in self.steps:
            fn = step_lib.make_train_step(self.model_cfg, self.optim_cfg, int(self.st["grad_accum"]),
                                          loss_fn=self._nan_loss if poisoned else None,
                                          loss_chunk=int(self.st["loss_chunk"]))
            self.steps[key] = step_lib.jit_train_step(fn, self.mesh, self.rules, self.shardings)
        return self.steps[key]

    def _nan_loss(self, params, batch):
        """debug.nan_at_steps: the real loss times NaN, so the loss and every gradient are non-finite."""
        total, count = step_lib.loss_sum(self.model_cfg, params, batch, int(self.st["loss_chunk"]))
        return total * jnp.nan, count

    def to_device(self, batch_np):
        return pipeline.make_global_batch({k: batch_np[k] for k in step_lib.BATCH_KEYS},
                                          mesh_lib.data_sharding(self.mesh))

    # ------------------------------------------------------------------------------------------ restore

    def restore_or_init(self):
        self.abstract = abstract = step_lib.abstract_train_state(self.model_cfg, self.optim_cfg, self.mesh,
                                                                 self.rules)
        self.shardings = jax.tree.map(lambda x: x.sharding, abstract)
        restored = self.ckpts.restore_latest(abstract, lambda meta: self.make_iterator(int(meta.get("phase", 0))))
        if restored is not None:
            step, state, it, meta = restored
            logging.info("stage %r: resumed from its checkpoint at step %d", self.name, step)
            return step, state, it, meta
        params, source = None, "scratch"
        if self.previous_stage is not None:
            params, at = ckpt_lib.load_params(os.path.join(self.previous_stage, "checkpoints"), abstract.params)
            source = f"previous stage {os.path.basename(self.previous_stage)!r} step {at}"
        elif self.c.init_from:
            params, at = ckpt_lib.load_params(self.c.init_from, abstract.params)
            source = f"init_from {self.c.init_from!r} step {at}"
        state, _ = step_lib.init_train_state(self.model_cfg, self.optim_cfg, self.mesh, self.rules,
                                             jax.random.key(int(self.c.seed)), params=params)
        logging.info("stage %r: starting from %s", self.name, source)
        meta = {"phase": 0, "tokens": 0, "skipped_windows": [], "rollbacks": 0, "seed": int(self.c.seed)}
        it = self.make_iterator(0)
        self.ckpts.save(0, state, it, meta)  # a rollback target, and a resumable start for the stage
        return 0, state, it, meta

    # ---------------------------------------------------------------------------------------------- run

    def run(self) -> dict:
        os.makedirs(self.dir, exist_ok=True)
        step, state, it, meta = self.restore_or_init()
        phase = int(meta.get("phase", 0))
        c = self.c
        logging.info("stage %r: %d steps; phases (first step, seq_len, global batch): %s; model %s (%.3gM params)",
                     self.name, self.total_steps, self.phases, self.model_cfg.name,
                     self.model_cfg.param_count() / 1e6)
        peak, peak_src = metrics_lib.device_peak_flops(self.model_cfg.dtype)
        logging.info("MFU peak per device: %.3g FLOP/s (%s)", peak, peak_src)
        progress = metrics_lib.Progress(self.total_steps, start_step=step, desc=self.name)
        bad_steps: collections.deque = collections.deque()
        ema_loss = None
        pending = None  # (step, phase, metrics, t_dispatch) of the step in flight
        previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None
        throughput = {}
        last_eval = None
        try:
            while step < self.total_steps or pending is not None:
                if step < self.total_steps:
                    new_phase = self.phase_at(step)
                    if new_phase != phase:
                        logging.info("stage %r: phase %d -> %d at step %d (seq_len %d, global batch %d)",
                                     self.name, phase, new_phase, step, self.phases[new_phase][1],
                                     self.phases[new_phase][2])
                        phase, it = new_phase, self.make_iterator(new_phase)
                        meta["phase"] = phase
                    batch_np = next(it)
                    if c.debug.log_batches:
                        self._log_batch(step, batch_np)
                    poisoned = step + 1 in list(c.debug.nan_at_steps) and step + 1 not in self._injected
                    if poisoned:
                        self._injected.add(step + 1)
                    t0 = time.perf_counter()
                    state, m = self.compiled_step(phase, poisoned)(state, self.to_device(batch_np))
                    step += 1
                    meta["tokens"] = int(meta["tokens"]) + int(np.prod(batch_np["inputs"].shape)) * jax.process_count()
                    current = (step, phase, m, t0)
                else:
                    current = None
                # Pipelined: fetch the previous step's metrics after the next step was dispatched.
                if pending is not None:
                    p_step, p_phase, p_metrics, p_t0 = pending
                    host = {k: float(v) for k, v in jax.device_get(p_metrics).items()}
                    dt = (current[3] if current else time.perf_counter()) - p_t0
                    if current is None:  # the last step's wall time would include the final save: not timed
                        pass
                    elif p_phase in throughput:  # the first step of a shape includes compilation: not timed
                        host.update(throughput[p_phase].update(int(host["tokens"]), dt))
                    else:
                        throughput[p_phase] = metrics_lib.Throughput(
                            self.model_cfg.flops_per_token(self.phases[p_phase][1]), jax.device_count(), peak)
                    host["perplexity"] = math.exp(min(host["loss"], 50.0))
                    bad = host["nonfinite"] > 0 or (c.spike.spike_factor > 0 and ema_loss is not None
                                                    and host["loss"] > c.spike.spike_factor * ema_loss)
                    if bad:
                        logging.warning("stage %r step %d: bad step (loss %s, grad_norm %s)%s", self.name, p_step,
                                        host["loss"], host["grad_norm"],
                                        "; update skipped" if host["nonfinite"] else "")
                        bad_steps.append(p_step)
                    elif math.isfinite(host["loss"]):
                        ema_loss = host["loss"] if ema_loss is None else 0.9 * ema_loss + 0.1 * host["loss"]
                    while bad_steps and bad_steps[0] <= p_step - int(c.spike.window):
                        bad_steps.popleft()
                    if p_step % int(c.log_every_steps) == 0 or p_step == self.total_steps or bad:
                        self.writer.write_scalars(p_step, host, prefix=f"{self.name}/train")
                    progress.update(p_step, {k: host[k] for k in _PROGRESS_KEYS if k in host})
                    if len(bad_steps) >= int(c.spike.max_bad_steps):
                        if current is not None:
                            jax.block_until_ready(state)
                        step, state, it, meta, phase = self._rollback(bad_steps[0], step, meta)
                        bad_steps.clear()
                        ema_loss = None
                        pending = None
                        continue
                pending = current
                if current is None:
                    break
                if step % int(c.checkpoint.every_steps) == 0 or step == self.total_steps or self._sigterm:
                    self.ckpts.save(step, state, it, dict(meta), force=True)
                if self._sigterm:
                    self.ckpts.wait()
                    raise Preempted(f"SIGTERM: checkpoint saved at step {step} of stage {self.name!r}")
                if int(c.eval.every_steps) and step % int(c.eval.every_steps) == 0 and step < self.total_steps:
                    last_eval = self.evaluate(state, phase, step)
            self.ckpts.wait()
            final = {"step": step, "tokens": int(meta["tokens"]), "skipped_steps": int(jax.device_get(state.skipped)),
                     "rollbacks": int(meta.get("rollbacks", 0))}
            if int(c.eval.batches):
                last_eval = self.evaluate(state, phase, step)
                final.update({f"eval_{k}": v for k, v in last_eval.items()})
            final["samples"] = self.samples(state)
            if jax.process_index() == 0:
                _write_json_atomic(os.path.join(self.dir, "DONE.json"), final)
            logging.info("stage %r finished: %s", self.name, {k: v for k, v in final.items() if k != "samples"})
            return final
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
            self.ckpts.close()

    def _on_sigterm(self, signum, frame):  # noqa: ARG002
        logging.warning("SIGTERM received: saving a checkpoint at the next step boundary")
        self._sigterm = True

    def _rollback(self, first_bad: int, current_step: int, meta: dict):
        """Restores the last checkpoint before `first_bad` and skips the data consumed since it."""
        self.ckpts.wait()
        rollbacks = int(meta.get("rollbacks", 0)) + 1
        if rollbacks > int(self.c.spike.max_rollbacks):
            raise RuntimeError(f"stage {self.name!r}: more than {self.c.spike.max_rollbacks} rollbacks; giving up "
                               f"(bad steps again at step {first_bad})")
        candidates = [s for s in self.ckpts.all_steps() if s < first_bad]
        if not candidates:
            raise RuntimeError(f"stage {self.name!r}: no checkpoint before bad step {first_bad} to roll back to")
        target = candidates[-1]
        it = self.make_iterator(int(self.ckpts.read_meta(target).get("phase", 0)))
        state, meta_saved = self.ckpts.restore(target, self.abstract, it)
        skip = current_step - target
        for _ in range(skip):
            next(it)
        meta_saved["skipped_windows"] = list(meta_saved.get("skipped_windows", [])) + [[target, current_step]]
        meta_saved["rollbacks"] = rollbacks
        meta_saved["tokens"] = int(meta.get("tokens", 0))
        logging.warning("stage %r: %d bad steps from step %d: rolled back to step %d and skipped the %d batches "
                        "of steps %d..%d", self.name, self.c.spike.max_bad_steps, first_bad, target, skip, target,
                        current_step - 1)
        self.writer.write_text(current_step, f"{self.name}/rollback",
                               f"rolled back to step {target}; skipped data of steps {target}..{current_step - 1}")
        for s in [s for s in self.ckpts.all_steps() if s > target]:
            self.ckpts.delete(s)
        return target, state, it, meta_saved, int(meta_saved.get("phase", 0))

    # ---------------------------------------------------------------------------------- eval and samples

    def evaluate(self, state, phase: int, step: int) -> dict:
        _, seq_len, batch = self.phases[phase]
        gb = int(self.c.eval.global_batch) or batch
        key = (seq_len, gb)
        if key not in self.eval_steps:
            self.eval_steps[key] = step_lib.jit_eval_step(self.model_cfg, self.mesh, self.rules, self.shardings.params)
        total = count = 0.0
        for b in pipeline.make_eval_iterator(self.data_cfg, self.tokenizer, seq_len, gb,
                                             num_batches=int(self.c.eval.batches)):
            s, n = jax.device_get(self.eval_steps[key](state.params, self.to_device(b)))
            total, count = total + float(s), count + float(n)
        if count == 0:
            raise ValueError(f"stage {self.name!r}: the evaluation split has no tokens")
        out = {"loss": total / count, "perplexity": math.exp(min(total / count, 50.0)), "tokens": count}
        self.writer.write_scalars(step, out, prefix=f"{self.name}/eval")
        logging.info("stage %r step %d: eval loss %.4f perplexity %.2f (%d tokens)", self.name, step, out["loss"],
                     out["perplexity"], count)
        return out

    def samples(self, state) -> list[str]:
        from llama_jax.infer import sampling  # noqa: PLC0415 - only needed at the end of a stage
        s = self.c.sample
        prompts = list(s.prompts)
        if not prompts or int(s.max_new_tokens) <= 0:
            return []
        ids = [self.tokenizer.encode(p, bos=True) for p in prompts]
        cfg = self.model_cfg.replace(remat="none")
        gen = sampling.generate(cfg, state.params, ids, max_new_tokens=int(s.max_new_tokens),
                                temperature=float(s.temperature), top_p=float(s.top_p), seed=int(s.seed),
                                stop_ids=self.tokenizer.stop_ids)
        texts = [p + self.tokenizer.decode(t) for p, t in zip(prompts, gen.tokens)]
        for t in texts:
            logging.info("stage %r sample:\n%s", self.name, t)
            self.writer.write_text(int(jax.device_get(state.step)), f"{self.name}/sample", t)
        return texts

    def _log_batch(self, step: int, batch_np) -> None:
        if jax.process_index() != 0:
            return
        crc = zlib.crc32(np.ascontiguousarray(batch_np["inputs"]).tobytes())
        with open(os.path.join(self.dir, "batches.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "crc32": crc}) + "\n")


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
