"""The options of every stage kind: one frozen dataclass each, parsed once when the experiment is resolved.

Field types and metadata drive the parser (`llama_jax.experiment.options`): `Spec` is a path or a
`stage:<name>[/<file>]` reference (`StageRef`) to a file an earlier stage of this run wrote; `FILE` / `DIR`
paths must exist; `REQUIRED` fields must be given; tuples are lists. Each default is written once, here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field

from llama_jax.experiment.options import DIR, FILE, REQUIRED, Spec, StageOptions
from llama_jax.posttrain.data import KEPT_STRENGTHS, STRENGTHS, TRUNCATION
from llama_jax.posttrain.dpo import BETA, NLL_COEF


@dataclasses.dataclass(frozen=True)
class Transition(StageOptions):
    """Settings read by the driver when a stage starts from the previous stage's final checkpoint. Both default
    to True, a choice: the paper's long-context stages and anneal continue one training run, but it does not
    say whether optimizer state or the data order carries across them.

    carry_optimizer: AdamW's moments and bias correction continue from the previous stage; the stage's own LR
      schedule starts at 0. False: a fresh optimizer state (zero moments).
    continue_data: each data source shared with the previous stage continues its document stream after the
      last document that stage used (same shuffle, nothing repeated); new sources start at their beginning.
    """

    carry_optimizer: bool = True
    continue_data: bool = True


@dataclasses.dataclass(frozen=True)
class LongContextOptions(Transition):
    """`long_context` (see `llama_jax.stages.long_context`): the gates at the end of an extension stage."""

    short_seq_len: int = 0
    short_tolerance: float = 0.0
    needle_threshold: float = 0.0
    needle_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    needle_trials: int = 4
    needle_lengths: tuple[int, ...] = ()

    def __post_init__(self):
        if not 0.0 <= self.needle_threshold <= 1.0 or self.short_tolerance < 0:
            raise ValueError(f"options.needle_threshold must be in [0, 1] and short_tolerance >= 0, got "
                             f"{self.needle_threshold}, {self.short_tolerance}")
        if self.needle_trials < 1 or not self.needle_depths or any(not 0 <= d <= 1 for d in self.needle_depths):
            raise ValueError(f"options.needle_trials must be >= 1 and needle_depths a non-empty list in [0, 1], "
                             f"got {self.needle_trials}, {list(self.needle_depths)}")


@dataclasses.dataclass(frozen=True)
class AnnealOptions(Transition):
    """`anneal` (see `llama_jax.stages.anneal`): how many of the stage's checkpoints are averaged, and the
    stage it anneals from (default: the previous one)."""

    average_last: int = 1
    start_from: str = ""

    def __post_init__(self):
        if self.average_last < 1:
            raise ValueError(f"options.average_last={self.average_last} must be >= 1")


@dataclasses.dataclass(frozen=True)
class TaskOptions(StageOptions):
    """Held-out task evaluation every post-training kind may report (`eval_prompts` + `verifier`: the mean
    verifier score of greedy answers), and `start_from` (an earlier stage whose final parameters the stage
    starts from instead of the previous stage's)."""

    eval_prompts: Spec = field(default="", metadata=FILE)
    verifier: str = ""
    eval_max_new_tokens: int = 16
    start_from: str = ""

    def __post_init__(self):
        if bool(self.eval_prompts) != bool(self.verifier):
            raise ValueError("options.eval_prompts and options.verifier go together")
        if self.eval_max_new_tokens < 1:
            raise ValueError(f"options.eval_max_new_tokens={self.eval_max_new_tokens} must be >= 1")


def _check_truncation(value: str) -> None:
    if value not in TRUNCATION:
        raise ValueError(f"options.truncation={value!r}; expected one of {TRUNCATION}")


@dataclasses.dataclass(frozen=True)
class SFTOptions(TaskOptions):
    """`sft`: dialogs (required; several files are mixed), eval_dialogs, truncation ("drop" | "error")."""

    dialogs: tuple[Spec, ...] = field(default=(), metadata={**REQUIRED, **FILE})
    eval_dialogs: Spec = field(default="", metadata=FILE)
    truncation: str = "drop"

    def __post_init__(self):
        super().__post_init__()
        _check_truncation(self.truncation)


@dataclasses.dataclass(frozen=True)
class PreferenceOptions(TaskOptions):
    """Kinds trained on preference records: preferences (required; several files are mixed: the reward model
    reads every annotation batch so far, DPO the latest ones), eval_preferences, truncation, strengths (the
    annotator labels kept; a record without a label is kept: the paper's "significantly better" and
    "better" by default, §4.1.2)."""

    preferences: tuple[Spec, ...] = field(default=(), metadata={**REQUIRED, **FILE})
    eval_preferences: Spec = field(default="", metadata=FILE)
    truncation: str = "drop"
    strengths: tuple[str, ...] = KEPT_STRENGTHS

    def __post_init__(self):
        super().__post_init__()
        _check_truncation(self.truncation)
        if not self.strengths or set(self.strengths) - set(STRENGTHS):
            raise ValueError(f"options.strengths={list(self.strengths)} must be a non-empty subset of {STRENGTHS}")


@dataclasses.dataclass(frozen=True)
class RewardOptions(PreferenceOptions):
    """`reward`: the preference settings."""


@dataclasses.dataclass(frozen=True)
class DPOOptions(PreferenceOptions):
    """`dpo`: β and the NLL coefficient of Llama 3's objective (the paper's values by default)."""

    beta: float = BETA
    nll_coef: float = NLL_COEF

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0 or self.nll_coef < 0:
            raise ValueError(f"beta={self.beta} must be > 0 and nll_coef={self.nll_coef} >= 0")


@dataclasses.dataclass(frozen=True)
class RejectionOptions(TaskOptions):
    """`rejection_sampling`: prompts (required), k (paper 10-30), scorer ("verifier" | "reward"), verifier
    ("package.module:function"), reward_model (`stage:<name>` of this run or another workdir), sampler ("" = the
    model the stage starts from, or `stage:<name>` or another workdir: a teacher), temperature, top_p,
    max_new_tokens, min_score (a best sample below it is not kept), batch_size (sequences per sampler call),
    system_prompts (steering system messages the samples are drawn with, prompt i taking the (i mod n)-th; the
    data written keeps the prompt as given), and task evaluation with eval_verifier (the scoring verifier when
    empty)."""

    prompts: Spec = field(default="", metadata={**REQUIRED, **FILE})
    k: int = 10
    scorer: str = "verifier"
    reward_model: Spec = ""
    sampler: Spec = field(default="", metadata=DIR)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    min_score: float = float("-inf")
    batch_size: int = 64
    system_prompts: tuple[str, ...] = ()
    eval_verifier: str = ""

    def __post_init__(self):
        if any(not p.strip() for p in self.system_prompts):
            raise ValueError("options.system_prompts holds an empty prompt")
        if self.eval_max_new_tokens < 1:
            raise ValueError(f"options.eval_max_new_tokens={self.eval_max_new_tokens} must be >= 1")
        if self.k < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("k, max_new_tokens and batch_size must be >= 1")
        if self.scorer not in ("verifier", "reward"):
            raise ValueError(f"scorer {self.scorer!r}; expected 'verifier' or 'reward'")
        if self.scorer == "verifier" and not self.verifier:
            raise ValueError("scorer 'verifier' needs options.verifier")
        if self.scorer == "reward" and not self.reward_model:
            raise ValueError("scorer 'reward' needs options.reward_model")
        if not (self.temperature >= 0 and 0 < self.top_p <= 1):
            raise ValueError(f"temperature={self.temperature} must be >= 0 and top_p={self.top_p} in (0, 1]")

    @property
    def task_verifier(self) -> str:
        """The verifier of the held-out evaluation (eval_verifier, else the scoring verifier)."""
        return self.eval_verifier or self.verifier


@dataclasses.dataclass(frozen=True)
class AnnotationOptions(TaskOptions):
    """`preference_annotation`: prompts (required), annotator (required: a graded verifier
    "package.module:function", (record, response) -> score, whose score gap sets the strength label;
    `posttrain.annotation`), score_scale (the annotator's score range), editor ("" or "package.module:function",
    (record, chosen) -> an improved response or ""), models (`stage:<name>` of this run or other workdirs whose
    samples are labelled, two different models per prompt; empty = two samples of the model the stage starts
    from), temperature, top_p, max_new_tokens, batch_size, task evaluation."""

    prompts: Spec = field(default="", metadata={**REQUIRED, **FILE})
    annotator: str = field(default="", metadata=REQUIRED)
    score_scale: float = 1.0
    editor: str = ""
    models: tuple[Spec, ...] = field(default=(), metadata=DIR)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    batch_size: int = 64

    def __post_init__(self):
        super().__post_init__()
        if self.score_scale <= 0 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(f"options.score_scale={self.score_scale} must be > 0, max_new_tokens and batch_size "
                             ">= 1")
        if not (self.temperature >= 0 and 0 < self.top_p <= 1):
            raise ValueError(f"temperature={self.temperature} must be >= 0 and top_p={self.top_p} in (0, 1]")


@dataclasses.dataclass(frozen=True)
class AverageOptions(StageOptions):
    """`average`: sources (required: `stage:<name>` of this run, another run's workdir, or a stage's checkpoint
    directory), weights (empty = uniform, else one per source, >= 0), task evaluation."""

    sources: tuple[Spec, ...] = field(default=(), metadata={**REQUIRED, **DIR})
    weights: tuple[float, ...] = ()
    eval_prompts: Spec = field(default="", metadata=FILE)
    verifier: str = ""
    eval_max_new_tokens: int = 16

    def __post_init__(self):
        TaskOptions.__post_init__(self)
        if self.weights:
            from llama_jax.train import averaging  # noqa: PLC0415
            try:
                averaging.normalized_weights(self.weights, len(self.sources))
            except ValueError as e:
                raise ValueError(f"options.weights={list(self.weights)}: {e}") from None


__all__ = ["AnnealOptions", "AnnotationOptions", "AverageOptions", "DPOOptions", "LongContextOptions",
           "PreferenceOptions", "RejectionOptions", "RewardOptions", "SFTOptions", "TaskOptions", "Transition"]
