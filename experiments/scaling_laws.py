"""IsoFLOP scaling-law sweeps (Llama 3 §3.2.1): per compute budget, a ladder of model shapes each trained on the
tokens that spend the budget; then fit the per-budget parabolas, the compute-optimal power laws and the two-step
downstream forecast.

Each run is an ordinary pretrain stage, trained from scratch in its own workdir `<workdir>/runs/<name>/` by the
usual driver; the sweep runner (`llama_jax.scaling.sweep`) skips finished runs, reports a failed run without
stopping, prints a progress line per run and records {flops, params, tokens, loss, ...} in `<workdir>/runs.jsonl`.

    python -m llama_jax.main --config=experiments/scaling_laws.py:cpu --workdir=/tmp/isoflop
    python -m llama_jax.scaling fit --workdir=/tmp/isoflop          # plots/*.png, fit.json, fit.txt
    python -m llama_jax.main --config=experiments/scaling_laws.py:cpu,run=c1e13_d64 --workdir=/tmp/one

Variants (`--config=experiments/scaling_laws.py:VARIANT[,key=value,...]`):

* `cpu` — budgets 1e12, 3e12, 1e13 FLOPs, 4-6 shapes each (16 runs; widths 16-112, 1-4 layers, head_dim 16,
  37K-775K parameters) with a 1,024-id embedded BPE tokenizer (so the output layer does not dominate N) on the
  embedded corpus, 128-token sequences, batch 16 -> 32 sequences by budget, 50 warm-up steps, cosine to 0.1x,
  wd 0.1 x LR, peak LR 2e-3 -> 1e-3 by size; 124M tokens in all. Hardware: a 2-core CPU, sized for about an
  hour idle. Held-out loss: 32 x 16 x 128 validation tokens; multiple-choice set: 256 four-way items from
  held-out passages (48-token passage, 4-token choices). A reduced sweep: `cpu,budgets=3e11/1e12,...`.
* `paper` — the paper's budgets, 6e18 ... 1e22 FLOPs, over this project's shape ladder (the paper's models span
  40M-16B; the ladder's shapes and sizes are a choice): 69 runs of 103M-20B parameters (Llama 3 block,
  head_dim 128, GQA with 8 KV heads, vocab 128,256), 8,192-token sequences, batch 262K -> 4.2M tokens by
  budget, 2,000 warm-up steps, cosine decay to 0.1x peak, weight decay 0.1 x LR, peak LR 4e-4 -> 2e-4 by size.
  Hardware: a GPU/TPU cluster (bf16, FSDP); point `data.sources` at your corpus and `tokenizer` at Meta's
  tokenizer.model.
* `toy` — the `cpu` code path at test size (a few steps per run), for CI.

Knobs: `run=NAME` (just that run), `budgets=A/B/...` (a subset or other budgets), `max_runs=` (shapes per
budget), `min_ratio=` / `max_ratio=` (the tokens-per-parameter window of a budget's shapes), `warmup=`.
"""

import dataclasses

from llama_jax import experiment as E
from llama_jax.scaling import isoflop

_PAPER_BUDGETS = (6e18, 1e19, 3e19, 6e19, 1e20, 3e20, 6e20, 1e21, 3e21, 1e22)


