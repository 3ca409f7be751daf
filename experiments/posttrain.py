"""Post-training (Llama 3 §4) from a pretrained checkpoint: rounds of preference annotation -> reward model ->
rejection sampling -> SFT -> DPO (+ averaging of runs), each round's data made by the previous round's models.

`init` is the pretrained model: another run's workdir (its stage `init_stage`, by default `pretrain`; or the
last stage with a checkpoint when `init_stage=last`) or a stage's checkpoint directory
(`<workdir>/stages/<name>/checkpoints`). As the paper, each round's reward model and SFT start from it
(`start_from="init_from"`), not from the model entering the round.

Variant `cpu` (`--config=experiments/posttrain.py:cpu,init=DIR[,key=value,...]`): the arithmetic task of
`experiments/herd.py` (same task files, tokenizer, model and stages), starting from a herd run's pretrained model:
    python -m llama_jax.main --config=experiments/herd.py:cpu --workdir=/tmp/llama_herd
    python -m llama_jax.main --config=experiments/posttrain.py:cpu,init=/tmp/llama_herd --workdir=/tmp/llama_post
Stages: `sft` on the seed dialogs, then per round `ann_rN` (two samples per prompt from the previous round's
two DPO runs, round 1: from `sft`, labelled by the synthetic annotator `tasks.score_arithmetic` with a
strength), `rs_rN` (K samples per prompt from the previous round's model, graded by `tasks.score_arithmetic`),
`sft_rN` (kept samples + seed dialogs, from the pretrained model), `dpo_rN` and `dpo_rN_2` (two DPO runs of
different NLL coefficients on the round's "significantly better" and "better" annotations) and `avg_rN` (their
uniform average, the round's model). Held-out accuracy is every stage's `eval_task_accuracy` (DONE.json,
metrics.jsonl). Knobs: init, init_stage, rounds, k, sft_steps, dpo_steps, dim, layers (must match the
checkpoint), task_dir, rm (1 = a reward model `rm_rN`, from the pretrained model, trained on every annotation
batch so far, scores the samples instead of the verifier), and choices that are not the paper's: `sft_from=policy`
/ `rm_from=policy` (start from the model entering the round), `pairs=rejection` (DPO on rejection-sampled
best-vs-worst pairs of the round's SFT model instead of annotations). Hardware: a 2-core CPU, a few minutes per
round.

Variant `dpo_sweep` (`--config=experiments/posttrain.py:dpo_sweep,init=DIR`): DPO's learning rate and NLL
coefficient from one SFT model (by default a herd workdir's `sft_r1`): `pairs` samples it (on-policy
rejection-sampled pairs, this project's choice of data for the sweep), then five DPO runs from it (LR 1e-4 /
3e-5 / 1e-5 with NLL 0.2, LR 1e-5 / 1e-4 with NLL 1.0, β 0.1), each with its held-out accuracy; `pairs`'
`eval_task_accuracy` is the starting model's.

Variant `paper` (`--config=experiments/posttrain.py:paper,init=DIR,tokenizer=PATH,sft=...,prompts=...,
preferences=...[,size=8b|70b|405b,sampler=DIR,system_prompts=FILE]`): Llama 3's settings (LLAMA3_FACTS §7): 6
rounds; per round a reward model trained on top of the pre-trained checkpoint on all preference annotations so
far (edited > chosen > rejected, no margin term), rejection sampling with K = 10 (paper 10-30) scored by that
round's reward model, SFT of the pre-trained checkpoint at LR 1e-5 for 9,000 steps on the round's samples and
`sft`, DPO at LR 1e-5 with β 0.1, NLL 0.2 and formatting tokens masked on the round's latest batch of
annotations; only "significantly better" and "better" annotations kept for the reward model and DPO; runs of
each reward model, SFT and DPO stage with different hyperparameters averaged (§4.1.5); from round 2, rejection
sampling with steering system prompts (§4.2.2). `preferences`: the human annotations, a file per round with
`{round}` in the path (round r's DPO reads batch r, its reward model batches 1..r; annotate the previous
round's models between rounds, then rerun with `rounds=r --allow_config_change`), or one file for every round.
For size 8b and 70b the samples come from the 405B model (`sampler=<a 405B post-training workdir>`, its last
stage), the flagship improving the smaller models (§1); `sampler=self` samples the model itself (not the
paper's). Not given by the paper (our choices): batch sizes (SFT 512 dialogs, RM 512 records, DPO 256 pairs),
RM and DPO steps (1,000 / 2,000), how many of the latest annotation batches DPO reads (1; `dpo_batches` of
`recipe.round_stages`), SFT warm-up (100 steps), the second run's LR of each averaged stage (5e-6),
sampling temperature 1.0, the first round with system prompts (2) and the prompts themselves
(`system_prompts=FILE`, one per line, replaces `STYLE_SYSTEM_PROMPTS`). 8K sequences, bfloat16. Hardware, meshes
and memory settings (choices that the planner says fit 80 GiB H100s on `plan_devices`): 8B on 64 (FSDP 64),
70B on 512 (FSDP 64 x TP 8), 405B on 2,048 (FSDP 64 x context 4 x TP 8), full remat, gradients accumulated one
record per device at a time; no pipeline, since the reward model and DPO train their own losses.
"""

