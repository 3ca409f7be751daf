"""Stage kind `rejection_sampling` (Llama 3 §4.2.2): K samples per prompt, scored by a verifier or a reward
model, the best kept as SFT data plus best-vs-worst preference pairs. It trains nothing (`trains = False`): its
checkpoint is the model it started from, and `finish` samples, scores, selects and writes `sft.jsonl`,
`preferences.jsonl` (best vs worst) and `stats.json` in the stage's directory, for the stages after it.

Options (`stages.options.RejectionOptions`): the sampler is the stage's own model unless `sampler` names another
workdir (a larger teacher); a reward model (`reward_model`: `stage:<name>` of this run or another workdir) is
loaded onto the stage's mesh.
"""

from __future__ import annotations

import jax
from absl import logging

from llama_jax import workdir as workdir_lib
from llama_jax.experiment.options import StageRef
from llama_jax.posttrain import data as data_lib
from llama_jax.posttrain import rejection
from llama_jax.posttrain import reward as reward_lib
from llama_jax.stages import common
from llama_jax.stages import options as options_lib
from llama_jax.train import kind as kind_lib
from llama_jax.train import resume


def load_model(ctx: kind_lib.StageContext, spec) -> tuple:
    """(ModelConfig, params) of `stage:<name>` (this run) or another run's workdir, on the stage's mesh."""
    if isinstance(spec, StageRef):
        return resume.load_stage(ctx.workdir, spec.stage, ctx.mesh, ctx.rules)
    return resume.load_workdir(spec, mesh=ctx.mesh, rules=ctx.rules)


class RejectionSampling(kind_lib.StageKind):
    name = "rejection_sampling"
    trains = False
    Options = options_lib.RejectionOptions

    def check_data(self, stage) -> None:
        o = stage.options
        common.check_files(stage, (o.prompts, "prompt"), (o.eval_prompts, "prompt"))

    def evaluate(self, ctx, params, phase, step):
        o = ctx.stage.options
        return common.task_eval(ctx, params, o.eval_prompts, o.task_verifier, o.eval_max_new_tokens)

    def finish(self, ctx, state):
        o = ctx.stage.options
        records, report = common.read_records(ctx, o.prompts, "prompt")
        if o.sampler:
            cfg, params = load_model(ctx, o.sampler)
            reward_lib.check_vocabulary(cfg, ctx.stage.model, o.sampler)
        else:
            cfg, params = ctx.stage.model, state.params
        responses = rejection.sample_responses(cfg, params, ctx.tokenizer, [r["prompt"] for r in records], o.k,
                                               o.max_new_tokens, o.temperature, o.top_p,
                                               seed=ctx.stage.iterator_seed(), batch_size=o.batch_size)
        if o.scorer == "verifier":
            scores = rejection.score_with_verifier(records, responses, rejection.load_verifier(o.verifier))
        else:
            rm_cfg, rm_params = load_model(ctx, o.reward_model)
            reward_lib.check_vocabulary(rm_cfg, cfg, str(o.reward_model))
            scores = rejection.score_with_reward_model(rm_cfg, rm_params, ctx.tokenizer, records, responses,
                                                       o.batch_size)
        dialogs, pairs, stats = rejection.select(records, responses, scores, o.min_score)
        stats = dict(stats, sampler=o.sampler or "this stage's model", scorer=o.scorer,
                     prompts_file=report.to_json())
        if jax.process_index() == 0:
            out = lambda name: workdir_lib.stage_output_path(ctx.workdir, ctx.stage.name, name)  # noqa: E731
            data_lib.write_jsonl(out("sft.jsonl"), dialogs)
            data_lib.write_jsonl(out("preferences.jsonl"), pairs)
            workdir_lib.write_json_atomic(out("stats.json"), stats)
        logging.info("stage %r: kept %d of %d prompts (%d pairs); mean score %s", ctx.stage.name, stats["kept"],
                     stats["prompts"], stats["pairs"], stats["score_mean"])
        return {"rejection_sampling": stats}


__all__ = ["RejectionSampling", "load_model"]
