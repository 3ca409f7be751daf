"""Stage kinds `long_context` (a context-extension stage with gates) and `anneal` (LR to 0 + checkpoint averaging).

Both train like `pretrain` (next-token loss on the stage's mixture; the stage's own phases, optimizer,
`model_overrides` such as RoPE θ / max length and `data` overrides such as upsampled mixture weights). They
differ at the end of the stage, configured by the stage's `options`:

long_context (Llama 3 section 3.4.2: each extension stage ends when short-context performance has recovered
and needle-in-a-haystack is solved at the new length):
    short_seq_len      the short length whose validation loss is gated (e.g. the pretraining length)
    short_tolerance    gate `short_loss`: loss(short, this stage) - loss(short, previous stage) <= tolerance.
                       The previous value is the previous stage's DONE.json `short_loss` (a long_context stage)
                       or `eval_loss` (a stage whose last phase ran at short_seq_len); evaluation batches hold
                       (tokens per step of the stage's last phase) / short_seq_len rows unless eval.global_batch
                       is set, i.e. the same rows as the pretraining stage's evaluation when tokens per batch are
                       constant.
    needle_threshold   gate `needle`: mean passkey accuracy (llama_jax.infer.needle) at the stage's final
                       length over `needle_depths` (`needle_trials` trials each) >= threshold.
A failed gate writes `<stage dir>/gates.json` and stops the run with a `GateFailed` error naming the gate, the
measured value and the threshold; the stage is not marked finished, so a rerun (after fixing the config: pass
`--allow_config_change`, the stages are defining keys) resumes from its final checkpoint and re-checks the gates.
Passed gates, the needle table and `needle.png` (heat map) go into DONE.json / the stage directory.

Both kinds (options read by the driver when the stage starts from the previous stage's final checkpoint):
    carry_optimizer    True (default, as the paper trains on across its stages): AdamW's moments and bias
                       correction continue from the previous stage; the stage's own LR schedule starts at 0.
                       False: a fresh optimizer state (zero moments).
    continue_data      True (default): each data source shared with the previous stage continues its document
                       stream after the last document that stage used (same shuffle, nothing repeated); new
                       sources start at their beginning. False: the stage's own stream from its beginning.

anneal (section 3.4.3: LR linearly to 0 over the last tokens, high-quality sources upsampled, the annealing
checkpoints averaged): give the stage `optim(..., decay="linear", final_lr_ratio=0.0)` and `data` with the new
weights; option `average_last` = how many of the stage's checkpoints (steps > 0, the last included) are averaged
(exactly, streaming: llama_jax.train.averaging) into the final model, which is saved as the stage's checkpoint
`total_steps + 1` (what the next stage, `generate` and `convert` load). DONE.json records the loss of the last
checkpoint and of the average. Option `start_from` = an earlier stage to anneal from (default: the previous
one); the data-value probe (`data_value_probe`) anneals one checkpoint twice this way.
"""

from __future__ import annotations

import json
import os

import jax

from llama_jax import workdir as workdir_lib
from llama_jax.data import pipeline
from llama_jax.train import averaging
from llama_jax.train import checkpoint as ckpt_lib
from llama_jax.train import kinds as kinds_lib

# Read by the driver when the stage starts from the previous one (llama_jax.train.loop): the paper continues
# training across its long-context stages and into the anneal, so both default to True.
TRANSITION_OPTIONS = {"carry_optimizer": True, "continue_data": True}
LONG_CONTEXT_OPTIONS = {"short_seq_len": 0, "short_tolerance": 0.0, "needle_threshold": 0.0,
                        "needle_depths": (0.0, 0.25, 0.5, 0.75, 1.0), "needle_trials": 4, "needle_lengths": (),
                        **TRANSITION_OPTIONS}
ANNEAL_OPTIONS = {"average_last": 1, "start_from": "", **TRANSITION_OPTIONS}


class GateFailed(RuntimeError):
    """A long-context stage's gate did not pass (the message names the gate, the value and the threshold)."""


