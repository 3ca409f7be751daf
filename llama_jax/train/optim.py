"""Optimizer and learning-rate schedules (optax).

AdamW with common-practice defaults (β1 0.9, β2 0.95, ε 1e-8, decoupled weight decay 0.1 applied to matrices
and embeddings but not to RMSNorm gains), global-norm gradient clipping at 1.0, and a linear warm-up followed
by cosine (or linear) decay to a floor. The Llama 3 paper gives neither the betas, ε nor clipping, and gives
weight decay only for its scaling-law runs; optax's decoupled decay multiplies by the current learning rate,
so `weight_decay=0.1` is exactly that setting, "weight decay = 0.1 × the current LR". The paper's warm-up
(8,000 steps), peak LRs and schedule length (1,200,000 steps, `total_steps`) are its own.
"""

from __future__ import annotations


import jax
import optax

from llama_jax.experiment.schema import OptimConfig  # the settings; typed with the stage


def make_schedule(c: OptimConfig) -> optax.Schedule:
    """Linear warm-up from init_lr to peak_lr over warmup_steps, then decay to final_lr_ratio·peak_lr."""
    if c.decay not in ("cosine", "linear", "constant"):
        raise ValueError(f"unknown learning-rate decay {c.decay!r}; expected cosine, linear or constant")
    if c.total_steps < c.warmup_steps:
        raise ValueError(f"total_steps={c.total_steps} is smaller than warmup_steps={c.warmup_steps}")
    floor = c.final_lr_ratio * c.peak_lr
    warmup = optax.linear_schedule(c.init_lr, c.peak_lr, max(c.warmup_steps, 1))
    decay_steps = max(c.total_steps - c.warmup_steps, 1)
    if c.decay == "cosine":
        decay = optax.cosine_decay_schedule(c.peak_lr, decay_steps, alpha=c.final_lr_ratio)
    elif c.decay == "linear":
        decay = optax.linear_schedule(c.peak_lr, floor, decay_steps)
    else:
        decay = optax.constant_schedule(c.peak_lr)
    if c.warmup_steps == 0:
        return decay
    return optax.join_schedules([warmup, decay], [c.warmup_steps])


def decay_mask(params):
    """True for weights that get weight decay: everything except RMSNorm gains."""
    def keep(path, _):
        return not any(getattr(k, "key", None) in ("attention_norm", "ffn_norm", "norm") for k in path)
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(c: OptimConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(c.clip_norm),
        optax.adamw(make_schedule(c), b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                    mask=decay_mask),
    )


def restart_schedule(opt_state):
    """The optimizer state carried into a new stage: AdamW's moments (and their bias-correction count) kept,
    the learning-rate schedule's step count set to 0 so that the new stage's own schedule starts at its first
    step (warm-up included)."""
    def reset(node):
        if isinstance(node, optax.ScaleByScheduleState):
            return node._replace(count=jax.numpy.zeros_like(node.count))
        return node
    return jax.tree.map(reset, opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
