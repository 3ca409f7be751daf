"""IsoFLOP sweep planning: a ladder of model shapes per compute budget, each with the tokens that spend it.

FLOPs accounting is the project's one convention, `ModelConfig.flops_per_token(seq_len)` (6 FLOPs per matmul
weight per token, plus the causal attention term; see its docstring). A run of `steps` steps of
`global_batch x seq_len` tokens spends `steps * global_batch * seq_len * flops_per_token(seq_len)` FLOPs. The
planner picks `steps = round(budget / (global_batch * seq_len * flops_per_token))`, so each run spends its budget
to within half a step (a few percent at worst; `RunPlan.flops` is the exact figure).

"params" of a run is the compute-equivalent parameter count `N = flops_per_token(seq_len) / 6`: the matmul
weights (blocks and output head; the embedding is a gather) plus the attention term, so that `C = 6 N D` holds
exactly for every run. `param_count` (the stored parameters, embedding included) is recorded beside it.

Depth/width rule (`ShapeRule`): a shape is named by its width `dim`;
    n_layers   = max(1, round(dim / aspect))            (dim / n_layers ~ aspect; Llama 3 8B/405B have ~128)
    n_heads    = dim / head_dim                          (head_dim fixed: 128 in Llama 3)
    n_kv_heads = gcd(n_heads, max_kv_heads)              (8 in Llama 3: GQA wherever the head count allows)
    ffn_dim    = Meta's rule (4·dim·2/3 · ffn_dim_multiplier, rounded up to multiple_of)
and everything else (RoPE, norm eps, the vocabulary unless `vocab_size` is set) comes from the base preset.

Ladder per budget: the widths whose run has between `min_ratio` and `max_ratio` tokens per parameter and at
least `min_steps` steps; if more than `max_runs` qualify, the `max_runs` whose tokens-per-parameter ratio is
closest (in log) to the window's geometric centre. A budget needs at least 3 shapes (a parabola has 3
coefficients); fewer is an error naming the budget.

Run settings (Llama 3 §3.2.1): linear warm-up, cosine decay to 0.1 x peak, AdamW weight decay 0.1 x the
current LR (optax's decoupled decay is multiplied by the learning rate, so `weight_decay=0.1` is exactly that), a
fixed batch per budget (interpolated log-linearly in the budget between `batch_range`, rounded to a power of
two sequences) and a peak LR by size (log-linear in N between `lr_range`, larger models lower).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from llama_jax.model import config as model_config


@dataclasses.dataclass(frozen=True)
class ShapeRule:
    """The depth/width rule of the model ladder (see the module docstring)."""

    base: str = "tiny"  # preset supplying vocabulary, RoPE, norm eps, max_seq_len
    head_dim: int = 16
    aspect: int = 32  # dim / n_layers
    max_kv_heads: int = 2
    multiple_of: int = 32
    ffn_dim_multiplier: float = 1.0
    vocab_size: int = 0  # 0: the base preset's (a sweep of small models may use a smaller tokenizer)

    def overrides(self, dim: int) -> dict:
        """ModelConfig fields of the shape of width `dim` (for a stage's `model_overrides`)."""
        if dim <= 0 or dim % self.head_dim:
            raise ValueError(f"ladder width {dim} is not a positive multiple of head_dim {self.head_dim}")
        n_heads = dim // self.head_dim
        vocab = dict(vocab_size=self.vocab_size) if self.vocab_size else {}
        return dict(**vocab, dim=int(dim), n_layers=max(1, int(math.floor(dim / self.aspect + 0.5))), n_heads=n_heads,
                    n_kv_heads=math.gcd(n_heads, self.max_kv_heads), head_dim=self.head_dim,
                    multiple_of=self.multiple_of, ffn_dim_multiplier=self.ffn_dim_multiplier)

    def model(self, dim: int) -> model_config.ModelConfig:
        return model_config.get(self.base, **self.overrides(dim))


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """An IsoFLOP sweep: budgets, the width ladder and the run settings."""

    budgets: tuple[float, ...]
    widths: tuple[int, ...]
    rule: ShapeRule = ShapeRule()
    seq_len: int = 128
    batch_range: tuple[int, int] = (8, 16)  # global batch (sequences) at the smallest / largest budget
    lr_range: tuple[float, float] = (3e-3, 1.5e-3)  # peak LR at the smallest / largest N of the ladder
    warmup_steps: int = 2000
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.1  # x the current LR (optax decoupled decay)
    min_ratio: float = 2.5  # tokens per parameter window of a budget's ladder
    max_ratio: float = 250.0
    min_steps: int = 0  # a run needs at least this many steps (default: 2 x warmup_steps)
    max_runs: int = 5


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """One run of the sweep: a model shape trained on `tokens` tokens for one budget."""

    name: str
    budget: float  # the budget this run belongs to (the IsoFLOP curve it is on)
    flops: float  # FLOPs it actually spends (whole steps)
    params: float  # compute-equivalent parameters N = flops_per_token / 6
    param_count: int  # stored parameters (embedding included)
    tokens: int
    steps: int
    seq_len: int
    global_batch: int
    peak_lr: float
    model_overrides: dict


def run_name(budget: float, dim: int) -> str:
    """`c3e+12_d64`: budget in 1-significant-digit scientific notation and width (unique within a sweep)."""
    return f"c{budget:.2g}_d{dim}".replace("+", "")


def compute_params(cfg: model_config.ModelConfig, seq_len: int) -> float:
    """N with C = 6 N D under the project's FLOPs accounting."""
    return cfg.flops_per_token(seq_len) / 6.0


def batch_for_budget(spec: SweepSpec, budget: float) -> int:
    """Global batch (sequences) of a budget: log-linear between batch_range over the budgets, a power of two."""
    lo, hi = min(spec.budgets), max(spec.budgets)
    t = 0.0 if hi == lo else math.log(budget / lo) / math.log(hi / lo)
    b0, b1 = spec.batch_range
    b = math.exp(math.log(b0) + t * (math.log(b1) - math.log(b0)))
    return int(2 ** round(math.log2(b)))


def lr_for_params(spec: SweepSpec, params: float, n_range: tuple[float, float]) -> float:
    """Peak LR by size: log-linear in N from lr_range[0] at the smallest N to lr_range[1] at the largest."""
    lo, hi = n_range
    t = 0.0 if hi <= lo else min(max(math.log(params / lo) / math.log(hi / lo), 0.0), 1.0)
    a, b = spec.lr_range
    return float(f"{math.exp(math.log(a) + t * (math.log(b) - math.log(a))):.4g}")


def plan(spec: SweepSpec) -> list[RunPlan]:
    """Every run of the sweep, grouped by budget (ascending), smallest model first within a budget."""
    if not spec.budgets:
        raise ValueError("the sweep has no budgets")
    if any(not (b > 0 and math.isfinite(b)) for b in spec.budgets):
        raise ValueError(f"sweep budgets must be positive and finite, got {spec.budgets}")
    if len(set(spec.widths)) < 3:
        raise ValueError(f"the width ladder needs at least 3 distinct widths, got {spec.widths}")
    min_steps = spec.min_steps or 2 * spec.warmup_steps
    models = {d: spec.rule.model(d) for d in sorted(set(spec.widths))}
    for d, cfg in models.items():
        if spec.seq_len > cfg.max_seq_len:
            raise ValueError(f"seq_len {spec.seq_len} exceeds max_seq_len {cfg.max_seq_len} of width {d}")
    n_of = {d: compute_params(cfg, spec.seq_len) for d, cfg in models.items()}
    n_range = (min(n_of.values()), max(n_of.values()))
    centre = math.sqrt(spec.min_ratio * spec.max_ratio)
    runs = []
    for budget in sorted(spec.budgets):
        batch = batch_for_budget(spec, budget)
        per_step = batch * spec.seq_len
        candidates = []
        for d, cfg in models.items():
            fpt = cfg.flops_per_token(spec.seq_len)
            steps = int(round(budget / (per_step * fpt)))
            tokens = steps * per_step
            ratio = tokens / n_of[d]
            if steps >= min_steps and spec.min_ratio <= ratio <= spec.max_ratio:
                candidates.append((abs(math.log(ratio / centre)), d, steps, tokens, fpt))
        if len(candidates) < 3:
            raise ValueError(
                f"budget {budget:.3g} FLOPs: only {len(candidates)} ladder shapes have {spec.min_ratio:g}-"
                f"{spec.max_ratio:g} tokens per parameter and >= {min_steps} steps (at {per_step} tokens per "
                f"step); a parabola needs 3: widen the ladder {spec.widths} or change the budget")
        chosen = sorted(sorted(candidates)[:spec.max_runs], key=lambda c: c[1])
        for _, d, steps, tokens, fpt in chosen:
            cfg = models[d]
            runs.append(RunPlan(
                name=run_name(budget, d), budget=float(budget), flops=float(tokens * fpt), params=n_of[d],
                param_count=cfg.param_count(), tokens=int(tokens), steps=int(steps), seq_len=spec.seq_len,
                global_batch=batch, peak_lr=lr_for_params(spec, n_of[d], n_range),
                model_overrides=spec.rule.overrides(d)))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"two budgets print alike in run names {names}; space the budgets further apart")
    return runs


