"""Stage kind `average`: model averaging (Llama 3 §4.1.5) as a stage. The stage starts from Σ_i w_i p_i of its
sources' newest parameters (`initial_params`; weights normalized, uniform by default; `train.averaging`) and
trains nothing (`trains = False`), so its checkpoint is the average and the next stage starts from it.

Options (`stages.options.AverageOptions`): sources (`stage:<name>` of this run, another run's workdir, or a
stage's checkpoint directory), weights, task evaluation. `finish` records the sources, their steps and the
normalized weights.
"""

from __future__ import annotations

import os

from llama_jax import workdir as workdir_lib
from llama_jax.experiment.options import StageRef
from llama_jax.stages import common
from llama_jax.stages import options as options_lib
from llama_jax.train import averaging
from llama_jax.train import checkpoint as ckpt_lib
from llama_jax.train import kind as kind_lib
from llama_jax.train import resume


def checkpoint_source(ctx: kind_lib.StageContext, spec) -> str:
    """An averaging source: `stage:<name>` (an earlier stage of this run), another run's workdir (its last stage
    with a checkpoint) or a stage's checkpoint directory -> the checkpoint directory to read."""
    if isinstance(spec, StageRef):
        directory = workdir_lib.checkpoints_dir(ctx.workdir, spec.stage)
    elif os.path.isfile(workdir_lib.config_path(spec)):
        name = resume.last_stage_with_checkpoints(spec)
        if name is None:
            raise FileNotFoundError(f"stage {ctx.stage.name!r} (average): workdir {spec!r} has no stage checkpoint")
        directory = workdir_lib.checkpoints_dir(spec, name)
    else:
        directory = spec
    if not ckpt_lib.list_steps(directory):
        raise FileNotFoundError(f"stage {ctx.stage.name!r} (average): source {str(spec)!r} has no checkpoint "
                                f"({directory})")
    return directory


class Average(kind_lib.StageKind):
    name = "average"
    trains = False
    Options = options_lib.AverageOptions

    def _weights(self, ctx) -> list[float] | None:
        return list(ctx.stage.options.weights) or None

    def initial_params(self, ctx, abstract_params):
        sources = ctx.stage.options.sources
        directories = [checkpoint_source(ctx, s) for s in sources]
        try:
            params = averaging.average_checkpoints([(d, None) for d in directories], abstract_params,
                                                   self._weights(ctx))
        except Exception as e:  # noqa: BLE001 - name the stage; restore errors name the tensor
            raise ValueError(f"stage {ctx.stage.name!r} (average): the sources {[str(s) for s in sources]} cannot "
                             f"be averaged onto this stage's model {ctx.stage.model.name!r}: {type(e).__name__}: "
                             f"{ckpt_lib.first_line(e) if str(e) else ''}") from None
        norm = averaging.normalized_weights(self._weights(ctx), len(sources))
        return params, "the average of " + ", ".join(f"{w:.4g} x {s}" for s, w in zip(sources, norm))

    def check_data(self, stage) -> None:
        common.check_files(stage, (stage.options.eval_prompts, "prompt"))

    def evaluate(self, ctx, params, phase, step):
        options = ctx.stage.options
        return common.task_eval(ctx, params, options.eval_prompts, options.verifier, options.eval_max_new_tokens)

    def finish(self, ctx, state):
        sources = ctx.stage.options.sources
        return {"average": {"sources": [str(s) for s in sources],
                            "weights": averaging.normalized_weights(self._weights(ctx), len(sources)),
                            "steps": [ckpt_lib.list_steps(checkpoint_source(ctx, s))[-1] for s in sources]}}


__all__ = ["Average", "checkpoint_source"]
