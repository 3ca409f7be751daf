"""Stage builders of the Llama 3 post-training recipe (§4), for experiment configs.

`round_stages(r, ...)` is one round: [preference annotation ->] [reward model ->] rejection sampling -> SFT ->
DPO, each training stage optionally several runs averaged. As the paper, by default: the reward model is trained
on top of the pre-trained checkpoint on all preference annotations so far (§4.1.2), each round's SFT fine-tunes
the pre-trained checkpoint on that round's data (§4.1, §4.1.3), and DPO trains on the latest batch of preference
annotations (§4.1.4) collected from the previous round's models (§4.2.1), keeping only "significantly better"
and "better" pairs (§4.1.2); rejection sampling draws K samples (10-30, default 10) from the model entering the
round (the previous round's model, or a teacher) and keeps the best as SFT data; runs of a stage with different
data or hyperparameters are averaged (§4.1.5). Paper values: SFT and DPO LR 1e-5, β 0.1, NLL coefficient 0.2.
Small models need larger learning rates (give `sft_lr`, `dpo_lr`). Choices, not the paper's: starting the
reward model or SFT from the policy (`rm_from` / `sft_from="policy"`) and DPO on rejection sampling's
best-vs-worst pairs (`dpo_pairs="rejection"`).
"""

from __future__ import annotations

from llama_jax import experiment as E
from llama_jax.experiment.options import START_FROM_INIT

PAPER_SFT_LR = 1e-5
PAPER_DPO_LR = 1e-5
STARTS = ("pretrained", "policy")  # where a round's reward model and SFT start (the paper: pretrained)
DPO_PAIRS = ("annotations", "rejection")  # DPO's data (the paper: annotations)


def sft_stage(name: str, dialogs: str | list[str], steps: int, seq_len: int, batch: int, lr: float = PAPER_SFT_LR,
              warmup: int = 0, **options) -> dict:
    return E.stage(name, [E.phase(seq_len, batch)], E.optim(lr, warmup, final_lr_ratio=0.1, weight_decay=0.0),
                   steps=steps, kind="sft",
                   options=dict(dialogs=[dialogs] if isinstance(dialogs, str) else list(dialogs), **options))


def dpo_stage(name: str, preferences: str | list[str], steps: int, seq_len: int, pairs: int,
              lr: float = PAPER_DPO_LR, warmup: int = 0, **options) -> dict:
    return E.stage(name, [E.phase(seq_len, 2 * pairs)], E.optim(lr, warmup, final_lr_ratio=0.1, weight_decay=0.0),
                   steps=steps, kind="dpo",
                   options=dict(preferences=[preferences] if isinstance(preferences, str) else list(preferences),
                                **options))


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


def annotation_stage(name: str, prompts: str, seq_len: int, batch: int, annotator: str,
                     models: list[str] | tuple[str, ...] = (), **options) -> dict:
    """A batch of preference annotations (kind `preference_annotation`): two samples per prompt from two of
    `models` (or the model the stage starts from), labelled by `annotator`; it trains nothing."""
    return E.stage(name, [E.phase(seq_len, batch)], E.optim(1.0, 0), kind="preference_annotation",
                   options=dict(prompts=prompts, annotator=annotator, models=list(models), **options))


def average_stage(name: str, sources: list[str], weights: list[float] | None = None, seq_len: int = 64,
                  batch: int = 8, **options) -> dict:
    """The weighted mean (uniform by default) of `sources` (`stage:<name>`, another run's workdir, or a
    checkpoint directory) as a stage: it trains nothing, its checkpoint is the average."""
    return E.stage(name, [E.phase(seq_len, batch)], E.optim(1.0, 0), kind="average",
                   options=dict(sources=list(sources), weights=[float(w) for w in weights or ()], **options))


def _runs(make, name: str, lr: float, runs: tuple[dict, ...], average: str, **average_options
          ) -> tuple[list[dict], str]:
    """(stages, the stage holding the result): `make(name, lr, {})`, one more run per dict of overrides in
    `runs` (`<name>_2`, ...: "lr" and options), then their uniform average `average` when there is more than one
    run (Llama 3 §4.1.5: models from runs with different data or hyperparameters are averaged)."""
    out = [make(name, lr, {})]
    for j, run in enumerate(runs, 2):
        run = dict(run)
        out.append(make(f"{name}_{j}", run.pop("lr", lr), run))
    if not runs:
        return out, name
    out.append(average_stage(average, [f"stage:{st['name']}" for st in out], **average_options))
    return out, average


