"""The herd recipe end to end on a task a program verifies: pretrain -> SFT -> rounds of rejection sampling ->
SFT -> DPO -> averaging, with held-out accuracy after every stage.

Variant `cpu` (`--config=experiments/herd.py:cpu[,key=value,...]`):
    python -m llama_jax.main --config=experiments/herd.py:cpu --workdir=/tmp/llama_herd
The task (`llama_jax.posttrain.tasks`): "What is a + b?" for operands below `max_operand` (40), generated
deterministically when the run starts (config.prepare; loading the config writes nothing) into a folder of
`task_dir` named by the task's size: 120 SFT dialogs, 400 rejection-sampling and annotation prompts and 1,000
held-out prompts (disjoint pairs), pretraining text "What is a + b? a + b = c" for every pair (the facts are in the
pretraining data, as in a web corpus; post-training has to elicit them in the dialog format for prompts it never
trained on), and a 290-rank BPE tokenizer. The verifier accepts a response whose last integer is a + b.
The model: the `tiny` block at dim 128, 4 layers (0.8M parameters), pretrained 2,000 steps of 32 x 64 tokens.
Stages: `pretrain` (text), then `llama_jax.posttrain.recipe.arithmetic_stages` (shared with
experiments/posttrain.py:cpu) with the paper's data flow (Llama 3 §4.1-4.2) but for DPO's data: `sft` (the 120
dialogs, from `pretrain`), and per round `rs_rN` (K samples per prompt from the model entering the round at
temperature 1, graded by `tasks.score_arithmetic`; fully correct ones kept as SFT data), `sft_rN` (fine-tunes
`pretrain`, as the paper, on the kept samples mixed with the 120 dialogs), `pairs_rN` (K samples of sft_rN: the
most frequent correct against the most frequent wrong answer, on-policy pairs), `dpo_rN` and `dpo_rN_2` (two
runs on those pairs, β 0.1 as the paper; LR 1e-4, NLL coefficient 1.0 and 200 steps are choices, measured by a
sweep in benchmarks/README.md; frozen reference = sft_rN) and `avg_rN` (their uniform average: the round's
model). The paper's DPO data and settings are knobs: `pairs=annotations` (`ann_rN`: two samples per prompt at
temperature 1 from the previous round's two DPO runs, round 1: from `sft`, labelled by a synthetic annotator,
the graded `score_arithmetic`, with a strength label and `tasks.edit_arithmetic` as its editing step; DPO on
the "significantly better" and "better" pairs), `dpo_lr=1e-5`, `dpo_nll=0.2` (the second run keeps NLL 1.0),
`dpo_steps=40`: with them DPO does not change held-out accuracy at this size (benchmarks/README.md says why).
Held-out accuracy (greedy, `verify_arithmetic`) is each stage's
`eval_task_accuracy` in `<workdir>/stages/<name>/DONE.json` and metrics.jsonl; `sft`'s
`start_task_accuracy` is the pretrained model's; the per-prompt scores are each stage's `task_scores.json`, and
    python -m llama_jax.posttrain.significance --workdir=/tmp/llama_herd
prints every model's accuracy with its 95% interval and the paired test (McNemar's exact, the same prompts)
against the model it started from and the model whose samples it trained on.
Knobs: pretrain_steps, sft_steps, dpo_steps, rounds, k, lr, dim, layers, task_dir, and the task's size:
`prompts` (rejection-sampling and annotation prompts, default 400), `heldout` (held-out prompts, default 1,000),
`max_operand` (40; 120 + prompts + heldout must not exceed max_operand²), `min_score` (the
`tasks.score_arithmetic` grade a sample needs to be kept: 1.0 by default, fully correct; 0.5 also takes a right
answer with wrong work, for models trained a few steps), the DPO knobs above; `sft_from=policy` (a choice: each round's SFT continues the model entering the round, at LR 3e-4). The
notebook `notebooks/posttrain_round.ipynb` runs this experiment, in CI with
`dim=64,layers=2,heldout=64,prompts=32,min_score=0.5` and a few steps per stage.
Hardware: a 2-core CPU; benchmarks/README.md has the runtime, every stage's accuracy and the paired tests.
Small-model SFT learning rates (1e-3; 3e-4 when continuing the policy) replace the paper's 1e-5.
"""

import os
import tempfile

from llama_jax import experiment as E
from llama_jax.posttrain import recipe, tasks

_KNOBS = ("pretrain_steps", "sft_steps", "dpo_steps", "rounds", "k", "lr", "dim", "layers", "task_dir", "prompts",
          "heldout", "max_operand", "min_score", "dpo_lr", "dpo_nll", "sft_from", "pairs")


def get_config(arg: str | None = None):
    a = E.parse_arg(arg, variant="cpu", pretrain_steps=2000, sft_steps=200, dpo_steps=200, rounds=1, k=16, lr=3e-3,
                    dim=128, layers=4, task_dir=os.path.join(tempfile.gettempdir(), "llama_jax_arithmetic"),
                    prompts=400, heldout=1000, max_operand=40, min_score=1.0, sft_from="pretrained",
                    pairs="rejection", dpo_lr=1e-4, dpo_nll=1.0)
    E.check_knobs(arg, a.variant, _KNOBS)
    if a.variant != "cpu":
        raise ValueError(f"unknown variant {a.variant!r} of experiments/herd.py; known: cpu")
    size = dict(n_prompts=a.prompts, n_heldout=a.heldout, max_operand=a.max_operand)
    paths = tasks.arithmetic_paths(a.task_dir, **size)
    c = recipe.arithmetic_config(paths, a.dim, a.layers)
    c.prepare = [tasks.prepare_arithmetic(paths, **size)]
    c.sample.update(dict(prompts=["What is 3 + 4? 3 + 4 ="], max_new_tokens=4))
    c.log_every_steps = 20
    c.stages = [E.stage("pretrain", [E.phase(recipe.ARITHMETIC_SEQ_LEN, 32)], E.optim(a.lr, 20, final_lr_ratio=0.1),
                        steps=a.pretrain_steps)]
    c.stages += recipe.arithmetic_stages(paths, rounds=a.rounds, k=a.k, sft_steps=a.sft_steps, dpo_steps=a.dpo_steps,
                                         min_score=a.min_score, pretrained="pretrain", sft_from=a.sft_from,
                                         dpo_pairs=a.pairs, dpo_lr=a.dpo_lr, dpo_nll=a.dpo_nll)
    return c
