"""Post-training (Llama 3 §4) from a pretrained checkpoint: rounds of reward model -> rejection sampling -> SFT ->
DPO (+ averaging of DPO runs), each round's data made by the previous round's model.

`init` is the pretrained model: another run's workdir (its stage `init_stage`, by default `pretrain`; or the
last stage with a checkpoint when `init_stage=last`) or a stage's checkpoint directory
(`<workdir>/stages/<name>/checkpoints`).

Variant `cpu` (`--config=experiments/posttrain.py:cpu,init=DIR[,key=value,...]`): the arithmetic task of
`experiments/herd.py` (same task files, tokenizer and model), starting from a herd run's pretrained model:
    python -m llama_jax.main --config=experiments/herd.py:cpu --workdir=/tmp/llama_herd
    python -m llama_jax.main --config=experiments/posttrain.py:cpu,init=/tmp/llama_herd --workdir=/tmp/llama_post
Stages: `sft` on the seed dialogs, then per round `rs_rN` (K samples per prompt from the previous round's
model, graded by `tasks.score_arithmetic`), `sft_rN` (kept samples + seed dialogs), `dpo_rN` and `dpo_rN_2`
(two DPO runs of different NLL coefficients on the round's pairs) and `avg_rN` (their uniform average, the
round's model). Held-out accuracy is every stage's `eval_task_accuracy` (DONE.json, metrics.jsonl). Knobs:
init, init_stage, rounds, k, sft_steps, dpo_steps, dim, layers (must match the checkpoint), task_dir, rm
(1 = score samples with a reward model trained each round on the previous round's pairs instead of the
verifier, from round 2: trained on the previous round's pairs). Hardware: a 2-core CPU, a few minutes per
round.

Variant `dpo_sweep` (`--config=experiments/posttrain.py:dpo_sweep,init=DIR`): DPO's learning rate and NLL
coefficient from one SFT model (by default a herd workdir's `sft_r1`): `pairs` samples it (on-policy pairs, as
`cpu`), then five DPO runs from it (LR 1e-4 / 3e-5 / 1e-5 with NLL 0.2, LR 1e-5 / 1e-4 with NLL 1.0, β 0.1),
each with its held-out accuracy; `pairs`' `eval_task_accuracy` is the starting model's.

Variant `paper` (`--config=experiments/posttrain.py:paper,init=DIR,tokenizer=PATH,sft=...,prompts=...,
preferences=...[,size=8b|70b|405b]`): Llama 3's settings (LLAMA3_FACTS §7): 6 rounds; reward model on the
human preference data (edited > chosen > rejected, no margin term), rejection sampling with K = 10 (paper
10-30) scored by that round's reward model, SFT at LR 1e-5 for 9,000 steps, DPO at LR 1e-5 with β 0.1, NLL
0.2 and formatting tokens masked, on the round's newest pairs; two DPO runs per round averaged. Not given by
the paper (our choices): DPO's pairs are the rejection-sampling stage's best vs worst sample (the paper's DPO
trains on the latest human preference annotations), batch sizes (SFT 512 dialogs, RM 512 records, DPO 256 pairs), RM and DPO steps
(1,000 / 2,000), the second DPO run's LR (5e-6), sampling temperature 1.0. 8K sequences, bfloat16, FSDP (+ TP
8 for 70B / 405B). Hardware: as pretraining of the size (experiments/pretrain.py).
"""

import os
import tempfile

from llama_jax import experiment as E
from llama_jax.posttrain import recipe, tasks

_CPU_KNOBS = ("init", "init_stage", "rounds", "k", "sft_steps", "dpo_steps", "dim", "layers", "task_dir", "rm")
_PAPER_KNOBS = ("init", "init_stage", "tokenizer", "sft", "prompts", "preferences", "size", "rounds", "k")
_PAPER = {"8b": ("llama3.1-8b", 1), "70b": ("llama3.1-70b", 8), "405b": ("llama3.1-405b", 8)}


def _init(c, init: str, stage: str) -> None:
    """Sets the pretrained model to post-train: `init` is a workdir (its stage `stage`; `last` = its last stage
    with a checkpoint) or a stage checkpoint directory; the run checks it when it starts (experiment.resolve)."""
    if not init:
        raise ValueError("experiments/posttrain.py needs init=<a workdir or a stage checkpoint directory>: the "
                         "pretrained model to post-train")
    c.init_from, c.init_stage = init, "" if stage == "last" else stage