def annotation_batch(r: int, annotations: str = "", annotator: str = "") -> str:
    """Round r's batch of preference annotations: what its annotation stage `ann_r<r>` wrote (with an
    `annotator`), else the file `annotations` names (`{round}` in it is replaced by r), else ""."""
    if annotator:
        return f"stage:ann_r{r}/preferences.jsonl"
    return annotations.replace("{round}", str(r))


def _unique(items) -> list:
    return list(dict.fromkeys(i for i in items if i))


def round_stages(r: int, prompts: str, seq_len: int, *, policy: str, pretrained: str = START_FROM_INIT,
                 rm_from: str = "pretrained", sft_from: str = "pretrained", k: int = 10, verifier: str = "",
                 eval_verifier: str = "", reward_preferences: str | list[str] = "", reward_model: bool = False,
                 annotations: str = "", annotator: str = "", annotation: dict | None = None,
                 annotation_models: tuple[str, ...] = (), dpo_pairs: str = "annotations", dpo_batches: int = 1,
                 sft_steps: int = 100, dpo_steps: int = 50, rm_steps: int = 0, batch: int = 16,
                 sft_lr: float = PAPER_SFT_LR, sft_warmup: int = 0, dpo_lr: float = PAPER_DPO_LR,
                 rs: dict | None = None, task: dict | None = None, sft_extra: str = "", dpo: dict | None = None,
                 rm_runs: tuple[dict, ...] = (), sft_runs: tuple[dict, ...] = (), dpo_runs: tuple[dict, ...] = (),
                 dpo_batch: int = 0, on_policy_pairs: bool = False, system_prompts: tuple[str, ...] = ()
                 ) -> list[dict]:
    """Round `r` from stage `policy` (the previous round's model):
    [ann_r ->] [rm_r.. ->] rs_r -> sft_r.. -> [pairs_r ->] dpo_r.. (`..`: further runs and their average).

    `pretrained`: the pre-trained model (an earlier stage, or "init_from": config.init_from). The round's
    batch of preference annotations (`annotation_batch`) is what `ann_r` writes when `annotator` is given (a
    graded verifier labelling two samples per prompt from `annotation_models`, by default `policy`; `annotation`:
    more options of that stage, e.g. `editor`), else the file `annotations` ("{round}" = r). With
    `reward_model` (or `reward_preferences`, files read every round), a reward model `rm_r` trained on
    `reward_preferences` plus every annotation batch of rounds 1..r scores rs_r's samples, else `verifier` does.
    `rm_from` / `sft_from`: "pretrained" (the paper's) or "policy". rs_r samples K responses per prompt from
    `policy` (from `rs["sampler"]`, a teacher, when given; `system_prompts` steer them) and keeps the best: the
    round's SFT data, mixed with `sft_extra`. `dpo_pairs`: "annotations" (the paper's: the latest `dpo_batches`
    annotation batches) or "rejection" (rs_r's best-vs-worst pairs, or with `on_policy_pairs` those of a
    second rejection-sampling stage `pairs_r` sampling the round's SFT model, DPO's reference). `rm_runs`,
    `sft_runs`, `dpo_runs`: further runs of that stage, each a dict of overrides ("lr" and options), averaged
    with the first (`avg_rm_r`, `avg_sft_r`, `avg_r`). The round's model is its last stage (`round_policy`).
    `task`: held-out evaluation options of every stage but the reward model's."""
    if rm_from not in STARTS or sft_from not in STARTS:
        raise ValueError(f"rm_from={rm_from!r} and sft_from={sft_from!r} must be one of {STARTS}")
    if dpo_pairs not in DPO_PAIRS:
        raise ValueError(f"dpo_pairs={dpo_pairs!r}; expected one of {DPO_PAIRS}")
    task = dict(task or {})
    start = {"pretrained": pretrained, "policy": policy}
    batches = _unique(annotation_batch(i, annotations, annotator) for i in range(1, r + 1))
    out = []
    if annotator:
        out.append(annotation_stage(f"ann_r{r}", prompts, seq_len, batch, annotator, annotation_models,
                                    start_from=policy, **dict(annotation or {})))
    scorer = dict(scorer="verifier", verifier=verifier)
    if reward_model or reward_preferences:
        extra = [reward_preferences] if isinstance(reward_preferences, str) else list(reward_preferences)
        preferences = _unique(extra + batches)
        if not preferences:
            raise ValueError(f"round {r}: the reward model has no preference data: give annotations, an annotator "
                             "or reward_preferences")

        def reward_run(name, lr, run):
            return reward_stage(name, preferences, rm_steps or sft_steps, seq_len, batch, lr,
                                **{"start_from": start[rm_from], **run})
        stages, rm = _runs(reward_run, f"rm_r{r}", sft_lr, rm_runs, f"avg_rm_r{r}", seq_len=seq_len, batch=batch)
        out += stages
        scorer = dict(scorer="reward", reward_model=f"stage:{rm}")
    evaluation = {k_: v for k_, v in task.items() if k_ != "verifier"}
    if task.get("verifier") and (task["verifier"] != verifier or scorer["scorer"] == "reward"):
        evaluation["eval_verifier"] = task["verifier"]
    if eval_verifier:
        evaluation["eval_verifier"] = eval_verifier
    steer = dict(system_prompts=list(system_prompts)) if system_prompts else {}
    out.append(rejection_stage(f"rs_r{r}", prompts, seq_len, batch, k=k, start_from=policy, **scorer,
                               **dict(rs or {}), **steer, **evaluation))
    dialogs = [f"stage:rs_r{r}/sft.jsonl"] + ([sft_extra] if sft_extra else [])

    def sft_run(name, lr, run):
        return sft_stage(name, dialogs, sft_steps, seq_len, batch, lr, sft_warmup,
                         **{"start_from": start[sft_from], **task, **run})
    stages, sft = _runs(sft_run, f"sft_r{r}", sft_lr, sft_runs, f"avg_sft_r{r}", seq_len=seq_len, batch=batch,
                        **task)
    out += stages
    pairs = dpo_batch or batch // 2
    if dpo_pairs == "annotations":
        prefs = _unique(annotation_batch(i, annotations, annotator) for i in range(max(1, r - dpo_batches + 1), r + 1))
        if not prefs:
            raise ValueError(f"round {r}: DPO trains on preference annotations (dpo_pairs='annotations', as the "
                             "paper): give annotations=FILE or an annotator, or choose dpo_pairs='rejection'")
    elif on_policy_pairs:
        out.append(rejection_stage(f"pairs_r{r}", prompts, seq_len, batch, k=k, start_from=sft, **scorer,
                                   **dict(rs or {}), **evaluation))
        prefs = [f"stage:pairs_r{r}/preferences.jsonl"]
    else:
        prefs = [f"stage:rs_r{r}/preferences.jsonl"]

    def dpo_run(name, lr, run):
        return dpo_stage(name, prefs, dpo_steps, seq_len, pairs, lr, **{**dict(dpo or {}), **run},
                         start_from=sft, **task)
    stages, _ = _runs(dpo_run, f"dpo_r{r}", dpo_lr, dpo_runs, f"avg_r{r}", seq_len=seq_len, batch=batch, **task)
    return out + stages


