"""The Llama 3 decoder as a pipeline: the layer stack cut into stages over the mesh axis `pipe`.

The parameters keep the model's own layout (`layers/block/...` stacked over all L layers, the same tree on
disk and in memory for every pipeline degree: a checkpoint does not know how it was pipelined). Inside the
train step the stack is gathered into the pipeline layout [V, P, Lc, ...] (`to_stages`): chunk c = v * P + s
holds the model's next Lc layers and runs on stage s, so stage s holds V chunks, P x V apart in depth (the
interleaved placement). `lighter_ends` leaves that many slots of the first and of the last chunk empty, the
paper's rule for the stages that also run the embedding and the output head (405B: 126 layers + 2 empty
slots = 16 stages x 8); other empty slots go to the chunks just before the last when L does not divide. An
empty slot passes its input through (its layer is computed and discarded: every stage runs the same program in
lockstep, `sharding.pipeline`, so a lighter stage does not make a tick shorter here).

The first chunk embeds its microbatch, the last runs the final norm, the output head and the loss
(`token_loss(hidden, w_out [D, V], targets, mask) -> (sum, count)`, the fused chunked loss in training), so
no [B, T, V] logits ever travel between stages. Microbatches are rows i, i + M, i + 2M, ... of the batch, so
each is spread over the data-parallel devices like the whole batch.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from llama_jax.model import layers, transformer
from llama_jax.model.config import ModelConfig
from llama_jax.sharding import pipeline as executor
from llama_jax.sharding import schedule as schedule_lib


PipelineConfig = schedule_lib.PipelineConfig
layout = schedule_lib.layout


def _stage_spec(logical: P, rules) -> P:
    """The pipeline layout's PartitionSpec for a stacked leaf: its model dims as stored (less `pipe`), the stage
    dim over `pipe`."""
    mesh_axes = nn.logical_to_mesh_axes(tuple(logical)[1:], rules)

    def strip(axes):
        if axes is None:
            return None
        kept = tuple(a for a in (axes if isinstance(axes, tuple) else (axes,)) if a != executor.AXIS)
        return kept[0] if len(kept) == 1 else (kept or None)
    return P(None, executor.AXIS, None, *(strip(a) for a in mesh_axes))


def to_stages(cfg: ModelConfig, stack: Any, slots: np.ndarray) -> Any:
    """The stacked block parameters [L, ...] gathered into the pipeline layout [V, P, Lc, ...] (empty slots hold
    a copy of layer 0, never run)."""
    idx = jnp.asarray(np.maximum(slots, 0).reshape(-1))
    rules = nn.get_logical_axis_rules()
    specs = transformer.param_logical_specs(cfg)["layers"]["block"]

    def gather(a, spec):
        out = jnp.take(a, idx, axis=0).reshape(slots.shape + a.shape[1:])
        return jax.lax.with_sharding_constraint(out, _stage_spec(spec, rules)) if rules else out
    return jax.tree.map(gather, stack, specs, is_leaf=lambda x: isinstance(x, P))


def _block_fn(cfg: ModelConfig) -> Callable:
    def block(w, x, positions, segment_ids):
        return layers.Block(cfg).apply({"params": w}, x, positions, segment_ids)[0]
    if cfg.remat != "none":
        block = jax.checkpoint(block, policy=transformer._remat_policy(cfg.remat), prevent_cse=False)
    return block


def stage_fns(cfg: ModelConfig, token_loss: Callable) -> executor.StageFns:
    dtype = jnp.dtype(cfg.dtype)
    block = _block_fn(cfg)

    def embed(table, tokens):
        return layers.constrain(transformer._lookup(table, tokens, dtype), ("act_batch", "act_length", "act_embed"))

    def chunk(w, real, x, mic):
        def body(x, layer):
            w_l, is_real = layer
            return jnp.where(is_real, block(w_l, x, mic["positions"], mic["segment_ids"]), x), None
        return jax.lax.scan(body, x, (w, real))[0]

    def head(head_w, x, mic):
        h = layers.RMSNorm(cfg.norm_eps, cfg.param_dtype).apply({"params": {"scale": head_w["norm"]}}, x)
        return token_loss(h, head_w["out"], mic["targets"], mic["loss_mask"])

    return executor.StageFns(embed=embed, chunk=chunk, head=head,
                             place=lambda x: layers.constrain(x, ("act_batch", "act_length", "act_embed")))


def split_micro(batch: Any, n: int, what: str = "pipeline.microbatches") -> Any:
    """[B, ...] -> [n, B/n, ...] for every array of `batch`: part i takes rows i, i + n, i + 2n, ..., so every part
    is spread evenly over the data-parallel devices (the set of rows, hence any sum, is unchanged). Used for
    pipeline microbatches and for gradient-accumulation micro-batches (`what` names the setting in errors)."""
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} rows cannot be cut into {what}={n}")
        return jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def loss_sum(cfg: ModelConfig, pipe: PipelineConfig, params: Any, batch: dict, token_loss: Callable):
    """(sum of masked next-token NLL, count) of `batch` ({inputs, targets, positions, segment_ids, loss_mask}),
    computed by the pipeline; differentiable, equal to the unpipelined `train.step.loss_sum`."""
    if not cfg.scan_layers:
        raise ValueError("pipeline parallelism needs the stacked layer layout (model scan_layers=True)")
    sched = schedule_lib.cached(pipe.stages, pipe.virtual, pipe.n_micro, pipe.schedule)
    slots = layout(cfg.n_layers, pipe.stages, pipe.virtual, pipe.lighter_ends)
    stage_w = to_stages(cfg, params["layers"]["block"], slots)
    head_w = {"norm": params["norm"]["scale"], "out": transformer.output_embedding(cfg, params)}
    micro = split_micro({"tokens": batch["inputs"], "targets": batch["targets"], "positions": batch["positions"],
                         "segment_ids": batch["segment_ids"], "loss_mask": batch["loss_mask"]}, sched.microbatches)
    fn = executor.loss_fn(sched, stage_fns(cfg, token_loss), jnp.dtype(cfg.dtype))
    return fn(stage_w, jnp.asarray(slots >= 0), params["embed"]["embedding"], head_w, micro)
