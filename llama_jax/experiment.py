"""The experiment config schema: defaults, stage builders, argument parsing and validation.

An experiment (`experiments/NAME.py`, `get_config(arg)`) is an ml_collections ConfigDict:

    seed, model (preset + overrides), tokenizer, data (sources, mixture weights), mesh, sharding_rules,
    checkpoint, eval, sample, spike, log_every_steps, init_from,
    stages: [stage, ...]  run in order; each starts from the previous stage's final parameters.

A stage: name, kind ("pretrain"), phases (batch / sequence-length ramp), steps or tokens, optim, grad_accum,
loss_chunk, and optional per-stage data / model overrides (e.g. a long-context stage with a new RoPE base or
a different mixture). Phases: [{seq_len, global_batch, until_tokens}] — a new compiled step per shape, each
step exactly global_batch x seq_len tokens; a phase ends at the first step at which the stage's cumulative
tokens reach `until_tokens` (the last phase runs to the end of the stage).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import ml_collections

from llama_jax.model import config as model_config

STAGE_KINDS = ("pretrain",)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """`"tiny,steps=50,lr=1e-3"` -> ConfigDict(variant="tiny", steps=50, lr=0.001) with types from defaults.

    The first bare word (if any) is the variant; `key=value` pairs must name a default (typos are errors).
    """
    out = dict(defaults)
    for i, part in enumerate(p for p in (arg or "").split(",") if p):
        if "=" not in part:
            if i == 0 and "variant" in defaults:
                out["variant"] = part
                continue
            raise ValueError(f"config argument {part!r} is not key=value")
        key, value = part.split("=", 1)
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        kind = type(defaults[key])
        if kind is bool:
            out[key] = value.lower() in ("1", "true", "yes", "y")
        elif defaults[key] is None:
            out[key] = value
        else:
            out[key] = kind(value)
    return ml_collections.ConfigDict(out)


def optim(peak_lr: float, warmup_steps: int, decay: str = "cosine", final_lr_ratio: float = 0.1,
          weight_decay: float = 0.1, clip_norm: float = 1.0, b2: float = 0.95) -> dict:
    """Optimizer settings of a stage (`total_steps` is filled from the stage length)."""
    return dict(peak_lr=peak_lr, warmup_steps=warmup_steps, decay=decay, final_lr_ratio=final_lr_ratio,
                weight_decay=weight_decay, clip_norm=clip_norm, b1=0.9, b2=b2, eps=1e-8, init_lr=0.0)


def phase(seq_len: int, global_batch: int, until_tokens: float | int = 0) -> dict:
    return dict(seq_len=int(seq_len), global_batch=int(global_batch), until_tokens=int(until_tokens))


def stage(name: str, phases: Iterable[dict], optim_cfg: dict, steps: int = 0, tokens: float | int = 0,
          kind: str = "pretrain", grad_accum: int = 1, loss_chunk: int = 0, model_overrides: dict | None = None,
          data: dict | None = None) -> dict:
    """A stage; give its length as `steps` or `tokens` (converted to whole steps through the phases)."""
    return dict(name=name, kind=kind, phases=list(phases), steps=int(steps), tokens=int(tokens),
                optim=dict(optim_cfg), grad_accum=grad_accum, loss_chunk=loss_chunk,
                model_overrides=dict(model_overrides or {}), data=dict(data or {}))


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every experiment."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(preset="tiny", dtype="float32", param_dtype="float32", remat="none",
                                             attention="auto", scan_layers=True))
    c.tokenizer = ""  # path to a Meta tokenizer.model; "" = the embedded default tokenizer (trained, cached)
    # cache_dir: where the embedded corpus and default tokenizer are built ("" = <workdir>/data_cache).
    # host_shards: logical training-data shards split among the processes (0 = the process count when a stage
    # starts); fixed for the stage by its checkpoints, so a restart may use any process count dividing it.
    c.data = ml_collections.ConfigDict(dict(sources=[], shuffle=True, num_workers=0, worker_buffer_size=2,
                                            cache_dir="", host_shards=0))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, context=1, tensor=1))
    c.sharding_rules = "fsdp"
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=100, keep=3, keep_every=0, async_save=True))
    c.eval = ml_collections.ConfigDict(dict(every_steps=100, batches=4, global_batch=0))
    c.sample = ml_collections.ConfigDict(dict(prompts=["def "], max_new_tokens=48, temperature=0.8, top_p=0.95,
                                              seed=0))
    # Loss-spike / fault handling: `max_bad_steps` bad steps (non-finite, or loss > spike_factor x its running
    # mean when spike_factor > 0) within `window` steps roll back to the last good checkpoint and skip the data
    # seen since then.
    c.spike = ml_collections.ConfigDict(dict(max_bad_steps=3, window=50, spike_factor=0.0, max_rollbacks=5))
    c.log_every_steps = 10
    c.init_from = ""  # another run's stage checkpoint directory: params only, for the first stage
    # Testing aids: log a CRC of every batch; a NaN loss the first time each listed step runs (steps counted as
    # in the metrics, from 1); stop a stage early after max_steps without changing its schedule.
    c.debug = ml_collections.ConfigDict(dict(log_batches=False, nan_at_steps=[], max_steps=0))
    c.stages = []
    return c


def stage_steps(st: Any) -> tuple[int, list[tuple[int, int, int]]]:
    """(total steps, [(first_step, seq_len, global_batch) per phase]) of a stage, tokens converted exactly."""
    phases = list(st["phases"])
    if not phases:
        raise ValueError(f"stage {st['name']!r} has no phases (seq_len / global_batch)")
    bounds, step, tokens = [], 0, 0
    target_steps, target_tokens = int(st["steps"]), int(st["tokens"])
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


def validate(c: ml_collections.ConfigDict) -> None:
    """Checks the whole experiment before any work starts; errors name the offending key."""
    if not c.stages:
        raise ValueError("config.stages is empty: an experiment needs at least one stage")
    names = [s["name"] for s in c.stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique, got {names}")
    model_config.get(c.model.preset)
    for st in c.stages:
        if st["kind"] not in STAGE_KINDS:
            raise ValueError(f"stage {st['name']!r}: unknown kind {st['kind']!r}; known: {STAGE_KINDS}")
        stage_steps(st)
        model_cfg = resolve_model(c, st)
        for ph in st["phases"]:
            if ph["seq_len"] > model_cfg.max_seq_len:
                raise ValueError(f"stage {st['name']!r}: seq_len {ph['seq_len']} exceeds the model's max_seq_len "
                                 f"{model_cfg.max_seq_len}")
        sources = (st["data"] or {}).get("sources", c.data.sources)
        if not sources:
            raise ValueError(f"stage {st['name']!r}: no data sources (config.data.sources is empty)")
        _check_sources(sources)


def _check_sources(sources) -> None:
    import glob
    import os
    for s in sources:
        if s.get("kind", "corpus") == "corpus":
            continue
        path = s.get("path")
        if not path or not (os.path.exists(path) or glob.glob(path)):
            raise FileNotFoundError(f"data source {s.get('name')!r}: path {path!r} does not exist")


def resolve_model(c: ml_collections.ConfigDict, st: Any = None) -> model_config.ModelConfig:
    """The ModelConfig of a stage: preset + experiment-wide fields + the stage's overrides."""
    fields = {k: v for k, v in c.model.to_dict().items() if k != "preset"}
    if st is not None:
        fields.update(dict(st["model_overrides"]))
    return model_config.get(c.model.preset, **fields)
