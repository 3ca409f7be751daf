"""Stage kind `anneal`: LR to 0 over the last tokens, the annealing checkpoints averaged (Llama 3 section
3.4.3: the final model is the average of the checkpoints written during annealing).

It trains like `pretrain`; give the stage `optim(..., decay="linear", final_lr_ratio=0.0)` and `data` with the
anneal's source weights (the paper upsamples very-high-quality sources; which ones is the experiment's choice).
Options (`stages.options.AnnealOptions`): `average_last` = how many of the stage's checkpoints (steps > 0, the
last included) are averaged (exactly, streaming: `train.averaging`) into the final model, which is saved as the
stage's checkpoint `total_steps + 1` (what the next stage, `generate` and `convert` load); `start_from` = an
earlier stage to anneal from (default: the previous one; the data-value probe, `experiment.data_value_probe`,
anneals one checkpoint twice this way); `carry_optimizer` and `continue_data` as `long_context`. DONE.json
records the loss of the last checkpoint and of the average.

Checkpoints: an anneal writes and keeps the checkpoints it averages. Unless the stage sets its own `checkpoint`,
it saves every min(config.checkpoint.every_steps, total_steps // average_last) steps (the run's cadence when
that is already frequent enough) and keeps at least `average_last` of them (`checkpoint_plan`); a stage whose
own cadence or retention cannot give `average_last` checkpoints is refused when the experiment is resolved
(`check`). `averaged_steps(stage)` names the steps a run averages.
"""

from __future__ import annotations

import json
import os

import jax
from absl import logging

from llama_jax import workdir as workdir_lib
from llama_jax.stages import options as options_lib
from llama_jax.stages.pretrain import Pretrain, eval_loss
from llama_jax.train import averaging
from llama_jax.train import checkpoint as ckpt_lib


def saved_steps(total_steps: int, every: int) -> list[int]:
    """The steps (> 0) a stage of `total_steps` steps saves at with cadence `every` (0: its last step only)."""
    periodic = range(every, total_steps + 1, every) if every > 0 else ()
    return sorted(set(periodic) | {total_steps})


def averaged_steps(stage) -> list[int]:
    """The steps of the checkpoints an uninterrupted run of the resolved anneal `stage` averages: the last
    `average_last` it saves (fewer only when its cadence cannot give them, which `Anneal.check` refuses)."""
    return saved_steps(stage.total_steps, stage.checkpoint_every)[-stage.options.average_last:]


class Anneal(Pretrain):
    name = "anneal"
    Options = options_lib.AnnealOptions

    def checkpoint_plan(self, stage) -> tuple[int, int]:
        """The run's cadence when it gives `average_last` checkpoints, else total_steps // average_last; at least
        `average_last` kept."""
        n = stage.options.average_last
        spread = max(stage.total_steps // n, 1)
        every = min(stage.checkpoint_every, spread) if stage.checkpoint_every > 0 else spread
        return every, max(stage.checkpoint_keep, n)

    def check(self, stage) -> None:
        n, total = stage.options.average_last, stage.total_steps
        if total < n:
            raise ValueError(f"stage {stage.name!r} (anneal): options.average_last={n} checkpoints cannot come from "
                             f"its {total} steps: lower average_last or lengthen the stage")
        every, keep = stage.checkpoint_every, stage.checkpoint_keep
        written = len(saved_steps(total, every))
        if written < n or keep < n:
            raise ValueError(f"stage {stage.name!r} (anneal) averages its last {n} checkpoints (options.average_last), "
                             f"but checkpoint.every_steps={every} writes {written} in its {total} steps and "
                             f"checkpoint.keep={keep} keeps {keep}: set the stage's checkpoint every_steps to at most "
                             f"{total // n} and keep to at least {n}, or leave its checkpoint unset")

    def finish(self, ctx, state):
        st = ctx.stage
        directory = workdir_lib.checkpoints_dir(ctx.workdir, st.name)
        steps = [s for s in ckpt_lib.list_steps(directory) if 0 < s <= st.total_steps][-st.options.average_last:]
        if not steps:
            raise ValueError(f"stage {st.name!r}: no annealing checkpoint to average in {directory!r}")
        if len(steps) < st.options.average_last:  # a run cut short (debug.max_steps) or checkpoints deleted
            logging.warning("stage %r: averaging %d checkpoints %s, not options.average_last=%d", st.name,
                            len(steps), steps, st.options.average_last)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state.params)
        averaged = averaging.average_checkpoints([(directory, s) for s in steps], abstract)
        p = st.phases[-1]
        batch = int(ctx.config.eval.global_batch) or p.global_batch
        out = {"averaged_steps": steps, "final_seq_len": p.seq_len}
        if int(ctx.config.eval.batches):
            out["last_checkpoint_loss"] = eval_loss(ctx, state.params, p.seq_len, batch, int(ctx.config.eval.batches))[0]
            out["averaged_loss"] = eval_loss(ctx, averaged, p.seq_len, batch, int(ctx.config.eval.batches))[0]
        ck = ckpt_lib.StageCheckpoints(directory, keep=10 ** 6, async_save=False)  # deletes nothing
        try:
            meta = dict(ck.read_meta(steps[-1]), averaged_steps=steps)
            ck.save(st.total_steps + 1, state.replace(params=averaged), None, meta, force=True)
        finally:
            ck.close()
        if jax.process_index() == 0:
            workdir_lib.write_json_atomic(os.path.join(workdir_lib.stage_dir(ctx.workdir, st.name),
                                                       "averaging.json"), json.loads(json.dumps(out)))
        out["averaged_checkpoint"] = st.total_steps + 1
        return out


def data_value_report(results: dict) -> dict:
    """The data-value probe's outcome from its two stages' results (DONE.json): held-out loss of the averaged
    model without (`base_loss`) and with (`new_loss`) the new source, and `gain` = base_loss - new_loss (> 0: the
    new data helped on this held-out set)."""
    missing = [n for n in ("probe_base", "probe_new") if "averaged_loss" not in (results.get(n) or {})]
    if missing:
        raise ValueError(f"data-value probe: stage(s) {missing} recorded no held-out loss (finished, with "
                         "eval.batches > 0?)")
    base, new = float(results["probe_base"]["averaged_loss"]), float(results["probe_new"]["averaged_loss"])
    return {"base_loss": base, "new_loss": new, "gain": base - new}


__all__ = ["Anneal", "averaged_steps", "data_value_report", "saved_steps"]