import os
import tempfile

from llama_jax import experiment as E
from llama_jax.posttrain import recipe, tasks

_CPU_KNOBS = ("init", "init_stage", "rounds", "k", "sft_steps", "dpo_steps", "dim", "layers", "task_dir", "rm",
              "sft_from", "rm_from", "pairs")
_PAPER_KNOBS = ("init", "init_stage", "tokenizer", "sft", "prompts", "preferences", "size", "rounds", "k")
# size: (preset, tensor and context parallelism, devices the mesh is planned for: `plan_devices`), choices that fit
# 80 GiB H100s with FSDP over the rest and no pipeline (the reward model and DPO train their own losses)
_PAPER = {"8b": ("llama3.1-8b", 1, 1, 64), "70b": ("llama3.1-70b", 8, 1, 512),
          "405b": ("llama3.1-405b", 8, 4, 2048)}
_PAPER_ROUND_KNOBS = ("sampler", "system_prompts")
# Steering system prompts of the paper variant's later rejection-sampling rounds (§4.2.2 gives none: our choice).
STYLE_SYSTEM_PROMPTS = ("Answer accurately and concisely; say so when you are not sure.",
                        "Use Markdown where it helps: short paragraphs, lists for steps, code in fenced blocks.",
                        "Be warm and direct; explain your reasoning step by step before the final answer.")
_PAPER_RUNS = (dict(lr=5e-6),)  # the second run of each reward model, SFT and DPO stage (our choice)


def _init(c, init: str, stage: str) -> None:
    """Sets the pretrained model to post-train: `init` is a workdir (its stage `stage`; `last` = its last stage
    with a checkpoint) or a stage checkpoint directory; the run checks it when it starts (experiment.resolve)."""
    if not init:
        raise ValueError("experiments/posttrain.py needs init=<a workdir or a stage checkpoint directory>: the "
                         "pretrained model to post-train")
    c.init_from, c.init_stage = init, "" if stage == "last" else stage


def _paper_sampler(size: str, sampler: str) -> dict:
    """The rejection-sampling option `sampler` of the paper variant: the 405B model for 8B and 70B (§1)."""
    if size == "405b" or sampler == "self":
        return {}
    if not sampler:
        raise ValueError(f"experiments/posttrain.py:paper,size={size} needs sampler=<a 405B post-training workdir> "
                         "(the paper samples with its flagship), or sampler=self to sample the model itself")
    return dict(sampler=sampler)


def _system_prompts(path: str) -> tuple[str, ...]:
    """The steering system prompts: one per line of `path`, or `STYLE_SYSTEM_PROMPTS` when none is given."""
    if not path:
        return STYLE_SYSTEM_PROMPTS
    if not os.path.isfile(path):
        raise ValueError(f"system_prompts={path!r} does not exist (a text file, one system prompt per line)")
    with open(path, encoding="utf-8") as f:
        prompts = tuple(line.strip() for line in f if line.strip())
    if not prompts:
        raise ValueError(f"system_prompts={path!r} holds no system prompt (one per line)")
    return prompts


