"""The herd recipe end to end on a task a program verifies: pretrain -> SFT -> rounds of rejection sampling ->
SFT -> DPO, with held-out accuracy after every stage.

Variant `cpu` (`--config=experiments/herd.py:cpu[,key=value,...]`):
    python -m llama_jax.main --config=experiments/herd.py:cpu --workdir=/tmp/llama_herd
The task (`llama_jax.posttrain.tasks`): "What is a + b?" for operands below 20, generated deterministically
when the run starts (config.prepare; loading the config writes nothing) into a folder of `task_dir` named by the
task's size: 120 SFT dialogs, 120 rejection-sampling prompts and 100 held-out
prompts (disjoint pairs), pretraining text "What is a + b? a + b = c" for every pair (the facts are in the
pretraining data, as in a web corpus; post-training has to elicit them in the dialog format for prompts it never
trained on), and a 290-rank BPE tokenizer. The verifier accepts a response whose last integer is a + b.
Stages: `pretrain` (text), then `llama_jax.posttrain.recipe.arithmetic_stages` (shared with
experiments/posttrain.py:cpu): `sft` (the 120 dialogs), and per round `rs_rN` (K samples per prompt from the
model entering the round at temperature 1, graded by `tasks.score_arithmetic`; fully correct ones kept as SFT
data), `sft_rN` (kept samples mixed with the 120 dialogs), `pairs_rN` (K samples from sft_rN: DPO's pairs,
the most frequent correct vs the most frequent wrong answer, on-policy), `dpo_rN` (the paper's LR 1e-5, β 0.1,
NLL 0.2, formatting masked, frozen reference = sft_rN), `dpo_rN_2` (the same with NLL 1.0) and `avg_rN`
(their uniform average: the round's model). Held-out accuracy (greedy, `verify_arithmetic`) is each stage's
`eval_task_accuracy` in `<workdir>/stages/<name>/DONE.json` and metrics.jsonl; `sft`'s
`start_task_accuracy` is the pretrained model's. Knobs: pretrain_steps, sft_steps, dpo_steps, rounds, k, lr,
dim, layers, task_dir, and the task's size: `prompts` (rejection-sampling prompts, default 120) and `heldout`
(held-out prompts, default 100), `min_score` (the `tasks.score_arithmetic` grade a sample needs to be kept and
to be DPO's chosen: 1.0 by default, fully correct; 0.5 also takes a right answer with wrong work, for models
trained a few steps); the notebook `notebooks/posttrain_round.ipynb` runs this experiment, in CI with
`heldout=64,prompts=32,min_score=0.5` and a few steps per stage.
Hardware: a 2-core CPU; measured runtime and accuracies are in benchmarks/README.md (a progress line per
stage). Small-model SFT learning rates (1e-3, then 3e-4 in the rounds) replace the paper's 1e-5; DPO at 1e-4
(ten times the paper's) lost the rounds' gain, at the paper's 1e-5 it keeps it (benchmarks/README.md).
"""

import os
import tempfile

from llama_jax import experiment as E
from llama_jax.posttrain import recipe, tasks

_KNOBS = ("pretrain_steps", "sft_steps", "dpo_steps", "rounds", "k", "lr", "dim", "layers", "task_dir", "prompts",
          "heldout", "min_score")


def get_config(arg: str | None = None):
    a = E.parse_arg(arg, variant="cpu", pretrain_steps=400, sft_steps=100, dpo_steps=40, rounds=1, k=16, lr=3e-3,
                    dim=64, layers=2, task_dir=os.path.join(tempfile.gettempdir(), "llama_jax_arithmetic"),
                    prompts=120, heldout=100, min_score=1.0)
    E.check_knobs(arg, a.variant, _KNOBS)
    if a.variant != "cpu":
        raise ValueError(f"unknown variant {a.variant!r} of experiments/herd.py; known: cpu")
    size = dict(n_prompts=a.prompts, n_heldout=a.heldout)
    paths = tasks.arithmetic_paths(a.task_dir, **size)
    c = recipe.arithmetic_config(paths, a.dim, a.layers)
    c.prepare = [tasks.prepare_arithmetic(paths, **size)]
    c.sample.update(dict(prompts=["What is 3 + 4? 3 + 4 ="], max_new_tokens=4))
    c.log_every_steps = 20
    c.stages = [E.stage("pretrain", [E.phase(recipe.ARITHMETIC_SEQ_LEN, 32)], E.optim(a.lr, 20, final_lr_ratio=0.1),
                        steps=a.pretrain_steps)]
    c.stages += recipe.arithmetic_stages(paths, rounds=a.rounds, k=a.k, sft_steps=a.sft_steps, dpo_steps=a.dpo_steps,
                                         min_score=a.min_score)
    return c
