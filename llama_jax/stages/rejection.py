"""Stage kind `rejection_sampling` (Llama 3 §4.2.2): K samples per prompt, scored by a verifier or a reward
model, the best kept as SFT data plus best-vs-worst preference pairs (a choice, not Llama 3's: its DPO trains on
human preference annotations). It trains nothing (`trains = False`): its
checkpoint is the model it started from, and `finish` samples, scores, selects and writes `sft.jsonl`,
`preferences.jsonl` (best vs worst; DPO's data when a recipe chooses them over annotations) and `stats.json` in
the stage's directory, for the stages after it. With `system_prompts` (Llama 3 §4.2.2, later rounds) each prompt
is sampled with a steering system message; the verifier or reward model scores, and the data keeps, the prompt
as given (this project's choice: the model learns the steered style without the steering message).

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
        options = stage.options
        common.check_files(stage, (options.prompts, "prompt"), (options.eval_prompts, "prompt"))

    def evaluate(self, ctx, params, phase, step):
        options = ctx.stage.options
        return common.task_eval(ctx, params, options.eval_prompts, options.task_verifier, options.eval_max_new_tokens)

    def finish(self, ctx, state):
        options = ctx.stage.options
        records, report = common.read_records(ctx, options.prompts, "prompt")
        if options.sampler:
            cfg, params = load_model(ctx, options.sampler)
            reward_lib.check_vocabulary(cfg, ctx.stage.model, str(options.sampler))
        else:
            cfg, params = ctx.stage.model, state.params
        prompts = rejection.with_system_prompts([r["prompt"] for r in records], options.system_prompts)
        responses = rejection.sample_responses(cfg, params, ctx.tokenizer, prompts, options.k,
                                               options.max_new_tokens, options.temperature, options.top_p,
                                               seed=ctx.stage.iterator_seed(), batch_size=options.batch_size)
        if options.scorer == "verifier":
            scores = rejection.score_with_verifier(records, responses, rejection.load_verifier(options.verifier))
        else:
            rm_cfg, rm_params = load_model(ctx, options.reward_model)
            reward_lib.check_vocabulary(rm_cfg, cfg, str(options.reward_model))
            scores = rejection.score_with_reward_model(rm_cfg, rm_params, ctx.tokenizer, records, responses,
                                                       options.batch_size)
        dialogs, pairs, stats = rejection.select(records, responses, scores, options.min_score)
        stats = dict(stats, sampler=str(options.sampler) or "this stage's model", scorer=options.scorer,
                     system_prompts=len(options.system_prompts), prompts_file=report.to_json())
        if jax.process_index() == 0:
            out = lambda name: workdir_lib.stage_output_path(ctx.workdir, ctx.stage.name, name)  # noqa: E731
            data_lib.write_jsonl(out("sft.jsonl"), dialogs)
            data_lib.write_jsonl(out("preferences.jsonl"), pairs)
            workdir_lib.write_json_atomic(out("stats.json"), stats)
        logging.info("stage %r: kept %d of %d prompts (%d pairs); mean score %s", ctx.stage.name, stats["kept"],
                     stats["prompts"], stats["pairs"], stats["score_mean"])
        return {"rejection_sampling": stats}


__all__ = ["RejectionSampling", "load_model"]