def get_config(arg: str | None = None):
    a = E.parse_arg(arg, variant="cpu", init="", init_stage="pretrain", rounds=0, k=0, sft_steps=100,
                    dpo_steps=40, dim=64, layers=2, rm=0,
                    task_dir=os.path.join(tempfile.gettempdir(), "llama_jax_arithmetic"), tokenizer="", sft="",
                    prompts="", preferences="", size="8b")
    if a.variant == "cpu":
        E.check_knobs(arg, a.variant, _CPU_KNOBS)
        paths = tasks.arithmetic_paths(a.task_dir)
        c = recipe.arithmetic_config(paths, a.dim, a.layers)
        c.prepare = [tasks.prepare_arithmetic(paths)]
        _init(c, a.init, a.init_stage)
        c.log_every_steps = 20
        c.stages = recipe.arithmetic_stages(paths, rounds=a.rounds or 1, k=a.k or 16, sft_steps=a.sft_steps,
                                            dpo_steps=a.dpo_steps, reward_model=bool(a.rm))
        return c
    if a.variant == "dpo_sweep":
        E.check_knobs(arg, a.variant, ("init", "init_stage", "k", "dpo_steps", "dim", "layers", "task_dir"))
        paths = tasks.arithmetic_paths(a.task_dir)
        c = recipe.arithmetic_config(paths, a.dim, a.layers)
        c.prepare = [tasks.prepare_arithmetic(paths)]
        _init(c, a.init, a.init_stage if "init_stage=" in (arg or "") else "sft_r1")
        task = dict(eval_prompts=paths["heldout"], verifier=recipe.ARITHMETIC_VERIFIER, eval_max_new_tokens=12)
        seq_len = recipe.ARITHMETIC_SEQ_LEN
        stages = [recipe.rejection_stage("pairs", paths["prompts"], seq_len, 16, k=a.k or 16,
                                         verifier=recipe.ARITHMETIC_SCORER, min_score=1.0, max_new_tokens=12,
                                         eval_verifier=recipe.ARITHMETIC_VERIFIER, eval_prompts=paths["heldout"],
                                         eval_max_new_tokens=12)]
        for name, lr, options in (("dpo_lr1e-4", 1e-4, {}), ("dpo_lr3e-5", 3e-5, {}), ("dpo_lr1e-5", 1e-5, {}),
                                  ("dpo_lr1e-5_nll1", 1e-5, dict(nll_coef=1.0)),
                                  ("dpo_lr1e-4_nll1", 1e-4, dict(nll_coef=1.0))):
            stages.append(recipe.dpo_stage(name, "stage:pairs/preferences.jsonl", a.dpo_steps, seq_len, 8, lr,
                                           start_from="pairs", **options, **task))
        c.stages = stages
        return c
    if a.variant == "paper":
        E.check_knobs(arg, a.variant, _PAPER_KNOBS)
        if a.size not in _PAPER:
            raise ValueError(f"size={a.size!r}; known: {sorted(_PAPER)}")
        for knob in ("tokenizer", "sft", "prompts", "preferences"):
            if not getattr(a, knob):
                raise ValueError(f"experiments/posttrain.py:paper needs {knob}=PATH")
        preset, tensor = _PAPER[a.size]
        c = E.base_config()
        _init(c, a.init, a.init_stage)
        c.tokenizer = a.tokenizer
        c.model.preset = preset
        c.model.dtype = "bfloat16"
        c.model.remat = "save_dots_no_batch"
        c.mesh.update(data=1, fsdp=-1, tensor=tensor)
        c.sharding_rules = "fsdp_tp" if tensor > 1 else "fsdp"
        # post-training stages read their own data (options); the schema asks for one source
        c.data.sources = [dict(name="sft", kind="jsonl", path=a.sft, weight=1.0, split="all", eval_split="all")]
        c.checkpoint.update(every_steps=500, keep=2)
        c.eval.update(every_steps=0, batches=0)
        c.sample.max_new_tokens = 0
        seq_len, rounds = 8192, a.rounds or 6
        stages = [recipe.sft_stage("sft", a.sft, 9000, seq_len, 512, lr=recipe.PAPER_SFT_LR, warmup=100)]
        policy, runs = "sft", (dict(lr=5e-6),)
        for r in range(1, rounds + 1):
            stages += recipe.round_stages(
                r, a.prompts, seq_len, policy=policy, k=a.k or 10,
                reward_preferences=a.preferences, rm_steps=1000, sft_steps=9000, dpo_steps=2000, batch=512,
                dpo_batch=256, sft_lr=recipe.PAPER_SFT_LR, dpo_lr=recipe.PAPER_DPO_LR, sft_extra=a.sft,
                rs=dict(max_new_tokens=2048, temperature=1.0, batch_size=256), dpo_runs=runs)
            policy = recipe.round_policy(r, runs)
        c.stages = stages
        return c
    raise ValueError(f"unknown variant {a.variant!r} of experiments/posttrain.py; known: cpu, paper, dpo_sweep")
