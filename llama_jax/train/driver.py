"""The experiment driver: runs an experiment's typed stages in order, shared by every stage kind.

`run_experiment(config, workdir, kinds)` first stops a run whose required files are not given (`check_inputs`),
then resolves the config once (`experiment.resolve(config, kinds)`), checks it
against the workdir, builds the mesh, rules and tokenizer, and runs each unfinished stage with a
`stage_run.StageRun` (the resume order: `train.resume`). A finished stage leaves
`<workdir>/stages/<name>/DONE.json` and is skipped on restart. A config whose defining keys
(`workdir.DEFINING_KEYS`) differ from the workdir's `config.json` is refused, naming the keys, unless
`allow_config_change`; `config.json` is rewritten only when a stage then runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
from typing import Mapping

import jax
import ml_collections
import numpy as np
from absl import logging

from llama_jax import experiment
from llama_jax import workdir as workdir_lib
from llama_jax.data import corpus as corpus_lib
from llama_jax.data import sources as sources_lib
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.sharding import mesh as mesh_lib
from llama_jax.sharding import rules as rules_lib
from llama_jax.train import fit
from llama_jax.train import kind as kind_lib
from llama_jax.train import metrics as metrics_lib
from llama_jax.train.stage_run import Preempted, StageRun


def check_inputs(c: ml_collections.ConfigDict) -> None:
    """Stops a run, before anything is built or written, while a file its config requires is not given: the
    tokenizer when `config.tokenizer_required` (no embedded fallback), and the files of every source named in
    `data.paths` that still has none (the experiment's or a stage's data; `experiment.require_files`). One line
    names everything missing and the knob that sets it."""
    missing = []  # (whether a given tokenizer file exists is checked once `config.prepare` has run: it may write it)
    if c.get("tokenizer_required", False) and not c.tokenizer:
        missing.append("Meta's tokenizer.model (set --config.tokenizer=PATH)")
    data = c.data.to_dict()
    names, kinds = [], set()
    for cfg in [data] + [dict(data, **dict(st.get("data", {}))) for st in c.stages]:
        new = [name for name in sources_lib.unmapped(cfg) if name not in names]
        names += new
        kinds |= {str(e.get("kind")) for e in cfg["sources"] if e.get("name") in new}
    if names:
        missing.append(f"the files of data source{'s' if len(names) > 1 else ''} {', '.join(names)} (set "
                       f"--config.data.paths.<name>=PATH for each: {' / '.join(sorted(kinds))} files)")
    if missing:
        raise ValueError(f"this experiment trains only on files you give, and is missing {'; and '.join(missing)}")


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
    """The SIGTERM flag, installed for the whole experiment (main thread only), and its agreement across the
    processes of a job: a SIGTERM may reach one host first, so every process asks `agreed()` at each step
    boundary, and all of them save the same step and stop."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def agreed(self) -> bool:
        """True on every process once any process received SIGTERM (a collective when there are several)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils  # noqa: PLC0415
        return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))

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


def run_experiment(c: ml_collections.ConfigDict, workdir: str, kinds: Mapping[str, kind_lib.StageKind],
                   allow_config_change: bool = False, start_over: bool = False,
                   stage_run: type[StageRun] = StageRun) -> dict[str, dict]:
    """Runs (or resumes) every stage of the experiment `c` in `workdir`. Returns each stage's final metrics.

    kinds: the table of stage kinds (`llama_jax.stages.KINDS`).
    allow_config_change: resume although the config's defining keys differ from the workdir's config.json
      (the checkpoints must still have the config's shapes).
    start_over: when none of a stage's checkpoints restores, move them aside and start the stage again.
    stage_run: the class that runs a stage (tests substitute one that injects faults).
    """
    kind_lib.check_table(kinds)
    check_inputs(c)
    experiment.prepare(c)
    stages = experiment.resolve(c, kinds)
    for stage in stages:
        if stage.pipeline.stages > 1 and type(kinds[stage.kind]).loss_fn is not kind_lib.StageKind.loss_fn:
            raise ValueError(f"stage {stage.name!r} (kind {stage.kind}) trains its own loss, which does not pipeline: "
                             f"run it with mesh.pipe=1 (mesh.pipe={stage.pipeline.stages} now)")
    if not c.get("skip_fit_check", False):
        fit.check(c, [s for s in stages if workdir_lib.read_done(os.path.abspath(workdir), s.name) is None], kinds)
    workdir = os.path.abspath(workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"workdir {workdir!r} exists and is not a directory")
    os.makedirs(workdir, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if jax.process_index() == 0:
            stack.enter_context(workdir_lib.WorkdirLock(workdir))
        return _run(c, workdir, kinds, stages, allow_config_change, start_over, stage_run)


def _run(c, workdir: str, kinds, stages: list, allow_config_change: bool, start_over: bool, stage_run) -> dict:
    """`run_experiment` once the workdir is this run's."""
    by_name = {s.name: s for s in stages}
    config_current = _check_workdir_config(c, workdir, allow_config_change)
    if not os.path.exists(workdir_lib.config_path(workdir)) and jax.process_index() == 0 and all(
            workdir_lib.read_done(workdir, s.name) is not None for s in stages):
        workdir_lib.write_config(workdir, c)  # a finished workdir that lost its config.json gets it back
        config_current = True
    mesh = mesh_lib.make_mesh(c.mesh.to_dict())
    rules = rules_lib.get_rules(c.sharding_rules)
    tokenizer = load_tokenizer(c, workdir)
    logging.info("mesh %s, rules %s, %d devices (%s)", dict(mesh.shape), c.sharding_rules, jax.device_count(),
                 jax.devices()[0].device_kind)
    for stage in stages:  # every unfinished stage's own data, before anything trains
        if workdir_lib.read_done(workdir, stage.name) is None:
            kinds[stage.kind].check_data(stage)
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
            run = stage_run(c, stage, workdir, mesh, rules, tokenizer, writer, preemption, kinds[stage.kind],
                            previous=by_name.get(stage.previous), start_over=start_over)
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
    if differences and not _trained_anything(workdir, stored):
        logging.warning("workdir %r: nothing was trained with its config.json yet (no stage has a checkpoint); it "
                        "is replaced by this config (%s)", workdir, "; ".join(differences[:4]))
        return False
    if differences and not allow_config_change:
        shown = "; ".join(differences[:8]) + ("; ..." if len(differences) > 8 else "")
        raise ValueError(f"the config differs from the one workdir {workdir!r} was trained with: {shown}. Use a "
                         "new workdir, or pass --allow_config_change to resume with it")
    return not differences and stored.to_json_best_effort(sort_keys=True) == c.to_json_best_effort(sort_keys=True)


def _trained_anything(workdir: str, stored) -> bool:
    """Whether any stage of the stored config has a checkpoint or finished (a first attempt that failed before
    its first checkpoint, e.g. on bad data, trained nothing, and a corrected config may take its place)."""
    from llama_jax.train import checkpoint as ckpt_lib  # noqa: PLC0415

    names = [s["name"] for s in stored.get("stages", [])]
    if os.path.isdir(os.path.join(workdir, workdir_lib.STAGES)):
        names += os.listdir(os.path.join(workdir, workdir_lib.STAGES))
    return any(ckpt_lib.list_steps(workdir_lib.checkpoints_dir(workdir, n))
               or os.path.exists(workdir_lib.done_path(workdir, n)) for n in set(names))


__all__ = ["Preempted", "Preemption", "check_inputs", "load_tokenizer", "run_experiment"]
