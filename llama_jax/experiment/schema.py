"""The experiment schema: `resolve(config, kinds) -> [Stage]`, the typed stages the driver runs.

An experiment (`experiments/NAME.py`, `get_config(arg)`, built from `experiment.builders`) is an ml_collections
ConfigDict:

    seed, model (preset + overrides), tokenizer, data (sources, mixture weights), mesh, sharding_rules,
    checkpoint, eval, sample, spike, log_every_steps, init_from,
    stages: [stage, ...]  run in order; each starts from the previous stage's final parameters.

A stage: name, kind, phases (batch / sequence-length ramp), steps or tokens, optim, grad_accum, loss_chunk
(positions per chunk of the fused output-head loss; 0: full logits; -1, the default: the platform's choice,
`resolve_chunk`), optional per-stage data / model overrides (e.g. a long-context stage with a new RoPE
base or a different mixture), an optional `checkpoint` override (`every_steps`, `keep`: the stage's own
cadence and retention; without it the kind's `checkpoint_plan`, by default the run's `config.checkpoint`) and
the kind's `options`, parsed once into the kind's typed options (`experiment.options`). Phases: [{seq_len,
global_batch, until_tokens[, weights]}]: a new compiled step per shape, each step exactly global_batch x seq_len
tokens; a phase ends at the first step at which the stage's cumulative tokens reach `until_tokens` (the last
phase runs to the end of the stage); `weights` ({source name: weight}) changes those sources' mixture weights
for the phase, in the stage's one document stream. A kind that trains nothing (`trains = False`: rejection sampling, averaging) takes no
steps or tokens.

`kinds` is the table of stage kinds (`llama_jax.stages.KINDS`, or a test's own): name -> kind object with
`trains`, `parse_options(stage, raw)`, `check(stage)` (see `llama_jax.train.kind.StageKind`). Nothing here
imports JAX at module import.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import types
from typing import Any, Mapping

import ml_collections

from llama_jax.experiment import options as options_lib
from llama_jax.experiment import parallelism
from llama_jax.model import config as model_config
from llama_jax.sharding import schedule as schedule_lib

STAGE_KEYS = ("name", "kind", "phases", "steps", "tokens", "optim", "grad_accum", "loss_chunk", "model_overrides",
              "data", "checkpoint", "options")
# what a stage's `checkpoint` may override: key -> minimum (the meaning of each is in INTERVALS)
STAGE_CHECKPOINT_KEYS = {"every_steps": 0, "keep": 1}
PHASE_KEYS = ("seq_len", "global_batch", "until_tokens", "weights")
# (config path, minimum, what 0 means or None where 0 is not allowed)
INTERVALS = (
    ("checkpoint.every_steps", 0, "no periodic checkpoints"),
    ("checkpoint.keep", 1, None),
    ("checkpoint.keep_every", 0, "none kept beyond `keep`"),
    ("eval.every_steps", 0, "no periodic evaluation"),
    ("eval.batches", 0, "no evaluation"),
    ("log_every_steps", 0, "no periodic metrics rows"),
    ("spike.window", 1, None),
    ("spike.max_bad_steps", 1, None),
    ("spike.max_rollbacks", 0, "no rollback: fail at the first spike"),
    ("sample.max_new_tokens", 0, "no samples"),
)


# Optimizer settings of a stage (the engine's `train.optim` builds AdamW and the schedule from them).
@dataclasses.dataclass(frozen=True)
class OptimConfig:
    peak_lr: float = 3e-4
    warmup_steps: int = 2000
    total_steps: int = 100_000  # steps of the schedule (warm-up included)
    decay: str = "cosine"  # cosine | linear | constant
    final_lr_ratio: float = 0.1  # floor = final_lr_ratio * peak_lr (Llama 3 405B: 8e-7 / 8e-5 = 0.01)
    init_lr: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0

    @classmethod
    def from_dict(cls, d) -> "OptimConfig":
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown optimizer setting(s) {sorted(unknown)}")
        return cls(**d)


# Positions per chunk when a stage leaves `loss_chunk` at -1, by platform. The fused loss is faster and leaner than
# full logits on CPU (benchmarks/README.md, "Train throughput": 1.50x at chunk 128) and on an H200 (the "GPU"
# section: 1.06x and 0.82x peak memory at chunk 512 for Llama 3.2 1B). TPUs keep full logits until measured there;
# the paper-scale experiments set their own chunk.
DEFAULT_CHUNK = {"cpu": 128, "gpu": 512}


def resolve_chunk(loss_chunk: int, platform: str | None = None) -> int:
    """A stage's `loss_chunk` made concrete: -1 means `DEFAULT_CHUNK` for `platform` (default: JAX's backend),
    0 full logits; a positive value is returned as it is."""
    if loss_chunk != -1:
        return int(loss_chunk)
    if platform is None:
        import jax  # noqa: PLC0415 - the backend of this process; only asked when a stage leaves the chunk to it
        platform = jax.default_backend()
    return DEFAULT_CHUNK.get(platform, 0)


@dataclasses.dataclass(frozen=True)
class Phase:
    """One batch shape of a stage: steps [first_step, next phase's first_step) use global_batch x seq_len."""

    first_step: int
    seq_len: int
    global_batch: int
    # the mixture weights this phase changes ({source name: weight}; the others keep the stage's data weights)
    weights: Mapping[str, float] = dataclasses.field(default_factory=lambda: types.MappingProxyType({}))

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.global_batch


@dataclasses.dataclass(frozen=True)
class Stage:
    """A resolved stage: everything the driver needs, typed and validated (see `resolve`).

    `init_source` says where the stage starts when it has no checkpoint of its own: `"previous:<stage>"`,
    `"init_from:<path>"` or `"scratch"`. `optim.total_steps` is the schedule length (`schedule_steps`, by
    default the stage's length). `data` is the stage's data config (read-only mapping, the pipeline's keys).
    `options` is the kind's typed options (a frozen dataclass, `experiment.options`). `checkpoint_every` /
    `checkpoint_keep`: the stage's checkpoint cadence (0 = only its last step) and retention (the newest kept).
    """

    index: int
    name: str
    kind: str
    model: model_config.ModelConfig
    optim: OptimConfig
    data: Mapping[str, Any]
    phases: tuple[Phase, ...]
    total_steps: int
    grad_accum: int
    loss_chunk: int  # resolved for this process's platform (`resolve_chunk`)
    init_source: str
    seed: int
    options: options_lib.StageOptions = options_lib.StageOptions()
    # the stage's `loss_chunk` as configured (-1: the platform's choice; the planner resolves it for the platform
    # it plans)
    loss_chunk_setting: int = -1
    # how the train step is pipelined (stages = mesh.pipe; 1: not pipelined)
    pipeline: schedule_lib.PipelineConfig = schedule_lib.PipelineConfig()
    checkpoint_every: int = 0  # both set by `resolve`
    checkpoint_keep: int = 1
    # the stage whose data stream this one continues (its own index unless option continue_data is set)
    stream_index: int = -1
    # the global batches of every phase of every stage sharing this stage's data stream (they fix its default
    # number of logical data shards, `data.hosts.default_shards`)
    stream_batches: tuple[int, ...] = ()

    @property
    def schedule_steps(self) -> int:
        return self.optim.total_steps

    def phase_at(self, step: int) -> int:
        """Index of the phase that runs step `step` (0-based: the step that takes the state from step to step+1)."""
        return max(i for i, p in enumerate(self.phases) if p.first_step <= step)

    def iterator_seed(self) -> int:
        """The seed of the stage's one data stream (all its phases share it; a stage that continues the previous
        stage's stream, option `continue_data`, shares that stream's seed)."""
        index = self.stream_index if self.stream_index >= 0 else self.index
        return (self.seed * 1_000_003 + index * 1009) % (2 ** 31)

    @property
    def previous(self) -> str | None:
        """The earlier stage this one starts from (`init_source` "previous:<name>"), or None."""
        origin, _, name = self.init_source.partition(":")
        return name if origin == "previous" else None

    @property
    def carry_optimizer(self) -> bool:
        """Option `carry_optimizer`: start from the previous stage's optimizer state."""
        return self.options.carry_optimizer and self.previous is not None

    @property
    def continue_data(self) -> bool:
        """Option `continue_data`: continue the previous stage's document stream."""
        return self.options.continue_data and self.previous is not None


def stage_steps(st: Any, trains: bool = True) -> tuple[int, list[tuple[int, int, int]]]:
    """(total steps, [(first_step, seq_len, global_batch) per phase]) of a stage, tokens converted exactly.

    A stage of a kind that trains nothing has 0 steps and its first phase only (the shape it evaluates at)."""
    _check_keys(st)
    phases = list(st["phases"])
    if not phases:
        raise ValueError(f"stage {st['name']!r} has no phases (seq_len / global_batch)")
    bounds, step, tokens = [], 0, 0
    target_steps, target_tokens = int(st.get("steps", 0)), int(st.get("tokens", 0))
    if not trains:
        if target_steps or target_tokens:
            raise ValueError(f"stage {st['name']!r} ({st.get('kind')}) trains nothing: give it no steps or tokens "
                             f"(got steps={target_steps}, tokens={target_tokens})")
        if phases[0]["seq_len"] <= 0 or phases[0]["global_batch"] <= 0:
            raise ValueError(f"stage {st['name']!r} phase 0: seq_len and global_batch must be positive")
        return 0, [(0, phases[0]["seq_len"], phases[0]["global_batch"])]
    if (target_steps > 0) == (target_tokens > 0):
        raise ValueError(f"stage {st['name']!r}: give exactly one of steps={target_steps} / tokens={target_tokens}")
    for i, ph in enumerate(phases):
        per_step = ph["seq_len"] * ph["global_batch"]
        if per_step <= 0:
            raise ValueError(f"stage {st['name']!r} phase {i}: seq_len and global_batch must be positive")
        bounds.append((step, ph["seq_len"], ph["global_batch"]))
        last = i == len(phases) - 1
        until = None if last else int(ph["until_tokens"])
        if until is not None and until <= tokens:
            raise ValueError(f"stage {st['name']!r} phase {i}: until_tokens={until} does not increase")
        if target_steps:
            n = target_steps - step if until is None else min(math.ceil((until - tokens) / per_step),
                                                              target_steps - step)
        else:
            end = target_tokens if until is None else min(until, target_tokens)
            n = max(math.ceil((end - tokens) / per_step), 0)
        step += n
        tokens += n * per_step
        if (target_steps and step >= target_steps) or (target_tokens and tokens >= target_tokens):
            break
    return step, bounds


def _check_keys(st: Any) -> None:
    name = st.get("name", "?") if hasattr(st, "get") else "?"
    unknown = sorted(set(st) - set(STAGE_KEYS))
    if unknown:
        raise ValueError(f"stage {name!r}: unknown key(s) {unknown}; known: {list(STAGE_KEYS)}")
    missing = [k for k in ("name", "phases", "optim") if k not in st]
    if missing:
        raise ValueError(f"stage {name!r}: missing key(s) {missing}")
    for i, ph in enumerate(st["phases"]):
        bad = sorted(set(ph) - set(PHASE_KEYS))
        if bad:
            raise ValueError(f"stage {name!r} phase {i}: unknown key(s) {bad}; known: {list(PHASE_KEYS)}")


def _get(c: ml_collections.ConfigDict, path: str):
    node = c
    for part in path.split("."):
        node = node[part]
    return node


def check_intervals(c: ml_collections.ConfigDict) -> None:
    """Every interval / count setting is an integer >= its minimum (see INTERVALS); errors name the key."""
    for path, minimum, zero in INTERVALS:
        value = _get(c, path)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            meaning = f" (0 = {zero})" if zero else ""
            raise ValueError(f"config.{path}={value!r} must be an integer >= {minimum}{meaning}")


def _stage_checkpoint(st: Any) -> dict:
    """A stage's own `checkpoint` settings, checked: each key in STAGE_CHECKPOINT_KEYS, an integer >= its minimum."""
    own = dict(st["checkpoint"])
    unknown = sorted(set(own) - set(STAGE_CHECKPOINT_KEYS))
    if unknown:
        raise ValueError(f"stage {st['name']!r}: unknown checkpoint key(s) {unknown}; known: "
                         f"{list(STAGE_CHECKPOINT_KEYS)}")
    for key, minimum in STAGE_CHECKPOINT_KEYS.items():
        value = own.get(key, minimum)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"stage {st['name']!r}: checkpoint.{key}={value!r} must be an integer >= {minimum}")
    return own


