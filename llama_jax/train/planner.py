"""Will this config fit on this mesh? Per-device memory, FLOPs and time of one training step, before any run.

Terms, in bytes per device (the largest training phase of a stage):
  * params: the float32 master weights, each divided over the mesh axes its logical axes map to (the
    experiment's rule set: `dp` replicates, `fsdp` splits `embed` over fsdp, `fsdp_tp` also splits heads / FFN /
    vocabulary over tensor; every set splits `embed` over `pipe` too);
  * frozen: models the stage holds beside the one it trains, sharded like it (DPO's reference model);
  * gradients: one float32 copy sharded like the parameters (plus the float32 accumulator with grad_accum > 1);
  * optimizer: AdamW's two moments, sharded like the parameters;
  * update: the optimizer step's temporaries, two parameter-sized float32 buffers (the new moments are built
    beside the old ones, which the step keeps until it knows the update is finite and not skipped);
  * gathered: FSDP's working set, for weights split over `fsdp`: the all-gathered float32 weight (and its cast
    to the compute dtype) for the embedding / head and for one layer at a time;
  * activations: what the backward pass keeps from the forward pass, read from JAX itself
    (`saved_residuals` of the real loss on this device's slice of the batch: batch / (data x fsdp x grad_accum)
    rows, length / context, heads / FFN / vocabulary / tensor), so the remat policy and the attention backend
    are exactly those of the run; plus the backward pass's working set: one layer's recomputed activations
    when a remat policy is set, and the float32 logits gradient (one `loss_chunk` of it with the chunked loss);
    pipelined (mesh.pipe > 1), the inputs each stage keeps for its backward passes and one chunk's backward;
  * pipeline: the layer stack gathered into the stage layout with its gradient accumulator, and the embedding
    and head gathered over `pipe` (`pipeline_terms`). The plan also gives the schedule's bubble fraction (the
    step time is divided by 1 - bubble) and the point-to-point traffic per step.
FLOPs per step are `ModelConfig.flops_per_token(seq_len)` x tokens per step (6N + attention, no remat
recomputation); the time estimate divides them by devices x peak x the stated MFU.

`--compile` (`compile_train_step`) builds the real train step on abstract shapes over simulated CPU devices and
reads XLA's memory analysis (arguments + outputs - donated aliases + temporaries) for comparison. The attention
backend is planned as `attention.choose` resolves it on the planned platform (on CPU, for `--compile`, its CPU
choice), for the run's shapes and context parallelism.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax import experiment
from llama_jax.model import attention as attention_lib
from llama_jax.model import transformer
from llama_jax.model.config import ModelConfig
from llama_jax.sharding import jax_compat
from llama_jax.sharding import mesh as mesh_lib
from llama_jax.sharding import rules as rules_lib
from llama_jax.sharding import schedule as schedule_lib

GIB = 1024 ** 3
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 1024, "mib": 1024 ** 2,
          "gib": GIB, "tib": 1024 ** 4}
TERMS = ("params", "frozen", "gradients", "optimizer", "update", "gathered", "activations", "pipeline")


def parse_bytes(text: str) -> int:
    """"80GiB" / "96 GB" / "1.5e9" -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read a memory size from {text!r}; write e.g. 80GiB, 96GB or 16e9")
    try:
        return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    except ValueError:
        raise ValueError(f"cannot read a memory size from {text!r}; write e.g. 80GiB, 96GB or 16e9") from None


