"""The experiment config schema: defaults, stage builders, argument parsing, and `resolve(config) -> [Stage]`.

An experiment (`experiments/NAME.py`, `get_config(arg)`) is an ml_collections ConfigDict:

    seed, model (preset + overrides), tokenizer, data (sources, mixture weights), mesh, sharding_rules,
    checkpoint, eval, sample, spike, log_every_steps, init_from,
    stages: [stage, ...]  run in order; each starts from the previous stage's final parameters.

A stage: name, kind ("pretrain"), phases (batch / sequence-length ramp), steps or tokens, optim, grad_accum,
loss_chunk (positions per chunk of the fused output-head loss; 0: full logits; -1, the default: the platform's
choice, `train.loss.resolve_chunk`), and optional per-stage data / model overrides (e.g. a long-context stage with a new RoPE base or
a different mixture); a kind reads its own settings from the stage's `options` (validated by the kind's
`options` hook; two options of the long_context and anneal kinds are read by the driver when the stage
starts from the previous one: `carry_optimizer` (AdamW moments carried over, the LR schedule restarted) and
`continue_data` (the previous stage's document stream continued, no document repeated). Phases:
[{seq_len, global_batch, until_tokens}] — a new compiled step per shape, each
step exactly global_batch x seq_len tokens; a phase ends at the first step at which the stage's cumulative
tokens reach `until_tokens` (the last phase runs to the end of the stage).
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, Iterable, Mapping

import ml_collections

from llama_jax.model import config as model_config
from llama_jax.train import loss as loss_lib
from llama_jax.train.optim import OptimConfig

STAGE_KEYS = ("name", "kind", "phases", "steps", "tokens", "optim", "grad_accum", "loss_chunk", "model_overrides",
              "data", "options")
PHASE_KEYS = ("seq_len", "global_batch", "until_tokens")
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


def _stage_kinds() -> tuple[str, ...]:
    from llama_jax.train import kinds  # noqa: PLC0415 - the registry lives beside the driver
    return kinds.names()


def _stage_kind(name: str):
    from llama_jax.train import kinds  # noqa: PLC0415
    return kinds.get(name)


STAGE_KINDS = ("pretrain", "long_context", "anneal", "sft", "reward", "rejection_sampling", "dpo",
               "average")  # the kinds registered today (see llama_jax.train.kinds.names())


@dataclasses.dataclass(frozen=True)
class Phase:
    """One batch shape of a stage: steps [first_step, next phase's first_step) use global_batch x seq_len."""

    first_step: int
    seq_len: int
    global_batch: int

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.global_batch


@dataclasses.dataclass(frozen=True)
class Stage:
    """A resolved stage: everything the driver needs, typed and validated (see `resolve`).

    `init_source` says where the stage starts when it has no checkpoint of its own: `"previous:<stage>"`,
    `"init_from:<path>"` or `"scratch"`. `optim.total_steps` is the schedule length (`schedule_steps`, by
    default the stage's length). `data` is the stage's data config (read-only mapping, the pipeline's keys).
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
    loss_chunk: int
    init_source: str
    seed: int
    # the kind's own settings (gates, averaging, post-training data), validated by the kind's `options` hook
    options: Mapping[str, Any] = dataclasses.field(default_factory=lambda: types.MappingProxyType({}))
    # the stage whose data stream this one continues (its own index unless option continue_data is set)
    stream_index: int = -1

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
    def carry_optimizer(self) -> bool:
        """Option `carry_optimizer` (long_context, anneal): start from the previous stage's optimizer state."""
        return bool(self.options.get("carry_optimizer", False)) and self.init_source.startswith("previous:")

    @property
    def continue_data(self) -> bool:
        """Option `continue_data` (long_context, anneal): continue the previous stage's document stream."""
        return bool(self.options.get("continue_data", False)) and self.init_source.startswith("previous:")


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
          weight_decay: float = 0.1, clip_norm: float = 1.0, b2: float = 0.95, schedule_steps: int = 0) -> dict:
    """Optimizer settings of a stage.

    `schedule_steps` is the length of the LR schedule (warm-up included); 0 = the stage's length. The paper
    decays over 1,200,000 steps while its 15.6T tokens at the batch ramp take about 1.1M steps, so the paper
    variants set it. Common practice, not given by the paper for the flagship runs: AdamW β1 0.9 / β2 0.95,
    ε 1e-8, gradient clipping at global norm 1.0, and weight decay 0.1 (the paper gives weight decay only for
    its scaling-law runs: 0.1 x the current LR, which is what optax's decoupled decay does).
    """
    return dict(peak_lr=peak_lr, warmup_steps=warmup_steps, decay=decay, final_lr_ratio=final_lr_ratio,
                weight_decay=weight_decay, clip_norm=clip_norm, b1=0.9, b2=b2, eps=1e-8, init_lr=0.0,
                schedule_steps=int(schedule_steps))


