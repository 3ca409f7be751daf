"""Pretraining: the main job (`tiny`) and the paper-scale Llama 3 recipes.

Variants (`--config=experiments/pretrain.py:VARIANT[,key=value,...]`):

* `tiny` — the main job. A 1.8M-parameter Llama 3 (4 layers, d 128, GQA 4:2, 3.1 RoPE scaling) trained on the
  embedded corpus (the Python standard library's code and docstrings, built locally, no network) with the
  default 4,096-id BPE tokenizer; 300 steps of 16 x 256 tokens, evaluation every 100 steps, samples at the end.
      python -m llama_jax.main --config=experiments/pretrain.py:tiny --workdir=/tmp/llama_tiny
  Hardware: any CPU (2 cores: about 4 minutes, ~6k tokens/s). Expected (measured on 2 cores): train loss falls
  from 8.35 (ln 4096) to about 5.5; validation loss 6.3 / 5.8 / 5.65 (perplexity ~285) at steps 100 / 200 / 300;
  samples that look like Python and docstring prose. Knobs: steps, lr, batch, seq_len, warmup, layers, data (a
  .jsonl file/glob or text files to train on instead of the embedded corpus), stages (2 adds a long-context
  stage that doubles the sequence length at a 10x lower LR: a choice; the paper gives neither). `llama3.2-1b`
  takes only `data`, the paper variants no knob; a knob a variant does not use is an error.
* `llama3.2-1b` — Llama 3.2 1B architecture (tied embeddings), 8K sequences, 4M-token batches. Llama 3.2 is
  not in the paper: its LR 3e-4, 2,000 warm-up steps, cosine to 1% and 9T tokens are choices.
  Hardware: one 8xH100 node (FSDP 8, 16 micro-batches per step, `save_dots_no_batch` remat: choices that the
  planner says fit 80 GiB) or a TPU v5p-32; give your corpus as `data=PATH` and Meta's tokenizer.model as
  `--config.tokenizer=PATH` (without them it trains on the embedded corpus with the embedded tokenizer).
* `llama3.1-8b`, `llama3.1-70b`, `llama3.1-405b` — the paper's recipe (§3.4): peak LR 3e-4 / 1.5e-4 / 8e-5,
  8,000 warm-up steps, cosine decay to 1% of peak over the paper's 1,200,000-step schedule (`schedule_steps`;
  the 15.6T tokens at the batch ramp take about 1.1M steps, so training ends before the floor); the 405B
  batch ramp 4M tokens at 4,096 -> 8M at 8,192 after 252M tokens -> 16M after 2.87T tokens, one document
  stream continued across the ramp. Common practice, not given by the paper: AdamW β 0.9/0.95, ε 1e-8,
  weight decay 0.1 (given only for the scaling-law runs), clipping at global norm 1.0. A choice, not the
  paper's: the model keeps the 3.1 RoPE scaling (the preset's) during the 8K pretraining stage.
  Hardware (80 GiB H100s; `python -m llama_jax.plan --config=experiments/pretrain.py:VARIANT
  --device_memory=80GiB` plans each on its `plan_devices` and says it fits): 405B on 8,192 H100s with the
  paper's mesh (Table 4: TP 8, PP 16, DP = FSDP 64; 16,384 gives DP 128), pipelined as the paper (§3.3.2):
  interleaved 1F1B, the first and last stage one layer lighter, no activation checkpointing; choices, not
  given by the paper: 4 virtual stages and 16 microbatches per step. 8B on 64 H100s (FSDP 64) and 70B on 512
  (FSDP 64 x TP 8): the paper gives no mesh for them; ours (a choice) accumulate gradients over 8
  micro-batches with full remat. Runtimes: 1.46M / 7.0M / 30.84M H100-hours (model card).
  Data, as the paper (§3.1.2): the mix by source name, general_knowledge 0.50, math_reasoning 0.25, code 0.17,
  multilingual 0.08 (`experiment.PAPER_MIX`), each mapped by you to its files (ArrayRecord shards with a `text`
  field, as `python -m llama_jax.curate` writes: a choice), and Meta's tokenizer.model:
      python -m llama_jax.main --config=experiments/pretrain.py:llama3.1-8b --workdir=DIR \
        --config.tokenizer=tokenizer.model --config.data.paths.general_knowledge='web/part-*.array_record' \
        --config.data.paths.math_reasoning=... --config.data.paths.code=... --config.data.paths.multilingual=...
  Until all are given the run stops before building anything, naming what is missing (`plan` needs none). A
  later mixture (the paper raises the non-English and math shares during training, without numbers: none is
  set here) is a phase's `weights`, e.g. `E.phase(8192, 2048, weights={"multilingual": 0.12})`, in the same
  document stream and LR schedule; a stage's own mixture is its `data=dict(sources=...)`, as the anneal's.
"""

from llama_jax import experiment as E