def round_policy(r: int, dpo_runs: tuple[dict, ...] = ()) -> str:
    """The stage holding round r's model: `avg_r` when the round averages several DPO runs, else `dpo_r`."""
    return f"avg_r{r}" if dpo_runs else f"dpo_r{r}"


def round_models(r: int, dpo_runs: tuple[dict, ...] = ()) -> list[str]:
    """Round r's DPO runs (`stage:<name>`): the models whose samples the next round's annotations label (the
    paper deploys several models of a round for annotation, §4.2.1)."""
    return [f"stage:dpo_r{r}"] + [f"stage:dpo_r{r}_{j}" for j in range(2, len(dpo_runs) + 2)]


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


ARITHMETIC_EDITOR = "llama_jax.posttrain.tasks:edit_arithmetic"  # the synthetic annotator's editing step


def arithmetic_stages(paths: dict, *, rounds: int, k: int, sft_steps: int, dpo_steps: int,
                      reward_model: bool = False, min_score: float = 1.0, pretrained: str = START_FROM_INIT,
                      sft_from: str = "pretrained", rm_from: str = "pretrained",
                      dpo_pairs: str = "annotations", dpo_lr: float = PAPER_DPO_LR,
                      dpo_nll: float | None = None) -> list[dict]:
    """Post-training on the arithmetic task (`tasks.write_arithmetic`'s `paths`) from the pre-trained model
    `pretrained` (an earlier stage, or "init_from"), the stage before: `sft` on the seed dialogs, then `rounds`
    rounds of [ann ->] rs -> sft -> two DPO runs -> their average, the paper's data flow (`round_stages`).

    `ann_rN` is the round's batch of preference annotations: two samples per prompt at temperature 1 from the
    previous round's two DPO runs (round 1: two samples of `sft`), labelled by a synthetic annotator, the
    graded `tasks.score_arithmetic` (a fully correct answer over a wrong one: "significantly better", every other
    preference "better"), with `tasks.edit_arithmetic` as its editing step. rs_rN samples K responses from the
    model entering the round, graded by `score_arithmetic` (or the reward model), and keeps the best as SFT data
    (`min_score`: the grade a kept sample needs: 1.0, fully correct; 0.5 also takes a right answer with wrong
    work, for models trained only a few steps). sft_rN fine-tunes `pretrained` (`sft_from`) on the kept samples
    mixed with the seed dialogs; dpo_rN trains on the round's annotations (`dpo_pairs="annotations"`) or, a
    choice, on the most frequent correct vs the most frequent wrong sample of a second rejection-sampling stage
    `pairs_rN` drawn from the round's SFT model, DPO's reference (`"rejection"`, on-policy); a second DPO run
    with NLL 1.0 is averaged with it. `reward_model`: a reward model (from `pretrained`, `rm_from`) trained
    on every annotation batch so far scores the samples instead of the program. Every stage reports held-out
    accuracy (`verify_arithmetic`). Small-model learning rates replace the paper's 1e-5 for SFT (this
    project's choice: 1e-3 with 10 warm-up steps from the pre-trained model, 3e-4 when a round's SFT continues
    the policy); DPO keeps the paper's β 0.1, and its LR 1e-5 and NLL coefficient 0.2 for the first run unless
    `dpo_lr` and `dpo_nll` say otherwise."""
    task = dict(eval_prompts=paths["heldout"], verifier=ARITHMETIC_VERIFIER, eval_max_new_tokens=12)
    stages = [sft_stage("sft", paths["sft"], sft_steps, ARITHMETIC_SEQ_LEN, 16, lr=1e-3, warmup=10,
                        start_from=pretrained, **task)]
    policy = "sft"
    annotate = dpo_pairs == "annotations" or reward_model
    sft_lr, sft_warmup = (1e-3, 10) if sft_from == "pretrained" else (3e-4, 0)
    for r in range(1, rounds + 1):
        annotation = dict(annotator=ARITHMETIC_SCORER, annotation_models=round_models(r - 1, ARITHMETIC_DPO_RUNS)
                          if r > 1 else (), annotation=dict(editor=ARITHMETIC_EDITOR, max_new_tokens=12,
                                                            temperature=1.0)) if annotate else {}
        stages += round_stages(r, paths["prompts"], ARITHMETIC_SEQ_LEN, policy=policy, pretrained=pretrained,
                               rm_from=rm_from, sft_from=sft_from, k=k, verifier=ARITHMETIC_SCORER,
                               reward_model=reward_model, rm_steps=sft_steps, sft_steps=sft_steps,
                               dpo_steps=dpo_steps, batch=16, sft_lr=sft_lr, sft_warmup=sft_warmup,
                               sft_extra=paths["sft"], dpo_lr=dpo_lr,
                               rs=dict(min_score=min_score, max_new_tokens=12, temperature=1.0), task=task,
                               dpo_runs=ARITHMETIC_DPO_RUNS, dpo_pairs=dpo_pairs, on_policy_pairs=True,
                               dpo=None if dpo_nll is None else dict(nll_coef=dpo_nll), **annotation)
        policy = round_policy(r, ARITHMETIC_DPO_RUNS)
    return stages


__all__ = ["ARITHMETIC_DPO_RUNS", "ARITHMETIC_EDITOR", "ARITHMETIC_SCORER", "ARITHMETIC_SEQ_LEN",
           "ARITHMETIC_VERIFIER", "DPO_PAIRS", "PAPER_DPO_LR", "PAPER_SFT_LR", "STARTS", "annotation_batch",
           "annotation_stage", "arithmetic_config", "arithmetic_stages", "average_stage", "dpo_stage",
           "rejection_stage", "reward_stage", "round_models", "round_policy", "round_stages", "sft_stage"]