def phase(seq_len: int, global_batch: int, until_tokens: float | int = 0) -> dict:
    return dict(seq_len=int(seq_len), global_batch=int(global_batch), until_tokens=int(until_tokens))


def stage(name: str, phases: Iterable[dict], optim_cfg: dict, steps: int = 0, tokens: float | int = 0,
          kind: str = "pretrain", grad_accum: int = 1, loss_chunk: int = -1, model_overrides: dict | None = None,
          data: dict | None = None, options: dict | None = None) -> dict:
    """A stage; give its length as `steps` or `tokens` (converted to whole steps through the phases)."""
    out = dict(name=name, kind=kind, phases=list(phases), steps=int(steps), tokens=int(tokens),
               optim=dict(optim_cfg), grad_accum=grad_accum, loss_chunk=loss_chunk,
               model_overrides=dict(model_overrides or {}), data=dict(data or {}))
    if options:
        out["options"] = dict(options)
    return out


def data_value_probe(start_from: str, sources: list[dict], new_source: dict, weight: float, phases: list[dict],
                     optim_cfg: dict, steps: int, average_last: int = 1) -> list[dict]:
    """The data-value probe (Llama 3 section 3.1.3: anneal a half-trained model with a new dataset at a given
    share of the mix and compare with the same anneal without it): two `anneal` stages, both starting from
    the final checkpoint of stage `start_from` (optimizer and data stream continued) with the same phases,
    optimizer (give `decay="linear", final_lr_ratio=0.0`), length and seed:

        probe_base   `sources` as they are, plus `new_source` at weight 0 (not trained on, still evaluated)
        probe_new    `sources` scaled to 1 - weight, plus `new_source` at `weight`

    Both evaluate on the same held-out data (every source's eval split, the new one's included). Add the
    returned stages after `start_from` in an experiment's `stages`;
    `llama_jax.train.long_context.data_value_report` compares them."""
    if not 0.0 < float(weight) < 1.0:
        raise ValueError(f"data-value probe: weight={weight} must be in (0, 1)")
    names = [s["name"] for s in sources]
    if new_source["name"] in names:
        raise ValueError(f"data-value probe: the new source {new_source['name']!r} is already one of {names}")
    total = sum(float(s.get("weight", 1.0)) for s in sources)
    base = [dict(s) for s in sources] + [dict(new_source, weight=0.0)]
    new = ([dict(s, weight=float(s.get("weight", 1.0)) / total * (1.0 - float(weight))) for s in sources]
           + [dict(new_source, weight=float(weight))])
    options = dict(average_last=int(average_last), start_from=start_from)
    return [stage(name, phases, optim_cfg, steps=steps, kind="anneal", options=options, data=dict(sources=mix))
            for name, mix in (("probe_base", base), ("probe_new", new))]


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
    # Testing aids: log a CRC of every batch; stop a stage early after max_steps without changing its schedule;
    # fault injection (llama_jax.train.faults): a NaN loss the first time each listed step runs (steps counted as
    # in the metrics, from 1), NaN parameters saved in the listed steps' checkpoints.
    c.debug = ml_collections.ConfigDict(dict(log_batches=False, nan_at_steps=[], max_steps=0,
                                             nan_params_in_checkpoints=[]))
    c.stages = []
    return c


def stage_steps(st: Any) -> tuple[int, list[tuple[int, int, int]]]:
    """(total steps, [(first_step, seq_len, global_batch) per phase]) of a stage, tokens converted exactly."""
    _check_keys(st)
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


def _optim_config(st: Any, total_steps: int) -> OptimConfig:
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