def _optim_config(st: Any, total_steps: int, trains: bool) -> OptimConfig:
    d = dict(st["optim"])
    schedule = int(d.pop("schedule_steps", 0) or 0)
    if schedule < 0:
        raise ValueError(f"stage {st['name']!r}: optim.schedule_steps={schedule} must be >= 0 (0 = the stage's "
                         f"length)")
    try:
        # A stage shorter than its warm-up keeps the warm-up's schedule length (it ends during the warm-up).
        length = schedule or max(total_steps, int(d.get("warmup_steps", 0)))
        cfg = OptimConfig.from_dict(dict(d, total_steps=length))
    except ValueError as e:
        raise ValueError(f"stage {st['name']!r}: {e}") from None
    if cfg.total_steps < cfg.warmup_steps:
        raise ValueError(f"stage {st['name']!r}: optim.schedule_steps={cfg.total_steps} is shorter than its "
                         f"warm-up ({cfg.warmup_steps} steps)")
    if trains and not (cfg.peak_lr > 0 and cfg.warmup_steps >= 0 and 0 <= cfg.final_lr_ratio <= 1
                       and cfg.weight_decay >= 0 and cfg.clip_norm >= 0):
        raise ValueError(f"stage {st['name']!r}: optim needs peak_lr > 0, warmup_steps >= 0, final_lr_ratio in "
                         f"[0, 1], weight_decay >= 0 and clip_norm >= 0; got peak_lr={cfg.peak_lr}, warmup_steps="
                         f"{cfg.warmup_steps}, final_lr_ratio={cfg.final_lr_ratio}, weight_decay={cfg.weight_decay}, "
                         f"clip_norm={cfg.clip_norm}")
    return cfg


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """A resolved stage's read-only data config as plain dicts and lists (for the data pipeline)."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


def resolve(c: ml_collections.ConfigDict, kinds: Mapping[str, Any]) -> list[Stage]:
    """The experiment's stages, typed and validated once; errors name the offending key or stage.

    `kinds`: the table of stage kinds (name -> kind; `llama_jax.stages.KINDS`)."""
    if not c.stages:
        raise ValueError("config.stages is empty: an experiment needs at least one stage")
    for st in c.stages:
        _check_keys(st)
    names = [s["name"] for s in c.stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique, got {names}")
    if options_lib.START_FROM_INIT in names:
        raise ValueError(f"stage name {options_lib.START_FROM_INIT!r} is reserved (options.start_from="
                         f"{options_lib.START_FROM_INIT!r} names config.init_from); rename that stage")
    model_config.get(c.model.preset)
    check_intervals(c)
    stages = []
    for index, st in enumerate(c.stages):
        st = dict(st)
        st.setdefault("kind", "pretrain")
        for key, default in (("steps", 0), ("tokens", 0), ("grad_accum", 1), ("loss_chunk", -1),
                             ("model_overrides", {}), ("data", {}), ("checkpoint", {}), ("options", {})):
            st.setdefault(key, default)
        if st["kind"] not in kinds:
            raise ValueError(f"stage {st['name']!r}: unknown kind {st['kind']!r}; known: {tuple(kinds)}")
        kind = kinds[st["kind"]]
        total, bounds = stage_steps(st, kind.trains)
        model_cfg = resolve_model(c, st)
        for _, seq_len, _ in bounds:
            if seq_len > model_cfg.max_seq_len:
                raise ValueError(f"stage {st['name']!r}: seq_len {seq_len} exceeds the model's max_seq_len "
                                 f"{model_cfg.max_seq_len}")
            cp = int(c.mesh.get("context", 1))
            if cp > 1 and (seq_len < cp or seq_len % (2 * cp)):
                raise ValueError(f"stage {st['name']!r}: seq_len {seq_len} cannot be split over mesh.context={cp}: "
                                 f"context parallelism needs a multiple of 2 x context = {2 * cp}")
        if int(st["grad_accum"]) < 1:
            raise ValueError(f"stage {st['name']!r}: grad_accum={st['grad_accum']} must be >= 1")
        if int(st["loss_chunk"]) < -1:
            raise ValueError(f"stage {st['name']!r}: loss_chunk={st['loss_chunk']} must be >= 0 (0: full logits), "
                             "or -1 for the platform's default")
        pipe = parallelism.pipeline_config(c)
        if pipe.stages > 1:
            parallelism.check_stage(st, pipe, model_cfg, bounds)
        data = c.data.to_dict()
        unknown_data = sorted(set(st["data"]) - set(data))
        if unknown_data:
            raise ValueError(f"stage {st['name']!r}: unknown data key(s) {unknown_data}; known: {sorted(data)}")
        data.update(dict(st["data"]))
        if not data.get("sources"):
            raise ValueError(f"stage {st['name']!r}: no data sources (config.data.sources is empty)")
        data["sources"] = _check_sources(data)
        if index > 0:
            init_source = f"previous:{names[index - 1]}"
        elif c.init_from:
            init_source = f"init_from:{init_directory(c.init_from, c.get('init_stage', ''))}"
        else:
            init_source = "scratch"
        options = kind.parse_options(st["name"], dict(st["options"]))
        if options.start_from == options_lib.START_FROM_INIT:  # the run's starting model (config.init_from)
            if not c.init_from:
                raise ValueError(f"stage {st['name']!r}: options.start_from={options.start_from!r} needs "
                                 "config.init_from (the model the run starts from)")
            init_source = f"init_from:{init_directory(c.init_from, c.get('init_stage', ''))}"
        elif options.start_from:
            if options.start_from not in names[:index]:
                raise ValueError(f"stage {st['name']!r}: options.start_from={options.start_from!r} is not an earlier "
                                 f"stage; earlier stages: {names[:index]}")
            init_source = f"previous:{options.start_from}"
        for ref in options_lib.references(options):
            if ref not in names[:index]:
                raise ValueError(f"stage {st['name']!r}: its options read stage {ref!r}, which is not an earlier "
                                 f"stage; earlier stages: {names[:index]}")
        stage = Stage(index=index, name=st["name"], kind=st["kind"], model=model_cfg,
                      optim=_optim_config(st, total, kind.trains), data=_freeze(data),
                      phases=_phases(st, bounds, data["sources"]),
                      total_steps=total, grad_accum=int(st["grad_accum"]),
                      loss_chunk=resolve_chunk(int(st["loss_chunk"])), loss_chunk_setting=int(st["loss_chunk"]),
                      init_source=init_source, seed=int(c.seed), options=options, stream_index=index,
                      pipeline=pipe,
                      checkpoint_every=int(c.checkpoint.every_steps), checkpoint_keep=int(c.checkpoint.keep))
        own = _stage_checkpoint(st)
        every, keep = (own.get("every_steps", stage.checkpoint_every), own.get("keep", stage.checkpoint_keep)) \
            if own else kind.checkpoint_plan(stage)
        stage = dataclasses.replace(stage, checkpoint_every=int(every), checkpoint_keep=int(keep))
        if stage.continue_data:
            stage = dataclasses.replace(stage, stream_index=stages[names.index(stage.previous)].stream_index)
        kind.check(stage)
        stages.append(stage)
    streams: dict[int, list[int]] = {}
    for stage in stages:
        streams.setdefault(stage.stream_index, []).extend(p.global_batch for p in stage.phases)
    return [dataclasses.replace(s, stream_batches=tuple(streams[s.stream_index])) for s in stages]


def _phases(st: Any, bounds: list[tuple[int, int, int]], sources) -> tuple[Phase, ...]:
    """The stage's typed phases; a phase's mixture `weights` must name the stage's sources (checked here)."""
    from llama_jax.data import sources as sources_lib  # noqa: PLC0415 - the table of source kinds (no JAX)

    out = []
    for i, (first, seq_len, batch) in enumerate(bounds):
        weights = dict(st["phases"][i].get("weights") or {})
        try:
            sources_lib.reweighted(sources, weights)
        except ValueError as e:
            raise ValueError(f"stage {st['name']!r} phase {i}: {e}") from None
        out.append(Phase(first, seq_len, batch, types.MappingProxyType(weights)))
    return tuple(out)