def _spec(variant: str) -> tuple[isoflop.SweepSpec, dict]:
    """(the sweep's plan settings, extra sweep-block entries) of a variant."""
    if variant == "cpu":  # vocab 1024 (768 BPE ranks + 256 specials) keeps the output layer from dominating N
        rule = isoflop.ShapeRule(base="tiny", head_dim=16, aspect=32, max_kv_heads=2, multiple_of=32,
                                 vocab_size=1024)
        spec = isoflop.SweepSpec(budgets=(1e12, 3e12, 1e13), widths=(16, 32, 48, 64, 80, 96, 112, 128), rule=rule,
                                 seq_len=128, batch_range=(16, 32), lr_range=(2e-3, 1e-3), warmup_steps=50,
                                 min_ratio=2.0, max_ratio=1000.0, max_runs=6)
        return spec, dict(forecast_flops=1e15, tokenizer_ranks=768)
    if variant == "toy":
        rule = isoflop.ShapeRule(base="tiny", head_dim=16, aspect=32, max_kv_heads=2, multiple_of=16, vocab_size=512)
        spec = isoflop.SweepSpec(budgets=(3e8, 6e8), widths=(16, 32, 48, 64), rule=rule, seq_len=32,
                                 batch_range=(8, 8), lr_range=(3e-3, 1.5e-3), warmup_steps=2, min_ratio=0.001,
                                 max_ratio=1000.0, min_steps=2, max_runs=3)
        return spec, dict(forecast_flops=1e13, tokenizer_ranks=256)
    if variant == "paper":
        rule = isoflop.ShapeRule(base="llama3-8b", head_dim=128, aspect=128, max_kv_heads=8, multiple_of=256)
        widths = (256, 384, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048, 2304, 2560, 3072, 3584, 4096, 4608,
                  5120, 5632, 6144)
        spec = isoflop.SweepSpec(budgets=_PAPER_BUDGETS, widths=widths, rule=rule, seq_len=8192,
                                 batch_range=(32, 512), lr_range=(4e-4, 2e-4), warmup_steps=2000, min_ratio=2.5,
                                 max_ratio=250.0, max_runs=8)
        return spec, dict(forecast_flops=3.8e25, tokenizer_ranks=0)
    raise ValueError(f"unknown variant {variant!r} of experiments/scaling_laws.py; known: cpu, paper, toy")


def get_config(arg: str | None = None):
    a = E.parse_arg(arg, variant="cpu", run="", budgets="", max_runs=0, min_ratio=0.0, max_ratio=0.0, warmup=-1)
    spec, extra = _spec(a.variant)
    if a.budgets:
        spec = dataclasses.replace(spec, budgets=tuple(float(b) for b in a.budgets.split("/")))
    for knob in ("max_runs", "min_ratio", "max_ratio"):
        if a[knob]:
            spec = dataclasses.replace(spec, **{knob: a[knob]})
    if a.warmup >= 0:
        spec = dataclasses.replace(spec, warmup_steps=a.warmup)
    runs = isoflop.plan(spec)
    c = E.base_config()
    c.data.sources = [
        dict(name="stdlib_code", kind="corpus", path="code", weight=0.7),
        dict(name="stdlib_prose", kind="corpus", path="prose", weight=0.3),
    ]
    c.model.preset = spec.rule.base
    c.sharding_rules = "dp"
    c.mesh.data = -1
    c.sample.prompts = []  # no samples: the sweep measures held-out loss
    c.log_every_steps = 25
    if a.variant == "paper":
        c.model.update(dtype="bfloat16", attention="auto", remat="save_dots_no_batch")
        c.mesh.update(data=1, fsdp=-1)
        c.sharding_rules = "fsdp"
        c.checkpoint.update(every_steps=1000, keep=2)
        c.eval.update(every_steps=0, batches=64, global_batch=64)
        mc = dict(n_items=1024, context_tokens=256, choice_tokens=64, seed=0)
    elif a.variant == "toy":
        c.checkpoint.update(every_steps=1000, keep=1, async_save=False)
        c.eval.update(every_steps=0, batches=2, global_batch=8)
        mc = dict(n_items=16, context_tokens=16, choice_tokens=8, seed=0)
    else:
        c.checkpoint.update(every_steps=500, keep=1)
        c.eval.update(every_steps=0, batches=32, global_batch=16)
        mc = dict(n_items=256, context_tokens=48, choice_tokens=4, seed=0)
    if a.run:
        names = [r.name for r in runs]
        if a.run not in names:
            raise ValueError(f"unknown run {a.run!r}; this sweep's runs: {', '.join(names)}")
        runs = [r for r in runs if r.name == a.run]
    c.stages = [isoflop.stage(r, spec) for r in runs]
    # The sweep block: the runner (llama_jax.scaling.sweep) trains each stage as its own experiment.
    c.sweep = dict(variant=a.variant, runs=[isoflop.record(r) for r in runs], mc=mc, **extra)
    return c