_TINY_KNOBS = ("steps", "lr", "batch", "seq_len", "stages", "warmup", "data", "layers")
PAPER_SCHEDULE_STEPS = 1_200_000  # §3.4.1: cosine decay to 8e-7 over 1,200,000 steps
_PAPER = {  # peak LR per size (§3.4.1, Table 3; the schedule floor is 8e-7 / 8e-5 = 1% of peak) and the mesh,
    # remat and micro-batching that fit 80 GiB H100s on `devices` (405B: Table 4's mesh; 8B / 70B: choices)
    "llama3.1-8b": dict(lr=3e-4, devices=64, mesh=dict(data=1, fsdp=-1), remat="full", grad_accum=8),
    "llama3.1-70b": dict(lr=1.5e-4, devices=512, mesh=dict(data=1, fsdp=-1, tensor=8), remat="full", grad_accum=8),
    "llama3.1-405b": dict(lr=8e-5, devices=8192, mesh=dict(data=1, fsdp=-1, pipe=16, tensor=8), remat="none",
                          grad_accum=1, pipeline=dict(virtual=4, microbatches=16, schedule="1f1b", lighter_ends=1)),
}


def get_config(arg: str | None = None):
    """The experiment of `arg` (variant and knobs); settings equal to `experiment.base_config()`'s are not
    repeated (attention "auto" picks cuDNN flash attention on GPU and splash on TPU)."""
    a = E.parse_arg(arg, variant="tiny", steps=300, lr=3e-3, batch=16, seq_len=256, stages=1, warmup=30, data="",
                    layers=4)
    E.check_knobs(arg, a.variant, _TINY_KNOBS if a.variant == "tiny" else () if a.variant in _PAPER else ("data",))
    c = E.base_config()
    c.data.sources = [
        dict(name="stdlib_code", kind="corpus", path="code", weight=0.7),
        dict(name="stdlib_prose", kind="corpus", path="prose", weight=0.3),
    ]
    if a.data:  # your own text: a .jsonl file / glob ({"text": ...} per line) or plain-text files
        kind = "jsonl" if ".jsonl" in a.data else "text"
        c.data.sources = [dict(name="user", kind=kind, path=a.data, weight=1.0, split="all", eval_split="all")]
    if a.variant == "tiny":
        c.model.preset = "tiny"
        c.model.n_layers = a.layers
        c.sharding_rules = "dp"
        c.sample.prompts = ["def fibonacci(n):", "The module"]
        stages = [E.stage("pretrain", [E.phase(a.seq_len, a.batch)],
                          E.optim(a.lr, a.warmup, final_lr_ratio=0.1), steps=a.steps)]
        if a.stages >= 2:
            long_steps = max(a.steps // 3, 1)
            stages.append(E.stage("long_context", [E.phase(2 * a.seq_len, a.batch // 2)],
                                  E.optim(a.lr / 10, max(long_steps // 10, 1), final_lr_ratio=0.1),
                                  steps=long_steps))
        c.stages = stages
        return c
    if a.variant == "llama3.2-1b":
        c.model.preset = "llama3.2-1b"
        c.model.dtype = "bfloat16"
        c.model.remat = "save_dots_no_batch"
        c.mesh.update(data=1, fsdp=-1)
        c.plan_devices = 8
        c.sharding_rules = "fsdp"
        c.checkpoint.every_steps = 1000
        c.eval.every_steps = 1000
        c.stages = [E.stage("pretrain", [E.phase(8192, 512)], E.optim(3e-4, 2000, final_lr_ratio=0.01),
                            tokens=int(9e12), loss_chunk=2048, grad_accum=16)]
        return c
    if a.variant in _PAPER:
        p = _PAPER[a.variant]
        c.model.preset = a.variant
        c.model.dtype = "bfloat16"
        c.model.remat = p["remat"]
        c.mesh.update(p["mesh"])
        c.pipeline.update(p.get("pipeline", {}))
        c.plan_devices = p["devices"]
        c.sharding_rules = "fsdp_tp" if p["mesh"].get("tensor", 1) > 1 else "fsdp"
        c.checkpoint.update(every_steps=500, keep_every=10_000)
        c.eval.every_steps = 1000
        c.spike.update(window=100, spike_factor=2.0)
        c.data.sources = E.named_sources(E.PAPER_MIX)  # §3.1.2; the user maps each to files (data.paths)
        E.require_files(c, E.PAPER_MIX)  # and gives Meta's tokenizer.model (config.tokenizer)
        # 405B batch ramp (§3.4.1): 4M tokens at 4,096 -> 8M at 8,192 after 252M -> 16M after 2.87T tokens.
        phases = [E.phase(4096, 1024, until_tokens=252e6), E.phase(8192, 1024, until_tokens=2.87e12),
                  E.phase(8192, 2048)]
        c.stages = [E.stage("pretrain", phases, E.optim(p["lr"], 8000, final_lr_ratio=0.01,
                                                         schedule_steps=PAPER_SCHEDULE_STEPS),
                            tokens=int(15.6e12), loss_chunk=4096, grad_accum=p["grad_accum"])]
        return c
    raise ValueError(f"unknown variant {a.variant!r} of experiments/pretrain.py; known: tiny, llama3.2-1b, "
                     f"{', '.join(_PAPER)}")
