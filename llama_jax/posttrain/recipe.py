"""Stage builders of the Llama 3 post-training recipe (§4), for experiment configs.

`round_stages(r, ...)` is one round: [reward model ->] rejection sampling -> SFT -> DPO, where the round's
SFT and DPO data are what its rejection-sampling stage wrote with the model entering the round (so each
round's data comes from the previous round's model). Paper settings by default: SFT and DPO LR 1e-5, β 0.1,
NLL coefficient 0.2, K 10-30 samples (default 10); small models need larger learning rates (give `sft_lr`,
`dpo_lr`).
"""

from __future__ import annotations

from llama_jax import experiment as E

PAPER_SFT_LR = 1e-5
PAPER_DPO_LR = 1e-5


def sft_stage(name: str, dialogs: str | list[str], steps: int, seq_len: int, batch: int, lr: float = PAPER_SFT_LR,
              warmup: int = 0, **options) -> dict:
    return E.stage(name, [E.phase(seq_len, batch)], E.optim(lr, warmup, final_lr_ratio=0.1, weight_decay=0.0),
                   steps=steps, kind="sft",
                   options=dict(dialogs=[dialogs] if isinstance(dialogs, str) else list(dialogs), **options))


def dpo_stage(name: str, preferences: str, steps: int, seq_len: int, pairs: int, lr: float = PAPER_DPO_LR,
              warmup: int = 0, **options) -> dict:
    return E.stage(name, [E.phase(seq_len, 2 * pairs)], E.optim(lr, warmup, final_lr_ratio=0.1, weight_decay=0.0),
                   steps=steps, kind="dpo", options=dict(preferences=preferences, **options))


def reward_stage(name: str, preferences: str | list[str], steps: int, seq_len: int, records: int, lr: float = PAPER_SFT_LR,
                 **options) -> dict:
    return E.stage(name, [E.phase(seq_len, 3 * records)], E.optim(lr, 0, final_lr_ratio=0.1, weight_decay=0.0),
                   steps=steps, kind="reward",
                   options=dict(preferences=[preferences] if isinstance(preferences, str) else list(preferences),
                                **options))


def rejection_stage(name: str, prompts: str, seq_len: int, batch: int, **options) -> dict:
    """The stage samples and writes data; it trains nothing (its phase is the shape it evaluates at)."""
    return E.stage(name, [E.phase(seq_len, batch)], E.optim(1.0, 0), kind="rejection_sampling",
                   options=dict(prompts=prompts, **options))


def average_stage(name: str, sources: list[str], weights: list[float] | None = None, seq_len: int = 64,
                  batch: int = 8, **options) -> dict:
    """The weighted mean (uniform by default) of `sources` (`stage:<name>`, another run's workdir, or a
    checkpoint directory) as a stage: it trains nothing, its checkpoint is the average."""
    return E.stage(name, [E.phase(seq_len, batch)], E.optim(1.0, 0), kind="average",
                   options=dict(sources=list(sources), weights=[float(w) for w in weights or ()], **options))


