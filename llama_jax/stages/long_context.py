"""Stage kind `long_context`: a context-extension stage with gates (Llama 3 section 3.4.2: each extension stage
ends when short-context performance has fully recovered and needle-in-a-haystack is solved at the new length).

It trains like `pretrain` (next-token loss on the stage's mixture; the stage's own phases, optimizer,
`model_overrides` such as RoPE θ / max length and `data` overrides such as upsampled mixture weights) and
checks its gates at the end (options: `stages.options.LongContextOptions`):

    short_seq_len      the short length whose validation loss is gated (e.g. the pretraining length)
    short_tolerance    gate `short_loss`: loss(short, this stage) - loss(short, short-context model) <= tolerance.
                       The short-context model is the one the extension started from: the init source of the
                       first of a run of consecutive long_context stages (a pretraining stage or `init_from`),
                       recorded as `short_model` in each stage's DONE.json and passed on. Every stage measures it
                       again on its own evaluation rows (the same rows as its own loss), so every stage of the
                       extension is gated against the same model and drift cannot add up stage by stage.
                       Evaluation batches hold (tokens per step of the stage's last phase) / short_seq_len rows
                       unless eval.global_batch is set.
    needle_threshold   gate `needle`: mean passkey accuracy (llama_jax.infer.needle) over `needle_depths`
                       (`needle_trials` trials each) >= threshold at every one of `needle_lengths`, which must not
                       exceed the stage's final length (default: short_seq_len doubled up to the final length, and
                       the final length); the gate's value is the lowest of them.
    carry_optimizer, continue_data: see `stages.options.Transition` (both True by default: a choice; the paper
                       does not say whether optimizer state carries across its stages).
A long_context stage cannot start from scratch (there is no short-context model to gate against): the
experiment is refused when it is resolved. A failed gate writes `<stage dir>/gates.json` and stops the run with a
`GateFailed` error naming the gate, the length, the measured value and the threshold; the stage is not marked
finished, so a rerun (after fixing the config: pass `--allow_config_change`, the stages are defining keys)
resumes from its final checkpoint and re-checks the gates. Passed gates, the needle table and `needle.png`
(heat map) go into DONE.json / the stage directory.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import jax

from llama_jax import workdir as workdir_lib
from llama_jax.stages import options as options_lib
from llama_jax.stages.pretrain import Pretrain, eval_loss
from llama_jax.train import resume


def needle_lengths(options, final_len: int) -> tuple[int, ...]:
    """The lengths the needle gate checks: `options.needle_lengths`, or short_seq_len doubled up to the final
    length, and the final length."""
    if options.needle_lengths:
        return tuple(options.needle_lengths)
    out, n = [], max(options.short_seq_len, 1)
    while n < final_len:
        out.append(n)
        n *= 2
    return tuple(out) + (final_len,)


def needle_gate(accuracy: Mapping[int, float], threshold: float) -> dict:
    """The needle gate over {length: mean accuracy}: it passes when every length reaches `threshold`; its value
    is the lowest accuracy, at `length` (the longest of equals)."""
    worst = min(accuracy, key=lambda n: (accuracy[n], -n))
    return {"value": accuracy[worst], "length": worst, "threshold": threshold,
            "by_length": {str(n): a for n, a in accuracy.items()}, "passed": accuracy[worst] >= threshold}


def short_model(ctx) -> str:
    """The init source (`experiment.Stage.init_source`) of the short-context model the extension started from:
    the previous stage's `short_model` when that stage is a long_context stage, else this stage's own source."""
    st = ctx.stage
    if st.previous is not None:
        done = workdir_lib.read_done(ctx.workdir, st.previous) or {}
        if done.get("short_model"):
            return done["short_model"]
    return st.init_source


class GateFailed(RuntimeError):
    """A long-context stage's gate did not pass (the message names the gate, the value and the threshold)."""