def _fill(stage: str, kind: str, raw, defaults: dict) -> dict:
    """The kind's options with defaults filled in; an unknown key is an error naming it."""
    unknown = sorted(set(raw) - set(defaults))
    if unknown:
        raise ValueError(f"stage {stage!r}: unknown option(s) {unknown} for kind {kind!r}; known: "
                         f"{sorted(defaults)}")
    return {**defaults, **dict(raw)}


def _options(stage, defaults: dict) -> dict:
    return _fill(stage.name, stage.kind, stage.options, defaults)


def _eval_loss(ctx, params, seq_len: int, global_batch: int) -> float:
    fn = ctx.eval_step(seq_len, global_batch)
    total = count = 0.0
    for b in pipeline.make_eval_iterator(ctx.data_cfg, ctx.tokenizer, seq_len, global_batch,
                                         num_batches=max(int(ctx.config.eval.batches), 1)):
        s, n = jax.device_get(fn(params, ctx.to_device(b)))
        total, count = total + float(s), count + float(n)
    if count == 0:
        raise ValueError(f"stage {ctx.stage.name!r}: the evaluation split has no tokens at length {seq_len}")
    return total / count


def _previous_stage(ctx):
    origin, _, name = ctx.stage.init_source.partition(":")
    return name if origin == "previous" else None