def round_stages(r: int, prompts: str, seq_len: int, *, policy: str, k: int = 10, verifier: str = "",
                 eval_verifier: str = "", reward_preferences: str = "", sft_steps: int = 100, dpo_steps: int = 50,
                 rm_steps: int = 0, batch: int = 16, sft_lr: float = PAPER_SFT_LR, dpo_lr: float = PAPER_DPO_LR,
                 rs: dict | None = None, task: dict | None = None, sft_extra: str = "", dpo: dict | None = None,
                 dpo_runs: tuple[dict, ...] = (), dpo_batch: int = 0, on_policy_pairs: bool = False) -> list[dict]:
    """Round `r` starting from stage `policy`: [rm_r ->] rs_r -> sft_r -> dpo_r [-> dpo_r_2.. -> avg_r].

    rs_r samples K responses per prompt from `policy` (the previous round's model) and keeps the best: the
    round's SFT data (mixed with `sft_extra`, earlier SFT data, as Llama 3 does) and its DPO pairs (best vs
    worst sample: a choice; Llama 3's DPO trains on the latest human preference annotations), so each round's
    data comes from the previous round's model. With `reward_preferences`, a reward model rm_r (from
    `policy`) scores the samples, else `verifier` does. `dpo`: the DPO stage's options (beta, nll_coef, ...);
    `dpo_runs`: further DPO runs from sft_r on the same pairs, each a dict of overrides ("lr" and options),
    after which `avg_r` averages every DPO run of the round uniformly (Llama 3 §4.1.5: models from runs with
    different data or hyperparameters are averaged). `on_policy_pairs`: DPO's pairs come from a second
    rejection-sampling stage `pairs_r` that samples the round's SFT model, the model DPO starts from and its
    reference, instead of rs_r's (sampled from the model entering the round). The round's model is its last stage
    (`round_policy(r, dpo_runs)`). `task`: held-out evaluation options of every stage."""
    task = dict(task or {})
    out = []
    scorer = dict(scorer="verifier", verifier=verifier)
    if reward_preferences:
        out.append(reward_stage(f"rm_r{r}", reward_preferences, rm_steps or sft_steps, seq_len, batch, sft_lr,
                                start_from=policy))
        scorer = dict(scorer="reward", reward_model=f"stage:rm_r{r}")
    evaluation = {k_: v for k_, v in task.items() if k_ != "verifier"}
    if task.get("verifier") and (task["verifier"] != verifier or reward_preferences):
        evaluation["eval_verifier"] = task["verifier"]
    if eval_verifier:
        evaluation["eval_verifier"] = eval_verifier
    out.append(rejection_stage(f"rs_r{r}", prompts, seq_len, batch, k=k, start_from=policy, **scorer,
                               **dict(rs or {}), **evaluation))
    dialogs = [f"stage:rs_r{r}/sft.jsonl"] + ([sft_extra] if sft_extra else [])
    out.append(sft_stage(f"sft_r{r}", dialogs, sft_steps, seq_len, batch, sft_lr, **task))
    pairs = dpo_batch or batch // 2
    prefs = f"stage:rs_r{r}/preferences.jsonl"
    if on_policy_pairs:
        out.append(rejection_stage(f"pairs_r{r}", prompts, seq_len, batch, k=k, **scorer, **dict(rs or {}),
                                   **evaluation))
        prefs = f"stage:pairs_r{r}/preferences.jsonl"
    out.append(dpo_stage(f"dpo_r{r}", prefs, dpo_steps, seq_len, pairs, dpo_lr, **dict(dpo or {}), **task))
    for j, run in enumerate(dpo_runs, 2):
        run = dict(run)
        lr = run.pop("lr", dpo_lr)
        out.append(dpo_stage(f"dpo_r{r}_{j}", prefs, dpo_steps, seq_len, pairs, lr,
                             **{**dict(dpo or {}), **run}, start_from=f"sft_r{r}", **task))
    if dpo_runs:
        runs = [f"stage:dpo_r{r}"] + [f"stage:dpo_r{r}_{j}" for j in range(2, len(dpo_runs) + 2)]
        out.append(average_stage(f"avg_r{r}", runs, seq_len=seq_len, batch=batch, **task))
    return out


def round_policy(r: int, dpo_runs: tuple[dict, ...] = ()) -> str:
    """The stage holding round r's model: `avg_r` when the round averages several DPO runs, else `dpo_r`."""
    return f"avg_r{r}" if dpo_runs else f"dpo_r{r}"


ARITHMETIC_VERIFIER = "llama_jax.posttrain.tasks:verify_arithmetic"  # held-out accuracy: last integer is a + b
ARITHMETIC_SCORER = "llama_jax.posttrain.tasks:score_arithmetic"  # choosing samples: the work shown too
ARITHMETIC_SEQ_LEN = 64
ARITHMETIC_DPO_RUNS = (dict(nll_coef=1.0),)  # a round's second DPO run: the same pairs, NLL coefficient 1.0


