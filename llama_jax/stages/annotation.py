"""Stage kind `preference_annotation` (Llama 3 §4.2.1): a batch of preference annotations on samples of the
previous round's models, the data the paper's DPO trains on (its latest batches) and its reward model adds up.

For each prompt two responses are sampled from two different models (`models`: prompt i takes models i and i + 1
mod n; with no model named, two samples of the model the stage starts from) and labelled by a synthetic
annotator (`posttrain.annotation`: a graded verifier, the strength from the score gap, an optional editor). It
trains nothing (`trains = False`): its checkpoint is the model it started from, and `finish` writes
`preferences.jsonl` (every labelled pair, whatever its strength: the stages that read it keep the strengths they
are set to) and `stats.json` (pairs, ties, strengths, each model's mean score) in the stage's directory.
Options: `stages.options.AnnotationOptions`.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import logging

from llama_jax import workdir as workdir_lib
from llama_jax.posttrain import annotation
from llama_jax.posttrain import data as data_lib
from llama_jax.posttrain import rejection
from llama_jax.posttrain import reward as reward_lib
from llama_jax.stages import common
from llama_jax.stages import options as options_lib
from llama_jax.stages.rejection import load_model
from llama_jax.train import kind as kind_lib

OWN_MODEL = "this stage's model"


def model_pairs(n_prompts: int, n_models: int) -> list[tuple[int, int]]:
    """(model of the first response, model of the second) per prompt: models i and i + 1 (mod n), so every
    prompt compares two different models and each model answers as many prompts; one model: (0, 0)."""
    return [(i % n_models, (i + 1) % n_models) for i in range(n_prompts)]


class PreferenceAnnotation(kind_lib.StageKind):
    name = "preference_annotation"
    trains = False
    Options = options_lib.AnnotationOptions

    def check_data(self, stage) -> None:
        options = stage.options
        common.check_files(stage, (options.prompts, "prompt"), (options.eval_prompts, "prompt"))

    def evaluate(self, ctx, params, phase, step):
        options = ctx.stage.options
        return common.task_eval(ctx, params, options.eval_prompts, options.verifier, options.eval_max_new_tokens)

    def finish(self, ctx, state):
        options = ctx.stage.options
        records, report = common.read_records(ctx, options.prompts, "prompt")
        names = [str(m) for m in options.models] or [OWN_MODEL]
        pairs = model_pairs(len(records), len(names))
        responses: list[list[str]] = [["", ""] for _ in records]
        for j, name in enumerate(names):
            wanted = [(i, slot) for i, pair in enumerate(pairs) for slot in (0, 1) if pair[slot] == j]
            if options.models:
                cfg, params = load_model(ctx, options.models[j])
                reward_lib.check_vocabulary(cfg, ctx.stage.model, name)
            else:
                cfg, params = ctx.stage.model, state.params
            texts = rejection.sample_responses(cfg, params, ctx.tokenizer, [records[i]["prompt"] for i, _ in wanted],
                                               1, options.max_new_tokens, options.temperature, options.top_p,
                                               seed=ctx.stage.iterator_seed() + j, batch_size=options.batch_size)
            for (i, slot), (text,) in zip(wanted, texts):
                responses[i][slot] = text
            del params
        grade = rejection.load_verifier(options.annotator)
        scores = rejection.score_with_verifier(records, responses, grade)
        editor = rejection.load_verifier(options.editor) if options.editor else None
        labelled, stats = annotation.annotate(records, [tuple(r) for r in responses], np.asarray(scores),
                                              [(names[a], names[b]) for a, b in pairs], options.score_scale, editor)
        stats = dict(stats, annotator=options.annotator, editor=options.editor, prompts_file=report.to_json())
        if jax.process_index() == 0:
            out = lambda name: workdir_lib.stage_output_path(ctx.workdir, ctx.stage.name, name)  # noqa: E731
            data_lib.write_jsonl(out("preferences.jsonl"), labelled)
            workdir_lib.write_json_atomic(out("stats.json"), stats)
        logging.info("stage %r: %d preference pairs from %d prompts (%d ties); strengths %s", ctx.stage.name,
                     stats["pairs"], stats["prompts"], stats["ties"], stats["strengths"])
        return {"annotation": stats}


__all__ = ["PreferenceAnnotation", "model_pairs"]