class LongContext(kinds_lib.Pretrain):
    name = "long_context"

    def options(self, stage, raw, total_steps):
        return _fill(stage, self.name, raw, LONG_CONTEXT_OPTIONS)

    def check_options(self, stage) -> None:
        o = _options(stage, LONG_CONTEXT_OPTIONS)
        final_len = stage.phases[-1].seq_len
        if int(o["short_seq_len"]) <= 0 or int(o["short_seq_len"]) > final_len:
            raise ValueError(f"stage {stage.name!r}: options.short_seq_len={o['short_seq_len']} must be in "
                             f"[1, {final_len}] (the stage's length)")
        for n in tuple(o["needle_lengths"]) or (final_len,):
            if int(n) > stage.model.max_seq_len:
                raise ValueError(f"stage {stage.name!r}: needle length {n} exceeds the model's max_seq_len "
                                 f"{stage.model.max_seq_len}")
        if not 0.0 <= float(o["needle_threshold"]) <= 1.0 or float(o["short_tolerance"]) < 0:
            raise ValueError(f"stage {stage.name!r}: options.needle_threshold must be in [0, 1] and "
                             f"short_tolerance >= 0, got {o['needle_threshold']}, {o['short_tolerance']}")

    def gates(self, ctx, params) -> dict:
        """Measures both gates; returns the report (gate -> value, threshold, passed) plus the needle table."""
        st = ctx.stage
        o = _options(st, LONG_CONTEXT_OPTIONS)
        short = int(o["short_seq_len"])
        last = st.phases[-1]
        batch = int(ctx.config.eval.global_batch) or max(last.tokens_per_step // short, 1)
        short_loss = _eval_loss(ctx, params, short, batch)
        report = {"short_loss": short_loss}
        prev = _previous_stage(ctx)
        if prev is not None:
            done = workdir_lib.read_done(ctx.workdir, prev) or {}
            ref = done.get("short_loss")
            if ref is None and done.get("final_seq_len") in (None, short):
                ref = done.get("eval_loss")
            if ref is None:
                raise ValueError(f"stage {st.name!r}: previous stage {prev!r} recorded no validation loss at "
                                 f"short_seq_len={short} (its DONE.json has no short_loss / eval_loss there)")
            report["gate_short_loss"] = {"value": short_loss - float(ref), "threshold": float(o["short_tolerance"]),
                                         "reference": float(ref)}
            report["gate_short_loss"]["passed"] = report["gate_short_loss"]["value"] <= float(o["short_tolerance"])
        from llama_jax.infer import needle  # noqa: PLC0415 - evaluation only at stage end

        lengths = tuple(int(n) for n in o["needle_lengths"]) or (last.seq_len,)
        tok = ctx.tokenizer
        result = needle.evaluate(st.model.replace(remat="none"), jax.device_get(params), tok.encode,
                                 tok.bos_id, lengths, tuple(o["needle_depths"]), trials=int(o["needle_trials"]),
                                 seed=st.seed)
        acc = result.mean(lengths[-1])
        report["needle"] = result.to_json()
        report["gate_needle"] = {"value": acc, "threshold": float(o["needle_threshold"]),
                                 "passed": acc >= float(o["needle_threshold"])}
        stage_dir = workdir_lib.stage_dir(ctx.workdir, st.name)
        if jax.process_index() == 0:
            os.makedirs(stage_dir, exist_ok=True)
            needle.write_heatmap(result, os.path.join(stage_dir, "needle.png"),
                                 title=f"{st.name}: passkey accuracy")
            workdir_lib.write_json_atomic(os.path.join(stage_dir, "gates.json"), report)
        return report

    def finish(self, ctx, state):
        report = self.gates(ctx, state.params)
        for gate in ("gate_short_loss", "gate_needle"):
            g = report.get(gate)
            if g is not None and not g["passed"]:
                op = "<=" if gate == "gate_short_loss" else ">="
                raise GateFailed(f"stage {ctx.stage.name!r}: gate {gate[5:]!r} failed: measured {g['value']:.4f}, "
                                 f"needs {op} {g['threshold']:g} (report: "
                                 f"{workdir_lib.stage_dir(ctx.workdir, ctx.stage.name)}/gates.json)")
        out = {"short_loss": report["short_loss"], "final_seq_len": ctx.stage.phases[-1].seq_len,
               "needle": report["needle"], "gates": {k: v for k, v in report.items() if k.startswith("gate_")}}
        return out


class Anneal(kinds_lib.Pretrain):
    name = "anneal"

    def options(self, stage, raw, total_steps):
        return _fill(stage, self.name, raw, ANNEAL_OPTIONS)

    def check_options(self, stage) -> None:
        o = _options(stage, ANNEAL_OPTIONS)
        if int(o["average_last"]) < 1:
            raise ValueError(f"stage {stage.name!r}: options.average_last={o['average_last']} must be >= 1")

    def finish(self, ctx, state):
        st = ctx.stage
        o = _options(st, ANNEAL_OPTIONS)
        directory = workdir_lib.checkpoints_dir(ctx.workdir, st.name)
        steps = [s for s in ckpt_lib.list_steps(directory) if 0 < s <= st.total_steps][-int(o["average_last"]):]
        if not steps:
            raise ValueError(f"stage {st.name!r}: no annealing checkpoint to average in {directory!r}")
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state.params)
        averaged = averaging.average_checkpoints(directory, steps, abstract)
        p = st.phases[-1]
        batch = int(ctx.config.eval.global_batch) or p.global_batch
        out = {"averaged_steps": steps, "final_seq_len": p.seq_len}
        if int(ctx.config.eval.batches):
            out["last_checkpoint_loss"] = _eval_loss(ctx, state.params, p.seq_len, batch)
            out["averaged_loss"] = _eval_loss(ctx, averaged, p.seq_len, batch)
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
    """The probe's outcome from the two stages' results (DONE.json): held-out loss of the averaged model
    without (`base_loss`) and with (`new_loss`) the new source, and `gain` = base_loss - new_loss (> 0: the
    new data helped on this held-out set)."""
    missing = [n for n in ("probe_base", "probe_new") if "averaged_loss" not in (results.get(n) or {})]
    if missing:
        raise ValueError(f"data-value probe: stage(s) {missing} recorded no held-out loss (finished, with "
                         "eval.batches > 0?)")
    base, new = float(results["probe_base"]["averaged_loss"]), float(results["probe_new"]["averaged_loss"])
    return {"base_loss": base, "new_loss": new, "gain": base - new}


kinds_lib.register(LongContext())
kinds_lib.register(Anneal())
