"""Experiment builders: what an experiment file (`experiments/NAME.py`, `get_config(arg)`) composes its config from.

Pure data: nothing here imports JAX or touches a file, so loading a config is cheap and side-effect free.
`base_config()` holds the defaults every experiment shares; `stage`, `phase` and `optim` build one stage of
`config.stages`; `parse_arg` reads the `:variant,key=value` argument of `--config=experiments/NAME.py:ARG`.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import ml_collections


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


def phase(seq_len: int, global_batch: int, until_tokens: float | int = 0,
          weights: Mapping[str, float] | None = None) -> dict:
    """One batch shape of a stage; `weights` ({source name: weight}) changes the named sources' mixture weights
    for this phase only (the others keep the stage's), in the stage's one document stream and LR schedule."""
    out = dict(seq_len=int(seq_len), global_batch=int(global_batch), until_tokens=int(until_tokens))
    if weights:
        out["weights"] = {str(name): float(weight) for name, weight in weights.items()}
    return out


def stage(name: str, phases: Iterable[dict], optim_cfg: dict, steps: int = 0, tokens: float | int = 0,
          kind: str = "pretrain", grad_accum: int = 1, loss_chunk: int = -1, model_overrides: dict | None = None,
          data: dict | None = None, options: dict | None = None, checkpoint: dict | None = None) -> dict:
    """A stage; give its length as `steps` or `tokens` (converted to whole steps through the phases).
    `checkpoint` (`every_steps`, `keep`) overrides the run's cadence and retention for this stage."""
    out = dict(name=name, kind=kind, phases=list(phases), steps=int(steps), tokens=int(tokens),
               optim=dict(optim_cfg), grad_accum=grad_accum, loss_chunk=loss_chunk,
               model_overrides=dict(model_overrides or {}), data=dict(data or {}))
    if checkpoint:
        out["checkpoint"] = dict(checkpoint)
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
    `llama_jax.stages.anneal.data_value_report` compares them."""
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


# Llama 3's pretraining data mix (section 3.1.2: roughly 50% general-knowledge tokens, 25% mathematical and
# reasoning, 17% code and 8% multilingual), by source name.
PAPER_MIX = {"general_knowledge": 0.50, "math_reasoning": 0.25, "code": 0.17, "multilingual": 0.08}


def named_sources(weights: Mapping[str, float]) -> list[dict]:
    """Data sources by name and weight whose files the user gives (`--config.data.paths.<name>=PATH`, see
    `require_files`): ArrayRecord shards of JSON records with a `text` field, what `python -m llama_jax.curate`
    writes (a choice: the one source kind read lazily, by index, as a corpus of trillions of tokens must be).
    Evaluation reads the same files (`eval_split="all"`; ArrayRecord sources are split beforehand)."""
    return [dict(name=name, kind="array_record", path="", text_key="text", split="all", eval_split="all",
                 weight=float(weight)) for name, weight in weights.items()]


def require_files(c: ml_collections.ConfigDict, source_names: Iterable[str]) -> None:
    """Makes `c` a run on the user's files only: Meta's tokenizer.model (`config.tokenizer`, no embedded
    fallback) and the files of each named source (`config.data.paths.<name>`, empty until set). Until all are
    given, `llama_jax.main` stops before building anything, in one line naming each missing knob (plan and
    `experiment.resolve` need none of them)."""
    c.tokenizer_required = True
    c.data.paths = ml_collections.ConfigDict({name: "" for name in source_names})


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every experiment."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(preset="tiny", dtype="float32", param_dtype="float32", remat="none",
                                             attention="auto", scan_layers=True))
    c.tokenizer = ""  # path to a Meta tokenizer.model; "" = the embedded default tokenizer (trained, cached)
    c.tokenizer_required = False  # True: no embedded fallback, the run stops until `tokenizer` is given
    # cache_dir: where the embedded corpus and default tokenizer are built ("" = <workdir>/data_cache).
    # host_shards: logical training-data shards split among the processes (0 = the process count when a stage
    # starts); fixed for the stage by its checkpoints, so a restart may use any process count dividing it.
    # paths: source name -> files, for sources an experiment names and the user maps (`require_files`).
    c.data = ml_collections.ConfigDict(dict(sources=[], shuffle=True, num_workers=0, worker_buffer_size=2,
                                            cache_dir="", host_shards=0, paths={}))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, pipe=1, context=1, tensor=1))
    c.sharding_rules = "fsdp"
    # Pipeline parallelism over mesh.pipe > 1 (llama_jax.model.pipeline): virtual stages per device (interleaving),
    # microbatches per step (0: as many as pipeline stages), schedule "1f1b" or "gpipe", and how many layers fewer
    # the first and the last stage hold (they also run the embedding / the output head).
    c.pipeline = ml_collections.ConfigDict(dict(virtual=1, microbatches=0, schedule="1f1b", lighter_ends=0))
    # The device count the mesh is written for (the planner's default; 0: the devices JAX sees), and whether the
    # run may start although the planner says the step does not fit the devices' memory.
    c.plan_devices = 0
    c.skip_fit_check = False
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=100, keep=3, keep_every=0, async_save=True))
    c.eval = ml_collections.ConfigDict(dict(every_steps=100, batches=4, global_batch=0))
    c.sample = ml_collections.ConfigDict(dict(prompts=["def "], max_new_tokens=48, temperature=0.8, top_p=0.95,
                                              seed=0))
    # Loss-spike / fault handling: `max_bad_steps` bad steps (non-finite, or loss > spike_factor x its running
    # mean when spike_factor > 0) within `window` steps roll back to the last good checkpoint and skip the data
    # seen since then.
    c.spike = ml_collections.ConfigDict(dict(max_bad_steps=3, window=50, spike_factor=0.0, max_rollbacks=5))
    c.log_every_steps = 10
    # The first stage's starting parameters (params only): another run's stage checkpoint directory, or a workdir
    # with init_stage = the stage whose checkpoints to take ("" = its last stage with a checkpoint).
    c.init_from = ""
    c.init_stage = ""
    # Files the run generates before it starts (a task's data), so that loading a config writes nothing: a list of
    # {call: "package.module:function", kwargs: {...}}, each called once when the run starts (experiment.prepare).
    c.prepare = []
    # Testing aids: log a CRC of every batch; stop a stage early after max_steps without changing its schedule.
    c.debug = ml_collections.ConfigDict(dict(log_batches=False, max_steps=0))
    c.stages = []
    return c


def given_knobs(arg: str | None) -> set[str]:
    """The `key=value` knob names given in a config argument string."""
    return {part.split("=", 1)[0] for part in (arg or "").split(",") if "=" in part}


def check_knobs(arg: str | None, variant: str, used: Iterable[str]) -> None:
    """Refuses a knob the variant does not use (it would be silently ignored); the error names it."""
    unused = sorted(given_knobs(arg) - set(used))
    if unused:
        raise ValueError(f"variant {variant!r} does not use config argument(s) {unused}; it uses "
                         f"{sorted(set(used)) or 'none'}")