def resolve(c: ml_collections.ConfigDict) -> list[Stage]:
    """The experiment's stages, typed and validated once; errors name the offending key or stage."""
    if not c.stages:
        raise ValueError("config.stages is empty: an experiment needs at least one stage")
    for st in c.stages:
        _check_keys(st)
    names = [s["name"] for s in c.stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique, got {names}")
    model_config.get(c.model.preset)
    check_intervals(c)
    kinds = _stage_kinds()
    stages = []
    for index, st in enumerate(c.stages):
        st = dict(st)
        st.setdefault("kind", "pretrain")
        for key, default in (("steps", 0), ("tokens", 0), ("grad_accum", 1), ("loss_chunk", -1),
                             ("model_overrides", {}), ("data", {}), ("options", {})):
            st.setdefault(key, default)
        if st["kind"] not in kinds:
            raise ValueError(f"stage {st['name']!r}: unknown kind {st['kind']!r}; known: {kinds}")
        total, bounds = stage_steps(st)
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
        data = c.data.to_dict()
        unknown_data = sorted(set(st["data"]) - set(data))
        if unknown_data:
            raise ValueError(f"stage {st['name']!r}: unknown data key(s) {unknown_data}; known: {sorted(data)}")
        data.update(dict(st["data"]))
        if not data.get("sources"):
            raise ValueError(f"stage {st['name']!r}: no data sources (config.data.sources is empty)")
        _check_sources(data["sources"])
        if index > 0:
            init_source = f"previous:{names[index - 1]}"
        elif c.init_from:
            init_source = f"init_from:{c.init_from}"
        else:
            init_source = "scratch"
        options = _stage_kind(st["kind"]).options(st["name"], dict(st["options"]), total)
        start_from = options.get("start_from", "")
        if start_from:
            if start_from not in names[:index]:
                raise ValueError(f"stage {st['name']!r}: options.start_from={start_from!r} is not an earlier "
                                 f"stage; earlier stages: {names[:index]}")
            init_source = f"previous:{start_from}"
        references = getattr(_stage_kind(st["kind"]), "stage_references", None)
        for ref in references(options) if references else ():
            if ref not in names[:index]:
                raise ValueError(f"stage {st['name']!r}: its options read stage {ref!r}, which is not an earlier "
                                 f"stage; earlier stages: {names[:index]}")
        stream_index = index
        if options.get("continue_data") and init_source.startswith("previous:"):
            stream_index = stages[names.index(init_source.partition(":")[2])].stream_index
        stages.append(Stage(index=index, name=st["name"], kind=st["kind"], model=model_cfg,
                            optim=_optim_config(st, total), data=_freeze(data),
                            phases=tuple(Phase(first, seq_len, batch) for first, seq_len, batch in bounds),
                            total_steps=total, grad_accum=int(st["grad_accum"]),
                            loss_chunk=loss_lib.resolve_chunk(int(st["loss_chunk"])),
                            init_source=init_source, seed=int(c.seed), options=_freeze(options),
                            stream_index=stream_index))
        _check_options(stages[-1])
    return stages


def _check_options(st: Stage) -> None:
    """Checks of a kind's options that need the resolved stage (lengths, the model); errors name the stage."""
    from llama_jax.train import kinds  # noqa: PLC0415
    check = getattr(kinds.get(st.kind), "check_options", None)
    if check is not None:
        check(st)


def validate(c: ml_collections.ConfigDict) -> None:
    """Checks the whole experiment before any work starts (`resolve`); errors name the offending key."""
    resolve(c)


def given_knobs(arg: str | None) -> set[str]:
    """The `key=value` knob names given in a config argument string."""
    return {part.split("=", 1)[0] for part in (arg or "").split(",") if "=" in part}


def check_knobs(arg: str | None, variant: str, used: Iterable[str]) -> None:
    """Refuses a knob the variant does not use (it would be silently ignored); the error names it."""
    unused = sorted(given_knobs(arg) - set(used))
    if unused:
        raise ValueError(f"variant {variant!r} does not use config argument(s) {unused}; it uses "
                         f"{sorted(set(used)) or 'none'}")


def _check_sources(sources) -> None:
    import glob
    import os
    for s in sources:
        if s.get("kind", "corpus") in ("corpus", "passkey"):  # built in, no files
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