def format_bytes(n: float) -> str:
    for unit, size in (("TiB", 1024 ** 4), ("GiB", GIB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclasses.dataclass(frozen=True)
class Workload:
    """One training step: the model, the mesh it runs on and the shape of its batch."""

    model: ModelConfig
    mesh: Mapping[str, int]  # resolved axis sizes (data, fsdp, context, tensor)
    rules: str
    seq_len: int
    global_batch: int
    grad_accum: int = 1
    loss_chunk: int = 0  # -1: the planned platform's choice (`experiment.resolve_chunk`), resolved by `plan`
    stage: str = ""
    optim: experiment.OptimConfig = experiment.OptimConfig()  # the stage's optimizer (its state is planned)
    pipeline: schedule_lib.PipelineConfig = schedule_lib.PipelineConfig()  # stages = mesh["pipe"]
    frozen_models: int = 0  # models the stage holds beside the trained one (DPO's reference), sharded like it

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.global_batch


def stage_of(c: Any, kinds: Mapping[str, Any], stage: str | None = None) -> experiment.Stage:
    """The typed stage named `stage` of the experiment (`experiment.resolve(c, kinds)`; default: the first
    stage)."""
    stages = experiment.resolve(c, kinds)
    found = [st for st in stages if stage in (None, st.name)]
    if not found:
        raise ValueError(f"no stage named {stage!r}; stages: {[st.name for st in stages]}")
    return found[0]


def workload_from_config(c: Any, devices: int, stage: str | None = None, *, kinds: Mapping[str, Any]) -> Workload:
    """The phase of `stage` (default: the first stage) with the most tokens per step, on `devices` devices;
    `kinds` is the table of stage kinds the experiment is resolved with (`llama_jax.stages.KINDS`)."""
    st = stage_of(c, kinds, stage)
    return stage_workload(c, st, devices, frozen_models=kinds[st.kind].frozen_models)


def stage_workload(c: Any, st: experiment.Stage, devices: int, frozen_models: int = 0) -> Workload:
    """The phase of the resolved stage `st` with the most tokens per step, on `devices` devices (holding
    `frozen_models` more models: the kind's `frozen_models`)."""
    p = max(st.phases, key=lambda p: (p.tokens_per_step, p.seq_len))
    sizes = mesh_lib.resolve_mesh_shape(c.mesh.to_dict(), devices)
    rules_lib.get_rules(c.sharding_rules)
    return Workload(model=st.model, mesh=sizes, rules=c.sharding_rules, seq_len=p.seq_len,
                    global_batch=p.global_batch, grad_accum=st.grad_accum, loss_chunk=st.loss_chunk_setting, stage=st.name,
                    optim=st.optim, pipeline=st.pipeline, frozen_models=frozen_models)


def _axes_size(mesh: Mapping[str, int], axes) -> int:
    if axes is None:
        return 1
    axes = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.get(a, 1) for a in axes)


def _rule_size(w: Workload, name: str) -> int:
    return _axes_size(w.mesh, dict(rules_lib.get_rules(w.rules)).get(name))


def _param_splits(w: Workload):
    """(bytes, split over all axes, split over the axes other than fsdp and pipe, layer-stacked?) per parameter
    tensor."""
    rules = rules_lib.get_rules(w.rules)
    specs = transformer.param_logical_specs(w.model)
    shapes = transformer.param_shapes(w.model)
    out = []
    for spec, shape in zip(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
                           jax.tree.leaves(shapes)):
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules)
        split = other = 1
        for dim, axes in zip(shape.shape, mesh_spec):
            size = _axes_size(w.mesh, axes)
            if dim % size:
                raise ValueError(f"a parameter of shape {shape.shape} cannot be sharded: dimension {dim} is not "
                                 f"divisible by mesh axes {axes} (size {size}) of mesh {dict(w.mesh)}")
            split *= size
            axes = axes if isinstance(axes, tuple) else (axes,) if axes else ()
            other *= _axes_size(w.mesh, tuple(a for a in axes if a not in ("fsdp", "pipe")) or None)
        out.append((shape.size * jnp.dtype(shape.dtype).itemsize, split, other, "layers" in tuple(spec)))
    return out


