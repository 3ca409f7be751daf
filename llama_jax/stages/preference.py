"""The part of the `reward` and `dpo` kinds that is the same: a step's rows are the preference records' roles
(chosen, rejected[, edited]) laid out by `common.Collate`, read from the stage's `preferences` file."""

from __future__ import annotations

from llama_jax.stages import common
from llama_jax.train import kind as kind_lib


class PreferenceKind(kind_lib.StageKind):
    """A kind trained on preference records: each step's rows are the records' `ROLES`, record by record."""

    ROLES: tuple[str, ...] = ()

    def batch_granule(self, stage) -> int:
        return common.granule(stage, len(self.ROLES))

    def examples(self, ctx, spec, seq_len: int) -> list[dict]:
        """{role: row} per record of the preference file `spec` that fits `seq_len`."""
        raise NotImplementedError

    def train_iterator(self, ctx, phase, start_documents):
        p = ctx.stage.phases[phase]
        _, records = common.local_rows(ctx, phase, len(self.ROLES))
        spec = ctx.stage.options.preferences
        examples = ctx.cached(("train", str(spec), p.seq_len), lambda: self.examples(ctx, spec, p.seq_len))
        return common.example_iterator(ctx, examples, records, ctx.stage.iterator_seed() + phase,
                                       common.Collate(self.ROLES, ctx.stage.grad_accum))

    def eval_examples(self, ctx, phase: int) -> list[dict]:
        """The first 256 records of eval_preferences (or preferences) at the phase's length."""
        o, p = ctx.stage.options, ctx.stage.phases[phase]
        spec = o.eval_preferences or o.preferences
        return ctx.cached(("eval", str(spec), p.seq_len), lambda: self.examples(ctx, spec, p.seq_len)[:256])


__all__ = ["PreferenceKind"]