def init_directory(init_from: str, init_stage: str = "") -> str:
    """The checkpoint directory `config.init_from` names: a stage checkpoint directory as it is, or, for another
    run's workdir, the checkpoints of its stage `init_stage` ("" = its last stage with a checkpoint; init_stage
    applies to a workdir only); errors name what is missing."""
    from llama_jax import workdir as workdir_lib  # noqa: PLC0415 - paths only

    if not os.path.isdir(init_from):
        raise FileNotFoundError(f"config.init_from={init_from!r} does not exist")
    if not workdir_lib.is_workdir(init_from):  # a checkpoint directory: init_stage has nothing to choose from
        return init_from
    stage = init_stage
    if not stage:
        names = [s["name"] for s in workdir_lib.read_config(init_from).stages
                 if os.path.isdir(workdir_lib.checkpoints_dir(init_from, s["name"]))]
        if not names:
            raise FileNotFoundError(f"config.init_from={init_from!r} has no stage checkpoint")
        stage = names[-1]
    directory = workdir_lib.checkpoints_dir(init_from, stage)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"config.init_from={init_from!r} has no checkpoints of stage {stage!r} ({directory})")
    return directory


def prepare(c: ml_collections.ConfigDict) -> None:
    """Writes the files the run generates before it starts (`config.prepare`); each call must be idempotent (the
    driver calls this at every start, before `resolve`, which then finds the files)."""
    import importlib  # noqa: PLC0415

    for i, item in enumerate(c.get("prepare", [])):
        call = str(item.get("call", ""))
        module, _, name = call.partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            raise ValueError(f"config.prepare[{i}].call={call!r} is not an importable 'package.module:function'") \
                from None
        fn(**dict(item.get("kwargs", {})))


