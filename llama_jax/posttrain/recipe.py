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


def sft_stage(name: str, dialogs: str, steps: int, seq_len: int, batch: int, lr: float = PAPER_SFT_LR,
              warmup: int = 0, **options) -> dict:
    return E.stage(name, [E.phase(seq_len, batch)], E.optim(lr, warmup, final_lr_ratio=0.1, weight_decay=0.0),
                   steps=steps, kind="sft", options=dict(dialogs=dialogs, **options))


def dpo_stage(name: str, preferences: str, steps: int, seq_len: int, pairs: int, lr: float = PAPER_DPO_LR,
              warmup: int = 0, **options) -> dict:
    return E.stage(name, [E.phase(seq_len, 2 * pairs)], E.optim(lr, warmup, final_lr_ratio=0.1, weight_decay=0.0),
                   steps=steps, kind="dpo", options=dict(preferences=preferences, **options))


def reward_stage(name: str, preferences: str, steps: int, seq_len: int, records: int, lr: float = PAPER_SFT_LR,
                 **options) -> dict:
    return E.stage(name, [E.phase(seq_len, 3 * records)], E.optim(lr, 0, final_lr_ratio=0.1, weight_decay=0.0),
                   steps=steps, kind="reward", options=dict(preferences=preferences, **options))


def rejection_stage(name: str, prompts: str, seq_len: int, batch: int, **options) -> dict:
    """One step at learning rate 0 (warm-up from 0): the stage samples and writes data, it trains nothing."""
    return E.stage(name, [E.phase(seq_len, batch)], E.optim(1.0, 1), steps=1, kind="rejection_sampling",
                   options=dict(prompts=prompts, **options))


def average_stage(name: str, sources: list[str], weights: list[float] | None = None, seq_len: int = 64,
                  batch: int = 8, **options) -> dict:
    """The weighted mean (uniform by default) of `sources` (`stage:<name>`, another run's workdir, or a
    checkpoint directory) as a stage: one step at learning rate 0, its checkpoint is the average."""
    return E.stage(name, [E.phase(seq_len, batch)], E.optim(1.0, 1), steps=1, kind="average",
                   options=dict(sources=",".join(sources),
                                weights=",".join(repr(float(w)) for w in weights) if weights else "", **options))


def round_stages(r: int, prompts: str, seq_len: int, *, policy: str, k: int = 10, verifier: str = "",
                 reward_preferences: str = "", sft_steps: int = 100, dpo_steps: int = 50, batch: int = 16,
                 sft_lr: float = PAPER_SFT_LR, dpo_lr: float = PAPER_DPO_LR, rs: dict | None = None,
                 task: dict | None = None, sft_extra: str = "") -> list[dict]:
    """Round `r` starting from stage `policy`: [rm_r ->] rs_r -> sft_r -> dpo_r (names carry the round).

    `sft_extra`: earlier SFT data mixed with the round's rejection-sampled dialogs (as Llama 3 does)."""
    task = dict(task or {})
    out = []
    scorer = dict(scorer="verifier", verifier=verifier)
    if reward_preferences:
        out.append(reward_stage(f"rm_r{r}", reward_preferences, sft_steps, seq_len, batch, sft_lr,
                                start_from=policy))
        scorer = dict(scorer="reward", reward_model=f"stage:rm_r{r}")
    out.append(rejection_stage(f"rs_r{r}", prompts, seq_len, batch, k=k, start_from=policy, **scorer,
                               **dict(rs or {}), **{k_: v for k_, v in task.items() if k_ != "verifier"}))
    dialogs = f"stage:rs_r{r}/sft.jsonl" + (f",{sft_extra}" if sft_extra else "")
    out.append(sft_stage(f"sft_r{r}", dialogs, sft_steps, seq_len, batch, sft_lr, **task))
    out.append(dpo_stage(f"dpo_r{r}", f"stage:rs_r{r}/preferences.jsonl", dpo_steps, seq_len, batch // 2, dpo_lr,
                         **task))
    return out


__all__ = ["PAPER_DPO_LR", "PAPER_SFT_LR", "average_stage", "dpo_stage", "rejection_stage", "reward_stage", "round_stages",
           "sft_stage"]