def summary(runs: Sequence[RunPlan]) -> str:
    """A table of the plan, one line per run."""
    lines = [f"{'run':<16}{'budget':>10}{'spent':>9}{'params':>10}{'tokens':>17}{'D/N':>7}{'steps':>8}"
             f"{'batch':>7}{'lr':>9}"]
    for r in runs:
        lines.append(f"{r.name:<16}{r.budget:>10.3g}{r.flops / r.budget:>9.3f}{r.params:>10.3g}{r.tokens:>17,}"
                     f"{r.tokens / r.params:>7.1f}{r.steps:>8}{r.global_batch:>7}{r.peak_lr:>9.2e}")
    return "\n".join(lines)


def stage(r: RunPlan, spec: SweepSpec) -> dict:
    """The run as an ordinary pretrain stage (`llama_jax.experiment.stage`)."""
    from llama_jax import experiment  # noqa: PLC0415 - ml_collections only when building configs

    warmup = min(spec.warmup_steps, r.steps)
    return experiment.stage(r.name, [experiment.phase(r.seq_len, r.global_batch)],
                            experiment.optim(r.peak_lr, warmup, decay="cosine", final_lr_ratio=spec.final_lr_ratio,
                                             weight_decay=spec.weight_decay),
                            steps=r.steps, model_overrides=r.model_overrides)


def record(r: RunPlan) -> dict:
    """What the runs file keeps of the plan (the measured loss is added after the run)."""
    return dict(name=r.name, flops=r.budget, flops_spent=r.flops, params=r.params, param_count=r.param_count,
                tokens=r.tokens, steps=r.steps, global_batch=r.global_batch, seq_len=r.seq_len, peak_lr=r.peak_lr,
                **{k: r.model_overrides[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads")})
