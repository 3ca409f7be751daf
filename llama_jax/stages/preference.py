"""The part of the `reward` and `dpo` kinds that is the same: a step's rows are the preference records' roles
(chosen, rejected[, edited]) laid out by `common.Collate`, read from the stage's `preferences` files; records
an annotator labelled weaker than the stage's `strengths` are left out (counted as `weaker` in DONE.json's
`data`)."""

from __future__ import annotations

from llama_jax.posttrain import data as data_lib
from llama_jax.stages import common
from llama_jax.train import kind as kind_lib


class PreferenceKind(kind_lib.StageKind):
    """A kind trained on preference records: each step's rows are the records' `ROLES`, record by record."""

    ROLES: tuple[str, ...] = ()

    def batch_granule(self, stage) -> int:
        return common.granule(stage, len(self.ROLES))

    def check_data(self, stage) -> None:
        options = stage.options
        common.check_files(stage, (options.preferences, "preference"), (options.eval_preferences, "preference"),
                           (options.eval_prompts, "prompt"))

    def read(self, ctx, specs) -> tuple[list[dict], object]:
        """The preference records of one setting or a list of them, with one read report over them."""
        records, report = [], None
        for spec in specs if isinstance(specs, tuple) else (specs,):
            got, rep = common.read_records(ctx, spec, "preference")
            records += got
            report = rep if report is None else type(rep)(
                f"{report.path},{rep.path}", report.total + rep.total, report.kept + rep.kept,
                report.malformed + rep.malformed, report.examples + rep.examples)
        return records, report

    def finish(self, ctx, state):
        if "data" not in ctx.cache:  # resumed at its end: the train data was not read in this process
            self.examples(ctx, ctx.stage.options.preferences, ctx.stage.phases[-1].seq_len)
        return {"data": ctx.cache["data"]}

    def rows(self, ctx, record: dict, seq_len: int) -> dict | None:
        """{role: row} of one preference record, or None when it does not fit `seq_len` (the kind's layout)."""
        raise NotImplementedError

    def examples(self, ctx, spec, seq_len: int, record: bool = True) -> list[dict]:
        """{role: row} per record of the preference file(s) `spec` that fits `seq_len`; `record`: its data report
        is the stage's DONE.json `data`."""
        labelled, report = self.read(ctx, spec)
        records = data_lib.keep_strengths(labelled, ctx.stage.options.strengths)
        examples = [rows for rows in (self.rows(ctx, r, seq_len) for r in records) if rows is not None]
        data = common.report(ctx, report, len(records) - len(examples), weaker=len(labelled) - len(records))
        if record:
            ctx.cache["data"] = data
        if not examples:
            weaker = f" ({len(labelled) - len(records)} labelled weaker than {list(ctx.stage.options.strengths)})" \
                if len(labelled) > len(records) else ""
            raise ValueError(f"stage {ctx.stage.name!r}: no preference record of {report.path!r} fits the sequence "
                             f"length {seq_len}{weaker}")
        return examples

    def train_iterator(self, ctx, phase, start_documents):
        p = ctx.stage.phases[phase]
        _, records = common.local_rows(ctx, phase, len(self.ROLES))
        spec = ctx.stage.options.preferences
        examples = ctx.cached(("train", spec, p.seq_len), lambda: self.examples(ctx, spec, p.seq_len))
        return common.example_iterator(ctx, examples, records, ctx.stage.iterator_seed() + phase,
                                       common.Collate(self.ROLES, ctx.stage.grad_accum))

    def eval_examples(self, ctx, phase: int) -> list[dict]:
        """The first 256 records of eval_preferences (or preferences) at the phase's length."""
        options, p = ctx.stage.options, ctx.stage.phases[phase]
        spec = options.eval_preferences or options.preferences
        return ctx.cached(("eval", spec, p.seq_len), lambda: self.examples(ctx, spec, p.seq_len, record=False)[:256])


__all__ = ["PreferenceKind"]