class LongContext(Pretrain):
    name = "long_context"
    Options = options_lib.LongContextOptions

    def check(self, stage) -> None:
        options = stage.options
        final_len = stage.phases[-1].seq_len
        if options.short_seq_len <= 0 or options.short_seq_len > final_len:
            raise ValueError(f"stage {stage.name!r}: options.short_seq_len={options.short_seq_len} must be in "
                             f"[1, {final_len}] (the stage's length)")
        for n in options.needle_lengths:
            if not 0 < n <= final_len:
                raise ValueError(f"stage {stage.name!r}: needle length {n} must be in [1, {final_len}] (the stage's "
                                 "length: the needle gate checks the lengths up to it)")
        if stage.init_source == "scratch":
            raise ValueError(f"stage {stage.name!r} (long_context) starts from scratch, but its gates compare with "
                             "the short-context model it extends: set config.init_from to that model's checkpoints "
                             "or put its pretraining stage first")

    def gates(self, ctx, params) -> dict:
        """Measures both gates; returns the report (gate -> value, threshold, passed) plus the needle table."""
        st, options = ctx.stage, ctx.stage.options
        short = options.short_seq_len
        last = st.phases[-1]
        batch = int(ctx.config.eval.global_batch) or max(last.tokens_per_step // short, 1)
        short_loss, _ = eval_loss(ctx, params, short, batch, max(int(ctx.config.eval.batches), 1))
        origin = short_model(ctx)
        reference = resume.start_params(ctx.workdir, dataclasses.replace(st, init_source=origin), ctx.mesh, ctx.rules)
        ref_loss, _ = eval_loss(ctx, reference, short, batch, max(int(ctx.config.eval.batches), 1))
        del reference
        value = short_loss - ref_loss
        report = {"short_loss": short_loss, "short_model": origin,
                  "gate_short_loss": {"value": value, "threshold": options.short_tolerance, "reference": ref_loss,
                                      "passed": value <= options.short_tolerance}}
        from llama_jax.infer import needle  # noqa: PLC0415 - evaluation only at stage end

        lengths = needle_lengths(options, last.seq_len)
        tok = ctx.tokenizer
        result = needle.evaluate(st.model.replace(remat="none"), jax.device_get(params), tok.encode,
                                 tok.bos_id, lengths, options.needle_depths, trials=options.needle_trials, seed=st.seed)
        report["needle"] = result.to_json()
        report["gate_needle"] = needle_gate({n: result.mean(n) for n in lengths}, options.needle_threshold)
        stage_dir = workdir_lib.stage_dir(ctx.workdir, st.name)
        if jax.process_index() == 0:
            os.makedirs(stage_dir, exist_ok=True)
            needle.write_heatmap(result, os.path.join(stage_dir, "needle.png"), title=f"{st.name}: passkey accuracy")
            workdir_lib.write_json_atomic(os.path.join(stage_dir, "gates.json"), report)
        return report

    def finish(self, ctx, state):
        report = self.gates(ctx, state.params)
        short = ctx.stage.options.short_seq_len
        for gate, op, where in (("gate_short_loss", "<=", f"at length {short} (vs the short-context model)"),
                                ("gate_needle", ">=", f"at length {report['gate_needle']['length']}")):
            g = report[gate]
            if not g["passed"]:
                raise GateFailed(f"stage {ctx.stage.name!r}: gate {gate[5:]!r} failed {where}: measured "
                                 f"{g['value']:.4f}, needs {op} {g['threshold']:g} (report: "
                                 f"{workdir_lib.stage_dir(ctx.workdir, ctx.stage.name)}/gates.json)")
        return {"short_loss": report["short_loss"], "short_model": report["short_model"],
                "final_seq_len": ctx.stage.phases[-1].seq_len, "needle": report["needle"],
                "gates": {k: v for k, v in report.items() if k.startswith("gate_")}}


__all__ = ["GateFailed", "LongContext", "needle_gate", "needle_lengths", "short_model"]