def arithmetic_config(paths: dict, dim: int, layers: int):
    """The base experiment config of the arithmetic task's CPU experiments (`tasks.write_arithmetic`'s `paths`):
    its 290-rank tokenizer, a tiny model (vocab_size 640 holds it), the pretraining text as the one data source,
    one kept checkpoint per stage and a 2-batch evaluation; stages are the caller's."""
    c = E.base_config()
    c.tokenizer = paths["tokenizer"]
    c.model.preset = "tiny"
    c.model.update(dict(vocab_size=640, dim=dim, n_layers=layers, n_heads=4, n_kv_heads=2, max_seq_len=128))
    c.sharding_rules = "dp"
    c.data.sources = [dict(name="arithmetic", kind="jsonl", path=paths["pretrain"], weight=1.0, split="all",
                           eval_split="all")]
    c.checkpoint.update(dict(every_steps=0, keep=1))
    c.eval.update(dict(every_steps=0, batches=2))
    return c


def arithmetic_stages(paths: dict, *, rounds: int, k: int, sft_steps: int, dpo_steps: int,
                      reward_model: bool = False, min_score: float = 1.0) -> list[dict]:
    """Post-training on the arithmetic task (`tasks.write_arithmetic`'s `paths`) from the stage before it (or
    init_from): `sft` on the seed dialogs, then `rounds` rounds of rs -> sft -> two DPO runs -> their average.

    Samples are graded by `tasks.score_arithmetic` (only fully correct ones kept; pairs: the most frequent
    correct vs the most frequent wrong sample, drawn from the round's SFT model, DPO's reference: on-policy);
    every stage reports held-out accuracy (`verify_arithmetic`).
    Small-model learning rates replace the paper's 1e-5 for SFT (1e-3, then 3e-4 in the rounds on the kept
    samples mixed with the seed dialogs); DPO keeps the paper's LR 1e-5, β 0.1 and NLL 0.2, and a second run
    with NLL 1.0 is averaged with it. `reward_model`: from round 2, a reward model trained on the previous
    round's pairs scores the samples instead of the program. `min_score`: the grade a sample needs to be kept
    (and to be DPO's chosen): 1.0, fully correct; 0.5 also takes a right answer with wrong work shown (useful
    for models trained only a few steps, which rarely produce a fully correct sample)."""
    task = dict(eval_prompts=paths["heldout"], verifier=ARITHMETIC_VERIFIER, eval_max_new_tokens=12)
    stages = [sft_stage("sft", paths["sft"], sft_steps, ARITHMETIC_SEQ_LEN, 16, lr=1e-3, warmup=10, **task)]
    policy = "sft"
    for r in range(1, rounds + 1):
        rm = dict(reward_preferences=f"stage:rs_r{r - 1}/preferences.jsonl", rm_steps=sft_steps) \
            if reward_model and r > 1 else {}
        stages += round_stages(r, paths["prompts"], ARITHMETIC_SEQ_LEN, policy=policy, k=k,
                               verifier=ARITHMETIC_SCORER, sft_steps=sft_steps, dpo_steps=dpo_steps, batch=16,
                               sft_lr=3e-4, sft_extra=paths["sft"], dpo_lr=PAPER_DPO_LR,
                               rs=dict(min_score=min_score, max_new_tokens=12, temperature=1.0), task=task,
                               dpo_runs=ARITHMETIC_DPO_RUNS, on_policy_pairs=True, **rm)
        policy = round_policy(r, ARITHMETIC_DPO_RUNS)
    return stages


__all__ = ["ARITHMETIC_DPO_RUNS", "ARITHMETIC_SCORER", "ARITHMETIC_SEQ_LEN", "ARITHMETIC_VERIFIER", "PAPER_DPO_LR",
           "PAPER_SFT_LR", "arithmetic_config", "arithmetic_stages", "average_stage", "dpo_stage", "rejection_stage", "reward_stage",
           "round_policy", "round_stages", "sft_stage"]
