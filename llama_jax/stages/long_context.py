"""Stage kind `long_context`: a context-extension stage with gates (Llama 3 section 3.4.2: each extension stage
ends when short-context performance has recovered and needle-in-a-haystack is solved at the new length).

It trains like `pretrain` (next-token loss on the stage's mixture; the stage's own phases, optimizer,
`model_overrides` such as RoPE θ / max length and `data` overrides such as upsampled mixture weights) and
checks its gates at the end (options: `stages.options.LongContextOptions`):

    short_seq_len      the short length whose validation loss is gated (e.g. the pretraining length)
    short_tolerance    gate `short_loss`: loss(short, this stage) - loss(short, previous stage) <= tolerance.
                       The previous value is the previous stage's DONE.json `short_loss` (a long_context stage)
                       or `eval_loss` (a stage whose last phase ran at short_seq_len); evaluation batches hold
                       (tokens per step of the stage's last phase) / short_seq_len rows unless eval.global_batch
                       is set, i.e. the same rows as the pretraining stage's evaluation when tokens per batch are
                       constant.
    needle_threshold   gate `needle`: mean passkey accuracy (llama_jax.infer.needle) at the stage's final
                       length over `needle_depths` (`needle_trials` trials each) >= threshold.
    carry_optimizer, continue_data: see `stages.options.Transition` (both True by default, as the paper trains
                       on across its stages).
A failed gate writes `<stage dir>/gates.json` and stops the run with a `GateFailed` error naming the gate, the
measured value and the threshold; the stage is not marked finished, so a rerun (after fixing the config: pass
`--allow_config_change`, the stages are defining keys) resumes from its final checkpoint and re-checks the gates.
Passed gates, the needle table and `needle.png` (heat map) go into DONE.json / the stage directory.
"""

from __future__ import annotations

import os

import jax

from llama_jax import workdir as workdir_lib
from llama_jax.stages import options as options_lib
from llama_jax.stages.pretrain import Pretrain, eval_loss


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
        for n in options.needle_lengths or (final_len,):
            if n > stage.model.max_seq_len:
                raise ValueError(f"stage {stage.name!r}: needle length {n} exceeds the model's max_seq_len "
                                 f"{stage.model.max_seq_len}")

    def gates(self, ctx, params) -> dict:
        """Measures both gates; returns the report (gate -> value, threshold, passed) plus the needle table."""
        st, options = ctx.stage, ctx.stage.options
        short = options.short_seq_len
        last = st.phases[-1]
        batch = int(ctx.config.eval.global_batch) or max(last.tokens_per_step // short, 1)
        short_loss, _ = eval_loss(ctx, params, short, batch, max(int(ctx.config.eval.batches), 1))
        report = {"short_loss": short_loss}
        if st.previous is not None:
            done = workdir_lib.read_done(ctx.workdir, st.previous) or {}
            ref = done.get("short_loss")
            if ref is None and done.get("final_seq_len") in (None, short):
                ref = done.get("eval_loss")
            if ref is None:
                raise ValueError(f"stage {st.name!r}: previous stage {st.previous!r} recorded no validation loss at "
                                 f"short_seq_len={short} (its DONE.json has no short_loss / eval_loss there)")
            value = short_loss - float(ref)
            report["gate_short_loss"] = {"value": value, "threshold": options.short_tolerance, "reference": float(ref),
                                         "passed": value <= options.short_tolerance}
        from llama_jax.infer import needle  # noqa: PLC0415 - evaluation only at stage end

        lengths = options.needle_lengths or (last.seq_len,)
        tok = ctx.tokenizer
        result = needle.evaluate(st.model.replace(remat="none"), jax.device_get(params), tok.encode,
                                 tok.bos_id, lengths, options.needle_depths, trials=options.needle_trials, seed=st.seed)
        acc = result.mean(lengths[-1])
        report["needle"] = result.to_json()
        report["gate_needle"] = {"value": acc, "threshold": options.needle_threshold, "passed": acc >= options.needle_threshold}
        stage_dir = workdir_lib.stage_dir(ctx.workdir, st.name)
        if jax.process_index() == 0:
            os.makedirs(stage_dir, exist_ok=True)
            needle.write_heatmap(result, os.path.join(stage_dir, "needle.png"), title=f"{st.name}: passkey accuracy")
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
        return {"short_loss": report["short_loss"], "final_seq_len": ctx.stage.phases[-1].seq_len,
                "needle": report["needle"], "gates": {k: v for k, v in report.items() if k.startswith("gate_")}}


__all__ = ["GateFailed", "LongContext"]