def param_bytes_per_device(w: Workload) -> int:
    """float32 master parameters on one device, each tensor divided by the mesh axes it is sharded over."""
    return sum(size // split for size, split, _, _ in _param_splits(w))


def gathered_bytes_per_device(w: Workload) -> int:
    """FSDP's working set: a weight split over `fsdp` (or `pipe`) is all-gathered before use; with a compute dtype other
    than the parameters' a cast copy is made too. Counted for the embedding / head (used outside the layer loop)
    and for one layer at a time."""
    per_byte = 1 + (jnp.dtype(w.model.dtype).itemsize / jnp.dtype(w.model.param_dtype).itemsize
                    if w.model.dtype != w.model.param_dtype else 0)
    total = 0.0
    for size, split, other, stacked in _param_splits(w):
        if split == other:  # not split over fsdp: nothing to gather
            continue
        total += per_byte * size / other / (w.model.n_layers if stacked else 1)
    return int(total)


def local_workload(w: Workload, platform: str = "cpu") -> tuple[ModelConfig, int, int]:
    """(model config with this device's slice of heads / FFN / vocabulary, micro-batch rows, length) per device."""
    cfg = w.model
    tp_heads, tp_kv, tp_mlp, tp_vocab = (_rule_size(w, n) for n in ("act_heads", "act_kv_heads", "act_mlp",
                                                                       "act_vocab"))
    dp, ctx = _rule_size(w, "act_batch"), _rule_size(w, "act_length")
    mesh_lib.check_global_batch(w.global_batch, devices=dp, grad_accum=w.grad_accum, mesh=w.mesh)
    rows = w.global_batch // (dp * w.grad_accum)
    if w.seq_len % ctx:
        raise ValueError(f"sequence length {w.seq_len} is not divisible by the context axis ({ctx})")
    # the backend the run itself resolves on `platform` (the same rule, for the same shapes)
    attention = attention_lib.choose(cfg.attention, platform=platform, dtype=cfg.dtype, training=True,
                                     length=w.seq_len, context_parallel=w.mesh.get("context", 1) > 1)
    local = cfg.replace(n_heads=max(cfg.n_heads // tp_heads, 1), n_kv_heads=max(cfg.n_kv_heads // tp_kv, 1),
                        head_dim=cfg.resolved_head_dim, ffn_dim_override=max(cfg.ffn_dim // tp_mlp, 1),
                        vocab_size=max(cfg.vocab_size // tp_vocab, 1), attention=attention)
    if local.n_heads % local.n_kv_heads:
        local = local.replace(n_kv_heads=1)
    return local, rows, w.seq_len // ctx


@functools.lru_cache(maxsize=256)
def saved_activation_bytes(cfg: ModelConfig, rows: int, length: int, loss_chunk: int) -> int:
    """Bytes the backward pass keeps from the forward pass of the real loss (JAX's saved residuals; arguments,
    i.e. parameters and the batch, excluded)."""
    from llama_jax.train import step as step_lib  # noqa: PLC0415

    params = transformer.param_shapes(cfg)
    batch = {k: jax.ShapeDtypeStruct((rows, length), jnp.int32) for k in step_lib.BATCH_KEYS}
    residuals = jax_compat.saved_residuals(lambda p, b: step_lib.loss_sum(cfg, p, b, loss_chunk)[0], params, batch)
    return sum(r.nbytes for r in residuals if not r.is_argument)


@dataclasses.dataclass(frozen=True)
class Plan:
    workload: Workload
    params: int
    frozen: int
    gradients: int
    optimizer: int
    update: int
    gathered: int
    activations: int
    pipeline: int
    flops_per_step: float
    peak_flops: float
    mfu: float
    device_memory: int | None
    notes: tuple[str, ...] = ()
    schedule: dict | None = None  # pipelined: bubble, stash, traffic (`pipeline_terms`)

    @property
    def total(self) -> int:
        return sum(getattr(self, t) for t in TERMS)

    @property
    def seconds_per_step(self) -> float:
        bubble = self.schedule["bubble"] if self.schedule else 0.0
        return self.flops_per_step / (self.workload.devices * self.peak_flops * self.mfu * (1 - bubble))

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.total <= self.device_memory

    @property
    def biggest(self) -> str:
        return max(TERMS, key=lambda t: getattr(self, t))

    def advice(self) -> str:
        w = self.workload
        if self.biggest in ("params", "frozen", "gradients", "optimizer", "update", "gathered", "pipeline"):
            return (f"shard the weights over more devices: rules {w.rules!r} with mesh {dict(w.mesh)}; raise "
                    "mesh.fsdp (sharding_rules='fsdp'), add tensor parallelism (mesh.tensor, 'fsdp_tp'), or use "
                    "more devices")
        return (f"cut the activations: a stronger remat policy (model.remat={w.model.remat!r} -> 'full'), fewer "
                f"rows per device ({w.global_batch // _rule_size(w, 'act_batch') // w.grad_accum} now: raise "
                "grad_accum or the data-parallel devices), context parallelism (mesh.context), or loss_chunk for "
                "the output head")

    def as_dict(self) -> dict:
        w = self.workload
        out = {"model": w.model.name, "stage": w.stage, "mesh": dict(w.mesh), "rules": w.rules,
               "seq_len": w.seq_len, "global_batch": w.global_batch, "grad_accum": w.grad_accum,
               "loss_chunk": w.loss_chunk, "remat": w.model.remat, "attention": w.model.attention,
               "devices": w.devices, "bytes_per_device": {t: getattr(self, t) for t in TERMS},
               "planned_bytes_per_device": self.total, "flops_per_step": self.flops_per_step,
               "peak_flops_per_device": self.peak_flops, "mfu": self.mfu, "seconds_per_step": self.seconds_per_step,
               "device_memory": self.device_memory, "fits": self.fits, "biggest": self.biggest,
               "pipeline": self.schedule}
        if self.fits is False:
            out["advice"] = self.advice()
        return out

    def report(self) -> str:
        w = self.workload
        lines = [f"{w.model.name} stage {w.stage!r}: {w.devices} devices, mesh {dict(w.mesh)}, rules {w.rules!r}",
                 f"  step: global batch {w.global_batch} x seq_len {w.seq_len} = {w.tokens_per_step:,} tokens, "
                 f"grad_accum {w.grad_accum}, remat {w.model.remat!r}, attention {w.model.attention!r}, "
                 f"dtype {w.model.dtype}, loss_chunk {w.loss_chunk}",
                 "  per device:"]
        for t in TERMS:
            lines.append(f"    {t:<12} {format_bytes(getattr(self, t)):>12}")
        lines.append(f"    {'total':<12} {format_bytes(self.total):>12}")
        if self.schedule:
            sc = self.schedule
            lines.append(f"  pipeline: {sc['stages']} stages x {sc['virtual']} virtual, {sc['microbatches']} microbatches "
                         f"of {sc['microbatch_rows']} rows, schedule {sc['schedule']!r}: bubble {sc['bubble']:.1%}, "
                         f"inputs kept per stage {sc['stash']}, point-to-point "
                         f"{format_bytes(sc['p2p_bytes_per_step'])} and weight resharding "
                         f"{format_bytes(sc['reshard_bytes_per_step'])} per device per step")
        lines.append(f"  FLOPs per step {self.flops_per_step:.3e}; at {self.mfu:.0%} MFU of "
                     f"{self.peak_flops:.3g} FLOP/s per device: {self.seconds_per_step:.3g} s per step")
        lines += [f"  note: {n}" for n in self.notes]
        if self.fits is not None:
            if self.fits:
                lines.append(f"  fits in {format_bytes(self.device_memory)} per device "
                             f"({self.total / self.device_memory:.0%} used)")
            else:
                lines.append(f"  does not fit: {format_bytes(self.total)} > {format_bytes(self.device_memory)} per "
                             f"device; the biggest term is {self.biggest} ({format_bytes(getattr(self, self.biggest))})"
                             f". To change: {self.advice()}")
        return "\n".join(lines)


def plan(w: Workload, device_memory: int | None = None, peak_flops: float = 989e12, mfu: float = 0.4,
         platform: str = "gpu") -> Plan:
    """The memory / FLOPs plan of `w` (module docstring). `platform` resolves attention='auto'."""
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu} must be in (0, 1]")
    w = dataclasses.replace(w, loss_chunk=experiment.resolve_chunk(w.loss_chunk, platform))
    p = param_bytes_per_device(w)
    # AdamW's mu / nu take the parameters' dtype and sharding (optax.adamw with mu_dtype=None).
    optimizer = 2 * p
    gradients = p * (2 if w.grad_accum > 1 else 1)
    local, rows, length = local_workload(w, platform)
    # cuDNN / splash flash attention cannot be traced off their hardware; xla_chunked is the same algorithm with
    # the same residuals (q, k, v, the output and the softmax statistics), so it stands in for them here.
    traced = local.replace(attention="xla_chunked") if local.attention in ("cudnn", "splash") else local
    saved = saved_activation_bytes(traced, rows, length, w.loss_chunk)
    working = 0
    if local.remat != "none":  # the backward pass recomputes one layer's full activations at a time
        plain = traced.replace(remat="none")
        working += (saved_activation_bytes(plain.replace(n_layers=2), rows, length, w.loss_chunk)
                    - saved_activation_bytes(plain.replace(n_layers=1), rows, length, w.loss_chunk))
    logit_rows = min(w.loss_chunk, length) if w.loss_chunk > 0 else length
    working += rows * logit_rows * local.vocab_size * 4  # float32 gradient of the logits
    notes = [] if local.attention == w.model.attention else [
        f"attention 'auto' planned as {local.attention!r} (the {platform} choice)"]
    pipeline, schedule_info = 0, None
    if w.pipeline.stages > 1:
        activations, pipeline, schedule_info = pipeline_terms(w, traced, rows, length)
    else:
        activations = saved + working
    return Plan(workload=dataclasses.replace(w, model=w.model.replace(attention=local.attention)), params=p,
                frozen=w.frozen_models * p, gradients=gradients, optimizer=optimizer, update=2 * p, gathered=gathered_bytes_per_device(w),
                activations=activations, pipeline=pipeline, schedule=schedule_info,
                flops_per_step=w.model.flops_per_token(w.seq_len) * w.tokens_per_step, peak_flops=peak_flops,
                mfu=mfu, device_memory=device_memory, notes=tuple(notes))


def pipeline_terms(w: Workload, local: ModelConfig, rows: int, length: int) -> tuple[int, int, dict]:
    """(activations, pipeline buffers, schedule facts) per device of a pipelined step (`model.pipeline`).

    Activations: the chunk inputs a stage keeps for its backward passes and the gradients waiting for theirs
    (the schedule's slots, plus four transfer buffers), each [microbatch rows, length, D] in the compute dtype,
    and the backward pass of one chunk (its saved residuals under the remat policy, with the output head and
    the loss, which every stage runs in lockstep). Pipeline buffers: the layer stack gathered into the stage
    layout and its float32 gradient accumulator (with the empty slots of an uneven split), and the embedding
    and output head, gathered over `pipe` for the first / last chunk, with their float32 gradients.
    """
    pipe, cfg = w.pipeline, w.model
    sched = schedule_lib.cached(pipe.stages, pipe.virtual, pipe.n_micro, pipe.schedule)
    slots = schedule_lib.layout(cfg.n_layers, pipe.stages, pipe.virtual, pipe.lighter_ends)
    per_chunk = slots.shape[-1]
    if rows % pipe.n_micro:
        raise ValueError(f"{rows} rows per device per step do not split into pipeline.microbatches={pipe.n_micro}")
    micro_rows = rows // pipe.n_micro
    x_bytes = micro_rows * length * cfg.dim * jnp.dtype(cfg.dtype).itemsize
    buffers = (sched.slots + sched.gslots + 4) * x_bytes
    chunk = local.replace(n_layers=per_chunk)
    backward = saved_activation_bytes(chunk, micro_rows, length, w.loss_chunk)
    if local.remat != "none":
        plain = chunk.replace(remat="none")
        backward += (saved_activation_bytes(plain.replace(n_layers=2), micro_rows, length, w.loss_chunk)
                     - saved_activation_bytes(plain.replace(n_layers=1), micro_rows, length, w.loss_chunk))
    logit_rows = min(w.loss_chunk, length) if w.loss_chunk > 0 else length
    backward += micro_rows * logit_rows * local.vocab_size * 4
    layer_bytes = ends_bytes = 0.0
    for size, split, _, stacked in _param_splits(w):
        unpiped = max(split / pipe.stages, 1)  # the stored split less `pipe` (the model dimension's share of it)
        if stacked:  # stage layout: this stage's V x Lc slots
            layer_bytes += size / cfg.n_layers * pipe.virtual * per_chunk / unpiped
        else:  # gathered over `pipe` for the first / last chunk
            ends_bytes += size / unpiped
    pipeline = int(2 * layer_bytes + 2 * ends_bytes)
    info = {"stages": pipe.stages, "virtual": pipe.virtual, "microbatches": pipe.n_micro, "schedule": pipe.schedule,
            "lighter_ends": pipe.lighter_ends, "microbatch_rows": micro_rows, "layers_per_chunk": per_chunk,
            "bubble": sched.bubble(), "bubble_formula": schedule_lib.bubble_formula(pipe.stages, pipe.virtual,
                                                                                   pipe.n_micro),
            "stash": max(sched.stash), "ticks": int(sched.ticks),
            "p2p_bytes_per_step": int(w.grad_accum * sched.ticks * 2 * x_bytes),
            "reshard_bytes_per_step": int(2 * layer_bytes)}
    return buffers + backward, pipeline, info


def compile_train_step(w: Workload):
    """The real train step of `w`, compiled ahead of time on abstract shapes over the current devices (no
    array is allocated). Returns the `jax.stages.Compiled`."""
    return lower_train_step(w).compile()


def lower_train_step(w: Workload):
    """The real train step of `w` lowered on abstract shapes (`jax.stages.Lowered`; see compile_train_step)."""
    from llama_jax.train import step as step_lib  # noqa: PLC0415

    devices = jax.devices()
    if len(devices) != w.devices:
        raise ValueError(f"the plan is for {w.devices} devices but JAX has {len(devices)}")
    mesh = mesh_lib.make_mesh(dict(w.mesh), devices)
    rules = rules_lib.get_rules(w.rules)
    optim_cfg = w.optim  # the driver's optimizer config of the stage
    abstract = step_lib.abstract_train_state(w.model, optim_cfg, mesh, rules)
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    loss_chunk = experiment.resolve_chunk(w.loss_chunk, jax.default_backend())  # (a plan's is already resolved)
    fn = step_lib.make_train_step(w.model, optim_cfg, w.grad_accum, loss_chunk=loss_chunk, pipeline=w.pipeline)
    step = step_lib.jit_train_step(fn, mesh, rules, shardings)
    batch = {k: jax.ShapeDtypeStruct((w.global_batch, w.seq_len), jnp.int32, sharding=mesh_lib.data_sharding(mesh))
             for k in step_lib.BATCH_KEYS}
    step_lib.check_batch_shapes({k: v.shape for k, v in batch.items()}, mesh, w.grad_accum, fn.microbatches)
    with jax.set_mesh(mesh):
        return step.lower(abstract, batch)


def compiled_bytes_per_device(compiled) -> int:
    """XLA's peak for one device: arguments + outputs - donated (aliased) buffers + temporaries."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)
