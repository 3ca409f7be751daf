"""The herd recipe end to end on a task a program verifies: pretrain -> SFT -> rounds of rejection sampling ->
SFT -> DPO, with held-out accuracy after every stage.

Variant `cpu` (`--config=experiments/herd.py:cpu[,key=value,...]`):
    python -m llama_jax.main --config=experiments/herd.py:cpu --workdir=/tmp/llama_herd
The task (`llama_jax.posttrain.tasks`): "What is a + b?" for operands below 20, generated deterministically
into `task_dir` when the config is built: 120 SFT dialogs, 120 rejection-sampling prompts and 100 held-out
prompts (disjoint pairs), pretraining text "What is a + b? a + b = c" for every pair (the facts are in the
pretraining data, as in a web corpus; post-training has to elicit them in the dialog format for prompts it never
trained on), and a 290-rank BPE tokenizer. The verifier accepts a response whose last integer is a + b.
Stages: `pretrain` (text), `sft` (the 120 dialogs), then per round `rs_rN` (K samples per prompt from the
model entering the round at temperature 1, verified, the first correct sample kept: SFT data; best vs worst:
DPO pairs), `sft_rN` on those dialogs and `dpo_rN` on those pairs (β 0.1, NLL 0.2, formatting masked, frozen
reference). Held-out accuracy (greedy) is each stage's `eval_task_accuracy` in
`<workdir>/stages/<name>/DONE.json` and metrics.jsonl; `sft`'s `start_task_accuracy` is the pretrained
model's. Knobs: pretrain_steps, sft_steps, dpo_steps, rounds, k, lr, dim, layers, task_dir, and the task's size:
`prompts` (rejection-sampling prompts, default 120) and `heldout` (held-out prompts, default 100); the notebook
`notebooks/posttrain_round.ipynb` runs this experiment, in CI with `heldout=64,prompts=32` (one sampling batch of 64
each) and a few steps per stage.
Hardware: a 2-core CPU; measured runtime and accuracies are in benchmarks/README.md (a progress line per
stage). Small-model learning rates (SFT 1e-3, round SFT 3e-4 on the kept samples mixed with the SFT dialogs, DPO
1e-4) replace the paper's 1e-5, which is for 405B.
"""

import os
import tempfile

from llama_jax import experiment as E
from llama_jax.posttrain import recipe, tasks

_KNOBS = ("pretrain_steps", "sft_steps", "dpo_steps", "rounds", "k", "lr", "dim", "layers", "task_dir", "prompts",
          "heldout")
VERIFIER = "llama_jax.posttrain.tasks:verify_arithmetic"


def get_config(arg: str | None = None):
    a = E.parse_arg(arg, variant="cpu", pretrain_steps=400, sft_steps=100, dpo_steps=40, rounds=1, k=8, lr=3e-3,
                    dim=64, layers=2, task_dir=os.path.join(tempfile.gettempdir(), "llama_jax_arithmetic"),
                    prompts=120, heldout=100)
    E.check_knobs(arg, a.variant, _KNOBS)
    if a.variant != "cpu":
        raise ValueError(f"unknown variant {a.variant!r} of experiments/herd.py; known: cpu")
    paths = tasks.write_arithmetic(a.task_dir, n_prompts=a.prompts, n_heldout=a.heldout)
    c = E.base_config()
    c.tokenizer = paths["tokenizer"]
    c.model.preset = "tiny"
    c.model.update(dict(vocab_size=640, dim=a.dim, n_layers=a.layers, n_heads=4, n_kv_heads=2, max_seq_len=128))
    c.sharding_rules = "dp"
    c.data.sources = [dict(name="arithmetic", kind="jsonl", path=paths["pretrain"], weight=1.0, split="all",
                           eval_split="all")]
    c.checkpoint.update(dict(every_steps=0, keep=1))
    c.eval.update(dict(every_steps=0, batches=2))
    c.sample.update(dict(prompts=["What is 3 + 4? 3 + 4 ="], max_new_tokens=4))
    c.log_every_steps = 20
    seq_len = 64
    task = dict(eval_prompts=paths["heldout"], verifier=VERIFIER, eval_max_new_tokens=12)
    stages = [
        E.stage("pretrain", [E.phase(seq_len, 32)], E.optim(a.lr, 20, final_lr_ratio=0.1), steps=a.pretrain_steps),
        recipe.sft_stage("sft", paths["sft"], a.sft_steps, seq_len, 16, lr=1e-3, warmup=10, **task),
    ]
    policy = "sft"
    for r in range(1, a.rounds + 1):
        stages += recipe.round_stages(r, paths["prompts"], seq_len, policy=policy, k=a.k, verifier=VERIFIER,
                                      sft_steps=a.sft_steps, dpo_steps=a.dpo_steps, batch=16, sft_lr=3e-4,
                                      sft_extra=paths["sft"],
                                      dpo_lr=1e-4, rs=dict(min_score=1.0, max_new_tokens=12, temperature=1.0),
                                      task=task)
        policy = f"dpo_r{r}"
    c.stages = stages
    return c