def _check_sources(data: Mapping[str, Any]) -> list[dict]:
    """The data config's sources with `data.paths` applied; every given path must exist. A source left for the
    user to map (named in `data.paths`, still empty) passes: `plan` needs no data, and the run stops before
    building anything until it is given (`train.driver.check_inputs`)."""
    from llama_jax.data import sources as sources_lib  # noqa: PLC0415 - the table of source kinds (no JAX)

    sources = sources_lib.with_paths(data["sources"], data.get("paths"))
    unmapped = set(sources_lib.unmapped(data))
    for s in sources:
        if s.get("kind", "corpus") in sources_lib.BUILTIN or s.get("name") in unmapped:  # no files / not yet given
            continue
        path = s.get("path")
        if not path or not (os.path.exists(path) or glob.glob(path)):
            raise FileNotFoundError(f"data source {s.get('name')!r}: path {path!r} does not exist")
    return sources


def resolve_model(c: ml_collections.ConfigDict, st: Any = None) -> model_config.ModelConfig:
    """The ModelConfig of a stage: preset + experiment-wide fields + the stage's overrides."""
    fields = {k: v for k, v in c.model.to_dict().items() if k != "preset"}
    if st is not None:
        fields.update(dict(st["model_overrides"]))
    return model_config.get(c.model.preset, **fields)
