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
  stage that doubles the sequence length at a 10x lower LR: a choice; the paper gives neither). The other
  variants take only `data`; a knob a variant does not use is an error.
* `llama3.2-1b` — Llama 3.2 1B architecture (tied embeddings), 8K sequences, 4M-token batches. Llama 3.2 is
  not in the paper: its LR 3e-4, 2,000 warm-up steps, cosine to 1% and 9T tokens are choices.
  Hardware: one 8xH100 node or a TPU v5p-32; point `data.sources` at your tokenized corpus and `tokenizer`
  at Meta's tokenizer.model.
* `llama3.1-8b`, `llama3.1-70b`, `llama3.1-405b` — the paper's recipe (§3.4): peak LR 3e-4 / 1.5e-4 / 8e-5,
  8,000 warm-up steps, cosine decay to 1% of peak over the paper's 1,200,000-step schedule (`schedule_steps`;
  the 15.6T tokens at the batch ramp take about 1.1M steps, so training ends before the floor); the 405B
  batch ramp 4M tokens at 4,096 -> 8M at 8,192 after 252M tokens -> 16M after 2.87T tokens, one document
  stream continued across the ramp. Common practice, not given by the paper: AdamW β 0.9/0.95, ε 1e-8,
  weight decay 0.1 (given only for the scaling-law runs), clipping at global norm 1.0. A choice, not the
  paper's: the model keeps the 3.1 RoPE scaling (the preset's) during the 8K pretraining stage.
  Hardware: 8B on 64+ H100s, 70B on 512+, 405B on 8,192-16,384 H100s (TP 8, FSDP over the rest) or the
  equivalent TPU pods. Runtimes: 1.46M / 7.0M / 30.84M H100-hours (model card).
"""

from llama_jax import experiment as E

_TINY_KNOBS = ("steps", "lr", "batch", "seq_len", "stages", "warmup", "data", "layers")
PAPER_SCHEDULE_STEPS = 1_200_000  # §3.4.1: cosine decay to 8e-7 over 1,200,000 steps
_PAPER = {  # peak LR and mesh per size (§3.4.1, Table 3); the schedule floor is 8e-7 / 8e-5 = 1% of peak
    "llama3.1-8b": dict(lr=3e-4, tensor=1),
    "llama3.1-70b": dict(lr=1.5e-4, tensor=8),
    "llama3.1-405b": dict(lr=8e-5, tensor=8),
}


def get_config(arg: str | None = None):
    """The experiment of `arg` (variant and knobs); settings equal to `experiment.base_config()`'s are not
    repeated (attention "auto" picks cuDNN flash attention on GPU and splash on TPU)."""
    a = E.parse_arg(arg, variant="tiny", steps=300, lr=3e-3, batch=16, seq_len=256, stages=1, warmup=30, data="",
                    layers=4)
    E.check_knobs(arg, a.variant, _TINY_KNOBS if a.variant == "tiny" else ("data",))
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
        c.sharding_rules = "fsdp"
        c.checkpoint.every_steps = 1000
        c.eval.every_steps = 1000
        c.stages = [E.stage("pretrain", [E.phase(8192, 512)], E.optim(3e-4, 2000, final_lr_ratio=0.01),
                            tokens=int(9e12), loss_chunk=2048)]
        return c
    if a.variant in _PAPER:
        p = _PAPER[a.variant]
        c.model.preset = a.variant
        c.model.dtype = "bfloat16"
        c.model.remat = "save_dots_no_batch"
        c.mesh.update(data=1, fsdp=-1, tensor=p["tensor"])
        c.sharding_rules = "fsdp_tp" if p["tensor"] > 1 else "fsdp"
        c.checkpoint.update(every_steps=500, keep_every=10_000)
        c.eval.every_steps = 1000
        c.spike.update(window=100, spike_factor=2.0)
        # 405B batch ramp (§3.4.1): 4M tokens at 4,096 -> 8M at 8,192 after 252M -> 16M after 2.87T tokens.
        phases = [E.phase(4096, 1024, until_tokens=252e6), E.phase(8192, 1024, until_tokens=2.87e12),
                  E.phase(8192, 2048)]
        c.stages = [E.stage("pretrain", phases, E.optim(p["lr"], 8000, final_lr_ratio=0.01,
                                                         schedule_steps=PAPER_SCHEDULE_STEPS),
                            tokens=int(15.6e12), loss_chunk=4096)]
        return c
    raise ValueError(f"unknown variant {a.variant!r} of experiments/pretrain.py; known: tiny, llama3.2-1b, "
                     f"{', '.join(_PAPER)}")