def get_config(arg: str | None = None):
    a = E.parse_arg(arg, variant="cpu", init="", init_stage="pretrain", rounds=0, k=0, sft_steps=100,
                    dpo_steps=40, dim=128, layers=4, rm=0,
                    task_dir=os.path.join(tempfile.gettempdir(), "llama_jax_arithmetic"), tokenizer="", sft="",
                    prompts="", preferences="", size="8b", sft_from="pretrained", rm_from="pretrained",
                    pairs="annotations", sampler="", system_prompts="")
    if a.variant == "cpu":
        E.check_knobs(arg, a.variant, _CPU_KNOBS)
        paths = tasks.arithmetic_paths(a.task_dir)
        c = recipe.arithmetic_config(paths, a.dim, a.layers)
        c.prepare = [tasks.prepare_arithmetic(paths)]
        _init(c, a.init, a.init_stage)
        c.log_every_steps = 20
        c.stages = recipe.arithmetic_stages(paths, rounds=a.rounds or 1, k=a.k or 16, sft_steps=a.sft_steps,
                                            dpo_steps=a.dpo_steps, reward_model=bool(a.rm), pretrained="init_from",
                                            sft_from=a.sft_from, rm_from=a.rm_from, dpo_pairs=a.pairs)
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
        E.check_knobs(arg, a.variant, _PAPER_KNOBS + _PAPER_ROUND_KNOBS)
        if a.size not in _PAPER:
            raise ValueError(f"size={a.size!r}; known: {sorted(_PAPER)}")
        for knob in ("tokenizer", "sft", "prompts", "preferences"):
            if not getattr(a, knob):
                raise ValueError(f"experiments/posttrain.py:paper needs {knob}=PATH")
        preset, tensor, context, devices = _PAPER[a.size]
        c = E.base_config()
        _init(c, a.init, a.init_stage)
        c.tokenizer, c.tokenizer_required = a.tokenizer, True  # Meta's tokenizer.model, no embedded fallback
        c.model.preset = preset
        c.model.dtype = "bfloat16"
        c.model.remat = "full"
        c.mesh.update(data=1, fsdp=-1, context=context, tensor=tensor)
        c.plan_devices = devices
        c.sharding_rules = "fsdp_tp" if tensor > 1 else "fsdp"
        # post-training stages read their own data (options); the schema asks for one source
        c.data.sources = [dict(name="sft", kind="jsonl", path=a.sft, weight=1.0, split="all", eval_split="all")]
        c.checkpoint.update(every_steps=500, keep=2)
        c.eval.update(every_steps=0, batches=0)
        c.sample.max_new_tokens = 0
        seq_len, rounds = 8192, a.rounds or 6
        sampler, system_prompts = _paper_sampler(a.size, a.sampler), _system_prompts(a.system_prompts)
        stages = [recipe.sft_stage("sft", a.sft, 9000, seq_len, 512, lr=recipe.PAPER_SFT_LR, warmup=100)]
        policy = "sft"
        for r in range(1, rounds + 1):
            stages += recipe.round_stages(
                r, a.prompts, seq_len, policy=policy, pretrained="init_from", k=a.k or 10, reward_model=True,
                annotations=a.preferences, rm_steps=1000, sft_steps=9000, dpo_steps=2000, batch=512, dpo_batch=256,
                sft_lr=recipe.PAPER_SFT_LR, sft_warmup=100, dpo_lr=recipe.PAPER_DPO_LR, sft_extra=a.sft,
                rs=dict(max_new_tokens=2048, temperature=1.0, batch_size=256, **sampler), rm_runs=_PAPER_RUNS,
                sft_runs=_PAPER_RUNS, dpo_runs=_PAPER_RUNS, system_prompts=system_prompts if r >= 2 else ())
            policy = recipe.round_policy(r, _PAPER_RUNS)
        # gradients accumulated so that each device holds one record (SFT: a dialog, RM: chosen / rejected /
        # edited, DPO: a pair) at a time on `devices`: a choice that the planner says fits 80 GiB
        records_per_device = {"sft": 512, "reward": 512, "dpo": 256}
        for st in stages:
            if st["kind"] in records_per_device:
                st["grad_accum"] = max(1, records_per_device[st["kind"]] // (devices // (tensor * context)))
        c.stages = stages
        return c
    raise ValueError(f"unknown variant {a.variant!r} of experiments/posttrain.py; known: cpu, paper, dpo_sweep")
